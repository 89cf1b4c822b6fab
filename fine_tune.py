#!/usr/bin/env python3
"""Fine-tune a pretrained backbone on an image folder, optionally from a linear probe.

    python fine_tune.py data/flowers --backbone resnet50 --epochs 10 \\
        --unfreeze conv5 --init-head results/flowers/best_model \\
        --output-dir runs/flowers_r50

Stage 1 trains the head on the frozen backbone, stage 2 the head and the unfrozen top
of the backbone. Re-running the same command resumes an interrupted run. See --help.
"""

from __future__ import annotations

import argparse
import sys

from tl.cli import ArgumentParser, ListOption, check_output, default_output, run_cli


def build_parser() -> ArgumentParser:
    from tl.finetune import (
        AUGMENTATIONS,
        DEFAULT_DROPOUT,
        DEFAULT_HEAD_EPOCHS,
        GLOBAL_POOLINGS,
        HEADS,
        FineTuneSettings,
    )
    from tl.images import INTERPOLATIONS, RESIZE_MODES

    default = FineTuneSettings().to_json()
    parser = ArgumentParser(
        description="Fine-tune a keras.applications backbone with a new head: stage 1 "
        "trains the head on the frozen backbone, stage 2 also the unfrozen top of the "
        "backbone, with warmup and cosine decay. Writes model.keras, training curves "
        "and a test evaluation in the classifier leaderboard's format. Re-running the "
        "same command resumes an interrupted run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    model.add_argument(
        "-b",
        "--backbone",
        default=default["backbone"],
        help="backbone name (see --list-backbones)",
    )
    model.add_argument(
        "-w",
        "--weights",
        default=default["weights"],
        help="imagenet, none (random, for tests) or a weights file",
    )
    model.add_argument("--pooling", default=default["pooling"], choices=GLOBAL_POOLINGS)
    model.add_argument("--head", default=default["head"], choices=HEADS)
    model.add_argument(
        "--hidden-units",
        type=int,
        default=default["hidden_units"],
        help="width of the mlp head",
    )
    model.add_argument(
        "--dropout",
        type=float,
        help=f"dropout before the head [0 with --init-head, else {DEFAULT_DROPOUT}]",
    )
    model.add_argument(
        "--init-head",
        metavar="MODEL_DIR",
        help="start the head from a linear classifier saved by train_classifier.py "
        "on --layers last codes of the same backbone and weights (LP-FT)",
    )
    model.add_argument(
        "--precision",
        default=default["precision"],
        choices=["float32", "bfloat16", "float16"],
        help="compute precision (mixed: float32 weights and head)",
    )
    model.add_argument(
        "--seed",
        type=int,
        default=default["seed"],
        help="seed of initialisation, splits, shuffling and augmentation",
    )
    schedule = parser.add_argument_group("schedule")
    schedule.add_argument(
        "--head-epochs",
        type=int,
        help=f"stage 1 epochs, backbone frozen [0 with --init-head, else "
        f"{DEFAULT_HEAD_EPOCHS}]",
    )
    schedule.add_argument(
        "--epochs",
        type=int,
        default=default["epochs"],
        help="stage 2 epochs (0: head only)",
    )
    schedule.add_argument(
        "--unfreeze",
        default=default["unfreeze"],
        help="what stage 2 trains: a block alias (conv5, block5, stage4, last: that "
        "block and all above), a layer name (it and all above), all, or a fraction "
        "of the layers with weights (0.3: the top 30%%)",
    )
    schedule.add_argument("--batch-size", type=int, default=default["batch_size"])
    schedule.add_argument(
        "--head-lr",
        type=float,
        default=default["head_learning_rate"],
        help="stage 1 learning rate",
    )
    schedule.add_argument(
        "--lr",
        type=float,
        default=default["learning_rate"],
        help="stage 2 peak learning rate",
    )
    schedule.add_argument(
        "--warmup-epochs",
        type=float,
        default=default["warmup_epochs"],
        help="stage 2 linear warmup, then cosine decay to 0",
    )
    schedule.add_argument(
        "--patience",
        type=int,
        default=default["patience"],
        help="stop a stage after this many epochs without a lower val_loss (0: never)",
    )
    regular = parser.add_argument_group("regularisation")
    regular.add_argument(
        "--augment",
        action=ListOption,
        positional="source",
        nargs="*",
        default=[],
        choices=list(AUGMENTATIONS),
        help="random training transformations (photographs: flip rotation zoom "
        "contrast; leave off for data where orientation or contrast carry meaning)",
    )
    regular.add_argument(
        "--label-smoothing", type=float, default=default["label_smoothing"]
    )
    regular.add_argument(
        "--weight-decay",
        type=float,
        default=default["weight_decay"],
        help="AdamW decoupled weight decay",
    )
    regular.add_argument(
        "--l2-sp",
        type=float,
        default=default["l2_sp"],
        help="strength of the L2-SP penalty pulling the backbone towards its "
        "pretrained weights (e.g. 0.01)",
    )
    regular.add_argument(
        "--class-weight",
        choices=["none", "balanced"],
        default="none",
        help="balanced: weight the loss by n / (classes * class count)",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--val-split",
        type=float,
        default=default["val_split"],
        help="stratified validation fraction (0: no validation)",
    )
    data.add_argument("--val-dir", help="separate validation folder")
    data.add_argument("--test-split", type=float, default=default["test_split"])
    data.add_argument("--test-dir", help="separate test folder")
    data.add_argument("-s", "--image-size", help="N or HxW [the backbone's default]")
    data.add_argument("--resize", default=default["resize"], choices=RESIZE_MODES)
    data.add_argument(
        "--interpolation", default=default["interpolation"], choices=INTERPOLATIONS
    )
    data.add_argument("--antialias", action="store_true")
    data.add_argument("--max-pixels", type=int, default=default["max_pixels"])
    run = parser.add_argument_group("run")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous run in --output-dir instead of resuming it",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    info = parser.add_argument_group("information")
    info.add_argument(
        "--list-backbones", action="store_true", help="list the backbones and exit"
    )
    info.add_argument(
        "--list-layers",
        metavar="BACKBONE",
        help="list aliases and layers of BACKBONE (at --image-size) and exit",
    )
    return parser


def _command(args: argparse.Namespace) -> int:
    from tl import backbones
    from tl.errors import TLError
    from tl.finetune import FineTuneSettings, fine_tune
    from tl.precision import half_precision_hint

    if args.list_backbones:
        print(backbones.describe_backbones())
        return 0
    if args.list_layers:
        settings = FineTuneSettings.create(
            backbone=args.list_layers, image_size=args.image_size
        ).resolved()
        print(backbones.describe_layers(settings.backbone.name, settings.image.size))
        return 0
    if not args.source:
        raise TLError("Give an image folder (one sub-folder per class) or a CSV.")
    settings = FineTuneSettings.create(
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        resize=args.resize,
        interpolation=args.interpolation,
        antialias=args.antialias,
        max_pixels=args.max_pixels,
        precision=args.precision,
        seed=args.seed,
        pooling=args.pooling,
        head=args.head,
        hidden_units=args.hidden_units,
        dropout=args.dropout,
        init_head=args.init_head,
        unfreeze=args.unfreeze,
        head_epochs=args.head_epochs,
        epochs=args.epochs,
        batch_size=args.batch_size,
        head_learning_rate=args.head_lr,
        learning_rate=args.lr,
        warmup_epochs=args.warmup_epochs,
        augment=args.augment,
        label_smoothing=args.label_smoothing,
        weight_decay=args.weight_decay,
        l2_sp=args.l2_sp,
        class_weight=None if args.class_weight == "none" else args.class_weight,
        val_split=args.val_split,
        test_split=args.test_split,
        patience=args.patience,
    )
    output = check_output(
        args.output_dir or default_output("runs", args.source, settings.backbone.name),
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
    )
    metrics = result.metrics
    best = ""
    if result.best_epoch == -1:
        best = ", best: the model before training"
    elif result.best_epoch is not None:
        best = f", best epoch {result.best_epoch + 1}"
    print(
        f"{result.directory}: test accuracy {metrics['accuracy']:.4f}, balanced "
        f"accuracy {metrics['balanced_accuracy']:.4f}, macro-F1 "
        f"{metrics['macro_f1']:.4f} ({result.epochs_run} epochs{best}); model in "
        f"{result.directory / 'model.keras'}"
    )
    hint = half_precision_hint(args.precision, args.backbone, training=True)
    if hint:  # after the work: a refusal of bad input stays one line
        print(f"hint: {hint}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _command(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
