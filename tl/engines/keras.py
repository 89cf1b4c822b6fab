"""The reference engine: the Keras extractor traced once into a TensorFlow graph.

The compute precision is the Keras dtype policy the model was built under
(`tl.precision`), so compiling only wraps the model.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from tl.engines import CompiledExtractor, CompileRequest


def compiled_extractor(extractor: keras.Model) -> Callable:
    """The extractor (or any one-input model) as a graph function over any batch
    size, in inference mode (traced once)."""

    @tf.function(
        input_signature=[tf.TensorSpec([None, *extractor.input_shape[1:]], tf.float32)],
        reduce_retracing=True,
    )
    def codes_of(images):
        return extractor(images, training=False)

    return codes_of


def compile_extractor(model: keras.Model, request: CompileRequest) -> CompiledExtractor:
    """The extractor as a graph function returning numpy codes."""
    graph = compiled_extractor(model)

    def codes_of(images) -> dict[str, np.ndarray]:
        return {key: value.numpy() for key, value in graph(images).items()}

    return CompiledExtractor(
        codes_of, {"engine": "keras", "precision": request.precision}
    )
