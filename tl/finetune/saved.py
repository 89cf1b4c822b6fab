"""The saved fine-tuned model: its format, the layers it is made of, loading it back.

`load_finetuned` reads a run back for prediction (`predict.py`): it checks
metadata.json and the SHA-256 of model.keras first, loads it in Keras' safe mode (only
registered layers are built: Keras' own and tl's; a `Lambda` layer is refused) and
refuses a metadata.json whose class names differ from the model's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

from tl.backbones import get_backbone
from tl.engines.keras import compiled_extractor
from tl.errors import TLError
from tl.finetune.data import _over_images
from tl.images import ImageSettings
from tl.model_folder import (
    METADATA,
    check_files,
    check_schema,
    check_unedited,
    read_metadata,
    require_keys,
    unreadable,
)

MODEL_FORMAT = "tl-finetuned"
MODEL_SCHEMA_VERSION = 2  # 1: no file hashes, no class names in model.keras
MODEL_FILE = "model.keras"


@keras.saving.register_keras_serializable(package="tl")
class BackbonePreprocessing(keras.layers.Layer):
    """The registry backbone's own `preprocess_input` as a layer, so that a saved
    model takes raw RGB pixels in [0, 255]. Runs in float32."""

    def __init__(self, backbone: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, pixels):
        return get_backbone(self.backbone).preprocess(pixels)

    def get_config(self) -> dict:
        return {**super().get_config(), "backbone": self.backbone}


@keras.saving.register_keras_serializable(package="tl")
class InferenceMode(keras.layers.Wrapper):
    """Runs the wrapped layer with `training=False` in every context.

    Keras 3 functional models pass the outer `training` flag down to nested layers,
    overriding a `training=False` given when the graph was built; this wrapper has no
    `training` argument, so BatchNormalization statistics stay fixed (and dropout
    inside the backbone stays off) while the backbone's weights train.
    """

    def call(self, inputs):
        return self.layer(inputs, training=False)


@keras.saving.register_keras_serializable(package="tl")
class ClassNames(keras.layers.Identity):
    """The identity on the probabilities, whose config holds the class names: they
    travel inside model.keras, and loading checks metadata.json's copy against them."""

    def __init__(self, class_names: list[str], **kwargs):
        super().__init__(**kwargs)
        self.class_names = list(class_names)

    def get_config(self) -> dict:
        return {**super().get_config(), "class_names": self.class_names}


@dataclasses.dataclass
class FineTunedModel:
    """A fine-tuned model read back from its run folder, ready to predict."""

    model: keras.Model
    metadata: dict

    @functools.cached_property
    def _predictor(self) -> Callable:
        return compiled_extractor(self.model)

    @property
    def class_names(self) -> list[str]:
        return self.metadata["class_names"]

    @property
    def image_settings(self) -> ImageSettings:
        return ImageSettings.from_json(self.metadata)

    def predict_images(
        self, paths: Sequence[str], batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str, str]]]:
        """Classify image files, decoded and resized as in training.

        Returns:
            Class numbers and probabilities (one row per decodable file, in the
            order of `paths`), and (position, path, reason) for each file that could
            not be decoded.
        """
        paths = [str(path) for path in paths]
        _, outputs, skipped = _over_images(
            paths, self.image_settings, batch_size, self._predictor
        )
        probabilities = (
            np.concatenate(outputs)
            if outputs
            else np.empty((0, len(self.class_names)), np.float32)
        )
        classes = probabilities.argmax(axis=1)
        return classes, probabilities, [(p, paths[p], why) for p, why in skipped]


_REMEDY = "re-run fine_tune.py --overwrite (model folders must come from it)"
_REQUIRED_KEYS = ("class_names", "image_size", "resize", "interpolation", "antialias",
                  "max_pixels", "files")  # fmt: skip


def load_finetuned(directory: str | Path) -> FineTunedModel:
    """Load the model `fine_tune` saved in `directory`, trusting nothing in it.

    Raises:
        TLError: in one line, for a folder without a finished run, a damaged or
            edited metadata.json or model.keras (checked against its SHA-256), a
            layer Keras' safe mode refuses (`Lambda`), or class names that differ
            from the model's.
    """
    directory = Path(directory)
    if not (directory / METADATA).is_file() or not (directory / MODEL_FILE).is_file():
        raise TLError(
            f"{str(directory)!r} holds no finished fine-tuning run (model.keras and a "
            f"metadata.json of format {MODEL_FORMAT!r}); give the --output-dir of "
            f"fine_tune.py (an interrupted run resumes when re-run)."
        )
    metadata = read_metadata(directory, _REMEDY)
    if metadata.get("format") != MODEL_FORMAT:
        raise TLError(
            f"{str(directory / METADATA)!r} does not describe a fine-tuned tl model."
        )
    if check_schema(metadata, directory, MODEL_SCHEMA_VERSION, _REMEDY) < 2:
        raise TLError(
            f"{str(directory)!r} was saved by an older tl, without the SHA-256 of "
            f"model.keras; re-run fine_tune.py --overwrite with the same settings."
        )
    require_keys(metadata, _REQUIRED_KEYS, directory, _REMEDY)
    check_files(metadata, directory, (MODEL_FILE,), _REMEDY)
    try:
        model = keras.models.load_model(
            directory / MODEL_FILE, compile=False, safe_mode=True
        )
    except Exception as error:  # Keras fails in many ways on a file it did not write
        raise unreadable(
            directory / MODEL_FILE,
            error,
            f"tl loads it in Keras' safe mode, which builds only Keras' and tl's "
            f"registered layers; {_REMEDY}",
        ) from None
    layer = next((x for x in model.layers if isinstance(x, ClassNames)), None)
    if layer is None:
        raise TLError(
            f"{str(directory / MODEL_FILE)!r} has no ClassNames layer; {_REMEDY}."
        )
    check_unedited(
        metadata, "class_names", layer.class_names, directory, MODEL_FILE, _REMEDY
    )
    check_unedited(
        metadata, "image_size", list(model.input_shape[1:3]), directory, MODEL_FILE,
        _REMEDY,
    )  # fmt: skip
    return FineTunedModel(model, metadata)


def _inference_model(model: keras.Model, class_names: list[str]) -> keras.Model:
    """The same layers as an uncompiled model (saved without optimizer state),
    with the class names in a last `ClassNames` layer."""
    probabilities = ClassNames(class_names, name="class_names")(model.outputs[0])
    return keras.Model(model.inputs, probabilities, name=model.name)
