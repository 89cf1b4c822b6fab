#!/usr/bin/env python3
"""Which cs231n scenario is this dataset in? Measure it, and run the comparison.

    python advise.py data/flowers                        # advice.json, experiment.toml
    python advise.py data/flowers --backbone resnet50 --budget 5 --run

Measures the images per class, a learning curve and the layer profile (a CV'd
logistic regression on every stage's codes), names the scenario (small or large,
similar or different), and writes the experiment that compares the recommended
strategy with the contrasting one; --run runs it and says whether the measured
winner agrees with the advice.
"""

from __future__ import annotations

import argparse
import sys

from tl import cli


def build_parser() -> cli.ArgumentParser:
    from tl.advisor.advice import DEFAULT_EPOCHS
    from tl.backbones import BackboneSettings
    from tl.experiment.spec import DEFAULT_CACHE_DIR
    from tl.features import DEFAULT_BACKBONE
    from tl.images import ImageSettings

    parser = cli.ArgumentParser(
        description="Measure an image dataset's size and its similarity to the "
        "backbone's source data, name its scenario (small/large, similar/"
        "different) with the numbers, and write the experiment that checks the "
        "advice; --run runs it.",
    )
    parser.add_argument(
        "source",
        nargs="?",
        help="image folder with one sub-folder per class, or a CSV with a "
        "path,label header",
    )
    parser.add_argument(
        "--test", help="separate test images for the comparison [20%% held out]"
    )
    parser.add_argument(
        "-o", "--output-dir", help="folder to write [advice/<source>_<backbone>]"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=10.0,
        metavar="MINUTES",
        help="caps the measured images, the stages and the CV folds",
    )
    parser.add_argument(
        "--run", action="store_true", help="run the comparison and judge its winner"
    )
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    parser.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help="epochs of the fine-tunes the comparison runs",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    model = parser.add_argument_group("model")
    cli.add_backbone_options(model, BackboneSettings(DEFAULT_BACKBONE))
    model.add_argument(
        "--head-weights",
        metavar="FILE",
        help="the backbone's include-top ImageNet weights, for the head's "
        "confidence offline [Keras' download with --weights imagenet]",
    )
    cli.add_image_options(parser.add_argument_group("images"), ImageSettings())
    cli.add_info_options(parser)
    return parser


def _command(args: argparse.Namespace) -> int:
    from tl.advisor import advise
    from tl.backbones import BackboneSettings
    from tl.errors import TLError
    from tl.images import ImageSettings

    if cli.handle_info(args):
        return 0
    if not args.source:
        raise TLError("Give the image folder or CSV to advise on.")
    if args.budget <= 0:
        raise TLError(
            f"--budget must be a positive number of minutes, got {args.budget}."
        )
    advise(
        args.source,
        BackboneSettings.from_json(vars(args)),
        ImageSettings.from_json(vars(args)),
        test=args.test,
        budget_minutes=args.budget,
        output_dir=args.output_dir,
        cache_dir=args.cache_dir,
        head_weights=args.head_weights,
        epochs=args.epochs,
        run=args.run,
        progress=not args.quiet,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(build_parser, _command, argv)


if __name__ == "__main__":
    sys.exit(main())
