"""Compare classifiers on CNN codes, layer by layer, with honest evaluation.

`compare` reads one layer of a feature store at a time and, for each classifier,
chooses hyper-parameters by stratified k-fold cross-validation on training rows only,
refits, and scores the result on rows that played no part in any choice:

- `holdout` (default): a stratified test split (`test_size`) or a separate test store.
  The winner (layer × classifier) is chosen by CV accuracy on the training rows; its
  test score is an unbiased estimate.
- `cv`: nested cross-validation. Each outer fold repeats the whole selection (every
  layer, classifier and hyper-parameter) on its training part and scores the selected
  model on its held-out part; the mean ± std of those scores estimates the procedure.
  The final model is chosen by that same rule on all rows, then refit on all rows.

Every protocol chooses by the best mean CV accuracy, ties broken by the lower std.
A low-shot mode trains on `shots` examples per class (several seeds, default
hyper-parameters: too few rows for CV) and scores on the test split.
Data problems (empty store, one class, tiny classes, non-finite codes) raise a
`TLError` or lead to an explicit adjustment listed in `ComparisonResult.adjustments`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from sklearn.decomposition import IncrementalPCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer
from tqdm.auto import tqdm

from tl._checks import ParameterError, check_choice, check_interval
from tl._settings import FlatSettings
from tl.classifiers import (
    CLASS_WEIGHTS,
    CLASSIFIERS,
    NORMALIZATIONS,
    as_features,
    get_classifier,
    make_pipeline,
    param_grid,
)
from tl.errors import TLError
from tl.provenance import identity_differences, layer_identity
from tl.reports import METRICS, classification_metrics, metric_rows
from tl.store import FeatureStore

if TYPE_CHECKING:  # only with the dask extra
    from distributed import Client

log = logging.getLogger("tl")
PROTOCOLS = ("holdout", "cv")
OUT_OF_CORE = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class ComparisonSettings(FlatSettings):
    """How `compare` trains and evaluates.

    Attributes:
        classifiers: names from `tl.classifiers.CLASSIFIERS`.
        layers: store layers to compare (None: all, in store order).
        normalization: `standard`, `l2` or `none`.
        pca: keep this many principal components (None: no PCA).
        class_weight: None or `balanced` (`none` is read as None).
        folds: k of the stratified k-fold CV (reduced, with a note, when a class
            has fewer training rows).
        protocol: `holdout` or `cv` (nested CV), see the module docstring.
        test_size: fraction of rows held out (holdout without a test store).
        search_rows: the CV search runs on at most this many training rows (a
            stratified subsample); the chosen model is refit on all of them.
        seed: seed of splits, subsamples and estimators.
        jobs: parallel CV fits (-1: all cores).
        shots: examples per class for the low-shot curves (empty: none).
        shot_seeds: repetitions per number of shots.
        out_of_core: `auto` trains a layer larger than `memory_limit_gb` chunk by
            chunk (SGD only), `always` forces it, `never` loads every layer.
        memory_limit_gb: largest layer loaded whole in `auto` mode.
        drop_nonfinite: drop rows with NaN/inf codes (listed) instead of refusing.
    """

    classifiers: tuple[str, ...] = ("logreg", "linear_svm", "rbf_svm")
    layers: tuple[str, ...] | None = None
    normalization: str = "standard"
    pca: int | None = None
    class_weight: str | None = None
    folds: int = 5
    protocol: str = "holdout"
    test_size: float = 0.2
    search_rows: int = 3000
    seed: int = 0
    jobs: int = -1
    shots: tuple[int, ...] = ()
    shot_seeds: int = 5
    out_of_core: str = "auto"
    memory_limit_gb: float = 4.0
    drop_nonfinite: bool = False

    def __post_init__(self):
        def set_(name, value):
            object.__setattr__(self, name, value)

        set_("classifiers", _names(self.classifiers))
        set_("layers", None if self.layers is None else _names(self.layers))
        set_("shots", tuple(self.shots))
        if self.class_weight == "none":  # as the command line spells it
            set_("class_weight", None)
        if not self.classifiers:
            raise ParameterError(
                "classifiers", f"some of {', '.join(CLASSIFIERS)}", self.classifiers
            )
        for name in self.classifiers:
            get_classifier(name, "classifiers")
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_choice("class_weight", self.class_weight, CLASS_WEIGHTS)
        check_choice("protocol", self.protocol, PROTOCOLS)
        check_interval("folds", self.folds, low=2, integer=True)
        check_interval("test_size", self.test_size, low=0, high=1, closed="neither")
        if self.shots and self.protocol != "holdout":
            raise TLError("Low-shot curves (shots) need the holdout protocol.")
        for shots in self.shots:
            check_interval("shots", shots, low=1, integer=True)
        check_choice("out_of_core", self.out_of_core, OUT_OF_CORE)


def _names(names: str | Sequence[str]) -> tuple[str, ...]:
    """One name or several, as a tuple."""
    return (names,) if isinstance(names, str) else tuple(names)


@dataclasses.dataclass
class Candidate:
    """One layer × classifier: chosen hyper-parameters and scores."""

    layer: str
    classifier: str
    params: dict
    cv_scores: list[float]
    test: dict[str, float] | None = None
    fit_seconds: float = float("nan")
    pipeline: Pipeline | None = None
    predicted: np.ndarray | None = None  # on the test rows (holdout)

    @property
    def cv_mean(self) -> float:
        return float(np.mean(self.cv_scores)) if self.cv_scores else float("nan")

    @property
    def cv_std(self) -> float:
        return float(np.std(self.cv_scores)) if self.cv_scores else float("nan")


@dataclasses.dataclass
class ComparisonResult:
    """Everything `compare` found; `tl.reports` turns it into tables and plots.

    Attributes:
        rows: tidy result rows (`tl.reports.RESULT_COLUMNS`).
        candidates: per layer × classifier (holdout: CV on train + test scores;
            cv: mean over outer folds in `test`, outer scores in `cv_scores`).
        winner: the chosen candidate, with its fitted pipeline.
        winner_estimate: the winner's unbiased score: its test metrics (holdout) or
            the nested-CV mean/std of the selection procedure (cv).
        selections: nested CV only: the candidate each outer fold selected.
        final_selection: nested CV only: how the final model was chosen, by the
            outer folds' rule on all rows (layer, classifier, params, inner CV).
        confusion: confusion matrix of the winner on the test rows (holdout) or
            pooled over outer folds of the selected models (cv).
        adjustments: what was changed or dropped, and why.
        split: sizes and the test row indices (holdout).
    """

    settings: ComparisonSettings
    rows: list[dict]
    candidates: list[Candidate]
    winner: Candidate
    winner_estimate: dict
    class_names: list[str]
    layer_order: list[str]
    confusion: np.ndarray
    adjustments: list[str]
    split: dict
    selections: list[dict] = dataclasses.field(default_factory=list)
    final_selection: dict = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------
# Data checks


@dataclasses.dataclass
class _Data:
    """Labels and row selection after checks; codes are read per layer later."""

    store: FeatureStore
    rows: np.ndarray  # rows of the store used (non-finite ones may be dropped)
    labels: np.ndarray
    test_store: FeatureStore | None
    test_rows: np.ndarray | None
    test_labels: np.ndarray | None
    folds: int
    adjustments: list[str]
    client: object = None  # a Dask client: CV fits run on its workers

    def search_codes(self, layer: str, positions: np.ndarray, X=None):
        """The codes a CV search runs on: rows `positions` of `self.rows`, taken
        from `X` (the layer's codes of `self.rows`) or read from the store; on a Dask
        client, rows that the workers read from the store themselves."""
        if self.client is not None:
            from tl.distributed import StoreRows

            return StoreRows(self.store, layer, self.rows[positions])
        if X is None:
            return as_features(self.store.read(layer, self.rows[positions]))
        return X[positions]


def _note(adjustments: list[str], text: str) -> None:
    """Record an adjustment made while training and log it at once (it also goes
    into run.json). The data checks' notes are logged once all checks passed."""
    adjustments.append(text)
    log.warning("note: %s", text)


def _class_counts(labels: np.ndarray, names: list[str]) -> str:
    values, counts = np.unique(labels, return_counts=True)
    return ", ".join(f"{names[v]}: {c}" for v, c in zip(values, counts, strict=True))


def _check_labels(store: FeatureStore, what: str) -> np.ndarray:
    labels = store.labels
    if len(labels) == 0:
        skipped = len(store.skipped)
        raise TLError(
            f"{what} {str(store.path)!r} has no rows"
            + (f" (all {skipped} images were skipped as unreadable)" if skipped else "")
            + "; extract codes from a folder with images first."
        )
    if (labels < 0).any():
        raise TLError(
            f"{what} {str(store.path)!r} has unlabeled rows: classifiers need labels. "
            f"Extract from a folder with one sub-folder per class or a path,label CSV."
        )
    return labels


def _nonfinite_rows(store: FeatureStore, layers: list[str]) -> dict[str, np.ndarray]:
    """Per compared layer, a mask of the rows whose codes hold NaN or inf (read by
    chunks)."""
    masks = {}
    for layer in layers:
        bad = masks[layer] = np.zeros(len(store), bool)
        for rows, codes in store.iter_rows(layer):
            bad[rows] |= ~np.isfinite(codes.reshape(len(codes), -1)).all(axis=1)
    return masks


def _drop_nonfinite(
    store: FeatureStore,
    layers: list[str],
    settings: ComparisonSettings,
    adjustments: list[str],
) -> np.ndarray:
    """The rows to use: all, or (drop_nonfinite) those with finite codes in every
    compared layer. Refuses, in one line, non-finite codes that cannot be dropped."""
    masks = _nonfinite_rows(store, layers)
    hopeless = [layer for layer, bad in masks.items() if bad.all()]
    if hopeless:
        others = [layer for layer in layers if layer not in hopeless]
        advice = (
            f"leave them out with --layers {' '.join(others)}, or " if others else ""
        )
        raise TLError(
            f"Every row of {str(store.path)!r} has NaN or infinite codes in layer(s) "
            f"{', '.join(hopeless)}; {advice}re-extract (a float16 --dtype can "
            f"overflow)."
        )
    bad = np.flatnonzero(np.logical_or.reduce(list(masks.values())))
    if not len(bad):
        return np.arange(len(store))
    paths = [store.paths[i] for i in bad[:5]]
    if not settings.drop_nonfinite:
        raise TLError(
            f"{len(bad)} rows of {str(store.path)!r} have NaN or infinite codes "
            f"(e.g. {', '.join(paths)}). Pass --drop-nonfinite to leave them out, "
            f"or re-extract (a float16 --dtype can overflow)."
        )
    if len(bad) == len(store):
        raise TLError(
            f"Every row of {str(store.path)!r} has NaN or infinite codes in one of "
            f"the layers {', '.join(layers)}, so --drop-nonfinite leaves nothing; "
            f"compare the layers one at a time with --layers, or re-extract."
        )
    adjustments.append(
        f"dropped {len(bad)} rows with NaN/inf codes: {', '.join(paths)}"
        + (" ..." if len(bad) > 5 else ""),
    )
    return np.setdiff1d(np.arange(len(store)), bad)


def _prepare(
    store: FeatureStore,
    test_store: FeatureStore | None,
    layers: list[str],
    settings: ComparisonSettings,
) -> _Data:
    adjustments: list[str] = []
    labels = _check_labels(store, "Feature store")
    names = store.class_names
    rows = _drop_nonfinite(store, layers, settings, adjustments)
    dropped = len(store) - len(rows)
    for number, name in enumerate(names):
        if not (labels[rows] == number).any():
            reason = (
                "rows left after dropping non-finite codes"
                if (labels == number).any()
                else "images"
            )
            adjustments.append(f"class {name!r} has no {reason}; it is left out")
    labels = labels[rows]

    present, counts = np.unique(labels, return_counts=True)
    if len(present) < 2:
        raise TLError(
            f"Classification needs at least two classes; {str(store.path)!r} has "
            f"only {names[present[0]]!r} ({counts[0]} images)"
            + (f" after dropping {dropped} rows with NaN/inf codes" if dropped else "")
            + "."
        )
    test_rows = test_labels = None
    if test_store is not None:
        test_labels = _check_labels(test_store, "Test store")
        _check_same_codes(store, test_store, layers)
        test_rows = np.arange(len(test_store))
        train_counts = counts
    elif settings.protocol == "holdout":
        tiny = [names[c] for c, n in zip(present, counts, strict=True) if n < 2]
        if tiny:
            raise TLError(
                f"Classes {', '.join(map(repr, tiny))} have a single image: a "
                f"stratified test split needs at least 2 per class. Add images, "
                f"remove those classes, or give a separate --test-store."
            )
        train_counts = np.floor(counts * (1 - settings.test_size)).astype(int)
    else:
        train_counts = np.floor(counts * (settings.folds - 1) / settings.folds)
    folds = min(settings.folds, int(train_counts.min()))
    if folds < 2:
        smallest = names[present[np.argmin(counts)]]
        raise TLError(
            f"Class {smallest!r} has too few images for cross-validation "
            f"({_class_counts(labels, names)}): each class needs at least 2 training "
            f"images per fold split. Add images or remove the class."
        )
    if folds < settings.folds:
        adjustments.append(
            f"cross-validation uses {folds} folds instead of {settings.folds}: the "
            f"smallest class has only {int(train_counts.min())} training images "
            f"({_class_counts(labels, names)})"
        )
    return _Data(
        store, rows, labels, test_store, test_rows, test_labels, folds, adjustments
    )


def _check_same_codes(store: FeatureStore, test_store: FeatureStore, layers) -> None:
    if test_store.class_names != store.class_names:
        raise TLError(
            f"The test store's classes {test_store.class_names} differ from the "
            f"training store's {store.class_names}; extract both from folders with "
            f"the same class sub-folders."
        )
    ours = {info["key"]: info for info in store.layer_info}
    theirs = {info["key"]: info for info in test_store.layer_info}
    for layer in layers:
        if layer not in theirs:
            raise TLError(f"The test store has no layer {layer!r}.")
        differences = identity_differences(
            layer_identity(store.settings, ours[layer]),
            layer_identity(test_store.settings, theirs[layer]),
        )
        if differences:
            raise TLError(
                f"Layer {layer!r} was extracted differently in the test store: "
                f"{'; '.join(differences)}."
            )


# ---------------------------------------------------------------------------------
# Search and fit


def _subsample(
    indices: np.ndarray, labels: np.ndarray, size: int, seed: int
) -> np.ndarray:
    """A stratified subsample of `indices` (positions into `labels`) of `size`."""
    if len(indices) <= size:
        return indices
    chosen, _ = train_test_split(
        indices, train_size=size, stratify=labels[indices], random_state=seed
    )
    return np.sort(chosen)


@dataclasses.dataclass
class _Search:
    params: dict
    fold_scores: list[float]


def _pipeline(
    classifier: str, settings: ComparisonSettings, params: dict | None = None
):
    """The settings' pipeline for `classifier`, with classifier `params` if given."""
    pipeline = make_pipeline(
        classifier,
        settings.normalization,
        settings.pca,
        settings.class_weight,
        settings.seed,
    )
    return pipeline.set_params(
        **{f"classifier__{k}": v for k, v in (params or {}).items()}
    )


def _search(
    classifier: str, X, y, folds: int, settings: ComparisonSettings, client=None
) -> _Search:
    """Grid search by stratified k-fold CV: best parameters and their fold scores
    (the fits run on the workers of a Dask `client` if one is given)."""
    if settings.pca and settings.pca > min(X.shape[1], len(X) - len(X) // folds):
        raise TLError(
            f"--pca {settings.pca} is more than the codes allow: {X.shape[1]} "
            f"dimensions and {len(X) - len(X) // folds} rows per CV training part."
        )
    cv = StratifiedKFold(folds, shuffle=True, random_state=settings.seed)
    search = GridSearchCV(
        _pipeline(classifier, settings),
        param_grid(classifier),
        scoring="accuracy",
        cv=cv,
        n_jobs=settings.jobs,
        refit=False,
        error_score="raise",
    )
    with warnings.catch_warnings(), _parallel_backend(client):
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(X, y)
    best = search.best_index_
    results = search.cv_results_
    return _Search(
        {k.removeprefix("classifier__"): v for k, v in results["params"][best].items()},
        [float(results[f"split{k}_test_score"][best]) for k in range(folds)],
    )


def choose_hyperparameters(
    classifier: str, X, y: np.ndarray, settings: ComparisonSettings
) -> tuple[dict, list[float]]:
    """Hyper-parameters for `classifier` on training rows, chosen as `compare`
    chooses them: stratified k-fold CV (k at most the smallest class's count) on at
    most `search_rows` rows.

    Returns:
        The chosen parameters and their fold scores; `({}, [])` (the defaults) when
        a class has fewer than 2 rows.
    """
    folds = min(settings.folds, int(np.unique(y, return_counts=True)[1].min()))
    if folds < 2:
        return {}, []
    rows = _subsample(np.arange(len(y)), y, settings.search_rows, settings.seed)
    found = _search(classifier, X[rows], y[rows], folds, settings)
    return found.params, found.fold_scores


def _parallel_backend(client):
    if client is None:
        return contextlib.nullcontext()
    from tl.distributed import search_backend

    return search_backend(client)


def _selection_key(fold_scores: list[float]) -> tuple[float, float]:
    """The rule that chooses among candidates, in every protocol: the best mean CV
    accuracy, ties broken by the lower standard deviation (then by layer ×
    classifier order)."""
    return float(np.mean(fold_scores)), -float(np.std(fold_scores))


def fit_pipeline(
    classifier: str, params: dict, X, y, settings
) -> tuple[Pipeline, float]:
    """Fit the pipeline with `params` on all of X; returns it and the seconds taken."""
    pipeline = _pipeline(classifier, settings, params)
    began = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        pipeline.fit(X, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("%s with %s did not fully converge", classifier, params)
    return pipeline, time.perf_counter() - began


def _fit_out_of_core(
    store: FeatureStore,
    layer: str,
    train_rows: np.ndarray,
    y_train: np.ndarray,
    params: dict,
    settings: ComparisonSettings,
    epochs: int = 5,
) -> tuple[Pipeline, float]:
    """The settings' pipeline with SGD, fitted by passes over chunks of the store.

    One pass fits the normalisation (`StandardScaler.partial_fit`; the l2
    `Normalizer` is stateless), one more fits PCA as `IncrementalPCA`, then SGD runs
    `epochs` passes, so the pipeline has every step the settings name.
    """
    began = time.perf_counter()
    label_of_row = np.zeros(len(store), np.int64)
    label_of_row[train_rows] = y_train
    classes = np.unique(y_train)
    pipeline = _pipeline("sgd", settings, params)
    if settings.pca:
        pipeline.set_params(pca=IncrementalPCA(n_components=settings.pca))
    model = pipeline.named_steps["classifier"]
    if settings.class_weight == "balanced":  # partial_fit needs explicit weights
        counts = np.bincount(y_train, minlength=classes.max() + 1)[classes]
        weights = len(y_train) / (len(classes) * counts)
        model.set_params(class_weight=dict(zip(classes.tolist(), weights, strict=True)))
    fitted: list = []  # the transforming steps fitted so far

    def train_chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for rows, codes in store.iter_rows(layer, train_rows):
            X = as_features(codes)
            for step in fitted:
                X = step.transform(X)
            yield X, label_of_row[rows]

    for name in ("normalize", "pca"):
        step = pipeline.named_steps[name]
        if step == "passthrough":
            continue
        if isinstance(step, Normalizer):  # stateless: fit only records the width
            step.fit(next(train_chunks())[0])
        else:
            chunks = (X for X, _ in train_chunks())
            for X in _batches_of_at_least(chunks, getattr(step, "n_components", 1)):
                step.partial_fit(X)
        fitted.append(step)
    for _ in range(epochs):
        for X, y in train_chunks():
            model.partial_fit(X, y, classes=classes)
    return pipeline, time.perf_counter() - began


def _batches_of_at_least(
    chunks: Iterator[np.ndarray], size: int
) -> Iterator[np.ndarray]:
    """The rows of `chunks`, regrouped so that each batch has at least `size` rows
    (when all of them together do): `IncrementalPCA.partial_fit` needs as many rows
    as components, and a chunk of selected rows can be small."""
    pending = None
    for chunk in chunks:
        if pending is not None and len(pending) >= size and len(chunk) >= size:
            yield pending
            pending = chunk
        else:
            pending = chunk if pending is None else np.concatenate([pending, chunk])
    if pending is not None:
        yield pending


def _predict_rows(store, layer, rows, pipeline) -> np.ndarray:
    """Predictions for `rows` of a layer, read chunk by chunk (out-of-core)."""
    predicted = np.empty(len(store), np.int64)
    for numbers, codes in store.iter_rows(layer, rows):
        predicted[numbers] = pipeline.predict(as_features(codes))
    return predicted[rows]


# ---------------------------------------------------------------------------------
# Protocols


def _layer_bytes(store: FeatureStore, layer: str) -> int:
    info = next(i for i in store.layer_info if i["key"] == layer)
    return len(store) * int(np.prod(info["shape"])) * np.dtype(info["dtype"]).itemsize


def _use_out_of_core(store, layer, settings) -> bool:
    if settings.out_of_core == "always":
        return True
    if settings.out_of_core == "never":
        return False
    return _layer_bytes(store, layer) > settings.memory_limit_gb * 1e9


def _holdout_split(data: _Data, settings: ComparisonSettings):
    """(train positions, test positions) into data.rows, stratified and seeded."""
    positions = np.arange(len(data.rows))
    train, test = train_test_split(
        positions,
        test_size=settings.test_size,
        stratify=data.labels,
        random_state=settings.seed,
    )
    return np.sort(train), np.sort(test)


def _holdout(data, layers, settings, bar) -> tuple[list, list, dict]:
    """Per layer × classifier: CV search on train, refit, score on test."""
    rows, candidates = [], []
    if data.test_store is None:
        train, test = _holdout_split(data, settings)
        split = {
            "folds": data.folds,
            "train": len(train),
            "test": len(test),
            "test_rows": data.rows[test].tolist(),
        }
    else:
        train, test = np.arange(len(data.rows)), None
        split = {
            "folds": data.folds,
            "train": len(train),
            "test": len(data.test_rows),
            "test_store": str(data.test_store.path),
        }
    y_train = data.labels[train]
    y_test = data.labels[test] if test is not None else data.test_labels
    search_rows = _subsample(train, data.labels, settings.search_rows, settings.seed)
    shots = _possible_shots(
        settings.shots, y_train, data.store.class_names, data.adjustments
    )
    for layer in layers:
        out_of_core = _use_out_of_core(data.store, layer, settings)
        if out_of_core:
            names = [c for c in settings.classifiers if CLASSIFIERS[c].out_of_core]
            skipped = sorted(set(settings.classifiers) - set(names))
            if skipped:
                _note(
                    data.adjustments,
                    f"layer {layer!r} is trained out of core "
                    f"({_layer_bytes(data.store, layer) / 1e9:.1f} GB): only sgd "
                    f"supports that; {', '.join(skipped)} skipped",
                )
            if shots:
                _note(
                    data.adjustments,
                    f"no low-shot curve for layer {layer!r}: it is trained out of "
                    f"core, and low-shot training needs its codes in memory",
                )
            X = None
        else:
            names = list(settings.classifiers)
            X = as_features(data.store.read(layer))[data.rows]
        X_search = data.search_codes(layer, search_rows, X)
        X_test = None
        if not out_of_core:
            X_test = (
                X[test]
                if test is not None
                else as_features(data.test_store.read(layer))
            )
        for name in names:
            bar.set_postfix_str(f"{layer} {name}")
            found = _search(
                name,
                X_search,
                data.labels[search_rows],
                data.folds,
                settings,
                data.client,
            )
            if out_of_core:
                pipeline, seconds = _fit_out_of_core(
                    data.store, layer, data.rows[train], y_train, found.params, settings
                )
                source = data.store if data.test_store is None else data.test_store
                test_rows = data.test_rows if test is None else data.rows[test]
                predicted = _predict_rows(source, layer, test_rows, pipeline)
            else:
                pipeline, seconds = fit_pipeline(
                    name, found.params, X[train], y_train, settings
                )
                predicted = pipeline.predict(X_test)
            metrics = classification_metrics(y_test, predicted)
            candidates.append(
                Candidate(
                    layer,
                    name,
                    found.params,
                    found.fold_scores,
                    metrics,
                    seconds,
                    pipeline,
                    predicted,
                )
            )
            keys = {
                "method": "linear_probe",
                "layer": layer,
                "classifier": name,
                "protocol": "holdout",
                "seed": settings.seed,
            }
            for fold, score in enumerate(found.fold_scores):
                rows += metric_rows(
                    {"accuracy": score}, split=f"cv_fold_{fold}", **keys
                )
            rows += metric_rows(
                {**metrics, "fit_seconds": seconds}, split="test", **keys
            )
            if shots and X is not None:
                rows += _low_shot(
                    name, X[train], y_train, X_test, y_test, layer, shots, settings
                )
            bar.update()
    split["y_test"] = y_test
    return rows, candidates, split


def _possible_shots(
    shots: tuple[int, ...],
    y_train: np.ndarray,
    class_names: list[str],
    adjustments: list[str],
) -> tuple[int, ...]:
    """`shots` with values larger than the smallest class's training rows replaced,
    with a note, by that number (the largest possible), without repeats."""
    if not shots:
        return ()
    classes, counts = np.unique(y_train, return_counts=True)
    largest = int(counts.min())
    possible = tuple(dict.fromkeys(min(s, largest) for s in shots))
    too_many = [s for s in shots if s > largest]
    if too_many:
        _note(
            adjustments,
            f"shots {', '.join(map(str, too_many))} per class: the smallest class "
            f"{class_names[classes[np.argmin(counts)]]!r} has only {largest} training "
            f"rows, so the low-shot curves use {', '.join(map(str, possible))}",
        )
    return possible


def _low_shot(
    name, X_train, y_train, X_test, y_test, layer, shot_counts, settings
) -> list[dict]:
    """Train on each of `shot_counts` examples per class (several seeds), score on
    the test rows."""
    rows = []
    classes = np.unique(y_train)
    for shots in shot_counts:
        for repeat in range(settings.shot_seeds):
            rng = np.random.default_rng(settings.seed + repeat)
            chosen = np.concatenate(
                [
                    rng.choice(np.flatnonzero(y_train == c), shots, replace=False)
                    for c in classes
                ]
            )
            pipeline = make_pipeline(
                name, settings.normalization, None, settings.class_weight, settings.seed
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                if name == "knn":
                    pipeline.set_params(classifier__n_neighbors=min(5, len(chosen)))
                pipeline.fit(X_train[chosen], y_train[chosen])
            metrics = classification_metrics(y_test, pipeline.predict(X_test))
            rows += metric_rows(
                metrics,
                method="linear_probe",
                layer=layer,
                classifier=name,
                protocol="low_shot",
                split="test",
                shots=shots,
                seed=settings.seed + repeat,
            )
    return rows


def _nested(data, layers, settings, bar) -> tuple[list, list, list, tuple, dict]:
    """Nested CV: every outer fold selects among all candidates on its train part.

    Each candidate is also searched, by the same inner rule, on all rows: the final
    model is chosen from those searches exactly as each outer fold chose its model.
    """
    outer = StratifiedKFold(data.folds, shuffle=True, random_state=settings.seed)
    splits = list(outer.split(np.zeros(len(data.labels)), data.labels))
    inner_folds = max(2, min(data.folds, _min_class(data.labels, splits)))
    if inner_folds < data.folds:
        _note(
            data.adjustments,
            f"inner cross-validation uses {inner_folds} folds: the smallest class "
            f"is too small for {data.folds} within an outer training part",
        )
    everything = np.arange(len(data.rows))
    final_rows = _subsample(
        everything, data.labels, settings.search_rows, settings.seed
    )
    rows, scores, final = [], {}, {}
    for layer in layers:
        X = as_features(data.store.read(layer))[data.rows]
        for name in settings.classifiers:
            bar.set_postfix_str(f"{layer} {name}")
            for fold, (train, test) in enumerate(splits):
                search_rows = _subsample(
                    train, data.labels, settings.search_rows, settings.seed
                )
                found = _search(
                    name,
                    data.search_codes(layer, search_rows, X),
                    data.labels[search_rows],
                    inner_folds,
                    settings,
                    data.client,
                )
                pipeline, seconds = fit_pipeline(
                    name, found.params, X[train], data.labels[train], settings
                )
                predicted = pipeline.predict(X[test])
                metrics = classification_metrics(data.labels[test], predicted)
                scores[(layer, name, fold)] = (found, metrics, predicted)
                rows += metric_rows(
                    {**metrics, "fit_seconds": seconds},
                    method="linear_probe",
                    layer=layer,
                    classifier=name,
                    protocol="cv",
                    split=f"outer_fold_{fold}",
                    seed=settings.seed,
                )
                bar.update()
            final[(layer, name)] = _search(
                name,
                data.search_codes(layer, final_rows, X),
                data.labels[final_rows],
                inner_folds,
                settings,
                data.client,
            )
            bar.update()
    candidates = []
    for layer in layers:
        for name in settings.classifiers:
            outer_scores = [scores[(layer, name, f)][1] for f in range(len(splits))]
            mean = {
                m: float(np.mean([s[m] for s in outer_scores])) for m in outer_scores[0]
            }
            candidates.append(
                Candidate(
                    layer,
                    name,
                    final[(layer, name)].params,
                    [s["accuracy"] for s in outer_scores],
                    mean,
                )
            )
    selections, confusion_pairs = [], []
    for fold, (_, test) in enumerate(splits):
        (layer, name, _), (found, metrics, predicted) = max(
            ((key, value) for key, value in scores.items() if key[2] == fold),
            key=lambda item: _selection_key(item[1][0].fold_scores),
        )
        selections.append(
            {
                "fold": fold,
                "layer": layer,
                "classifier": name,
                "params": found.params,
                "inner_cv": float(np.mean(found.fold_scores)),
                **metrics,
            }
        )
        rows += metric_rows(
            metrics,
            method="linear_probe",
            layer="selected",
            classifier="selected",
            protocol="nested_cv",
            split=f"outer_fold_{fold}",
            seed=settings.seed,
        )
        confusion_pairs.append((data.labels[test], predicted))
    y_true = np.concatenate([t for t, _ in confusion_pairs])
    y_pred = np.concatenate([p for _, p in confusion_pairs])
    return rows, candidates, selections, (y_true, y_pred), final


def _min_class(labels, splits) -> int:
    smallest = min(
        np.bincount(labels[train])[np.unique(labels)].min() for train, _ in splits
    )
    return int(smallest)


# ---------------------------------------------------------------------------------


def compare(
    store: str | FeatureStore,
    settings: ComparisonSettings | None = None,
    *,
    test_store: str | FeatureStore | None = None,
    progress: bool = True,
    client: Client | str | None = None,
    **setting_overrides,
) -> ComparisonResult:
    """Compare classifiers on each layer of a feature store (see module docstring).

    Args:
        store: the feature store (path or open `FeatureStore`).
        settings: a `ComparisonSettings`; keyword arguments override its fields.
        test_store: a separate store of test images (same extraction settings and
            classes); then every row of `store` is training data.
        progress: show a progress bar over layer × classifier fits.
        client: run the CV fits on a Dask cluster (`pip install 'tl[dask]'`): a
            `distributed.Client`, `"local:N"` or a scheduler address (see
            `tl.distributed.connected`). Its workers read the codes from the store
            (at the same path), and the results equal a local run's.

    Returns:
        A `ComparisonResult`; `tl.reports.write_report` turns it into files.
    """
    settings = (settings or ComparisonSettings()).updated(**setting_overrides)
    if client is not None:
        from tl.distributed import check_client

        check_client(client)  # no Dask, or a malformed cluster: one line, at once
    with contextlib.ExitStack() as stack:
        if not isinstance(store, FeatureStore):
            store = stack.enter_context(FeatureStore(store))
        if test_store is not None and not isinstance(test_store, FeatureStore):
            test_store = stack.enter_context(FeatureStore(test_store))
        layers = list(settings.layers or store.layers)
        for layer in layers:
            if layer not in store.layers:
                raise TLError(
                    f"Unknown layer {layer!r} in {str(store.path)!r}. Layers: "
                    f"{', '.join(store.layers)}."
                )
        if test_store is not None and settings.protocol != "holdout":
            raise TLError("A separate test store goes with the holdout protocol.")
        data = _prepare(store, test_store, layers, settings)
        if client is not None:  # once the checks passed: a refusal costs nothing
            from tl.distributed import connected

            data.client = stack.enter_context(connected(client))
        if store.settings.get("weights") == "none":
            log.warning(
                "note: %s holds codes of random weights (--weights none): these "
                "accuracies say nothing about the pretrained backbone.",
                store.path,
            )
        for note in data.adjustments:  # once the checks passed: a refusal is one line
            log.warning("note: %s", note)
        total = len(layers) * len(settings.classifiers)
        if settings.protocol == "cv":
            total *= data.folds + 1  # outer folds, then the search on all rows
        with tqdm(total=total, unit="fit", disable=not progress, leave=False) as bar:
            if settings.protocol == "holdout":
                return _finish_holdout(data, layers, settings, bar)
            return _finish_nested(data, layers, settings, bar)


def _finish_holdout(data, layers, settings, bar) -> ComparisonResult:
    rows, candidates, split = _holdout(data, layers, settings, bar)
    winner = max(candidates, key=lambda c: _selection_key(c.cv_scores))
    y_test = split.pop("y_test")
    labels = np.arange(len(data.store.class_names))
    return ComparisonResult(
        settings=settings,
        rows=rows,
        candidates=candidates,
        winner=winner,
        winner_estimate={"protocol": "holdout", **winner.test},
        class_names=data.store.class_names,
        layer_order=layers,
        confusion=confusion_matrix(y_test, winner.predicted, labels=labels),
        adjustments=data.adjustments,
        split=split,
    )


def _finish_nested(data, layers, settings, bar) -> ComparisonResult:
    rows, candidates, selections, (y_true, y_pred), final = _nested(
        data, layers, settings, bar
    )
    # The final model: chosen by the rule each outer fold used, on all rows, refit.
    (layer, name), found = max(
        final.items(), key=lambda item: _selection_key(item[1].fold_scores)
    )
    best = next(c for c in candidates if (c.layer, c.classifier) == (layer, name))
    X = as_features(data.store.read(layer))[data.rows]
    best.pipeline, best.fit_seconds = fit_pipeline(
        name, found.params, X, data.labels, settings
    )
    final_selection = {
        "layer": layer,
        "classifier": name,
        "params": found.params,
        "inner_cv": float(np.mean(found.fold_scores)),
        "inner_cv_std": float(np.std(found.fold_scores)),
        "inner_folds": len(found.fold_scores),
    }
    estimate = {"protocol": "nested_cv"}
    for metric in METRICS:
        values = [selection[metric] for selection in selections]
        estimate[metric] = float(np.mean(values))
        estimate[f"{metric}_std"] = float(np.std(values))
    labels = np.arange(len(data.store.class_names))
    return ComparisonResult(
        settings=settings,
        rows=rows,
        candidates=candidates,
        winner=best,
        winner_estimate=estimate,
        class_names=data.store.class_names,
        layer_order=layers,
        confusion=confusion_matrix(y_true, y_pred, labels=labels),
        adjustments=data.adjustments,
        split={"rows": len(data.rows), "outer_folds": data.folds},
        selections=selections,
        final_selection=final_selection,
    )
