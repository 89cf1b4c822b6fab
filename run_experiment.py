#!/usr/bin/env python3
"""Run an experiment file: backbones x layers x classifiers x fine-tuning, cached.

    python run_experiment.py experiments/flowers.toml         # run (or resume)
    python run_experiment.py experiments/flowers.toml --plan  # steps, cached or not
    python run_experiment.py --cache ls                       # the shared cache
    python run_experiment.py --cache gc                       # remove unused entries

Writes leaderboard.csv, results.csv/json and report.html into the experiment's
output_dir; codes are kept in the cache (features/cache), shared by experiments.
"""

from __future__ import annotations

import argparse
import sys

from tl import cli


def build_parser() -> cli.ArgumentParser:
    from tl.experiment.spec import DEFAULT_CACHE_DIR

    parser = cli.ArgumentParser(
        description="Compare backbones, layers, classifiers and fine-tuning on an "
        "image dataset, as an experiment file says; every step is cached and "
        "resumes.",
    )
    parser.add_argument("experiment", nargs="?", help="experiment file (TOML)")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print the steps and which are cached, and stop",
    )
    parser.add_argument(
        "--hash-content",
        action="store_true",
        default=None,
        help="name images by the SHA-256 of their bytes, not size and mtime",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    cache = parser.add_argument_group("cache")
    cache.add_argument(
        "--cache",
        choices=["ls", "gc"],
        help="ls: list the cache's entries; gc: remove those no experiment uses",
    )
    cache.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    return parser


def _command(args: argparse.Namespace) -> int:
    from tl.errors import TLError
    from tl.experiment import FeatureCache, run

    if args.cache:
        if args.experiment:
            raise TLError("--cache works on --cache-dir, not on an experiment file.")
        cache = FeatureCache(args.cache_dir)
        if args.cache == "ls":
            print(cache.listing())
        else:
            removed = cache.collect_garbage()
            print("\n".join(f"removed {line}" for line in removed) or "nothing to do")
        return 0
    if not args.experiment:
        raise TLError("Give the experiment file to run (or --cache ls|gc).")
    run(
        args.experiment,
        plan_only=args.plan,
        progress=not args.quiet,
        hash_content=args.hash_content,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(build_parser, _command, argv)


if __name__ == "__main__":
    sys.exit(main())
