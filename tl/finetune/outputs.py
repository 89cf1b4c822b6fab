"""What a run shows: a progress bar per epoch; history, confusion matrix and splits
as tables and plots."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm.auto import tqdm

from tl.finetune.data import Splits
from tl.reports import plot_confusion


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
