"""The training loop: both stages, epoch by epoch, checkpointed and resumable."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from tqdm.auto import tqdm

from tl.errors import TLError
from tl.features import compiled_extractor
from tl.finetune.checkpoint import (
    _BEST,
    _CHECKPOINTS,
    _STATE,
    _checkpointed,
    _load_variables,
    _save_variables,
    _State,
)
from tl.finetune.data import Splits, _over_images, _training_batches, class_weights
from tl.finetune.model import FineTuneModel
from tl.finetune.outputs import _write_history
from tl.finetune.settings import FineTuneSettings
from tl.images import ImageIndex

log = logging.getLogger("tl")


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
