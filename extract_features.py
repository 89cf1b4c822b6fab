#!/usr/bin/env python3
"""Extract the CNN codes of several layers of a pretrained backbone into an HDF5 file.

    python extract_features.py data/flowers --backbone vgg16 \\
        --layers block3_pool block4_pool block5_pool --pooling avg \\
        --output features/flowers_vgg16.h5

Re-running the same command resumes an interrupted run. See --help for everything.
"""

from __future__ import annotations

import argparse
import sys

from tl import cli
from tl._checks import ParameterError
from tl.errors import TLError


def build_parser() -> cli.ArgumentParser:
    from tl.features import OUTPUT_DTYPES, ExtractionSettings
    from tl.store import COMPRESSIONS

    defaults = ExtractionSettings()
    parser = cli.ArgumentParser(
        description="Extract CNN codes of several layers in one forward pass into an "
        "HDF5 feature store. Re-running the same command resumes an interrupted run.",
    )
    parser.add_argument(
        "source",
        nargs="?",
        help="image folder (one sub-folder per class, or unlabeled images) or a CSV "
        "with a path (and optionally label) header",
    )
    parser.add_argument(
        "-o",
        "--output",
        help="feature store to write [features/<source>_<backbone>.h5]",
    )
    model = parser.add_argument_group("model")
    cli.add_backbone_options(
        model,
        defaults.backbone,
        engine=defaults.engine,
        backbone_help="backbone name (see --list-backbones); vgg16 gives the classic "
        "CNN codes, one pooled block per alias",
    )
    model.add_argument(
        "-l",
        "--layers",
        action=cli.ListOption,
        positional="source",
        default=list(defaults.layers),
        help="layer aliases or Keras layer names (see --list-layers)",
    )
    model.add_argument(
        "-p",
        "--pooling",
        action=cli.ListOption,
        positional="source",
        default=list(defaults.pooling),
        help="avg, max, avgmax, flatten, none or grid:GHxGW; one for "
        "all layers or one per layer",
    )
    model.add_argument(
        "--dtype",
        default=defaults.dtype,
        choices=OUTPUT_DTYPES,
        help="stored precision of the codes",
    )
    images = parser.add_argument_group("images")
    cli.add_image_options(images, defaults.image)
    images.add_argument(
        "--unlabeled",
        action="store_true",
        help="index every image below SOURCE, without labels",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument(
        "--compression",
        choices=[str(c).lower() for c in COMPRESSIONS],
        default="none",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output instead of resuming it",
    )
    run.add_argument(
        "--resume",
        metavar="STORE",
        help="finish the interrupted extraction in STORE with its own "
        "settings (no other arguments needed)",
    )
    run.add_argument(
        "--shard",
        metavar="I/N",
        help="process only the I-th of N contiguous slices (0-based)",
    )
    run.add_argument(
        "--merge",
        nargs="+",
        metavar="SHARD",
        help="join complete shard files into --output and exit",
    )
    cli.add_dask_option(run)
    run.add_argument(
        "--keep-shards",
        action="store_true",
        help="with --dask: keep the shard stores (<output>.shards/) after the merge",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--no-speed-hint",
        action="store_true",
        help="no hint about a faster engine or precision (with OpenVINO installed, "
        "long float32 runs on a CPU measure one for a few seconds)",
    )
    cli.add_info_options(parser)
    return parser


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()):
        raise ParameterError("shard", "I/N (e.g. 0/4)", text)
    return int(index), int(count)


def _check_dask_options(args: argparse.Namespace) -> None:
    if args.keep_shards and not args.dask:
        raise TLError("--keep-shards goes with --dask (the shards of a Dask run).")
    clash = [
        flag
        for flag, given in (
            ("--shard", args.shard),
            ("--merge", args.merge),
            ("--resume", args.resume),
        )
        if given
    ]
    if args.dask and clash:
        raise TLError(
            f"--dask splits, resumes and merges shards itself; drop {clash[0]} (re-run "
            f"the same --dask command to resume it)."
        )


def _command(args: argparse.Namespace) -> int:
    from tl import features, store
    from tl.engines import missing_packages

    if cli.handle_info(args):
        return 0
    _check_dask_options(args)
    options = {"batch_size": args.batch_size, "progress": not args.quiet}
    # With OpenVINO installed, a long run measures the faster engines' speed instead.
    measured = not args.no_speed_hint and not missing_packages("openvino")
    if args.merge:
        if not args.output:
            raise TLError("--merge needs --output, the merged store to write.")
        output = cli.check_output(args.output, "--output")
        store.merge_stores(args.merge, output, overwrite=args.overwrite)
        print(f"merged {len(args.merge)} shards into {output}")
        return 0
    if args.resume:
        result = features.resume(cli.check_output(args.resume, "--resume"), **options)
    else:
        if not args.source:
            raise TLError("Give an image folder or CSV to extract (or --resume STORE).")
        settings = features.ExtractionSettings.from_json(
            {**vars(args), "labels": None if args.unlabeled else "inferred"}
        )
        output = cli.check_output(
            args.output
            or cli.default_output(
                "features", args.source, settings.backbone.name, ".h5"
            ),
            "--output",
        )
        result = features.extract(
            args.source,
            output,
            settings,
            compression=None if args.compression == "none" else args.compression,
            shard=_shard(args.shard),
            overwrite=args.overwrite,
            client=args.dask,
            keep_shards=args.keep_shards,
            speed_hint=measured and not args.dask,
            **options,
        )
    print(
        f"{result.path}: {result.rows} rows, {len(result.skipped)} skipped"
        + (f", {result.images_per_second:.1f} images/s" if result.seconds else "")
    )
    engine = result.settings.engine.name
    if result.seconds and not (args.no_speed_hint or measured or engine != "keras"):
        cli.print_precision_hint(result.settings.backbone)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(build_parser, _command, argv)


if __name__ == "__main__":
    sys.exit(main())
