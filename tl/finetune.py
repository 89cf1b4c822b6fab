"""Fine-tuning: a head on a registry backbone, trained in two stages, exported whole.

`fine_tune` indexes an image folder, holds out stratified validation and test splits,
builds `pixels → backbone preprocessing → backbone → global pooling → dropout → head`
and trains it in two stages: the head alone on the frozen backbone, then the top of the
backbone too (`unfreeze`: a block alias, a layer, `all` or a fraction) with a lower
learning rate under a linear warmup and a cosine decay. The head can start from a
linear probe saved by `train_classifier.py` (LP-FT): its scaler and PCA are folded into
the Dense layer, so the untrained model predicts exactly what the probe predicts.

The backbone always runs in inference mode: its BatchNormalization layers keep their
(ImageNet) statistics even where their weights train. Keras' recipe of calling the
backbone with `training=False` no longer does that in Keras 3, whose functional models
pass `fit`'s `training=True` down to nested models (keras-team/keras#20285); tl wraps
the backbone in `InferenceMode`, which calls it with `training=False` whatever the
context.

A run writes into its output folder, epoch by epoch, what it needs to resume after an
interruption (`state.json`: settings, data fingerprints, progress, early-stopping
state, history; `checkpoints/`: weights, random seed states and optimizer state;
`best.npz`), and at the end (the checkpoints removed, `state.json` kept so that a
re-run returns at once):

    model.keras            the trained model: raw RGB pixels in [0, 255] → probabilities
                           (its last layer, `ClassNames`, holds the class names)
    metadata.json          format `tl-finetuned`, class names, image settings, settings,
                           data, best epoch, test metrics, versions, files (the
                           SHA-256 of model.keras)
    results.csv/.json      test metrics in the classifier leaderboard's schema
    confusion_matrix.csv/.png, history.csv/.png, splits.csv (path, label, split)

`load_finetuned` reads a run back for prediction (`predict.py`): it checks
metadata.json and the SHA-256 of model.keras first, loads it in Keras' safe mode (only
registered layers are built: Keras' own and tl's; a `Lambda` layer is refused) and
refuses a metadata.json whose class names differ from the model's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from keras import ops
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.decomposition import PCA
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import Normalizer, StandardScaler
from tqdm.auto import tqdm

from tl._checks import check_choice, check_interval
from tl._settings import FlatSettings
from tl.backbones import (
    BackboneSettings,
    BackboneSpec,
    WeightsInfo,
    get_backbone,
    layer_taps,
    resolve_layers,
)
from tl.classifiers import (
    CLASS_WEIGHTS,
    CLASSIFIERS,
    SavedClassifier,
    load_classifier,
)
from tl.engines.keras import compiled_extractor
from tl.errors import TLError
from tl.features import ExtractionSettings
from tl.images import (
    ImageIndex,
    ImageSettings,
    decoded_batches,
    index_images,
    load_image,
)
from tl.model_folder import (
    METADATA,
    check_files,
    check_schema,
    check_unedited,
    file_hashes,
    read_metadata,
    require_keys,
    unreadable,
)
from tl.precision import compute_policy
from tl.provenance import (
    INFERENCE_KEYS,
    identity_differences,
    layer_identity,
    library_versions,
)
from tl.reports import (
    classification_metrics,
    metric_rows,
    plot_confusion,
    write_results,
)

log = logging.getLogger("tl")

MODEL_FORMAT = "tl-finetuned"
MODEL_SCHEMA_VERSION = 2  # 1: no file hashes, no class names in model.keras
MODEL_FILE = "model.keras"
HEADS = ("linear", "mlp")
GLOBAL_POOLINGS = ("avg", "max")
DEFAULT_HEAD_EPOCHS = 5
DEFAULT_DROPOUT = 0.2

# Keras preprocessing layers for `augment`; factors suit photographs (see README).
AUGMENTATIONS: dict[str, Callable[[int], keras.layers.Layer]] = {
    "flip": lambda seed: keras.layers.RandomFlip("horizontal", seed=seed),
    "vflip": lambda seed: keras.layers.RandomFlip("vertical", seed=seed),
    "rotation": lambda seed: keras.layers.RandomRotation(0.05, seed=seed),  # ±18°
    "zoom": lambda seed: keras.layers.RandomZoom(0.1, seed=seed),  # ±10%
    "contrast": lambda seed: keras.layers.RandomContrast(0.2, seed=seed),
}

# Files of a run (all of them; `overwrite` deletes exactly these).
_STATE = "state.json"
_CHECKPOINTS = "checkpoints"
_BEST = "best.npz"
_OUTPUTS = (
    "model.keras",
    "metadata.json",
    "results.csv",
    "results.json",
    "confusion_matrix.csv",
    "confusion_matrix.png",
    "history.csv",
    "history.png",
    "splits.csv",
)


# ---------------------------------------------------------------------------------
# Settings


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise TLError(message)


def _fraction(text: str) -> float | None:
    """`text` as a number when it is one (`0.3`), else None (a layer name)."""
    try:
        return float(text)
    except ValueError:
        return None


# Each training step costs about a quarter of vgg16's (4.1 vs 15.5 GFLOPs per image
# at 224x224, backward pass not counted); extraction keeps vgg16's classic codes.
DEFAULT_BACKBONE = "resnet50"


@dataclasses.dataclass(frozen=True)
class FineTuneSettings(FlatSettings):
    """Everything that determines a fine-tuned model; stored flat with it and
    compared when a run resumes.

    Derived values (the image size from the backbone, `head_epochs` and `dropout`
    from `init_head`) stay None here and are filled in by `resolved`, which
    `fine_tune` and `build_model` call: a copy made with `dataclasses.replace` or
    `updated` (another backbone, another `init_head`) derives them afresh.

    Attributes:
        backbone: as in `tl.features.ExtractionSettings`; its seed also drives the
            head's initialisation, the splits, shuffling and augmentation.
        image: as in `tl.features.ExtractionSettings`.
        pooling: global pooling of the last feature map, `avg` or `max`.
        head: `linear` (one Dense layer) or `mlp` (Dense + ReLU, dropout, Dense).
        hidden_units: width of the MLP's hidden layer.
        dropout: dropout rate before the head's Dense layers (0 disables); None
            means 0 with `init_head` (a folded probe reads uncentred features, on
            which dropout is much noisier) and `DEFAULT_DROPOUT` without.
        init_head: folder of a linear classifier saved by `train_classifier.py` on
            the final pooled codes of the same backbone and weights (LP-FT).
        unfreeze: what stage 2 trains besides the head: a block alias (`conv5`,
            `block5`, `stage4`, `last`: that block and everything above it), a Keras
            layer name (that layer and everything above it), `all`, or a fraction
            F in (0, 1] (the top F of the backbone's layers that have weights).
        head_epochs: stage-1 epochs (backbone frozen); None means 0 with `init_head`
            (the probe is the trained head) and `DEFAULT_HEAD_EPOCHS` without.
        epochs: stage-2 epochs (0 trains the head only).
        batch_size: images per step, over all replicas.
        head_learning_rate: stage-1 learning rate (constant).
        learning_rate: stage-2 peak learning rate, reached after `warmup_epochs` of
            linear warmup from 0, then cosine decay to 0.
        warmup_epochs: stage-2 warmup length in epochs (fractions allowed).
        augment: names of `AUGMENTATIONS` applied to training batches.
        label_smoothing: cross-entropy label smoothing.
        weight_decay: AdamW decoupled weight decay (biases and normalisation
            parameters excluded; with `l2_sp`, the backbone too: then it is the
            L2-SP paper's penalty on the head).
        l2_sp: strength α of L2-SP, (α/2)·‖w − w₀‖² over the trainable backbone
            weights w with pretrained values w₀ (Li et al., ICML 2018).
        class_weight: None or `balanced` (loss weights n / (K·n_k)); `none` is read
            as None.
        val_split: fraction of the non-test images held out, stratified, for
            validation (early stopping, best checkpoint); 0 disables validation.
        test_split: fraction held out, stratified, for the final evaluation.
        patience: stop a stage after this many epochs without a lower validation
            loss (0: never stop early).
    """

    backbone: BackboneSettings = dataclasses.field(
        default_factory=lambda: BackboneSettings(DEFAULT_BACKBONE)
    )
    image: ImageSettings = dataclasses.field(default_factory=ImageSettings)
    pooling: str = "avg"
    head: str = "linear"
    hidden_units: int = 256
    dropout: float | None = None
    init_head: str | None = None
    unfreeze: str = "all"
    head_epochs: int | None = None
    epochs: int = 10
    batch_size: int = 32
    head_learning_rate: float = 1e-3
    learning_rate: float = 1e-4
    warmup_epochs: float = 1.0
    augment: tuple[str, ...] = ()
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    l2_sp: float = 0.0
    class_weight: str | None = None
    val_split: float = 0.1
    test_split: float = 0.2
    patience: int = 3

    def __post_init__(self):
        def set_(name, value):
            object.__setattr__(self, name, value)

        self.check_parts()
        set_("unfreeze", str(self.unfreeze))
        set_("augment", tuple(self.augment))
        if self.class_weight == "none":  # as the command line spells it
            set_("class_weight", None)
        check_choice("pooling", self.pooling, GLOBAL_POOLINGS)
        for name in self.augment:
            check_choice("augment", name, AUGMENTATIONS)
        check_choice("head", self.head, HEADS)
        check_choice("class_weight", self.class_weight, CLASS_WEIGHTS)
        if self.init_head is not None:
            _require(
                self.head == "linear",
                f"--init-head starts a linear head from a saved linear classifier; "
                f"it cannot initialise --head {self.head}. Use --head linear.",
            )
            set_("init_head", str(Path(self.init_head).expanduser().resolve()))
        self._check_numbers()
        fraction = _fraction(self.unfreeze)
        if fraction is not None:
            check_interval(
                "unfreeze",
                fraction,
                low=0,
                high=1,
                closed="right",
                advice="To train the head only, pass --epochs 0.",
            )

    def _check_numbers(self) -> None:
        whole = {"low": 0, "integer": True}
        for name, bounds in [
            ("epochs", whole),
            ("head_epochs", whole),
            ("batch_size", {"low": 1, "integer": True}),
            ("hidden_units", {"low": 1, "integer": True}),
            ("dropout", {"low": 0, "high": 1, "closed": "left"}),
            ("head_learning_rate", {"low": 0, "closed": "neither"}),
            ("learning_rate", {"low": 0, "closed": "neither"}),
            ("warmup_epochs", {"low": 0}),
            ("label_smoothing", {"low": 0, "high": 1, "closed": "left"}),
            ("weight_decay", {"low": 0}),
            ("l2_sp", {"low": 0}),
            ("val_split", {"low": 0, "high": 1, "closed": "left"}),
            ("test_split", {"low": 0, "high": 1, "closed": "neither"}),
            ("patience", whole),
        ]:
            value = getattr(self, name)
            if value is not None:  # head_epochs and dropout: derived when used
                check_interval(name, value, **bounds)
        _require(
            self.epochs + self._head_epochs() > 0 or self.init_head is not None,
            "Nothing to train: --head-epochs and --epochs are both 0.",
        )

    def _head_epochs(self) -> int:
        if self.head_epochs is not None:
            return self.head_epochs
        return 0 if self.init_head else DEFAULT_HEAD_EPOCHS

    def _dropout(self) -> float:
        if self.dropout is not None:
            return self.dropout
        return 0.0 if self.init_head else DEFAULT_DROPOUT

    def resolved(self) -> FineTuneSettings:
        """These settings with the derived values filled in: the image size from
        the backbone, `head_epochs` and `dropout` from `init_head`."""
        return dataclasses.replace(
            self,
            image=self.image.resolved(self.backbone.spec),
            head_epochs=self._head_epochs(),
            dropout=self._dropout(),
        )

    @property
    def seed(self) -> int:
        """The backbone's seed, which seeds everything random in a run."""
        return self.backbone.seed

    def extraction_settings(self) -> ExtractionSettings:
        """The settings `extract_features.py` would use for this model's pooled
        final-layer codes: what a probe for `init_head` must have been trained on."""
        return ExtractionSettings(
            self.backbone, self.image, layers=("last",), pooling=(self.pooling,)
        )


# ---------------------------------------------------------------------------------
# Model


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


def _numbered_alias(alias: str) -> tuple[str, int] | None:
    match = re.fullmatch(r"(.*?)(\d+)", alias)
    return (match[1], int(match[2])) if match else None


def unfrozen_layers(backbone: keras.Model, spec: BackboneSpec, unfreeze: str) -> list:
    """The backbone layers that `unfreeze` selects, in topological order.

    A numbered alias (`conv5`, `block5`, `stage4`) selects its block, from the layer
    after the previous alias of the same kind (`conv4`) up, and everything above it;
    `last` selects the final block (the family's alias when there
    is one, else the last stage). A Keras layer name selects that layer and all
    later ones, `all` every layer, a fraction F the top F of the layers with weights.

    Raises:
        TLError: for an unknown name, or a selection with no weights to train.
    """
    layers = [
        layer
        for layer in backbone.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]
    fraction = _fraction(unfreeze)
    if unfreeze == "all":
        start = 0
    elif fraction is not None:
        weighted = [i for i, layer in enumerate(layers) if layer.weights]
        start = weighted[-math.ceil(fraction * len(weighted))]
    else:
        taps = layer_taps(backbone, spec)
        position = {tap.layer: i for i, tap in enumerate(taps)}
        by_alias = {alias: tap for tap in taps for alias in tap.aliases}
        if unfreeze in by_alias:
            numbered = [
                _numbered_alias(alias)
                for alias in [unfreeze, *by_alias[unfreeze].aliases]
                if _numbered_alias(alias)
            ]
            numbered.sort(key=lambda alias: alias[0] == "stage")  # family first
            prefix, number = numbered[0]
            previous = by_alias.get(f"{prefix}{number - 1}")
            start = position[previous.layer] + 1 if previous else 0
        elif unfreeze in position:
            start = position[unfreeze]
        else:
            try:
                resolve_layers(taps, [unfreeze], spec.name)  # raises, listing names
            except TLError as error:
                raise TLError(
                    f"--unfreeze: {error} Or pass all, or a fraction such as 0.3."
                ) from None
    selected = layers[start:]
    if not any(layer.weights for layer in selected):
        names = ", ".join(layer.name for layer in selected)
        raise TLError(
            f"--unfreeze {unfreeze!r} selects {names} "
            f"of {spec.name}, which have no weights to train. Choose an earlier "
            f"block (see --list-layers {spec.name})."
        )
    return selected


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


# ---------------------------------------------------------------------------------
# LP-FT: the head from a saved linear probe


def _step(pipeline, name):
    step = pipeline.named_steps.get(name)
    return None if step in (None, "passthrough") else step


def linear_head_weights(
    saved: SavedClassifier, class_names: list[str]
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Fold a saved linear probe into one Dense layer on the pooled codes.

    The pipeline `normalize → pca → classifier` is affine after an optional l2
    normalisation: with scaler mean μ and scale σ, PCA mean m and components C
    (divided by √explained variance when whitening), classifier weights W and
    intercept b, the logits of codes x are W·C·((x − μ)/σ − m) + b. Binary probes
    (one row of weights, score z) become logits [0, z], so that softmax gives
    logistic regression's probabilities and argmax the decision of the others.

    Returns:
        (kernel (D, K), bias (K,), l2_normalize) in float64.

    Raises:
        TLError: for a non-linear classifier, or one trained on other classes than
            `class_names` (or not on all of them).
    """
    name = saved.metadata["classifier"]
    if name not in CLASSIFIERS or not CLASSIFIERS[name].linear:
        linear = [spec.name for spec in CLASSIFIERS.values() if spec.linear]
        raise TLError(
            f"--init-head needs a linear classifier ({', '.join(linear)}); the saved "
            f"model is {name!r}. Train a linear one with train_classifier.py."
        )
    if list(saved.class_names) != list(class_names):
        raise TLError(
            f"--init-head was trained on classes {saved.class_names}, the data has "
            f"{class_names}."
        )
    pipeline = saved.pipeline
    classifier = pipeline.named_steps["classifier"]
    if not np.array_equal(classifier.classes_, np.arange(len(class_names))):
        raise TLError(
            f"--init-head saw only the classes numbered {classifier.classes_.tolist()} "
            f"of {len(class_names)} in training; a head needs weights for every class."
        )
    weights = np.atleast_2d(np.asarray(classifier.coef_, np.float64))
    bias = np.broadcast_to(
        np.asarray(classifier.intercept_, np.float64), (weights.shape[0],)
    ).copy()
    pca = _step(pipeline, "pca")
    if isinstance(pca, PCA):
        components = pca.components_.astype(np.float64)
        if pca.whiten:
            components = components / np.sqrt(pca.explained_variance_)[:, None]
        weights = weights @ components
        bias = bias - weights @ pca.mean_
    normalizer = _step(pipeline, "normalize")
    l2_normalize = False
    if isinstance(normalizer, StandardScaler):
        if normalizer.scale_ is not None:
            weights = weights / normalizer.scale_
        if normalizer.mean_ is not None:
            bias = bias - weights @ normalizer.mean_
    elif isinstance(normalizer, Normalizer) and normalizer.norm == "l2":
        l2_normalize = True
    elif normalizer is not None:
        raise TLError(
            f"--init-head cannot fold the normalisation {normalizer!r} into a Dense "
            f"layer; train the probe with --normalization standard, l2 or none."
        )
    if weights.shape[0] == 1:  # binary: score z of class 1
        weights = np.vstack([np.zeros_like(weights), weights])
        bias = np.concatenate([[0.0], bias])
    return weights.T, bias, l2_normalize


def check_init_head(
    saved: SavedClassifier, net: FineTuneModel, settings: FineTuneSettings
) -> None:
    """Refuse a probe trained on other codes than this model computes.

    The codes must come from the same backbone, weights (by SHA-256), image size,
    resize, interpolation and antialiasing, at the backbone's final layer with the
    model's global pooling. (The compute precision and engine may differ: they change
    codes by rounding.)
    """
    settings = settings.resolved()
    ours = layer_identity(
        {
            **settings.extraction_settings().to_json(),
            "weights_sha256": net.weights.sha256,
        },
        {"layer": net.final_layer, "pooling": settings.pooling},
    )
    differences = identity_differences(
        saved.identity, ours, ignore=INFERENCE_KEYS, names=("probe has", "this model")
    )
    if differences:
        hint = ""
        if any(d.startswith(("layer:", "pooling:")) for d in differences):
            hint = (
                f" Train the probe on --layers last --pooling {settings.pooling} "
                f"codes of {net.spec.name}."
            )
        raise TLError(
            f"--init-head {settings.init_head!r} was trained on other codes than this "
            f"model computes: {'; '.join(differences)}.{hint}"
        )


def initialise_head(
    net: FineTuneModel,
    saved: SavedClassifier,
    settings: FineTuneSettings,
    class_names: list[str],
) -> None:
    """Check `saved` against the model, then set the head to its folded weights."""
    check_init_head(saved, net, settings)
    kernel, bias, _ = linear_head_weights(saved, class_names)
    logits = net.model.get_layer("logits")
    if kernel.shape != tuple(logits.kernel.shape):
        raise TLError(
            f"--init-head folds into a {kernel.shape} kernel (features x classes), "
            f"the model's head has {tuple(logits.kernel.shape)}."
        )
    logits.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])


# ---------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class Splits:
    """The images of a run: training, validation (None without) and test."""

    train: ImageIndex
    val: ImageIndex | None
    test: ImageIndex
    skipped: list[tuple[str, str]]  # (path, reason) of files that cannot be used

    def items(self) -> list[tuple[str, ImageIndex]]:
        named = [("train", self.train), ("val", self.val), ("test", self.test)]
        return [(name, index) for name, index in named if index is not None]

    def fingerprints(self) -> dict[str, str]:
        return {name: index.fingerprint() for name, index in self.items()}


def _subset(index: ImageIndex, positions: np.ndarray) -> ImageIndex:
    positions = np.sort(positions)
    return ImageIndex(
        index.root,
        [index.paths[p] for p in positions],
        index.labels[positions],
        index.class_names,
    )


def _class_counts(index: ImageIndex) -> dict[str, int]:
    counts = np.bincount(index.labels, minlength=len(index.class_names))
    return dict(zip(index.class_names, counts.tolist(), strict=True))


def _names(names: list[str]) -> str:
    return ", ".join(map(repr, names))


def labelled_index(source: str | Path, role: str = "training") -> ImageIndex:
    """Index `source`, refusing unlabeled data, a single class or an empty class."""
    index = index_images(source)
    if not index.class_names:
        raise TLError(
            f"The {role} images {str(source)!r} have no labels: fine-tuning needs one "
            f"sub-folder per class (or a path,label CSV)."
        )
    empty = [name for name, count in _class_counts(index).items() if not count]
    if empty:
        raise TLError(
            f"Class {_names(empty)} of {str(index.root)!r} has no images; add images "
            f"or remove the empty folder."
        )
    if len(index.class_names) < 2:
        raise TLError(
            f"{str(index.root)!r} has one class ({index.class_names[0]!r}); "
            f"classification needs at least two."
        )
    return index


def _over_images(
    paths: list[str],
    settings: ImageSettings,
    batch_size: int,
    apply: Callable | None = None,
    progress: bool = False,
    description: str = "",
) -> tuple[np.ndarray, list[np.ndarray], list[tuple[int, str]]]:
    """Decode `paths` in parallel, optionally calling `apply` on each batch.

    Returns:
        Positions of the decoded files, `apply`'s outputs per batch, and
        (position, reason) for each file that could not be decoded.
    """
    kept, outputs, skipped = [np.empty(0, np.int64)], [], []
    with tqdm(
        total=len(paths), desc=description, unit="img", disable=not progress
    ) as bar:
        for batch in decoded_batches(paths, settings, batch_size):
            kept.append(batch.positions)
            skipped += batch.skipped
            if apply is not None and batch.images is not None:
                outputs.append(np.asarray(apply(batch.images)))
            bar.update(batch.end - bar.n)
    return np.concatenate(kept), outputs, skipped


def _readable(
    index: ImageIndex, settings: ImageSettings, batch_size: int, progress: bool
) -> tuple[ImageIndex, list[tuple[str, str]]]:
    """`index` without the files that cannot be decoded, and why each was dropped."""
    paths = index.absolute_paths()
    kept, _, skipped = _over_images(
        paths, settings, batch_size, progress=progress, description="checking images"
    )
    for position, reason in skipped:
        log.warning("skipped %s: %s", paths[position], reason)
    readable = _subset(index, kept)
    empty = [name for name, count in _class_counts(readable).items() if not count]
    if empty:
        raise TLError(
            f"No image of class {_names(empty)} in {str(index.root)!r} could be "
            f"decoded (see the warnings above)."
        )
    return readable, [(paths[p], reason) for p, reason in skipped]


def _split(
    index: ImageIndex, fraction: float, seed: int, role: str
) -> tuple[ImageIndex, ImageIndex]:
    """Stratified split: (the rest, `fraction` of each class held out for `role`)."""
    small = [f"{name!r} ({n})" for name, n in _class_counts(index).items() if n < 2]
    if small:
        raise TLError(
            f"Cannot hold out a stratified {role} split: class {', '.join(small)} "
            f"has fewer than 2 images. Add images, or pass --{role}-dir."
        )
    try:
        rest, held = train_test_split(
            np.arange(len(index)),
            test_size=fraction,
            stratify=index.labels,
            random_state=seed,
        )
    except ValueError as error:
        raise TLError(
            f"Cannot hold out {fraction:g} of {len(index)} images as a stratified "
            f"{role} split over {len(index.class_names)} classes: "
            f"{str(error).rstrip('.')}. Change "
            f"--{role}-split or pass --{role}-dir."
        ) from None
    return _subset(index, rest), _subset(index, held)


def prepare_splits(
    index: ImageIndex,
    settings: FineTuneSettings,
    *,
    val: ImageIndex | None = None,
    test: ImageIndex | None = None,
    progress: bool = False,
) -> Splits:
    """Drop undecodable files and split train/val/test.

    Args:
        index: the labelled images (see `labelled_index`).
        settings: the run's settings (image settings, splits, seed).
        val, test: separate validation and test images, with the same classes.
        progress: show a progress bar while checking that the images decode.

    Without separate images, `settings.test_split` and then `settings.val_split` of
    each class are held out (stratified, seeded by `settings.seed`).
    """
    for role, other in (("val", val), ("test", test)):
        if other is not None and other.class_names != index.class_names:
            raise TLError(
                f"The {role} images {str(other.root)!r} have classes "
                f"{other.class_names}, the training images {index.class_names}; "
                f"they must be the same."
            )
    check = settings.image, settings.batch_size, progress
    index, skipped = _readable(index, *check)
    if test is None:
        index, test = _split(index, settings.test_split, settings.seed, "test")
    else:
        test, dropped = _readable(test, *check)
        skipped += dropped
    if val is not None:
        val, dropped = _readable(val, *check)
        skipped += dropped
    elif settings.val_split:
        index, val = _split(index, settings.val_split, settings.seed, "val")
    return Splits(index, val, test, skipped)


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Balanced class weights n / (K·n_k), as scikit-learn's `balanced`."""
    counts = np.bincount(labels, minlength=num_classes)
    return len(labels) / (num_classes * np.maximum(counts, 1))


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _training_batches(
    index: ImageIndex,
    settings: FineTuneSettings,
    epoch: int,
    sample_weights: np.ndarray | None,
    full_batches: bool,
) -> tf.data.Dataset:
    """One epoch of (pixels, one-hot labels[, sample weights]), decoded in parallel.

    Shuffled and augmented with seeds derived from (seed, epoch), so an epoch's
    batches are the same in a resumed run. `full_batches` drops a last, smaller batch.
    """
    image_settings = settings.image
    paths = tf.constant(index.absolute_paths())
    labels = tf.constant(index.labels)
    classes = len(index.class_names)
    weights = None
    if sample_weights is not None:
        weights = tf.constant(sample_weights[index.labels], tf.float32)

    @tf.autograph.experimental.do_not_convert
    def load(position):
        image = load_image(paths[position], image_settings)
        example = (image, tf.one_hot(labels[position], classes))
        return example if weights is None else (*example, weights[position])

    seed = _epoch_seed(settings.seed, epoch)
    order = np.random.default_rng(seed).permutation(len(index))  # not TF's seeds
    dataset = tf.data.Dataset.from_tensor_slices(order)
    # Every file decoded once already (`prepare_splits`): a failure now is an error.
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(settings.batch_size, drop_remainder=full_batches)
    if settings.augment:
        augment = keras.Sequential(
            [AUGMENTATIONS[name](seed + i) for i, name in enumerate(settings.augment)]
        )

        @tf.autograph.experimental.do_not_convert
        def augmented(images, *rest):
            return (augment(images, training=True), *rest)

        dataset = dataset.map(augmented)  # sequential: random state in order
    return dataset.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------
# Training state: what a resumed run needs


@dataclasses.dataclass
class _State:
    """Progress of a run, committed to `state.json` after every epoch.

    `epoch` counts finished epochs over both stages; `stage_epochs` those of the
    current `stage`. `best_epoch` is the epoch of the lowest validation loss (-1:
    the model before training). `checkpoint` names the file holding the weights and
    optimizer state after the last finished epoch.
    """

    identity: dict
    stage: int = 1
    epoch: int = 0
    stage_epochs: int = 0
    best: float | None = None
    best_epoch: int | None = None
    wait: int = 0
    stopped: bool = False
    fit_seconds: float = 0.0
    checkpoint: str | None = None
    complete: bool = False
    history: list[dict] = dataclasses.field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> _State | None:
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))

    def commit(self, path: Path) -> None:
        """Write atomically: a kill leaves the previous or the new state."""
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        os.replace(temporary, path)


def _save_variables(path: Path, variables: list) -> None:
    """Write variables' values to an .npz file, atomically."""
    temporary = path.with_name(f"{path.name}.tmp")
    with open(temporary, "wb") as handle:
        np.savez(handle, *[np.asarray(variable) for variable in variables])
    os.replace(temporary, path)


def _load_variables(path: Path, variables: list) -> None:
    with np.load(path) as saved:
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(arrays) != len(variables):
        raise TLError(
            f"{str(path)!r} holds {len(arrays)} variables, this model has "
            f"{len(variables)}: it was written by another version of tl. Pass "
            f"--overwrite to start over."
        )
    for variable, array in zip(variables, arrays, strict=True):
        variable.assign(array)


def _checkpointed(model: keras.Model) -> list:
    """What an epoch's checkpoint holds: the model's weights and random seed states,
    and the optimizer's state (moments, step count: the schedule's position)."""
    if not model.optimizer.built:  # before the first step of a resumed stage
        model.optimizer.build(model.trainable_variables)
    return [*model.variables, *model.optimizer.variables]


def _remove_run_files(directory: Path) -> None:
    for name in (*_OUTPUTS, _STATE, _BEST):
        (directory / name).unlink(missing_ok=True)
    shutil.rmtree(directory / _CHECKPOINTS, ignore_errors=True)


@dataclasses.dataclass
class _TrainingJob:
    """One fine-tuning run being trained: the model, its images, its progress and
    its folder."""

    net: FineTuneModel
    settings: FineTuneSettings
    splits: Splits
    state: _State
    directory: Path

    @functools.cached_property
    def _predictor(self) -> Callable:
        return compiled_extractor(self.net.model)

    def predict(self, index: ImageIndex) -> tuple[np.ndarray, np.ndarray]:
        """Labels and predicted probabilities of the decodable images of `index`."""
        settings = self.settings
        kept, outputs, _ = _over_images(
            index.absolute_paths(),
            settings.image,
            settings.batch_size,
            self._predictor,
        )
        return index.labels[kept], np.concatenate(outputs)


# ---------------------------------------------------------------------------------
# Training


class _ProgressBar(keras.callbacks.Callback):
    """A tqdm bar over one epoch's steps, with the running loss."""

    def __init__(self, steps: int, description: str):
        super().__init__()
        self.steps = steps
        self.description = description
        self.bar = None

    def on_epoch_begin(self, epoch, logs=None):
        self.bar = tqdm(
            total=self.steps, desc=self.description, unit="step", leave=False
        )

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update(1)
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}")

    def on_epoch_end(self, epoch, logs=None):
        self.bar.close()


def _compile(net: FineTuneModel, settings: FineTuneSettings, stage: int, steps: int):
    """Set the stage's trainable layers and compile with a fresh optimizer.

    Stage 1: constant `head_learning_rate`. Stage 2: linear warmup from 0 to
    `learning_rate` over `warmup_epochs`, then cosine decay to 0 at the last step.
    """
    net.set_stage(stage)
    if stage == 1:
        learning_rate = settings.head_learning_rate
    else:
        total = max(1, settings.epochs * steps)
        warmup = min(total - 1, round(settings.warmup_epochs * steps))
        learning_rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else settings.learning_rate,
            decay_steps=total - warmup,
            warmup_target=settings.learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate, weight_decay=settings.weight_decay
    )
    optimizer.exclude_from_weight_decay(
        var_list=net.backbone.weights if settings.l2_sp else None,
        var_names=["bias", "gamma", "beta"],
    )
    net.model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            label_smoothing=settings.label_smoothing
        ),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


def _end_epoch(job: _TrainingJob, logs: dict, seconds: float) -> None:
    """Record an epoch, keep the best weights, decide early stopping, checkpoint."""
    model, state, directory = job.net.model, job.state, job.directory
    patience = job.settings.patience
    row = {
        "epoch": state.epoch,
        "stage": state.stage,
        **{key: float(value) for key, value in logs.items()},
        "learning_rate": float(ops.convert_to_numpy(model.optimizer.learning_rate)),
        "seconds": seconds,
    }
    state.history.append(row)
    state.fit_seconds += seconds
    if "val_loss" in logs:
        if state.best is None or row["val_loss"] < state.best:
            state.best, state.best_epoch, state.wait = row["val_loss"], state.epoch, 0
            _save_variables(directory / _BEST, model.variables)
        else:
            state.wait += 1
            state.stopped = bool(patience) and state.wait >= patience
    state.epoch += 1
    state.stage_epochs += 1
    name = f"epoch_{state.epoch:04d}.npz"
    (directory / _CHECKPOINTS).mkdir(exist_ok=True)
    _save_variables(directory / _CHECKPOINTS / name, _checkpointed(model))
    previous, state.checkpoint = state.checkpoint, name
    state.commit(directory / _STATE)
    if previous and previous != name:
        (directory / _CHECKPOINTS / previous).unlink(missing_ok=True)
    _write_history(state.history, directory)
    log.info(
        "epoch %d (stage %d): %s%s",
        row["epoch"] + 1,
        row["stage"],
        ", ".join(
            f"{key} {row[key]:.4g}"
            for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
            if key in row
        ),
        " (best)" if state.best_epoch == row["epoch"] else "",
    )


def _validation_logs(job: _TrainingJob) -> dict[str, float]:
    """`val_loss` (cross-entropy, without label smoothing or penalties) and
    `val_accuracy`, computed on one device (Keras' distributed validation fails on
    a last batch that does not split evenly over the replicas)."""
    labels, probabilities = job.predict(job.splits.val)
    true_class = probabilities[np.arange(len(labels)), labels]
    return {
        "val_loss": float(-np.mean(np.log(np.clip(true_class, 1e-7, 1.0)))),
        "val_accuracy": float(np.mean(probabilities.argmax(axis=1) == labels)),
    }


def _train(
    job: _TrainingJob, progress: bool, callbacks: Sequence[keras.callbacks.Callback]
) -> None:
    """Both stages, epoch by epoch, from wherever the run's state says it is."""
    net, settings, state, directory = job.net, job.settings, job.state, job.directory
    train = job.splits.train
    weights = None
    if settings.class_weight == "balanced":
        weights = class_weights(train.labels, len(train.class_names))
    # Several replicas get full batches only: a replica's share of a last, small
    # batch may be empty, which some CPU kernels refuse.
    full_batches = tf.distribute.get_strategy().num_replicas_in_sync > 1
    rounding = math.floor if full_batches else math.ceil
    steps = rounding(len(train) / settings.batch_size)
    if not steps:
        raise TLError(
            f"{len(train)} training images make no full batch of --batch-size "
            f"{settings.batch_size}; lower it."
        )
    if job.splits.val is not None and state.best is None:
        # The model before training is the first candidate: with --init-head, a
        # fine-tuning that never beats the probe on validation returns the probe.
        logs = _validation_logs(job)
        state.best, state.best_epoch = logs["val_loss"], -1
        _save_variables(directory / _BEST, net.model.variables)
        log.info(
            "before training: val_loss %.4g, val_accuracy %.4g",
            logs["val_loss"],
            logs["val_accuracy"],
        )
    total = settings.head_epochs + settings.epochs
    for stage, epochs in ((1, settings.head_epochs), (2, settings.epochs)):
        if stage < state.stage or not epochs:
            continue
        _compile(net, settings, stage, steps)
        if state.stage == stage and state.checkpoint:
            checkpoint = directory / _CHECKPOINTS / state.checkpoint
            _load_variables(checkpoint, _checkpointed(net.model))
            log.info("resuming stage %d after epoch %d", stage, state.epoch)
        else:
            state.stage, state.stage_epochs, state.wait = stage, 0, 0
            state.stopped, state.checkpoint = False, None
        what = "head" if stage == 1 else f"head and {len(net.unfrozen)} layers"
        while state.stage_epochs < epochs and not state.stopped:
            bar = _ProgressBar(
                steps, f"stage {stage} ({what}), epoch {state.epoch + 1}/{total}"
            )
            began = time.perf_counter()
            history = net.model.fit(
                _training_batches(train, settings, state.epoch, weights, full_batches),
                initial_epoch=state.epoch,
                epochs=state.epoch + 1,
                shuffle=False,
                verbose=0,
                callbacks=[*([bar] if progress else []), *callbacks],
            )
            logs = {key: values[-1] for key, values in history.history.items()}
            if job.splits.val is not None:
                logs.update(_validation_logs(job))
            _end_epoch(job, logs, time.perf_counter() - began)
        if state.stopped:
            log.info("stage %d stopped early: no better val_loss", stage)
        if state.best_epoch is not None:
            _load_variables(directory / _BEST, net.model.variables)


# ---------------------------------------------------------------------------------
# Reports


_HISTORY_COLUMNS = (
    "epoch",
    "stage",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "learning_rate",
    "seconds",
)


def _figure(columns: int) -> Figure:
    """A figure drawn without pyplot, so no global matplotlib backend is set."""
    return Figure(figsize=(5.5 * columns, 4.2), layout="constrained")


def _write_history(history: list[dict], directory: Path) -> None:
    """`history.csv` and `history.png`: loss and accuracy per epoch."""
    columns = [c for c in _HISTORY_COLUMNS if not history or c in history[0]]
    table = pd.DataFrame(history, columns=columns)
    table.to_csv(directory / "history.csv", index=False)
    if not history:
        return
    figure = _figure(2)
    stage_two = table.loc[table["stage"] == 2, "epoch"]
    for axes, metric in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for prefix, label in (("", "train"), ("val_", "validation")):
            if prefix + metric in table:
                axes.plot(table["epoch"] + 1, table[prefix + metric], "o-", label=label)
        if len(stage_two):
            axes.axvline(stage_two.iloc[0] + 0.5, color="grey", linestyle=":")
        axes.set(xlabel="epoch", ylabel=metric)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend()
    figure.suptitle("stage 1: head only; stage 2 (after the dotted line): fine-tuning")
    figure.savefig(directory / "history.png", dpi=100)


def _write_confusion(matrix: np.ndarray, class_names: list[str], directory: Path):
    """`confusion_matrix.csv` (rows: true class) and `confusion_matrix.png`."""
    table = pd.DataFrame(matrix, index=class_names, columns=class_names)
    table.index.name = "true \\ predicted"
    table.to_csv(directory / "confusion_matrix.csv")
    plot_confusion(
        matrix, class_names, directory / "confusion_matrix.png", "test, fine-tuned"
    )


def _write_splits(splits: Splits, directory: Path) -> None:
    rows = [
        (name, path, index.class_names[label])
        for name, index in splits.items()
        for path, label in zip(index.absolute_paths(), index.labels, strict=True)
    ]
    pd.DataFrame(rows, columns=["split", "path", "label"]).to_csv(
        directory / "splits.csv", index=False
    )


# ---------------------------------------------------------------------------------
# The saved model


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


def _metadata(
    job: _TrainingJob, source: Path, metrics: dict, saved: SavedClassifier | None
) -> dict:
    settings, net, splits, state = job.settings, job.net, job.splits, job.state
    return {
        "format": MODEL_FORMAT,
        "schema_version": MODEL_SCHEMA_VERSION,
        "class_names": splits.train.class_names,
        **settings.backbone.to_json(),
        "weights_sha256": net.weights.sha256,
        **settings.image.to_json(),
        "pooling": settings.pooling,
        "head": settings.head,
        "unfreeze": settings.unfreeze,
        "unfrozen_layers": net.unfrozen,
        "init_head": {
            "path": settings.init_head,
            "classifier": saved.metadata["classifier"],
            "normalization": saved.metadata["normalization"],
            "pca": saved.metadata["pca"],
            "identity": saved.identity,
        }
        if saved
        else None,
        "settings": settings.to_json(),
        "data": {
            "source": str(source),
            **{f"{name}_images": len(index) for name, index in splits.items()},
            "fingerprints": splits.fingerprints(),
            "skipped": splits.skipped,
        },
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "fit_seconds": state.fit_seconds,
        "test_metrics": metrics,
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class FineTuneResult:
    """What a call of `fine_tune` produced (also for a run that was already done)."""

    directory: Path
    metrics: dict[str, float]
    confusion_matrix: np.ndarray
    history: pd.DataFrame
    best_epoch: int | None  # the model's epoch: -1 before training, None without val
    epochs_run: int
    fit_seconds: float


def _result(directory: Path) -> FineTuneResult:
    metadata = json.loads((directory / "metadata.json").read_text())
    matrix = pd.read_csv(directory / "confusion_matrix.csv", index_col=0).to_numpy()
    return FineTuneResult(
        directory,
        metadata["test_metrics"],
        matrix,
        pd.read_csv(directory / "history.csv"),
        metadata["best_epoch"],
        metadata["epochs_run"],
        metadata["fit_seconds"],
    )


def _strategy() -> tf.distribute.Strategy:
    """MirroredStrategy over all visible GPUs; the default strategy without any."""
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        log.info("training on %d GPU(s) with MirroredStrategy", len(gpus))
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def fine_tune(
    source: str | Path,
    output_dir: str | Path,
    settings: FineTuneSettings | None = None,
    *,
    val_source: str | Path | None = None,
    test_source: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    strategy: tf.distribute.Strategy | None = None,
    **setting_overrides,
) -> FineTuneResult:
    """Fine-tune a registry backbone on an image folder and evaluate it.

    Args:
        source: a folder with one sub-folder per class, or a path,label CSV.
        output_dir: where the run writes (see the module docstring). If it holds an
            interrupted run with the same settings and data, that run resumes after
            its last finished epoch; a finished one is returned as it is; one with
            other settings is refused unless `overwrite`.
        settings: a `FineTuneSettings`; keyword arguments override it by its flat
            keys (`FineTuneSettings.updated`), e.g. `backbone="efficientnetb3"`.
        val_source, test_source: separate folders for validation and test instead
            of splitting them off `source`.
        overwrite: delete a previous run's files in `output_dir` first.
        progress: show progress bars.
        callbacks: extra Keras callbacks, passed to each epoch's `fit` call.
        strategy: a `tf.distribute` strategy; default: `MirroredStrategy` over all
            visible GPUs, or none on a machine without.

    Returns:
        A `FineTuneResult`: test metrics, confusion matrix, history, timings.
    """
    settings = (settings or FineTuneSettings()).updated(**setting_overrides)
    settings = settings.resolved()
    directory = Path(output_dir)
    source = Path(source).expanduser().resolve()
    images = {"train": labelled_index(source)}
    for role, other in (("val", val_source), ("test", test_source)):
        if other is not None:
            images[role] = labelled_index(other, role)
    state = _open_run(directory, settings, images, overwrite)
    if state.complete:
        log.info("%s is already complete; nothing to do.", directory)
        return _result(directory)

    class_names = images["train"].class_names
    saved = load_classifier(settings.init_head) if settings.init_head else None
    strategy = strategy or _strategy()
    l2_normalize = False
    if saved is not None:
        l2_normalize = linear_head_weights(saved, class_names)[2]
    net = build_model(
        settings, len(class_names), l2_normalize=l2_normalize, strategy=strategy
    )
    if saved is not None:
        initialise_head(net, saved, settings, class_names)
    splits = prepare_splits(
        images["train"],
        settings,
        val=images.get("val"),
        test=images.get("test"),
        progress=progress,
    )
    directory.mkdir(parents=True, exist_ok=True)
    log.info(
        "%s: %d classes; %s; stage 2 trains %d layers of %s (--unfreeze %s)",
        source,
        len(class_names),
        ", ".join(f"{len(index)} {name}" for name, index in splits.items()),
        len(net.unfrozen),
        net.spec.name,
        settings.unfreeze,
    )
    _write_splits(splits, directory)
    job = _TrainingJob(net, settings, splits, state, directory)
    with strategy.scope():
        _train(job, progress, callbacks)
    _export(job, source, saved)
    return _result(directory)


def _open_run(
    directory: Path,
    settings: FineTuneSettings,
    images: dict[str, ImageIndex],
    overwrite: bool,
) -> _State:
    """The state of the run in `directory`: new, to resume, or complete.

    Raises:
        TLError: when `directory` holds a run with other settings or images.
    """
    identity = {
        "settings": settings.to_json(),
        "data": {role: index.fingerprint() for role, index in images.items()},
    }
    if overwrite:
        _remove_run_files(directory)
    state = _State.load(directory / _STATE)
    if state is None:
        return _State(identity)
    differences = identity_differences(
        state.identity["settings"],
        identity["settings"],
        names=("file has", "this run asks"),
    )
    if state.identity["data"] != identity["data"]:
        differences.append("data: other images or labels")
    if differences:
        raise TLError(
            f"{str(directory)!r} holds a run with other settings: "
            f"{'; '.join(differences)}. Pass --overwrite to replace it, or choose "
            f"another --output-dir."
        )
    return state


def _export(job: _TrainingJob, source: Path, saved: SavedClassifier | None) -> None:
    """Evaluate on the test split, write the results and the model, mark complete."""
    settings, state, directory = job.settings, job.state, job.directory
    class_names = job.splits.train.class_names
    truth, probabilities = job.predict(job.splits.test)
    predicted = probabilities.argmax(axis=1)
    metrics = classification_metrics(truth, predicted)
    matrix = confusion_matrix(truth, predicted, labels=range(len(class_names)))
    rows = metric_rows(
        {**metrics, "fit_seconds": state.fit_seconds},
        method="fine_tune",
        layer=settings.unfreeze,
        classifier=settings.head + ("+lpft" if saved else ""),
        protocol="holdout",
        split="test",
        seed=settings.seed,
    )
    write_results(rows, directory)
    _write_confusion(matrix, class_names, directory)
    _write_history(state.history, directory)
    _inference_model(job.net.model, class_names).save(directory / MODEL_FILE)
    metadata = _metadata(job, source, metrics, saved)
    metadata["files"] = file_hashes(directory, [MODEL_FILE])
    (directory / METADATA).write_text(json.dumps(metadata, indent=2, default=str))
    state.complete = True
    state.commit(directory / _STATE)
    shutil.rmtree(directory / _CHECKPOINTS, ignore_errors=True)
    (directory / _BEST).unlink(missing_ok=True)  # model.keras holds these weights
