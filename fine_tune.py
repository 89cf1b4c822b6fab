#!/usr/bin/env python3
"""Fine-tune a pretrained backbone on an image folder, starting from a linear probe.

    python fine_tune.py data/flowers --backbone resnet50 --epochs 10 \\
        --unfreeze conv5 --output-dir runs/flowers_r50

Stage 1 fits a linear probe on the frozen codes and folds it into the head (or trains
a new head on them), stage 2 trains the head and the unfrozen top of the backbone.
`--weights none` trains from scratch. Re-running the same command resumes an
interrupted run. See --help.
"""

from __future__ import annotations

import argparse
import sys

from tl import cli


def build_parser() -> cli.ArgumentParser:
    from tl.finetune import (
        AUGMENTATIONS,
        DEFAULT_DROPOUT,
        DEFAULT_HEAD_EPOCHS,
        GLOBAL_POOLINGS,
        HEAD_INITS,
        HEADS,
        FineTuneSettings,
    )
    from tl.finetune.cache import DEFAULT_MEMORY_GB
    from tl.finetune.settings import DEFAULT_LEARNING_RATE, SCRATCH_LEARNING_RATE

    defaults = FineTuneSettings()
    parser = cli.ArgumentParser(
        description="Fine-tune a keras.applications backbone with a new head: stage 1 "
        "starts the head as a linear probe on the frozen codes (computed once), stage "
        "2 also trains the unfrozen top of the backbone, with warmup and cosine decay; "
        "the model kept is never worse on validation than the probe. --weights none "
        "trains from scratch. Writes model.keras, training curves and a test "
        "evaluation in the classifier leaderboard's format. Re-running the same "
        "command resumes an interrupted run.",
    )
    parser.add_argument(
        "source",
        nargs="?",
        help="image folder with one sub-folder per class, or a CSV with a "
        "path,label header",
    )
    parser.add_argument(
        "-o", "--output-dir", help="run folder to write [runs/<source>_<backbone>]"
    )
    model = parser.add_argument_group("model")
    cli.add_backbone_options(
        model,
        defaults.backbone,
        backbone_help="backbone name (see --list-backbones); resnet50 trains at about "
        "a quarter of vgg16's cost per image",
        seed_help="seed of initialisation, splits, shuffling and augmentation",
        weights_help="imagenet, a weights file, or none: random weights, trained "
        "from scratch",
    )
    model.add_argument("--pooling", default=defaults.pooling, choices=GLOBAL_POOLINGS)
    model.add_argument("--head", default=defaults.head, choices=HEADS)
    model.add_argument(
        "--hidden-units",
        type=int,
        default=defaults.hidden_units,
        help="width of the mlp head",
    )
    model.add_argument(
        "--dropout",
        type=float,
        default=defaults.dropout,
        help=f"dropout before the head [0 for a probe head, else {DEFAULT_DROPOUT}]",
    )
    model.add_argument(
        "--head-init",
        default=defaults.head_init,
        choices=HEAD_INITS,
        help="stage 1: probe (a logistic regression on the frozen codes, C chosen by "
        "CV, folded exactly into the head) or random (a new head trained for "
        "--head-epochs on the codes) [probe for a linear head, else random]",
    )
    model.add_argument(
        "--init-head",
        metavar="MODEL_DIR",
        default=defaults.init_head,
        help="start the head from a linear classifier saved by train_classifier.py "
        "on --layers last codes of the same backbone and weights (LP-FT) instead of "
        "fitting one",
    )
    model.add_argument(
        "--from-scratch",
        action=argparse.BooleanOptionalAction,
        default=defaults.from_scratch,
        help="train every layer from random weights, BatchNorm in training mode, "
        "head and backbone together [with --weights none]; --no-from-scratch "
        "fine-tunes random weights like pretrained ones (tests)",
    )
    schedule = parser.add_argument_group("schedule")
    schedule.add_argument(
        "--head-epochs",
        type=int,
        default=defaults.head_epochs,
        help=f"stage 1 epochs on the frozen codes [0 for a probe head, else "
        f"{DEFAULT_HEAD_EPOCHS}]",
    )
    schedule.add_argument(
        "--epochs",
        type=int,
        default=defaults.epochs,
        help="stage 2 epochs (0: head only)",
    )
    schedule.add_argument(
        "--unfreeze",
        default=defaults.unfreeze,
        help="what stage 2 trains: a block alias (conv5, block5, stage4, last: that "
        "block and all above), a layer name (it and all above), all, or a fraction "
        "of the layers with weights (0.3: the top 30%%)",
    )
    schedule.add_argument("--batch-size", type=int, default=defaults.batch_size)
    schedule.add_argument(
        "--head-lr",
        dest="head_learning_rate",
        metavar="LR",
        type=float,
        default=defaults.head_learning_rate,
        help="stage 1 learning rate",
    )
    schedule.add_argument(
        "--lr",
        dest="learning_rate",
        metavar="LR",
        type=float,
        default=defaults.learning_rate,
        help=f"stage 2 peak learning rate [{DEFAULT_LEARNING_RATE:g}, "
        f"{SCRATCH_LEARNING_RATE:g} from scratch]",
    )
    schedule.add_argument(
        "--warmup-epochs",
        type=float,
        default=defaults.warmup_epochs,
        help="stage 2 linear warmup, then cosine decay to 0",
    )
    schedule.add_argument(
        "--patience",
        type=int,
        default=defaults.patience,
        help="stop a stage after this many epochs without a better model on "
        "validation (0: never)",
    )
    regular = parser.add_argument_group("regularisation")
    regular.add_argument(
        "--augment",
        action=cli.ListOption,
        positional="source",
        nargs="*",
        default=list(defaults.augment),
        choices=list(AUGMENTATIONS),
        help="random training transformations (photographs: flip rotation zoom "
        "contrast; leave off for data where orientation or contrast carry meaning)",
    )
    regular.add_argument(
        "--label-smoothing", type=float, default=defaults.label_smoothing
    )
    regular.add_argument(
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help="AdamW decoupled weight decay",
    )
    regular.add_argument(
        "--l2-sp",
        type=float,
        default=defaults.l2_sp,
        help="strength of the L2-SP penalty pulling the backbone towards its "
        "pretrained weights (e.g. 0.01)",
    )
    cli.add_class_weight_option(
        regular, "balanced: weight the loss by n / (classes * class count)"
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--val-split",
        type=float,
        default=defaults.val_split,
        help="stratified validation fraction (0: no validation)",
    )
    data.add_argument("--val-dir", help="separate validation folder")
    data.add_argument("--test-split", type=float, default=defaults.test_split)
    data.add_argument("--test-dir", help="separate test folder")
    cli.add_image_options(data, defaults.image)
    run = parser.add_argument_group("run")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous run in --output-dir instead of resuming it",
    )
    run.add_argument(
        "--cache-memory",
        dest="cache_memory_gb",
        metavar="GB",
        type=float,
        default=DEFAULT_MEMORY_GB,
        help="stage 2's cache (the frozen part's output, or decoded images) stays "
        "in memory up to this size, else goes to <output-dir>/cache/",
    )
    run.add_argument(
        "--keep-cache",
        action="store_true",
        help="keep <output-dir>/cache/ after the run",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    cli.add_info_options(parser)
    return parser


def _command(args: argparse.Namespace) -> int:
    from tl.errors import TLError
    from tl.finetune import FineTuneSettings, fine_tune

    if cli.handle_info(args):
        return 0
    if not args.source:
        raise TLError("Give an image folder (one sub-folder per class) or a CSV.")
    settings = FineTuneSettings.from_json(vars(args))
    output = cli.check_output(
        args.output_dir
        or cli.default_output("runs", args.source, settings.backbone.name),
        "--output-dir",
        folder=True,
    )
    result = fine_tune(
        args.source,
        output,
        settings,
        val_source=args.val_dir,
        test_source=args.test_dir,
        overwrite=args.overwrite,
        progress=not args.quiet,
        cache_memory_gb=args.cache_memory_gb,
        keep_cache=args.keep_cache,
    )
    metrics = result.metrics
    best = ""
    if result.best_epoch == -1:
        best = ", kept: the model before training"
    elif result.best_epoch is not None:
        best = f", kept: epoch {result.best_epoch + 1}"
    print(
        f"{result.directory}: test accuracy {metrics['accuracy']:.4f}, balanced "
        f"accuracy {metrics['balanced_accuracy']:.4f}, macro-F1 "
        f"{metrics['macro_f1']:.4f} ({result.epochs_run} epochs{best}); model in "
        f"{result.directory / 'model.keras'}"
    )
    cli.print_precision_hint(settings.backbone, training=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(build_parser, _command, argv)


if __name__ == "__main__":
    sys.exit(main())
