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

from tl.cli import default_output, run_cli
from tl.errors import TLError


def build_parser() -> argparse.ArgumentParser:
    from tl.engines import DEFAULT_ENGINE, PRECISIONS, get_engine, list_engines
    from tl.engines.calibration import DEFAULT_CALIBRATION_IMAGES
    from tl.images import DEFAULT_MAX_PIXELS, INTERPOLATIONS, RESIZE_MODES

    parser = argparse.ArgumentParser(
        description="Extract CNN codes of several layers in one forward pass into an "
        "HDF5 feature store. Re-running the same command resumes an interrupted run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "source",
        nargs="?",
        help="image folder (one sub-folder per class, or unlabeled images) or a CSV "
        "of path,label",
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
        nargs="+",
        default=["last"],
        help="layer aliases or Keras layer names (see --list-layers)",
    )
    model.add_argument(
        "-p",
        "--pooling",
        nargs="+",
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
        "--engine",
        default=DEFAULT_ENGINE,
        choices=list_engines(),
        help="what runs the extractor: "
        + "; ".join(
            f"{name}: {get_engine(name).description}" for name in list_engines()
        ),
    )
    model.add_argument(
        "--precision",
        default="float32",
        choices=PRECISIONS,
        help="compute precision; float16 with keras only, int8 with openvino only "
        "(calibrated on your images)",
    )
    model.add_argument(
        "--calibration-images",
        type=int,
        metavar="N",
        help=f"int8: calibrate on a stratified sample of N images "
        f"[{DEFAULT_CALIBRATION_IMAGES}]",
    )
    model.add_argument(
        "--calibration-source",
        metavar="TRAIN",
        help="int8: the training images (folder or CSV) to calibrate on [SOURCE]; "
        "give it when SOURCE is a test folder, so that test images never calibrate",
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
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--no-speed-hint",
        action="store_true",
        help="no hint about a faster engine or precision (with OpenVINO installed, "
        "long float32 runs on a CPU measure one for a few seconds)",
    )
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


def _command(args: argparse.Namespace) -> int:
    from tl import backbones, features, store
    from tl.engines import missing_packages
    from tl.precision import half_precision_hint

    if args.list_backbones:
        print(backbones.describe_backbones())
        return 0
    if args.list_layers:
        size = features.ExtractionSettings(image_size=args.image_size).image_size
        print(backbones.describe_layers(args.list_layers, size))
        return 0
    options = {"batch_size": args.batch_size, "progress": not args.quiet}
    if args.merge:
        if not args.output:
            raise TLError("--merge needs --output, the merged store to write.")
        store.merge_stores(args.merge, args.output, overwrite=args.overwrite)
        print(f"merged {len(args.merge)} shards into {args.output}")
        return 0
    if args.resume:
        result = features.resume(args.resume, **options)
    else:
        if not args.source:
            raise TLError("Give an image folder or CSV to extract (or --resume STORE).")
        calibration = (args.calibration_images, args.calibration_source)
        if args.precision != "int8" and calibration != (None, None):
            raise TLError(
                f"--calibration-images and --calibration-source apply to --precision "
                f"int8 only, not {args.precision}."
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
            engine=args.engine,
            calibration_images=args.calibration_images,
            calibration_source=args.calibration_source,
        )
        measured = not args.no_speed_hint and not missing_packages("openvino")
        if not (args.no_speed_hint or measured or args.engine != "keras"):
            hint = half_precision_hint(args.precision, args.backbone)
            if hint:
                print(f"hint: {hint}", file=sys.stderr)
        result = features.extract(
            args.source,
            args.output
            or default_output("features", args.source, args.backbone, ".h5"),
            settings,
            compression=None if args.compression == "none" else args.compression,
            shard=_shard(args.shard),
            overwrite=args.overwrite,
            speed_hint=measured,
            **options,
        )
    print(
        f"{result.path}: {result.rows} rows, {len(result.skipped)} skipped"
        + (f", {result.images_per_second:.1f} images/s" if result.seconds else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _command(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
