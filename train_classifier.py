#!/usr/bin/env python3
"""Train linear and SVM classifiers on CNN codes, layer by layer, and compare them.

    python train_classifier.py features/flowers_vgg16.h5 \\
        --classifiers logreg linear_svm rbf_svm --cv 5 --output-dir results/flowers

prints a leaderboard (layer x classifier), writes results.csv/json, leaderboard.csv,
run.json and plots to --output-dir, and saves the winning model in
<output-dir>/best_model (see predict.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tl import cli


def build_parser() -> cli.ArgumentParser:
    from tl.classifiers import CLASSIFIERS, NORMALIZATIONS
    from tl.evaluation import OUT_OF_CORE, PROTOCOLS, ComparisonSettings

    defaults = ComparisonSettings()
    parser = cli.ArgumentParser(
        description="Compare classifiers on the CNN codes of each layer of a feature "
        "store, with honest evaluation; save the winner.",
    )
    parser.add_argument(
        "store", nargs="?", help="feature store written by extract_features.py"
    )
    parser.add_argument("-o", "--output-dir", help="[results/<store name>]")
    parser.add_argument(
        "-c",
        "--classifiers",
        action=cli.ListOption,
        positional="store",
        default=list(defaults.classifiers),
        choices=list(CLASSIFIERS),
    )
    parser.add_argument(
        "-l",
        "--layers",
        action=cli.ListOption,
        positional="store",
        default=defaults.layers,
        help="store layers [all]",
    )
    parser.add_argument(
        "--normalization", default=defaults.normalization, choices=NORMALIZATIONS
    )
    parser.add_argument(
        "--pca",
        type=int,
        default=defaults.pca,
        help="keep this many principal components",
    )
    cli.add_class_weight_option(
        parser, "balanced: weight classes inversely to their frequency"
    )
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--protocol",
        default=defaults.protocol,
        choices=PROTOCOLS,
        help="holdout: CV on train, score on a held-out split; "
        "cv: nested cross-validation",
    )
    evaluation.add_argument(
        "--cv",
        dest="folds",
        metavar="K",
        type=int,
        default=defaults.folds,
        help="folds of the stratified k-fold cross-validation",
    )
    evaluation.add_argument("--test-size", type=float, default=defaults.test_size)
    evaluation.add_argument(
        "--test-store", help="a feature store of separate test images"
    )
    evaluation.add_argument(
        "--search-rows",
        type=int,
        default=defaults.search_rows,
        help="CV search on at most this many training rows "
        "(stratified); the winner is refit on all",
    )
    evaluation.add_argument(
        "--shots",
        action=cli.ListOption,
        positional="store",
        type=int,
        default=list(defaults.shots),
        help="low-shot curves: examples per class, e.g. 1 2 5 10",
    )
    evaluation.add_argument("--shot-seeds", type=int, default=defaults.shot_seeds)
    evaluation.add_argument("--seed", type=int, default=defaults.seed)
    run = parser.add_argument_group("run")
    run.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=defaults.jobs,
        help="parallel CV fits (-1: all cores, or all threads of the --dask workers)",
    )
    cli.add_dask_option(run)
    run.add_argument("--save", choices=["best", "all"], default="best")
    run.add_argument(
        "--out-of-core",
        choices=OUT_OF_CORE,
        default=defaults.out_of_core,
        help="train layers larger than --memory-limit chunk by chunk (sgd only)",
    )
    run.add_argument(
        "--memory-limit",
        dest="memory_limit_gb",
        metavar="GB",
        type=float,
        default=defaults.memory_limit_gb,
        help="GB: larger layers are trained out of core in auto mode",
    )
    run.add_argument(
        "--drop-nonfinite",
        action="store_true",
        default=defaults.drop_nonfinite,
        help="leave out rows with NaN/inf codes instead of refusing",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def _command(args: argparse.Namespace) -> int:
    from tl import classifiers, evaluation, reports
    from tl.errors import TLError
    from tl.provenance import library_versions
    from tl.store import FeatureStore

    if not args.store:
        raise TLError("Give the feature store to train on (see extract_features.py).")
    output = cli.check_output(
        args.output_dir or Path("results") / Path(args.store).stem,
        "--output-dir",
        folder=True,
    )
    settings = evaluation.ComparisonSettings.from_json(vars(args))
    with FeatureStore(args.store) as store:
        result = evaluation.compare(
            store,
            settings,
            test_store=args.test_store,
            progress=not args.quiet,
            client=args.dask,
        )
        print(reports.format_leaderboard(result))
        invocation = {"arguments": vars(args), "versions": library_versions()}
        written = reports.write_report(
            result, output, store=store, invocation=invocation
        )
        chosen = [result.winner]
        if args.save == "all":
            chosen = [c for c in result.candidates if c.pipeline is not None]
        for candidate in chosen:
            is_winner = candidate is result.winner
            folder = (
                output / "best_model"
                if is_winner
                else output / "models" / f"{candidate.layer}__{candidate.classifier}"
            )
            classifiers.save_classifier(
                folder,
                candidate.pipeline,
                store=store,
                layer=candidate.layer,
                classifier=candidate.classifier,
                params=candidate.params,
                normalization=settings.normalization,
                pca=settings.pca,
                scores={
                    "cv_accuracy": candidate.cv_scores,
                    "test": candidate.test,
                    "estimate": result.winner_estimate if is_winner else None,
                },
            )
    print(f"\nwrote {', '.join(str(p) for p in written.values())}")
    print(f"saved the winner in {output / 'best_model'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(build_parser, _command, argv)


if __name__ == "__main__":
    sys.exit(main())
