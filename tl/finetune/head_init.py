"""LP-FT: the head from a saved linear probe, folded exactly into its Dense layer."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.preprocessing import Normalizer, StandardScaler

from tl.classifiers import CLASSIFIERS, SavedClassifier
from tl.errors import TLError
from tl.finetune.model import FineTuneModel
from tl.finetune.settings import FineTuneSettings
from tl.provenance import identity_differences, layer_identity


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
    model's global pooling. (The compute precision may differ: it changes codes by
    rounding.)
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
        saved.identity, ours, ignore=("precision",), names=("probe has", "this model")
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
