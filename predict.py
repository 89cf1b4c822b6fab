#!/usr/bin/env python3
"""Classify new images with a model saved by train_classifier.py or fine_tune.py.

    python predict.py results/flowers/best_model data/new_photos -o predictions.csv

Rebuilds the extractor the training codes came from (backbone, weights, layer,
pooling, preprocessing), then applies the classifier. Writes a CSV of path,
predicted class and score (and the true class when the folder has class folders).
"""

from __future__ import annotations

import argparse
import sys

from tl import cli


def build_parser() -> cli.ArgumentParser:
    from tl.engines import PRECISIONS, list_engines

    parser = cli.ArgumentParser(
        description="Classify images with a saved tl model.",
    )
    parser.add_argument("model", help="folder of a saved model (e.g. .../best_model)")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders")
    parser.add_argument(
        "-o", "--output", default="predictions.csv", help="CSV to write"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    codes = parser.add_argument_group(
        "codes of a linear probe", "[those of its training codes]"
    )
    codes.add_argument(
        "--engine",
        choices=list_engines(),
        help="engine computing the codes",
    )
    codes.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="compute precision of the codes",
    )
    codes.add_argument(
        "--allow-engine-mismatch",
        action="store_true",
        help="accept an --engine or --precision other than the training codes': "
        "the codes then differ from those the classifier learned (int8 ones "
        "noticeably), so predictions can be worse",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def _command(args: argparse.Namespace) -> int:
    from tl.prediction import predict_images

    output = cli.check_output(args.output, "-o/--output")
    table = predict_images(
        args.model,
        args.inputs,
        batch_size=args.batch_size,
        progress=not args.quiet,
        engine=args.engine,
        precision=args.precision,
        allow_engine_mismatch=args.allow_engine_mismatch,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(output, index=False)
    errors = table[table.error != ""]
    print(table.head(10).to_string(index=False))
    summary = f"{len(table)} images, {len(errors)} skipped; wrote {args.output}"
    if "true" in table:
        judged = table[table.error == ""]
        accuracy = (judged.true == judged.predicted).mean() if len(judged) else 0.0
        summary += f"; accuracy against the folder's classes: {accuracy:.3f}"
    print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(build_parser, _command, argv)


if __name__ == "__main__":
    sys.exit(main())
