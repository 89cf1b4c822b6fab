"""Results of linear probes and fine-tuning: tidy tables, files and plots.

Every evaluation becomes tidy rows with the columns `RESULT_COLUMNS`:

    method      linear_probe | fine_tune
    layer       store layer key (probes) or the tapped/unfrozen part (fine-tuning)
    classifier  registry name (probes) or the head (fine-tuning: linear, mlp)
    protocol    holdout | cv | nested_cv | low_shot
    split       test | cv_fold_K | outer_fold_K
    shots       examples per class (low-shot rows), else empty
    seed        random seed of the split or the subsample
    metric      accuracy | balanced_accuracy | macro_f1 | fit_seconds
    value       the number

so that probes and fine-tuned models compare in one table (`results.csv`,
`results.json`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

RESULT_COLUMNS = [
    "method",
    "layer",
    "classifier",
    "protocol",
    "split",
    "shots",
    "seed",
    "metric",
    "value",
]
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 of predictions."""
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def metric_rows(metrics: dict[str, float], **keys) -> list[dict]:
    """One tidy row per metric, with the identifying `keys` (method, layer, ...)."""
    base = {column: keys.get(column) for column in RESULT_COLUMNS[:-2]}
    return [{**base, "metric": name, "value": value} for name, value in metrics.items()]


def write_results(rows: list[dict], directory: str | Path) -> pd.DataFrame:
    """Write tidy rows to `results.csv` and `results.json` in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    table.to_csv(directory / "results.csv", index=False)
    (directory / "results.json").write_text(
        json.dumps(table.to_dict(orient="records"), indent=1, default=str)
    )
    return table
