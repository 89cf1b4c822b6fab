"""Classifiers on CNN codes: scikit-learn pipelines, their registry, save and load.

A pipeline is `normalize → pca → classifier` (steps named so; unused steps are
"passthrough"). `CLASSIFIERS` holds what differs between classifiers (estimator,
hyper-parameter grid, whether it is linear). A saved model is a folder of data, never
code:

    model.skops      skops.io file of {"pipeline": the fitted Pipeline, "class_names",
                     "layer", "layer_info"}: no pickle, so loading runs no code
    metadata.json    format, schema_version, layer (store dataset key), layer_info,
                     classifier, params, normalization, pca, class_names, extraction
                     (the store's settings: what determines the codes), provenance,
                     versions (tl, scikit-learn, numpy, skops, ...), scores, created,
                     files (the SHA-256 of model.skops)

`load_classifier` checks metadata.json and the file's SHA-256 first, builds only the
types of `TRUSTED_TYPES`, and refuses a folder whose metadata.json names other classes
or another layer than the model file (never relabelling predictions), one saved with
another scikit-learn version, or an old one holding a pickle (model.joblib).
`SavedClassifier.check_codes` refuses a store whose codes were made differently.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import sklearn
import skops
import skops.io
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.decomposition import PCA, IncrementalPCA
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.multiclass import unique_labels
from sklearn.utils.validation import check_is_fitted, validate_data

from tl._checks import check_choice
from tl.errors import TLError
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
from tl.provenance import identity_differences, layer_identity, library_versions

MODEL_FORMAT = "tl-classifier"
MODEL_SCHEMA_VERSION = 2  # 1: a pickle (model.joblib), no longer loaded
MODEL_FILE = "model.skops"
NORMALIZATIONS = ("standard", "l2", "none")
CLASS_WEIGHTS = (None, "balanced")


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


def get_classifier(name: str, parameter: str = "classifier") -> ClassifierSpec:
    """The registered classifier `name` (`parameter` names it in the error)."""
    return CLASSIFIERS[check_choice(parameter, name, CLASSIFIERS)]


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
    check_choice("normalization", normalization, NORMALIZATIONS)
    check_choice("class_weight", class_weight, CLASS_WEIGHTS)
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
        """What the codes it classifies must match (`tl.provenance.layer_identity`)."""
        return layer_identity(self.metadata["extraction"], self.layer_info)

    def check_codes(self, store) -> None:
        """Refuse a `FeatureStore` whose codes for this layer were made differently."""
        infos = {info["key"]: info for info in store.layer_info}
        if self.layer not in infos:
            raise TLError(
                f"{str(store.path)!r} has no layer {self.layer!r} (it has "
                f"{', '.join(infos)}); the model was trained on that layer."
            )
        differences = identity_differences(
            self.identity,
            layer_identity(store.settings, infos[self.layer]),
            names=("model has", "store has"),
        )
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


def _type_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


# Every estimator type a saved pipeline holds: its steps (each registry classifier,
# the normalisers, PCA, IncrementalPCA) and the SVC inside RelativeGammaSVC. Loading
# builds these and what skops trusts itself (builtins, numpy arrays, dtypes and
# scalars, scikit-learn estimators), refuses any other type, and refuses a pipeline
# step of a type not listed here.
TRUSTED_TYPES: tuple[str, ...] = tuple(
    sorted(
        {
            _type_name(kind)
            for kind in (
                Pipeline,
                StandardScaler,
                Normalizer,
                PCA,
                IncrementalPCA,
                SVC,
                *(type(spec.build(None, 0)) for spec in CLASSIFIERS.values()),
            )
        }
    )
)
# What the model file holds besides the pipeline: copies of what metadata.json says
# the pipeline's outputs and inputs are, so that an edit cannot relabel predictions.
_CHECKED_KEYS = ("class_names", "layer", "layer_info")
_REQUIRED_KEYS = (*_CHECKED_KEYS, "classifier", "normalization", "pca", "extraction",
                  "versions", "files")  # fmt: skip
_REMEDY = "retrain with train_classifier.py (model folders must come from it)"


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
    class_names: list[str] | None = None,
) -> Path:
    """Save a fitted pipeline trained on `layer` of the `FeatureStore` `store`.

    `class_names` names the pipeline's classes 0, 1, ...: by default the store's
    (a pipeline trained on relabelled rows gives its own).
    """
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
        "class_names": list(store.class_names if class_names is None else class_names),
        "extraction": store.settings,
        "provenance": store.provenance,
        "store": str(Path(store.path).resolve()),
        "versions": library_versions(),
        "scores": scores or {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    metadata = json.loads(json.dumps(metadata, default=str))  # as it will read back
    content = {key: metadata[key] for key in _CHECKED_KEYS}
    skops.io.dump({"pipeline": pipeline, **content}, directory / MODEL_FILE)
    metadata["files"] = file_hashes(directory, [MODEL_FILE])
    (directory / METADATA).write_text(json.dumps(metadata, indent=2))
    return directory


def load_classifier(directory: str | Path) -> SavedClassifier:
    """Load a model saved by `save_classifier`, trusting nothing in its folder.

    metadata.json and the SHA-256 of model.skops are checked before the model file
    is read; it is read with skops, building only trusted types (no pickle, so no
    code runs); its class names and layer must be those of metadata.json.

    Raises:
        TLError: in one line, for a folder that is not a tl classifier, is damaged
            or edited, holds an older tl's pickle (model.joblib) or untrusted types,
            or was saved with another scikit-learn version.
    """
    directory = Path(directory)
    meta_path = directory / METADATA
    if not meta_path.is_file():
        raise TLError(
            f"{str(directory)!r} is not a saved tl model (no metadata.json); give the "
            f"folder train_classifier.py wrote (e.g. results/<name>/best_model)."
        )
    metadata = read_metadata(directory, _REMEDY)
    if metadata.get("format") != MODEL_FORMAT:
        raise TLError(f"{str(meta_path)!r} does not describe a tl classifier.")
    if check_schema(metadata, directory, MODEL_SCHEMA_VERSION, _REMEDY) < 2:
        raise TLError(
            f"{str(directory)!r} was saved by an older tl as a pickle (model.joblib), "
            f"which can run any code when loaded; tl no longer loads pickles: "
            f"retrain with train_classifier.py."
        )
    require_keys(metadata, _REQUIRED_KEYS, directory, _REMEDY)
    versions = metadata["versions"] if isinstance(metadata["versions"], dict) else {}
    saved = str(versions.get("scikit-learn"))
    if saved.split(".")[:2] != sklearn.__version__.split(".")[:2]:
        raise TLError(
            f"{str(directory)!r} was saved with scikit-learn {saved}, this is "
            f"{sklearn.__version__}; fitted estimators are not portable across "
            f"versions. Install scikit-learn=={saved} or retrain with "
            f"train_classifier.py."
        )
    check_files(metadata, directory, (MODEL_FILE,), _REMEDY)
    content = _read_model_file(directory / MODEL_FILE)
    for key in _CHECKED_KEYS:
        check_unedited(metadata, key, content[key], directory, MODEL_FILE, _REMEDY)
    return SavedClassifier(content["pipeline"], metadata)


def _read_model_file(path: Path) -> dict:
    """The dict `save_classifier` dumped, built from trusted types only."""
    try:
        untrusted = set(skops.io.get_untrusted_types(file=path)) - set(TRUSTED_TYPES)
    except Exception as error:  # skops fails in many ways on a file it did not write
        raise unreadable(path, error, _REMEDY) from None
    if untrusted:
        raise TLError(
            f"{str(path)!r} contains types tl does not trust: "
            f"{', '.join(sorted(untrusted))}; {_REMEDY}."
        )
    try:
        content = skops.io.load(path, trusted=list(TRUSTED_TYPES))
    except Exception as error:
        raise unreadable(path, error, _REMEDY) from None
    pipeline = content.get("pipeline") if isinstance(content, dict) else None
    steps = getattr(pipeline, "steps", None)
    if (
        not isinstance(pipeline, Pipeline)
        or set(content) != {"pipeline", *_CHECKED_KEYS}
        or not isinstance(steps, list)
        or not all(isinstance(step, tuple) and len(step) == 2 for step in steps)
    ):
        raise TLError(f"{str(path)!r} does not hold a tl pipeline; {_REMEDY}.")
    steps = {
        _type_name(type(step))
        for _, step in steps
        if not (isinstance(step, str) and step == "passthrough")
    }
    if steps - set(TRUSTED_TYPES):
        raise TLError(
            f"{str(path)!r} holds pipeline steps tl does not trust: "
            f"{', '.join(sorted(steps - set(TRUSTED_TYPES)))}; {_REMEDY}."
        )
    return content


def check_labels(labels: np.ndarray) -> np.ndarray:
    """The distinct labels, refusing unlabeled rows."""
    if (labels < 0).any():
        raise TLError(
            "The store has unlabeled images (label -1): classifiers need labels. "
            "Extract from a folder with one sub-folder per class or a path,label CSV."
        )
    return unique_labels(labels)
