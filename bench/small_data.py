"""Defaults on small real folders: fine-tuning against linear probes on the same data.

    python bench/small_data.py /work/data/fm4 /work/data/fm25 \\
        --weights bench/out/vgg16_hed_notop.weights.h5 [-- --unfreeze block5 --epochs 5]

Each FOLDER holds train/ and test/ class folders (bench/fashion_mnist.py writes them:
about 25 images per class is the case this checks). Tried as a new user would, at the
backbone's default input size, with the project's own commands:

- probes: codes of every VGG16 block (extract_features.py), a logistic regression per
  block with C chosen by CV on the training images, scored on test/
  (train_classifier.py --test-store); the block5 probe reads the codes the fine-tuned
  head starts from;
- fine_tune.py --epochs 0: the probe stage 1 fits (the same training images less the
  validation split), scored on test/;
- fine_tune.py with the options after `--` (none: every default), scored on test/.

Prints one row per folder; writes into bench/out/small/. On a shared CPU the timings
are noisy; the accuracies are not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from real_data import HERE, LAYERS, run

OUT = HERE / "out" / "small"


def probes(folder: Path, out: Path, weights: str) -> pd.DataFrame:
    """Test accuracy of the CV-chosen logistic regression on each block's codes."""
    common = ["--backbone", "vgg16", "--weights", weights, "--layers", *LAYERS, "-q"]
    for split in ("train", "test"):
        store = out / f"{split}.h5"
        if not store.exists():
            run("extract_features.py", str(folder / split), *common, "-o", str(store))
    if not (out / "probes" / "results.csv").exists():
        run("train_classifier.py", str(out / "train.h5"), "--test-store",
            str(out / "test.h5"), "-c", "logreg", "-o", str(out / "probes"),
            "-q")  # fmt: skip
    results = pd.read_csv(out / "probes" / "results.csv")
    test = results[(results.split == "test") & (results.metric == "accuracy")]
    return test.set_index("layer")["value"]


def fine_tuned(folder: Path, out: Path, weights: str, options: list[str]) -> dict:
    """Test accuracy and wall time of fine_tune.py with `options`."""
    seconds = run("fine_tune.py", str(folder / "train"), "--test-dir",
                  str(folder / "test"), "--backbone", "vgg16", "--weights", weights,
                  *options, "-o", str(out), "-q", "--overwrite")  # fmt: skip
    metadata = json.loads((out / "metadata.json").read_text())
    return {
        "accuracy": metadata["test_metrics"]["accuracy"],
        "seconds": seconds,
        "best_epoch": metadata["best_epoch"],
        "probe": metadata["probe"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument(
        "--weights", default=str(HERE / "out" / "vgg16_hed_notop.weights.h5")
    )
    parser.add_argument("--name", default="default", help="name of this fine-tuning")
    args, options = parser.parse_known_args()
    options = [o for o in options if o != "--"]
    rows = []
    for folder in args.folders:
        out = OUT / folder.name
        out.mkdir(parents=True, exist_ok=True)
        layers = probes(folder, out, args.weights)
        own_probe = fine_tuned(
            folder, out / "probe_only", args.weights, ["--epochs", "0"]
        )
        tuned = fine_tuned(folder, out / f"ft_{args.name}", args.weights, options)
        classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
        rows.append(
            {
                "folder": folder.name,
                "classes": len(classes),
                "train images": sum(1 for _ in (folder / "train").rglob("*.png")),
                "best probe (layer)": f"{layers.max():.3f} ({layers.idxmax()})",
                "block5 probe": round(layers["block5_pool"], 3),
                "stage-1 probe": round(own_probe["accuracy"], 3),
                f"fine-tune {args.name}": round(tuned["accuracy"], 3),
                "kept epoch": tuned["best_epoch"],
                "fine-tune s": round(tuned["seconds"]),
            }
        )
        print(pd.DataFrame(rows).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(OUT / f"summary_{args.name}.csv", index=False)
    print(f"options: {' '.join(options) or '(defaults)'}")
    print(table.to_markdown(index=False) if _has_tabulate() else table.to_string())


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
