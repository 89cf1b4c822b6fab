"""The fine-tuning model: pixels → preprocessing → backbone → pooling → head.

The backbone always runs in inference mode: its BatchNormalization layers keep their
(ImageNet) statistics even where their weights train. Keras' recipe of calling the
backbone with `training=False` no longer does that in Keras 3, whose functional models
pass `fit`'s `training=True` down to nested models (keras-team/keras#20285); tl wraps
the backbone in `InferenceMode`, which calls it with `training=False` whatever the
context.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf
from keras import ops

from tl.backbones import (
    BackboneSpec,
    WeightsInfo,
    layer_taps,
    layers_from,
    resolve_layers,
)
from tl.errors import TLError
from tl.finetune.saved import BackbonePreprocessing, InferenceMode
from tl.finetune.settings import FineTuneSettings
from tl.precision import compute_policy


class _TowardsPretrained(keras.regularizers.Regularizer):
    """L2-SP: (strength / 2)·‖w − w₀‖², pulling a weight towards its pretrained
    value w₀ instead of towards zero. Set on variables, so it is not serialised."""

    def __init__(self, anchor: keras.Variable, strength: float):
        self.anchor = anchor
        self.strength = strength

    def __call__(self, weights):
        return 0.5 * self.strength * ops.sum(ops.square(weights - self.anchor))


@dataclasses.dataclass
class FineTuneModel:
    """A built model and what training needs to know about its backbone.

    Attributes:
        model: pixels → class probabilities (float32).
        backbone: the nested backbone (inside `InferenceMode`).
        spec: its registry entry.
        weights: where its weights came from.
        final_layer: the backbone's last layer (alias `last`): what the head reads.
        unfrozen: names of the backbone layers that stage 2 trains, in order.
    """

    model: keras.Model
    backbone: keras.Model
    spec: BackboneSpec
    weights: WeightsInfo
    final_layer: str
    unfrozen: list[str]

    def set_stage(self, stage: int) -> None:
        """Freeze the backbone (stage 1) or unfreeze its top (stage 2)."""
        self.backbone.trainable = stage == 2
        if stage == 2:
            unfrozen = set(self.unfrozen)
            for layer in self.backbone.layers:
                layer.trainable = layer.name in unfrozen


def unfrozen_layers(backbone: keras.Model, spec: BackboneSpec, unfreeze: str) -> list:
    """The backbone layers that `unfreeze` selects (`tl.backbones.layers_from`), in
    topological order.

    Raises:
        TLError: naming --unfreeze, for an unknown name or a selection with no
            weights to train.
    """
    try:
        return layers_from(backbone, spec, unfreeze)
    except TLError as error:
        raise TLError(f"--unfreeze: {error}") from None


def _copy_into_scope(model: keras.Model) -> keras.Model:
    """`model` with new variables, created in the current tf.distribute scope."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def build_model(
    settings: FineTuneSettings,
    num_classes: int,
    *,
    l2_normalize: bool = False,
    strategy: tf.distribute.Strategy | None = None,
) -> FineTuneModel:
    """Build backbone and head under the settings' precision.

    Args:
        settings: the run's settings.
        num_classes: outputs of the head.
        l2_normalize: scale pooled features to unit length before the head (a probe
            saved with l2 normalisation is initialised onto such a head).
        strategy: the `tf.distribute` strategy whose scope holds the variables.

    The final Dense layer and the softmax run in float32 whatever the precision. With
    `l2_sp`, every backbone weight carries the L2-SP penalty (counted only while the
    weight is trainable).
    """
    settings = settings.resolved()
    spec = settings.backbone.spec
    # Outside the strategy's scope: building clears Keras' session, which a
    # surrounding scope does not survive.
    backbone, weights = settings.backbone.build(settings.image.size)
    with (strategy or tf.distribute.get_strategy()).scope():
        if tf.distribute.has_strategy():
            backbone = _copy_into_scope(backbone)
        net = _add_head(backbone, spec, settings, num_classes, l2_normalize)
    net.weights = weights
    return net


def _add_head(
    backbone: keras.Model,
    spec: BackboneSpec,
    settings: FineTuneSettings,
    num_classes: int,
    l2_normalize: bool,
) -> FineTuneModel:
    final_layer = resolve_layers(layer_taps(backbone, spec), ["last"], spec.name)[0]
    unfrozen = [
        layer.name for layer in unfrozen_layers(backbone, spec, settings.unfreeze)
    ]
    if settings.l2_sp:
        for variable in backbone.trainable_weights:
            anchor = keras.Variable(variable.numpy().copy(), trainable=False)
            variable.regularizer = _TowardsPretrained(anchor, settings.l2_sp)
    global_pooling = {
        "avg": keras.layers.GlobalAveragePooling2D,
        "max": keras.layers.GlobalMaxPooling2D,
    }[settings.pooling]
    keras.utils.set_random_seed(settings.seed)  # the same head on any strategy
    with compute_policy(settings.backbone.precision):
        pixels = keras.Input((*settings.image.size, 3), name="pixels")
        x = BackbonePreprocessing(spec.name, name="preprocess")(pixels)
        x = InferenceMode(backbone, name="backbone")(x)
        x = global_pooling(dtype="float32", name="pool")(x)  # as extraction pools
        if l2_normalize:
            x = keras.layers.UnitNormalization(dtype="float32", name="l2")(x)
        if settings.dropout:
            x = keras.layers.Dropout(settings.dropout, name="dropout")(x)
        if settings.head == "mlp":
            x = keras.layers.Dense(
                settings.hidden_units, activation="relu", name="hidden"
            )(x)
            if settings.dropout:
                x = keras.layers.Dropout(settings.dropout, name="hidden_dropout")(x)
        logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
        probabilities = keras.layers.Activation(
            "softmax", dtype="float32", name="probabilities"
        )(logits)
        model = keras.Model(pixels, probabilities, name=f"{spec.name}_finetune")
    return FineTuneModel(model, backbone, spec, None, final_layer.layer, unfrozen)
