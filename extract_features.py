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

from tl.cli import (
    ArgumentParser,
    ListOption,
    add_dask_option,
    check_output,
    default_output,
    run_cli,
)
from tl.errors import TLError


def build_parser() -> ArgumentParser:
    from tl.images import DEFAULT_MAX_PIXELS, INTERPOLATIONS, RESIZE_MODES

    parser = ArgumentParser(
        description="Extract CNN codes of several layers in one forward pass into an "
        "HDF5 feature store. Re-running the same command resumes an interrupted run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    model.add_argument(
        "-b", "--backbone", default="vgg16", help="backbone name (see --list-backbones)"
    )
    model.add_argument(
        "-l",
        "--layers",
        action=ListOption,
        positional="source",
        default=["last"],
        help="layer aliases or Keras layer names (see --list-layers)",
    )
    model.add_argument(
        "-p",
        "--pooling",
        action=ListOption,
        positional="source",
        default=["avg"],
        help="avg, max, avgmax, flatten, none or grid:GHxGW; one for "
        "all layers or one per layer",
    )
    model.add_argument(
        "-w",
        "--weights",
        default="imagenet",
        help="imagenet, none (random, for tests) or a weights file",
    )
    model.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="compute precision",
    )
    model.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16"],
        help="stored precision of the codes",
    )
    model.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random initialisation seed (--weights none)",
    )
    images = parser.add_argument_group("images")
    images.add_argument("-s", "--image-size", help="N or HxW [the backbone's default]")
    images.add_argument("--resize", default="squash", choices=RESIZE_MODES)
    images.add_argument("--interpolation", default="bilinear", choices=INTERPOLATIONS)
    images.add_argument(
        "--antialias",
        action="store_true",
        help="low-pass filter when downscaling (slower)",
    )
    images.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse larger images without decoding them",
    )
    images.add_argument(
        "--unlabeled",
        action="store_true",
        help="index every image below SOURCE, without labels",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--compression", choices=["none", "lzf", "gzip"], default="none")
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
    add_dask_option(run)
    run.add_argument(
        "--keep-shards",
        action="store_true",
        help="with --dask: keep the shard stores (<output>.shards/) after the merge",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    info = parser.add_argument_group("information")
    info.add_argument(
        "--list-backbones",
        action="store_true",
        help="list the known backbones and exit",
    )
    info.add_argument(
        "--list-layers",
        metavar="BACKBONE",
        help="list aliases and layers of BACKBONE (at --image-size) and exit",
    )
    return parser


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()):
        raise TLError(f"--shard must look like I/N (e.g. 0/4), got {text!r}.")
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
    from tl import backbones, features, store
    from tl.precision import half_precision_hint

    if args.list_backbones:
        print(backbones.describe_backbones())
        return 0
    if args.list_layers:
        size = features.ExtractionSettings(image_size=args.image_size).image_size
        print(backbones.describe_layers(args.list_layers, size))
        return 0
    _check_dask_options(args)
    options = {"batch_size": args.batch_size, "progress": not args.quiet}
    if args.merge:
        if not args.output:
            raise TLError("--merge needs --output, the merged store to write.")
        output = check_output(args.output, "--output")
        store.merge_stores(args.merge, output, overwrite=args.overwrite)
        print(f"merged {len(args.merge)} shards into {output}")
        return 0
    if args.resume:
        result = features.resume(check_output(args.resume, "--resume"), **options)
    else:
        if not args.source:
            raise TLError("Give an image folder or CSV to extract (or --resume STORE).")
        output = check_output(
            args.output
            or default_output("features", args.source, args.backbone, ".h5"),
            "--output",
        )
        settings = features.ExtractionSettings(
            backbone=args.backbone,
            layers=args.layers,
            pooling=args.pooling,
            image_size=args.image_size,
            resize=args.resize,
            interpolation=args.interpolation,
            antialias=args.antialias,
            max_pixels=args.max_pixels,
            weights=args.weights,
            precision=args.precision,
            dtype=args.dtype,
            labels=None if args.unlabeled else "inferred",
            seed=args.seed,
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
            **options,
        )
    print(
        f"{result.path}: {result.rows} rows, {len(result.skipped)} skipped"
        + (f", {result.images_per_second:.1f} images/s" if result.seconds else "")
    )
    hint = result.seconds and half_precision_hint(args.precision, args.backbone)
    if hint:  # after the work: a refusal of bad input stays one line
        print(f"hint: {hint}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _command(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
