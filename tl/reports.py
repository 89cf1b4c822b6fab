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
from matplotlib.figure import Figure
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


def write_results(
    rows: list[dict], directory: str | Path, columns: list[str] = RESULT_COLUMNS
) -> pd.DataFrame:
    """Write tidy rows to `results.csv` and `results.json` in `directory` (the
    `RESULT_COLUMNS`, or `columns` that extend them)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=columns)
    table.to_csv(directory / "results.csv", index=False)
    (directory / "results.json").write_text(
        json.dumps(table.to_dict(orient="records"), indent=1, default=str)
    )
    return table


# ---------------------------------------------------------------------------------
# Leaderboard, plots and report files of a comparison (tl.evaluation)


def leaderboard(result) -> pd.DataFrame:
    """One row per layer × classifier, best first (by the selection criterion).

    Holdout: ranked by CV accuracy on the training rows; test columns are scores on
    the held-out rows. Nested CV: ranked by the mean over outer folds (cv columns),
    test columns are those means; the final model (chosen by the inner rule on all
    rows, see `protocol_summary`) need not be first.
    """
    records = []
    for c in result.candidates:
        test = c.test or {}
        records.append(
            {
                "layer": c.layer,
                "classifier": c.classifier,
                "cv_accuracy": c.cv_mean,
                "cv_std": c.cv_std,
                "test_accuracy": test.get("accuracy"),
                "test_balanced_accuracy": test.get("balanced_accuracy"),
                "test_macro_f1": test.get("macro_f1"),
                "params": json.dumps(c.params, default=str) if c.params else "",
                "fit_seconds": c.fit_seconds,
            }
        )
    table = pd.DataFrame(records).sort_values(
        ["cv_accuracy", "cv_std"], ascending=[False, True], kind="stable"
    )
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def format_leaderboard(result) -> str:
    """The leaderboard as terminal text, with the protocol and the winner's estimate."""
    table = leaderboard(result)
    nested = result.settings.protocol == "cv"
    cv_label = "outer CV acc" if nested else "CV acc (train)"
    lines = [
        f"{'#':>2}  {'layer':<24} {'classifier':<11} {cv_label:>15} "
        f"{'test acc':>8} {'bal acc':>8} {'macro F1':>8} {'fit s':>6}  params"
    ]
    for row in table.itertuples():
        mark = (
            "*"
            if (row.layer, row.classifier)
            == (result.winner.layer, result.winner.classifier)
            else " "
        )
        lines.append(
            f"{row.rank:>2}{mark} {row.layer:<24} {row.classifier:<11} "
            f"{row.cv_accuracy:>8.3f} ± {row.cv_std:.3f} "
            f"{row.test_accuracy:>8.3f} {row.test_balanced_accuracy:>8.3f} "
            f"{row.test_macro_f1:>8.3f} {_seconds(row.fit_seconds):>6}  {row.params}"
        )
    lines.append("")
    lines.append(protocol_summary(result))
    return "\n".join(lines)


def _seconds(value: float) -> str:
    return "" if value != value else f"{value:.1f}"  # NaN: not fitted alone (nested)


def protocol_summary(result) -> str:
    """One paragraph: which protocol, and the winner's unbiased estimate."""
    w, estimate, final = result.winner, result.winner_estimate, result.final_selection
    if estimate["protocol"] == "holdout":
        split = result.split
        held = (
            f"a separate test store ({split['test']} rows)"
            if "test_store" in split
            else f"a stratified held-out split ({split['test']} of "
            f"{split['train'] + split['test']} rows)"
        )
        return (
            f"Protocol: holdout. Hyper-parameters, layer and classifier were chosen "
            f"by {split['folds']}-fold CV on the {split['train']} training rows only. "
            f"Winner (*): {w.layer} + {w.classifier} {w.params}; on {held}, which "
            f"played no part in choosing it: accuracy {estimate['accuracy']:.3f}, "
            f"balanced accuracy {estimate['balanced_accuracy']:.3f}, macro-F1 "
            f"{estimate['macro_f1']:.3f}."
        )
    return (
        f"Protocol: nested CV ({result.split['outer_folds']} outer folds). Each outer "
        f"fold chose layer, classifier and hyper-parameters on its training part; the "
        f"chosen models scored accuracy {estimate['accuracy']:.3f} ± "
        f"{estimate['accuracy_std']:.3f}, balanced accuracy "
        f"{estimate['balanced_accuracy']:.3f} ± "
        f"{estimate['balanced_accuracy_std']:.3f}, macro-F1 "
        f"{estimate['macro_f1']:.3f} ± {estimate['macro_f1_std']:.3f} on the "
        f"held-out folds: the estimate for the whole procedure. Final model (*): "
        f"{w.layer} + {w.classifier} {w.params}, chosen by the same rule on all rows "
        f"({final['inner_folds']}-fold CV accuracy {final['inner_cv']:.3f}) and refit "
        f"on all rows."
    )


def _figure(width: float, height: float) -> Figure:
    """A figure drawn without pyplot: no global matplotlib backend or state."""
    return Figure(figsize=(width, height), layout="constrained")


def plot_layers(result, path: str | Path, depth: dict[str, int]) -> Path:
    """Accuracy against layer depth, one line per classifier (CV mean ± std, and
    held-out test accuracy for the holdout protocol)."""
    layers = sorted(result.layer_order, key=lambda layer: depth.get(layer, 0))
    x = np.arange(len(layers))
    figure = _figure(max(5, 1.3 * len(layers) + 2), 4)
    axis = figure.subplots()
    nested = result.settings.protocol == "cv"
    for number, name in enumerate(result.settings.classifiers):
        by_layer = {c.layer: c for c in result.candidates if c.classifier == name}
        cv = [by_layer[layer].cv_mean for layer in layers]
        err = [by_layer[layer].cv_std for layer in layers]
        color = f"C{number}"
        label = f"{name} ({'outer CV' if nested else 'CV on train'})"
        axis.errorbar(x, cv, yerr=err, color=color, marker="o", capsize=3, label=label)
        if not nested:
            test = [by_layer[layer].test["accuracy"] for layer in layers]
            axis.plot(
                x, test, color=color, marker="s", linestyle="--", label=f"{name} (test)"
            )
    axis.set_xticks(x, layers, rotation=20, ha="right")
    axis.set_xlabel("layer (shallow → deep)")
    axis.set_ylabel("accuracy")
    axis.set_title("Accuracy per layer")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=120)
    return Path(path)


def plot_confusion(
    matrix: np.ndarray, class_names: list[str], path, title: str
) -> Path:
    """Confusion matrix, rows normalised to recall, with counts in the cells."""
    size = max(4, 0.5 * len(class_names) + 2)
    figure = _figure(size + 1, size)
    axis = figure.subplots()
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    image = axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, class_names)
    if len(class_names) <= 20:
        for i in ticks:
            for j in ticks:
                axis.text(
                    j,
                    i,
                    int(matrix[i, j]),
                    ha="center",
                    va="center",
                    color="white" if normalised[i, j] > 0.5 else "black",
                    fontsize=8,
                )
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, label="fraction of the true class")
    figure.savefig(path, dpi=120)
    return Path(path)


def plot_low_shot(rows: list[dict], path, depth: dict[str, int]) -> Path | None:
    """Accuracy against examples per class, one line per layer, one panel per
    classifier (mean ± std over seeds)."""
    table = pd.DataFrame(rows)
    table = table[(table.protocol == "low_shot") & (table.metric == "accuracy")]
    if table.empty:
        return None
    classifiers = list(dict.fromkeys(table.classifier))
    figure = _figure(4.5 * len(classifiers), 4)
    axes = figure.subplots(1, len(classifiers), squeeze=False, sharey=True)
    for axis, name in zip(axes[0], classifiers, strict=True):
        part = table[table.classifier == name]
        layers = sorted(set(part.layer), key=lambda layer: depth.get(layer, 0))
        for layer in layers:
            stats = (
                part[part.layer == layer].groupby("shots").value.agg(["mean", "std"])
            )
            axis.errorbar(
                stats.index,
                stats["mean"],
                yerr=stats["std"].fillna(0),
                marker="o",
                capsize=3,
                label=layer,
            )
        axis.set_xscale("log")
        shots = sorted(set(part.shots))
        axis.set_xticks(shots, [str(int(s)) for s in shots])
        axis.minorticks_off()
        axis.set_xlabel("training examples per class")
        axis.set_title(name)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=8)
    figure.savefig(path, dpi=120)
    return Path(path)


def write_report(
    result, directory: str | Path, *, store, invocation: dict
) -> dict[str, Path]:
    """Write results.csv/json, leaderboard.csv, run.json and the plots.

    Args:
        result: a `tl.evaluation.ComparisonResult`.
        store: the `FeatureStore` compared (for provenance and layer depths).
        invocation: how the comparison was invoked, for re-running it (arguments,
            library versions...).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    depth = {
        info["key"]: info.get("depth", i) for i, info in enumerate(store.layer_info)
    }
    write_results(result.rows, directory)
    table = leaderboard(result)
    table.to_csv(directory / "leaderboard.csv", index=False)
    written = {
        "results": directory / "results.csv",
        "leaderboard": directory / "leaderboard.csv",
        "layers_plot": plot_layers(result, directory / "accuracy_per_layer.png", depth),
        "confusion_plot": plot_confusion(
            result.confusion,
            result.class_names,
            directory / "confusion_matrix.png",
            f"{result.winner.layer} + {result.winner.classifier}",
        ),
    }
    low_shot = plot_low_shot(result.rows, directory / "low_shot.png", depth)
    if low_shot:
        written["low_shot_plot"] = low_shot
    summary = {
        **invocation,
        "store": str(Path(store.path).resolve()),
        "store_settings": store.settings,
        "store_provenance": store.provenance,
        "protocol": result.settings.protocol,
        "protocol_summary": protocol_summary(result),
        "comparison_settings": result.settings.to_json(),
        "winner": {
            "layer": result.winner.layer,
            "classifier": result.winner.classifier,
            "params": result.winner.params,
            "estimate": result.winner_estimate,
        },
        "selections": result.selections,
        "final_selection": result.final_selection,
        "split": {k: v for k, v in result.split.items()},
        "adjustments": result.adjustments,
        "class_names": result.class_names,
    }
    (directory / "run.json").write_text(json.dumps(summary, indent=2, default=str))
    written["run"] = directory / "run.json"
    return written


# ---------------------------------------------------------------------------------
# Plots of an experiment (tl.experiment): several backbones, probes and fine-tunes


def plot_accuracy_by_depth(table: pd.DataFrame, path: str | Path) -> Path:
    """Test accuracy against relative layer depth (0: input, 1: the backbone's last
    layer), one line per backbone × classifier (× pooling when several).

    Args:
        table: one row per probe: backbone, layer, pooling, classifier, depth,
            test_accuracy.
    """
    figure = _figure(7.5, 4.5)
    axis = figure.subplots()
    several_poolings = table.groupby("backbone").pooling.nunique().max() > 1
    keys = ["backbone", "classifier", *(["pooling"] if several_poolings else [])]
    markers = "osD^vP*X"
    for number, (names, part) in enumerate(table.groupby(keys, sort=False)):
        part = part.sort_values("depth")
        backbone_number = list(dict.fromkeys(table.backbone)).index(names[0])
        axis.plot(
            part.depth,
            part.test_accuracy,
            marker=markers[backbone_number % len(markers)],
            color=f"C{number % 10}",
            label=" / ".join(map(str, names)),
        )
    for (_, layer), part in table.groupby(["backbone", "layer"], sort=False):
        axis.annotate(
            layer,
            (part.depth.iloc[0], part.test_accuracy.max()),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=7,
            color="0.35",
        )
    axis.set_xlim(-0.02, 1.08)
    axis.set_xlabel("layer depth (fraction of the backbone's layers)")
    axis.set_ylabel("test accuracy")
    axis.set_title("Accuracy against layer depth")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    return Path(path)


def plot_probe_vs_finetune(table: pd.DataFrame, path: str | Path) -> Path:
    """Per backbone: its best probe (by the ranking) against each of its fine-tunes,
    test accuracy with the 95% interval.

    Args:
        table: the experiment's leaderboard (rank order), with test_ci_low/high.
    """
    bars = []
    for backbone, part in table.groupby("backbone", sort=False):
        probes = part[part.strategy == "probe"]
        if len(probes):
            best = probes.iloc[0]
            bars.append((backbone, f"probe {best.layer}\n{best.classifier}", best))
        for _, row in part[part.strategy != "probe"].iterrows():
            bars.append((backbone, f"{row.strategy}\nunfreeze {row.layer}", row))
    figure = _figure(max(5.0, 1.2 * len(bars) + 2), 4.5)
    axis = figure.subplots()
    backbones = list(dict.fromkeys(backbone for backbone, _, _ in bars))
    for x, (backbone, _, row) in enumerate(bars):
        accuracy = row.test_accuracy
        axis.bar(
            x,
            accuracy,
            color=f"C{backbones.index(backbone) % 10}",
            hatch="" if row.strategy == "probe" else "//",
            yerr=[[accuracy - row.test_ci_low], [row.test_ci_high - accuracy]],
            capsize=4,
        )
    axis.set_xticks(
        range(len(bars)),
        [f"{backbone}\n{label}" for backbone, label, _ in bars],
        fontsize=7,
    )
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("test accuracy (95% interval)")
    axis.set_title("Best probe against fine-tuning, per backbone")
    axis.grid(alpha=0.3, axis="y")
    figure.savefig(path, dpi=110)
    return Path(path)


def plot_step_times(times: pd.DataFrame, path: str | Path) -> Path:
    """Seconds each step took when it was computed; hatched: reused by this run.

    Args:
        times: one row per step: title, kind, seconds, reused.
    """
    figure = _figure(8, max(2.5, 0.22 * len(times) + 1.2))
    axis = figure.subplots()
    kinds = list(dict.fromkeys(times.kind))
    y = range(len(times))
    axis.barh(
        y,
        times.seconds,
        color=[f"C{kinds.index(kind)}" for kind in times.kind],
        hatch=["//" if reused else "" for reused in times.reused],
        edgecolor="white",
    )
    axis.set_yticks(y, times.title, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("seconds (hatched: computed by an earlier run, reused)")
    axis.set_title("Time per step")
    axis.grid(alpha=0.3, axis="x")
    figure.savefig(path, dpi=110)
    return Path(path)
