"""The naive way, for comparison: load every image, then one predict() per layer.

    python bench/naive_extraction.py FOLDER resnet50 LAYER [LAYER ...]

What tutorials do: `keras.utils.load_img` each file into one in-memory array, then for
each layer a truncated model and `model.predict` over the whole array, then numpy
average pooling. Prints the array shapes; the caller measures time and peak memory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

CONSTRUCTORS = {
    "resnet50": (
        keras.applications.ResNet50,
        keras.applications.resnet.preprocess_input,
    ),
    "vgg16": (keras.applications.VGG16, keras.applications.vgg16.preprocess_input),
}


def main(folder: str, backbone: str, layers: list[str], weights: str | None) -> None:
    constructor, preprocess = CONSTRUCTORS[backbone]
    paths = sorted(Path(folder).rglob("*.jpg"))
    images = np.stack(
        [
            keras.utils.img_to_array(keras.utils.load_img(p, target_size=(224, 224)))
            for p in paths
        ]
    )
    inputs = preprocess(images)
    model = constructor(include_top=False, weights=weights, input_shape=(224, 224, 3))
    codes = {}
    for layer in layers:
        truncated = keras.Model(model.input, model.get_layer(layer).output)
        maps = truncated.predict(inputs, batch_size=32, verbose=0)
        codes[layer] = maps.mean(axis=(1, 2))
    print({layer: value.shape for layer, value in codes.items()})


if __name__ == "__main__":
    weights = os.environ.get("NAIVE_WEIGHTS") or None
    main(sys.argv[1], sys.argv[2], sys.argv[3:], weights)
