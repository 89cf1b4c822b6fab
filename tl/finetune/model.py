"""The fine-tuning model: pixels → preprocessing → backbone → pooling → head.

The head is a model of its own (pooled codes → probabilities) that the whole model
ends with: stage 1 trains it on codes computed once, and stage 2 can train `top` (the
backbone from a cut point up, then the head) on the cached output of the layers below
the cut. The three models share their layers, so training one trains the others.

The head reads standardised codes: a `Normalization` layer with the mean and variance
of the training codes (or of the scaler of the probe the head starts from), after an
optional unit-length normalisation (a probe trained on l2-normalised codes).

The backbone runs in inference mode when fine-tuned: its BatchNormalization layers
keep their (ImageNet) statistics even where their weights train. Keras' recipe of
calling the backbone with `training=False` no longer does that in Keras 3, whose
functional models pass `fit`'s `training=True` down to nested models
(keras-team/keras#20285); tl wraps the backbone in `InferenceMode`, which calls it with
`training=False` whatever the context. Trained from scratch, the backbone is called
plainly, so its BatchNorm layers normalise by batch statistics, and their moving
statistics are estimated afresh after every epoch (`estimate_batchnorm`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from sklearn.preprocessing import Normalizer, StandardScaler

from tl.backbones import (
    BackboneSpec,
    Tap,
    WeightsInfo,
    cut_below,
    layer_taps,
    layers_from,
    resolve_layers,
)
from tl.classifiers import as_features
from tl.errors import TLError
from tl.features import Pooling, build_extractor
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


@dataclasses.dataclass(frozen=True)
class HeadInput:
    """How the head normalises the pooled codes: to unit length first when
    `l2_normalize`, then (x − mean) / √variance per feature."""

    mean: np.ndarray
    variance: np.ndarray
    l2_normalize: bool = False

    @classmethod
    def of_codes(cls, codes: np.ndarray, l2_normalize: bool = False) -> HeadInput:
        """Standardise as scikit-learn's `StandardScaler` fitted on `codes` would
        (a feature without variance is only centred)."""
        features = as_features(codes)
        if l2_normalize:
            features = Normalizer().transform(features)
        scaler = StandardScaler().fit(features)
        return cls(scaler.mean_, scaler.scale_**2, l2_normalize)


@dataclasses.dataclass
class FineTuneModel:
    """A built model and what training needs to know about it.

    Attributes:
        model: pixels → class probabilities (float32).
        head: pooled codes → class probabilities: the last layer of `model`.
        backbone: the nested backbone (inside `InferenceMode` unless from scratch).
        spec: its registry entry.
        weights: where its weights came from.
        settings: the resolved settings it was built with.
        num_classes: outputs of the head.
        final_layer: the backbone's last layer (alias `last`): what the head reads.
        unfrozen: names of the backbone layers that stage 2 trains, in order.
        strategy: the `tf.distribute` strategy whose scope holds the variables.
    """

    model: keras.Model
    head: keras.Model
    backbone: keras.Model
    spec: BackboneSpec
    weights: WeightsInfo
    settings: FineTuneSettings
    num_classes: int
    final_layer: str
    unfrozen: list[str]
    strategy: tf.distribute.Strategy

    def set_stage(self, stage: int) -> None:
        """Freeze the backbone (stage 1) or unfreeze its top (stage 2)."""
        self.backbone.trainable = stage == 2
        if stage == 2:
            unfrozen = set(self.unfrozen)
            for layer in self.backbone.layers:
                layer.trainable = layer.name in unfrozen

    def replace_head(self, head_input: HeadInput | None) -> None:
        """A new head reading codes normalised as `head_input` says (None: as
        they are), on the same backbone; its weights are initialised from the
        settings' seed."""
        with self.strategy.scope():
            self.head, self.model = _assemble(
                self.backbone, self.spec, self.settings, self.num_classes, head_input
            )

    def estimate_batchnorm(self, batches: Iterable[np.ndarray]) -> None:
        """Set the moving statistics of every BatchNormalization layer of the
        backbone to the mean of its batch statistics over `batches` in training
        mode (PreciseBN: Wu & Johnson, "Rethinking batch in BatchNorm", 2021).

        Trained from scratch, the weights change faster than the moving averages
        follow (Keras' momentum of 0.99-0.999 needs thousands of steps), so that
        inference-mode outputs, validation included, would lag the model; after
        each epoch, one pass over training images sets them exactly.
        """
        layers = [
            layer
            for layer in self.backbone.layers
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        momenta = [layer.momentum for layer in layers]
        sums = [[0.0, 0.0] for _ in layers]
        count = 0
        try:
            for layer in layers:  # the moving statistics become the batch's
                layer.momentum = 0.0
            for images in batches:
                self._training_forward(images)
                count += 1
                for total, layer in zip(sums, layers, strict=True):
                    total[0] += np.asarray(layer.moving_mean, np.float64)
                    total[1] += np.asarray(layer.moving_variance, np.float64)
        finally:
            for layer, momentum in zip(layers, momenta, strict=True):
                layer.momentum = momentum
        for (mean, variance), layer in zip(sums, layers, strict=True):
            if count:
                layer.moving_mean.assign(mean / count)
                layer.moving_variance.assign(variance / count)

    @functools.cached_property
    def _training_forward(self) -> Callable:
        """The model in training mode as a graph function, traced once (with the
        momentum `estimate_batchnorm` sets)."""
        shape = [None, *self.model.input_shape[1:]]

        @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32)])
        def forward(images):
            return self.model(images, training=True)

        return forward

    def cut(self) -> str | None:
        """Where stage 2's frozen part ends: the deepest layer below the first
        unfrozen one that every path goes through (None: nothing below it)."""
        return cut_below(self.backbone, self.unfrozen[0])

    def extractor(self, cut: str | None) -> keras.Model:
        """Pixels → {the final layer: pooled codes, `cut`: its raw output}, in one
        forward pass of the frozen backbone (`tl.features.build_extractor`)."""
        taps = _taps(self.backbone, self.spec, [self.final_layer, cut])
        poolings = [Pooling.parse(self.settings.pooling), Pooling("none")]
        with self.strategy.scope():
            return build_extractor(
                self.backbone, self.spec, taps, poolings[: len(taps)]
            )

    def top(self, cut: str) -> keras.Model:
        """The output of `cut` → class probabilities: the backbone above `cut` (in
        inference mode), the pooling and the head, sharing `model`'s layers."""
        tail = keras.Model(
            self.backbone.get_layer(cut).output,
            self.backbone.output,
            name=f"{self.backbone.name}_above_{cut}",
        )
        with (
            self.strategy.scope(),
            compute_policy(self.settings.backbone.precision),
        ):
            inputs = keras.Input(tail.inputs[0].shape[1:], name=cut)
            x = InferenceMode(tail, name="backbone")(inputs)
            x = self.model.get_layer("pool")(x)
            return keras.Model(inputs, self.head(x), name=f"{self.model.name}_top")


def _taps(backbone: keras.Model, spec: BackboneSpec, names: list) -> list[Tap]:
    by_layer = {tap.layer: tap for tap in layer_taps(backbone, spec)}
    return [by_layer[name] for name in names if name is not None]


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
    head_input: HeadInput | None = None,
    strategy: tf.distribute.Strategy | None = None,
) -> FineTuneModel:
    """Build backbone and head under the settings' precision.

    Args:
        settings: the run's settings.
        num_classes: outputs of the head.
        head_input: how the head normalises the pooled codes (None: not at all;
            `FineTuneModel.replace_head` sets it once the codes are known).
        strategy: the `tf.distribute` strategy whose scope holds the variables.

    The head (its Normalization, final Dense layer and softmax) runs in float32
    whatever the precision. With `l2_sp`, every backbone weight carries the L2-SP
    penalty (counted only while the weight is trainable).
    """
    settings = settings.resolved()
    spec = settings.backbone.spec
    strategy = strategy or tf.distribute.get_strategy()
    # Outside the strategy's scope: building clears Keras' session, which a
    # surrounding scope does not survive.
    backbone, weights = settings.backbone.build(settings.image.size)
    with strategy.scope():
        if tf.distribute.has_strategy():
            backbone = _copy_into_scope(backbone)
        final_layer = resolve_layers(layer_taps(backbone, spec), ["last"], spec.name)
        unfrozen = unfrozen_layers(backbone, spec, settings.unfreeze)
        if settings.l2_sp:
            for variable in backbone.trainable_weights:
                anchor = keras.Variable(variable.numpy().copy(), trainable=False)
                variable.regularizer = _TowardsPretrained(anchor, settings.l2_sp)
        head, model = _assemble(backbone, spec, settings, num_classes, head_input)
    return FineTuneModel(
        model,
        head,
        backbone,
        spec,
        weights,
        settings,
        num_classes,
        final_layer[0].layer,
        [layer.name for layer in unfrozen],
        strategy,
    )


def _assemble(
    backbone: keras.Model,
    spec: BackboneSpec,
    settings: FineTuneSettings,
    num_classes: int,
    head_input: HeadInput | None,
) -> tuple[keras.Model, keras.Model]:
    """The head, and the whole model that ends with it."""
    global_pooling = {
        "avg": keras.layers.GlobalAveragePooling2D,
        "max": keras.layers.GlobalMaxPooling2D,
    }[settings.pooling]
    keras.utils.set_random_seed(settings.seed)  # the same head on any strategy
    with compute_policy(settings.backbone.precision):
        codes = keras.Input((backbone.output.shape[-1],), name="codes")
        x = codes
        if head_input is not None:
            if head_input.l2_normalize:
                x = keras.layers.UnitNormalization(dtype="float32", name="l2")(x)
            x = keras.layers.Normalization(
                mean=head_input.mean,
                variance=head_input.variance,
                dtype="float32",
                name="standardize",
            )(x)
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
        head = keras.Model(codes, probabilities, name="head")

        pixels = keras.Input((*settings.image.size, 3), name="pixels")
        x = BackbonePreprocessing(spec.name, name="preprocess")(pixels)
        if settings.from_scratch:
            x = backbone(x)  # BatchNorm in training mode while fit trains
        else:
            x = InferenceMode(backbone, name="backbone")(x)
        x = global_pooling(dtype="float32", name="pool")(x)  # as extraction pools
        model = keras.Model(pixels, head(x), name=f"{spec.name}_finetune")
    return head, model
