"""`fine_tune`: a head on a registry backbone, trained in two stages, exported whole.

`fine_tune` indexes an image folder, holds out stratified validation and test splits,
builds `pixels → backbone preprocessing → backbone → global pooling → dropout → head`
and trains it in two stages: the head alone on the frozen backbone, then the top of the
backbone too (`unfreeze`: a block alias, a layer, `all` or a fraction) with a lower
learning rate under a linear warmup and a cosine decay. The head can start from a
linear probe saved by `train_classifier.py` (LP-FT): its scaler and PCA are folded into
the Dense layer, so the untrained model predicts exactly what the probe predicts.

A run writes into its output folder (see `tl.finetune.checkpoint` for what a resumed
run needs) and at the end:

    model.keras            the trained model: raw RGB pixels in [0, 255] → probabilities
                           (its last layer, `ClassNames`, holds the class names)
    metadata.json          format `tl-finetuned`, class names, image settings, settings,
                           data, best epoch, test metrics, versions, files (the
                           SHA-256 of model.keras)
    results.csv/.json      test metrics in the classifier leaderboard's schema
    confusion_matrix.csv/.png, history.csv/.png, splits.csv (path, label, split)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.metrics import confusion_matrix

from tl.classifiers import SavedClassifier, load_classifier
from tl.finetune.checkpoint import _BEST, _CHECKPOINTS, _STATE, _open_run
from tl.finetune.data import labelled_index, prepare_splits
from tl.finetune.head_init import initialise_head, linear_head_weights
from tl.finetune.model import build_model
from tl.finetune.outputs import _write_confusion, _write_history, _write_splits
from tl.finetune.saved import (
    MODEL_FILE,
    MODEL_FORMAT,
    MODEL_SCHEMA_VERSION,
    _inference_model,
)
from tl.finetune.settings import FineTuneSettings
from tl.finetune.training import _train, _TrainingJob
from tl.model_folder import METADATA, file_hashes
from tl.provenance import library_versions
from tl.reports import classification_metrics, metric_rows, write_results

log = logging.getLogger("tl")


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
