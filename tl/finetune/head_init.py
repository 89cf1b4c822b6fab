"""How stage 1 starts a linear head: as an exact linear probe on the frozen codes.

The probe is fitted on the codes of the training images (a standardised logistic
regression, C chosen by cross-validation as `train_classifier.py` chooses it) or read
from a folder `train_classifier.py` saved (LP-FT, `--init-head`). Either is a pipeline
`normalize → pca → classifier`, affine in its normaliser's output, so it folds exactly
into the head's Normalization and Dense layers: before stage 2, the model predicts
what the probe predicts.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from threadpoolctl import threadpool_limits

from tl.classifiers import CLASSIFIERS, SavedClassifier, as_features
from tl.errors import TLError
from tl.evaluation import ComparisonSettings, choose_hyperparameters, fit_pipeline
from tl.finetune.model import FineTuneModel, HeadInput
from tl.finetune.settings import FineTuneSettings
from tl.provenance import INFERENCE_KEYS, identity_differences, layer_identity

PROBE_CLASSIFIER = "logreg"
_PARALLEL_SEARCH_VALUES = 2_000_000


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """A linear probe as one affine map of the pooled codes x:

        logits = weights · (z − mean) / scale + bias,   z = x (or x / ‖x‖)

    Attributes:
        weights: (classes, features), after PCA is folded in.
        bias: (classes,).
        mean, scale: the probe's standardisation; zeros and ones without one.
        standardized: whether the probe has a scaler (then the head uses it).
        l2_normalize: whether z is x scaled to unit length.
    """

    weights: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    standardized: bool
    l2_normalize: bool

    def head_input(self, codes: np.ndarray) -> HeadInput:
        """The head's normalisation: the probe's scaler when it has one, else the
        standardisation of the training `codes`."""
        if self.standardized:
            return HeadInput(self.mean, self.scale**2, self.l2_normalize)
        return HeadInput.of_codes(codes, self.l2_normalize)

    def folded(self, head_input: HeadInput) -> tuple[np.ndarray, np.ndarray]:
        """(kernel (features, classes), bias) of a Dense layer on codes normalised
        by `head_input` that gives the probe's logits.

        With u = (z − μh) / σh the head's input, z = σh·u + μh, so the logits are
        weights·diag(σh / σ)·u + weights·(μh − μ) / σ + bias.
        """
        head_scale = np.sqrt(head_input.variance)
        kernel = self.weights * (head_scale / self.scale)
        bias = self.bias + self.weights @ ((head_input.mean - self.mean) / self.scale)
        return kernel.T, bias


def _step(pipeline, name):
    step = pipeline.named_steps.get(name)
    return None if step in (None, "passthrough") else step


def linear_probe(pipeline: Pipeline, num_classes: int) -> LinearProbe:
    """Fold a fitted linear pipeline into a `LinearProbe`.

    With PCA mean m and components C (divided by √explained variance when
    whitening) and classifier weights W and intercept b, the logits of the
    normalised codes u are W·C·(u − m) + b. Binary probes (one row of weights,
    score s) become logits [0, s], so that softmax gives logistic regression's
    probabilities and argmax the decision of the others.

    Raises:
        TLError: for a probe that saw fewer than `num_classes` classes, or one
            whose normalisation is not affine.
    """
    classifier = pipeline.named_steps["classifier"]
    if not np.array_equal(classifier.classes_, np.arange(num_classes)):
        raise TLError(
            f"The probe saw only the classes numbered {classifier.classes_.tolist()} "
            f"of {num_classes} in training; a head needs weights for every class."
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
    if weights.shape[0] == 1:  # binary: score s of class 1
        weights = np.vstack([np.zeros_like(weights), weights])
        bias = np.concatenate([[0.0], bias])
    features = weights.shape[1]
    mean, scale = np.zeros(features), np.ones(features)
    normalizer = _step(pipeline, "normalize")
    if isinstance(normalizer, StandardScaler):
        if normalizer.mean_ is not None:
            mean = normalizer.mean_
        if normalizer.scale_ is not None:
            scale = normalizer.scale_
    elif normalizer is not None and not (
        isinstance(normalizer, Normalizer) and normalizer.norm == "l2"
    ):
        raise TLError(
            f"--init-head cannot fold the normalisation {normalizer!r} into the "
            f"head; train the probe with --normalization standard, l2 or none."
        )
    return LinearProbe(
        weights,
        bias,
        mean,
        scale,
        standardized=isinstance(normalizer, StandardScaler),
        l2_normalize=isinstance(normalizer, Normalizer),
    )


def saved_probe(saved: SavedClassifier, class_names: list[str]) -> LinearProbe:
    """The probe of a folder saved by `train_classifier.py`, for `--init-head`.

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
    try:
        return linear_probe(saved.pipeline, len(class_names))
    except TLError as error:
        raise TLError(f"--init-head: {error}") from None


def fit_probe(
    codes: np.ndarray, labels: np.ndarray, settings: FineTuneSettings
) -> tuple[Pipeline, dict]:
    """A standardised logistic regression on the training codes, its C chosen by
    stratified CV on them as `train_classifier.py` chooses it (`compare`).

    Returns:
        The fitted pipeline, and what was chosen: classifier, params, CV accuracy
        (mean of the folds; None when a class has too few images for CV, and the
        default C is used), folds.
    """
    features = as_features(codes)
    large = features.size > _PARALLEL_SEARCH_VALUES
    comparison = ComparisonSettings(
        classifiers=(PROBE_CLASSIFIER,),
        normalization="standard",
        class_weight=settings.class_weight,
        seed=settings.seed,
        jobs=-1 if large else 1,
    )
    # Small codes: worker processes take seconds to start, and BLAS threads cost
    # more than they give (10x slower fits measured on a busy 2-core machine).
    with threadpool_limits(None if large else 1):
        params, scores = choose_hyperparameters(
            PROBE_CLASSIFIER, features, labels, comparison
        )
        pipeline, seconds = fit_pipeline(
            PROBE_CLASSIFIER, params, features, labels, comparison
        )
    return pipeline, {
        "classifier": PROBE_CLASSIFIER,
        "normalization": "standard",
        "params": params,
        "cv_accuracy": float(np.mean(scores)) if scores else None,
        "folds": len(scores),
        "fit_seconds": seconds,
    }


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


def initialise_head(net: FineTuneModel, probe: LinearProbe, codes: np.ndarray) -> None:
    """Give `net` a head that predicts what `probe` predicts: its normalisation
    (`LinearProbe.head_input` of the training `codes`) and the folded weights."""
    head_input = probe.head_input(codes)
    net.replace_head(head_input)
    kernel, bias = probe.folded(head_input)
    logits = net.head.get_layer("logits")
    if kernel.shape != tuple(logits.kernel.shape):
        raise TLError(
            f"The probe folds into a {kernel.shape} kernel (features x classes), "
            f"the model's head has {tuple(logits.kernel.shape)}."
        )
    logits.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
