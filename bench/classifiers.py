"""Classifier comparison benchmark: prints how its time grows with N and D.

    python bench/classifiers.py [--sizes 2000x512 10000x2048 ...] [--full]

For synthetic codes shaped like real ones (non-negative, post-ReLU, 10 classes that
live in a 32-dimensional subspace plus noise), times `tl.evaluation.compare` with
logreg, linear_svm and rbf_svm (5-fold CV search on at most 3000 training rows,
holdout protocol, all cores) on one layer of N rows by D dimensions, then the full
3 layers x 3 classifiers comparison at N=10,000, D=2,048 through train_classifier.py.
Results also go to bench/out/classifiers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tl.evaluation import compare  # noqa: E402
from tl.store import StoreWriter  # noqa: E402

CLASSES = 10
# What the synthetic store records of its "extraction": enough for tl.evaluation.
SETTINGS = {"backbone": "synthetic", "weights": "none"}


def synthetic_codes(n: int, d: int, seed: int, signal: float = 1.0) -> tuple:
    """ReLU of a class-dependent latent projected to D dims, plus noise (float32)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    centres = rng.normal(size=(CLASSES, 32)) * signal
    latent = centres[labels] + rng.normal(size=(n, 32))
    projection = rng.normal(size=(32, d)).astype(np.float32) / np.sqrt(32)
    codes = latent.astype(np.float32) @ projection
    codes += rng.normal(scale=1.0, size=(n, d)).astype(np.float32)
    return np.maximum(codes, 0, out=codes), labels


def make_store(n: int, d: int, layers: int) -> Path:
    path = OUT / f"codes_{n}x{d}x{layers}.h5"
    if path.exists():
        return path
    infos, data = [], {}
    for i in range(layers):
        key = f"layer{i + 1}"
        data[key], labels = synthetic_codes(n, d, seed=i, signal=0.4 + 0.3 * i)
        infos.append(
            {
                "key": key,
                "requested": key,
                "layer": key,
                "raw_shape": [d],
                "stride": None,
                "depth": i,
                "pooling": "avg",
                "shape": [d],
                "dtype": "float32",
            }
        )
    temporary = path.with_suffix(".tmp")
    with StoreWriter.create(
        temporary,
        settings=SETTINGS,
        provenance={},
        layers=infos,
        class_names=[f"class{c}" for c in range(CLASSES)],
        num_images=n,
        index_sha256="synthetic",
    ) as writer:
        for start in range(0, n, 2000):
            rows = np.arange(start, min(start + 2000, n))
            writer.write_batch(
                {k: v[rows] for k, v in data.items()},
                rows,
                labels[rows],
                [f"{r}.jpg" for r in rows],
                [],
                rows[-1] + 1,
            )
        writer.finish()
    temporary.rename(path)
    return path


def time_one_layer(n: int, d: int) -> dict:
    store = make_store(n, d, layers=1)
    began = time.perf_counter()
    result = compare(
        store, classifiers=("logreg", "linear_svm", "rbf_svm"), progress=False
    )
    seconds = time.perf_counter() - began
    fits = {c.classifier: c.fit_seconds for c in result.candidates}
    return {
        "seconds": seconds,
        "refit_seconds": fits,
        "winner": result.winner.classifier,
        "test_accuracy": result.winner.test["accuracy"],
    }


def time_full(n: int, d: int) -> dict:
    store = make_store(n, d, layers=3)
    output = OUT / "classifiers_full"
    began = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "train_classifier.py"),
            str(store),
            "--classifiers",
            "logreg",
            "linear_svm",
            "rbf_svm",
            "--cv",
            "5",
            "--output-dir",
            str(output),
            "-q",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return {
        "seconds": time.perf_counter() - began,
        "leaderboard": (output / "leaderboard.csv").read_text(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=[
            "2000x512",
            "2000x2048",
            "2000x25088",
            "10000x512",
            "10000x2048",
            "10000x25088",
        ],
    )
    parser.add_argument("--no-full", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    print(
        f"{os.cpu_count()} cores; one layer, logreg + linear_svm + rbf_svm, 5-fold "
        f"CV search on <= 3000 rows, holdout 20%"
    )
    print(f"{'N':>6} {'D':>6} {'seconds':>9}  refit seconds (on 80% of N)")
    results = {}
    for size in args.sizes:
        n, d = (int(v) for v in size.split("x"))
        figures = time_one_layer(n, d)
        results[size] = figures
        refits = ", ".join(f"{k} {v:.1f}" for k, v in figures["refit_seconds"].items())
        print(
            f"{n:>6} {d:>6} {figures['seconds']:>9.1f}  {refits}  (winner "
            f"{figures['winner']}, test acc {figures['test_accuracy']:.3f})"
        )
    if not args.no_full:
        full = time_full(10000, 2048)
        results["full_10000x2048x3"] = full
        print(
            f"\nfull comparison, N=10,000, D=2,048, 3 layers x 3 classifiers, 5-fold, "
            f"via train_classifier.py: {full['seconds']:.0f} s"
        )
        print(full["leaderboard"])
    (OUT / "classifiers.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
