"""Classifiers on CNN codes: scikit-learn pipelines, their registry, save and load.

A pipeline is `normalize → pca → classifier` (steps named so; unused steps are
"passthrough"). `CLASSIFIERS` holds what differs between classifiers (estimator,
hyper-parameter grid, whether it is linear). A saved model is a folder:

    model.joblib     the fitted scikit-learn Pipeline
    metadata.json    format, schema_version, layer (store dataset key), layer_info,
                     classifier, params, normalization, pca, class_names, extraction
                     (the store's settings: what determines the codes), provenance,
                     versions (tl, scikit-learn, numpy, joblib, ...), scores, created

`load_classifier` refuses a model saved with another scikit-learn version, and
`SavedClassifier.check_codes` a store whose codes were made differently.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import joblib
import numpy as np
import sklearn
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.multiclass import unique_labels
from sklearn.utils.validation import check_is_fitted, validate_data

import tl
from tl.engines import ENGINE_SETTINGS, LEGACY_SETTINGS
from tl.errors import TLError

MODEL_FORMAT = "tl-classifier"
MODEL_SCHEMA_VERSION = 1
NORMALIZATIONS = ("standard", "l2", "none")


class RelativeGammaSVC(ClassifierMixin, BaseEstimator):
    """An RBF SVM whose gamma is a multiple of scikit-learn's `gamma="scale"`.

    `gamma = gamma_factor / (n_features * X.var())`, so one grid of factors suits
    codes of any width and scale (the CV search would otherwise need a grid per
    layer). The kernel matrix is computed with BLAS and handed to libsvm
    precomputed: on wide codes (VGG's 25,088 dimensions) libsvm's own kernel loop
    is many times slower. Otherwise it is `sklearn.svm.SVC(kernel="rbf")`; only the
    support vectors are kept for prediction.
    """

    def __init__(self, C=1.0, gamma_factor=1.0, class_weight=None, random_state=None):
        self.C = C
        self.gamma_factor = gamma_factor
        self.class_weight = class_weight
        self.random_state = random_state

    def _kernel(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        distances = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2 * (A @ B.T)
        return np.exp(-self.gamma_ * np.maximum(distances, 0, out=distances))

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        variance = X.var()
        self.gamma_ = self.gamma_factor / (X.shape[1] * (variance or 1.0))
        self.svc_ = SVC(
            C=self.C,
            kernel="precomputed",
            class_weight=self.class_weight,
            random_state=self.random_state,
        ).fit(self._kernel(X, X), y)
        self.support_vectors_ = X[self.svc_.support_]
        self.n_train_ = len(X)
        self.classes_ = self.svc_.classes_
        return self

    def _apply(self, method: str, X, rows: int = 1024) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        parts = []
        for start in range(0, len(X), rows):
            block = X[start : start + rows]
            kernel = np.zeros((len(block), self.n_train_))
            kernel[:, self.svc_.support_] = self._kernel(block, self.support_vectors_)
            parts.append(getattr(self.svc_, method)(kernel))
        return np.concatenate(parts)

    def decision_function(self, X):
        return self._apply("decision_function", X)

    def predict(self, X):
        return self._apply("predict", X)


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """What differs between classifiers.

    Attributes:
        name: registry key.
        description: one line for tables and `--help`.
        build: `(class_weight, seed) -> estimator` with default hyper-parameters.
        grid: hyper-parameter grid searched by cross-validation.
        linear: a linear function of the (normalised) codes, with `coef_` and
            `intercept_` (what fine-tuning can start from).
        out_of_core: supports `partial_fit`, so a layer larger than memory can be
            trained chunk by chunk.
    """

    name: str
    description: str
    build: Callable[[str | None, int], BaseEstimator]
    grid: dict[str, list]
    linear: bool
    out_of_core: bool = False


CLASSIFIERS: dict[str, ClassifierSpec] = {
    spec.name: spec
    for spec in [
        ClassifierSpec(
            "logreg",
            "multinomial logistic regression (lbfgs)",
            lambda weight, seed: LogisticRegression(
                max_iter=2000, class_weight=weight, random_state=seed
            ),
            {"C": [1e-3, 1e-2, 1e-1, 1.0, 10.0]},
            linear=True,
        ),
        ClassifierSpec(
            "linear_svm",
            "linear SVM, one-vs-rest (liblinear)",
            # the dual solver: liblinear's primal one (which dual="auto" picks when
            # rows outnumber dimensions) was 20x slower on 2,400 x 2,048 codes
            lambda weight, seed: LinearSVC(
                C=1e-2,
                dual=True,
                max_iter=2000,
                class_weight=weight,
                random_state=seed,
            ),
            # C above 0.1 rarely wins on standardised codes and converges slowly
            {"C": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]},
            linear=True,
        ),
        ClassifierSpec(
            "rbf_svm",
            "RBF-kernel SVM, gamma relative to 1/(D var)",
            lambda weight, seed: RelativeGammaSVC(
                C=10.0, class_weight=weight, random_state=seed
            ),
            {"C": [1.0, 10.0, 100.0], "gamma_factor": [0.25, 1.0, 4.0]},
            linear=False,
        ),
        ClassifierSpec(
            "ridge",
            "ridge regression on one-hot labels",
            lambda weight, seed: RidgeClassifier(alpha=10.0, class_weight=weight),
            {"alpha": [0.1, 1.0, 10.0, 100.0, 1000.0]},
            linear=True,
        ),
        ClassifierSpec(
            "knn",
            "k nearest neighbours (cosine)",
            lambda weight, seed: KNeighborsClassifier(n_neighbors=5, metric="cosine"),
            {"n_neighbors": [1, 5, 15]},
            linear=False,
        ),
        ClassifierSpec(
            "sgd",
            "logistic regression by SGD (out-of-core capable)",
            lambda weight, seed: SGDClassifier(
                loss="log_loss", alpha=1e-4, class_weight=weight, random_state=seed
            ),
            {"alpha": [1e-5, 1e-4, 1e-3, 1e-2]},
            linear=True,
            out_of_core=True,
        ),
    ]
}


def as_features(codes: np.ndarray) -> np.ndarray:
    """Codes as the 2-D float64 matrix the pipelines expect.

    Stores hold float32 (or float16) codes; scikit-learn's float32 paths measured
    5x slower for logistic regression on 2,048-wide codes, so rows are widened.
    """
    return np.asarray(codes, np.float64).reshape(len(codes), -1)


def get_classifier(name: str) -> ClassifierSpec:
    if name not in CLASSIFIERS:
        raise TLError(
            f"Unknown classifier {name!r}; choose from {', '.join(CLASSIFIERS)}."
        )
    return CLASSIFIERS[name]


def make_pipeline(
    classifier: str,
    normalization: str = "standard",
    pca: int | None = None,
    class_weight: str | None = None,
    seed: int = 0,
) -> Pipeline:
    """`normalize → pca → classifier` with the classifier's default hyper-parameters.

    Args:
        classifier: a `CLASSIFIERS` name.
        normalization: `standard` (zero mean, unit variance per feature), `l2` (each
            row to unit length) or `none`.
        pca: keep this many principal components (None: no PCA).
        class_weight: None or `balanced` (weights inversely proportional to class
            frequencies).
        seed: random state of the estimators that have one.
    """
    spec = get_classifier(classifier)
    if normalization not in NORMALIZATIONS:
        raise TLError(
            f"Unknown normalization {normalization!r}; choose from "
            f"{', '.join(NORMALIZATIONS)}."
        )
    if class_weight not in (None, "balanced"):
        raise TLError(f"class_weight must be None or 'balanced', got {class_weight!r}.")
    normalizer = {
        "standard": StandardScaler(),
        "l2": Normalizer(),
        "none": "passthrough",
    }
    return Pipeline(
        [
            ("normalize", normalizer[normalization]),
            ("pca", PCA(n_components=pca, random_state=seed) if pca else "passthrough"),
            ("classifier", spec.build(class_weight, seed)),
        ]
    )


def param_grid(classifier: str) -> dict[str, list]:
    """The classifier's grid, with keys addressed to the pipeline's classifier step."""
    return {f"classifier__{k}": v for k, v in get_classifier(classifier).grid.items()}


# ---------------------------------------------------------------------------------
# Saved models


def library_versions() -> dict[str, str]:
    import h5py
    import keras
    import tensorflow as tf

    return {
        "tl": tl.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "joblib": joblib.__version__,
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "h5py": h5py.__version__,
    }


# Settings that change the codes of one layer (besides its own layer and pooling).
_CODE_SETTINGS = (
    "backbone",
    "weights",
    "weights_sha256",
    "seed",
    "image_size",
    "resize",
    "interpolation",
    "antialias",
    "precision",
    *ENGINE_SETTINGS,
)


def codes_identity(settings: dict, layer_info: dict) -> dict:
    """What determines the codes of one layer of a store: compare these to match."""
    settings = {**LEGACY_SETTINGS, **settings}
    identity = {key: settings.get(key) for key in _CODE_SETTINGS}
    if settings.get("weights") != "none":
        identity.pop("seed")  # the seed only matters for random weights
    identity["layer"] = layer_info["layer"]
    identity["pooling"] = layer_info["pooling"]
    return identity


@dataclasses.dataclass
class SavedClassifier:
    """A fitted pipeline with the provenance of the codes it was trained on."""

    pipeline: Pipeline
    metadata: dict

    @property
    def layer(self) -> str:
        return self.metadata["layer"]

    @property
    def layer_info(self) -> dict:
        return self.metadata["layer_info"]

    @property
    def class_names(self) -> list[str]:
        return self.metadata["class_names"]

    @property
    def identity(self) -> dict:
        return codes_identity(self.metadata["extraction"], self.layer_info)

    def check_codes(self, store) -> None:
        """Refuse a `FeatureStore` whose codes for this layer were made differently."""
        infos = {info["key"]: info for info in store.layer_info}
        if self.layer not in infos:
            raise TLError(
                f"{str(store.path)!r} has no layer {self.layer!r} (it has "
                f"{', '.join(infos)}); the model was trained on that layer."
            )
        theirs = codes_identity(store.settings, infos[self.layer])
        differences = [
            f"{key}: model has {value!r}, store has {theirs.get(key)!r}"
            for key, value in self.identity.items()
            if theirs.get(key) != value
        ]
        if differences:
            raise TLError(
                f"The codes in {str(store.path)!r} were made differently from those "
                f"the model was trained on: {'; '.join(differences)}."
            )

    def predict(self, codes: np.ndarray) -> np.ndarray:
        """Class numbers for rows of codes."""
        return self.pipeline.predict(as_features(codes))

    def scores(self, codes: np.ndarray) -> tuple[np.ndarray, str]:
        """Per-class scores and their kind: `probability` when the classifier has
        `predict_proba`, else `decision` (decision function values)."""
        codes = as_features(codes)
        if hasattr(self.pipeline, "predict_proba"):
            return self.pipeline.predict_proba(codes), "probability"
        values = self.pipeline.decision_function(codes)
        if values.ndim == 1:  # binary: score of class 1; make it one column per class
            values = np.stack([-values, values], axis=1)
        return values, "decision"


def save_classifier(
    directory: str | Path,
    pipeline: Pipeline,
    *,
    store,
    layer: str,
    classifier: str,
    params: dict,
    normalization: str,
    pca: int | None,
    scores: dict | None = None,
) -> Path:
    """Save a fitted pipeline trained on `layer` of the `FeatureStore` `store`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layer_info = next(info for info in store.layer_info if info["key"] == layer)
    metadata = {
        "format": MODEL_FORMAT,
        "schema_version": MODEL_SCHEMA_VERSION,
        "layer": layer,
        "layer_info": layer_info,
        "classifier": classifier,
        "params": params,
        "normalization": normalization,
        "pca": pca,
        "class_names": store.class_names,
        "extraction": store.settings,
        "provenance": store.provenance,
        "store": str(Path(store.path).resolve()),
        "versions": library_versions(),
        "scores": scores or {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    joblib.dump(pipeline, directory / "model.joblib")
    (directory / "metadata.json").write_text(
        json.dumps(metadata, indent=2, default=str)
    )
    return directory


def load_classifier(directory: str | Path) -> SavedClassifier:
    """Load a saved model, refusing one from another scikit-learn version."""
    directory = Path(directory)
    meta_path = directory / "metadata.json"
    if not meta_path.is_file():
        raise TLError(
            f"{str(directory)!r} is not a saved tl model (no metadata.json); give the "
            f"folder train_classifier.py wrote (e.g. results/<name>/best_model)."
        )
    metadata = json.loads(meta_path.read_text())
    if metadata.get("format") != MODEL_FORMAT:
        raise TLError(f"{str(meta_path)!r} does not describe a tl classifier.")
    if metadata["schema_version"] > MODEL_SCHEMA_VERSION:
        raise TLError(
            f"{str(directory)!r} was saved by a newer tl (schema "
            f"{metadata['schema_version']}); upgrade tl."
        )
    saved = metadata["versions"]["scikit-learn"]
    if saved.split(".")[:2] != sklearn.__version__.split(".")[:2]:
        raise TLError(
            f"{str(directory)!r} was saved with scikit-learn {saved}, this is "
            f"{sklearn.__version__}; pickled models are not portable across versions. "
            f"Install scikit-learn=={saved} or retrain with train_classifier.py."
        )
    pipeline = joblib.load(directory / "model.joblib")
    return SavedClassifier(pipeline, metadata)


def check_labels(labels: np.ndarray) -> np.ndarray:
    """The distinct labels, refusing unlabeled rows."""
    if (labels < 0).any():
        raise TLError(
            "The store has unlabeled images (label -1): classifiers need labels. "
            "Extract from a folder with one sub-folder per class or a path,label CSV."
        )
    return unique_labels(labels)
