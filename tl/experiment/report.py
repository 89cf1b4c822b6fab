"""An experiment's report: leaderboard, tidy results and one self-contained page.

In the output folder:

    leaderboard.csv     one row per backbone × layer × pooling × classifier and per
                        fine-tune, best first: the comparison leaderboard's columns
                        plus backbone, strategy (probe, fine_tune, scratch), pooling,
                        validation accuracy, the test accuracy's 95% interval, and
                        the step, stores and model folder each row comes from
    results.csv/.json   tidy rows: `tl.reports.RESULT_COLUMNS` plus `EXTRA_COLUMNS`
    report.html         one file, plots embedded, to open and share
    plots/*.png         the page's plots

Rows are ranked by their accuracy on the experiment's test images, which every
strategy shares and none was trained or tuned on: probes choose hyper-parameters by
CV on the training images, fine-tunes stop early on validation images taken from
the training images. CV and validation accuracies do not compare across strategies
(other images, other amounts), the test images do. The winner comes with its Wilson
95% interval, and McNemar's exact test on the same test images says whether it beats
the runner-up by more than chance. Being the maximum over every candidate on the
same images, the winner's test accuracy is optimistic by construction; the report
and the terminal say so, and show the candidates a training-side criterion picks
(the best CV accuracy among probes, the best validation accuracy among fine-tunes)
with their test accuracies: those are the honest estimates.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from tl import reports
from tl.experiment.plan import ExtractStep, Plan, probe_selection_key
from tl.store import FeatureStore

EXTRA_COLUMNS = ["backbone", "strategy", "pooling", "step", "store", "model"]
CONFIDENCE = 0.95
SIGNIFICANCE = 0.05
LEADERBOARD_COLUMNS = [
    "rank", "backbone", "strategy", "layer", "pooling", "classifier",
    "cv_accuracy", "cv_std", "val_accuracy", "test_accuracy", "test_ci_low",
    "test_ci_high", "test_images", "test_balanced_accuracy", "test_macro_f1",
    "params", "fit_seconds", "step_seconds", "depth", "store", "test_store",
    "model", "step",
]  # fmt: skip


def wilson_interval(
    correct: int, total: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The Wilson score interval of an accuracy of `correct` out of `total`."""
    interval = binomtest(correct, total).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)


def mcnemar_p_value(only_first: int, only_second: int) -> float:
    """McNemar's exact test: the two-sided binomial p-value of the discordant pairs
    (images only the first model gets right, images only the second does) under
    equal error rates. 1.0 when the two never disagree."""
    discordant = only_first + only_second
    if discordant == 0:
        return 1.0
    return float(binomtest(only_first, discordant, 0.5).pvalue)


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """Two models on the test images both predicted."""

    images: int
    first_accuracy: float
    second_accuracy: float
    only_first: int  # right where the second is wrong
    only_second: int
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < SIGNIFICANCE


def paired_comparison(first: dict, second: dict) -> PairedComparison:
    """McNemar's test between two records' predictions, on the images both have."""
    right = []
    for record in (first, second):
        predictions = record["predictions"]
        right.append(
            {
                path: truth == predicted
                for path, truth, predicted in zip(
                    predictions["paths"],
                    predictions["truth"],
                    predictions["predicted"],
                    strict=True,
                )
            }
        )
    common = sorted(right[0].keys() & right[1].keys())
    a = np.array([right[0][path] for path in common], bool)
    b = np.array([right[1][path] for path in common], bool)
    only_first, only_second = int((a & ~b).sum()), int((~a & b).sum())
    return PairedComparison(
        len(common),
        float(a.mean()) if len(common) else math.nan,
        float(b.mean()) if len(common) else math.nan,
        only_first,
        only_second,
        mcnemar_p_value(only_first, only_second),
    )


# ---------------------------------------------------------------------------------
# Tables


def leaderboard(records: list[dict]) -> pd.DataFrame:
    """One row per probe and fine-tune record, ranked by test accuracy (see the
    module docstring); ties by balanced accuracy, then by the training-side score
    (CV accuracy of a probe, validation accuracy of a fine-tune)."""
    rows = []
    for record in records:
        predictions = record["predictions"]
        correct = sum(
            truth == predicted
            for truth, predicted in zip(
                predictions["truth"], predictions["predicted"], strict=True
            )
        )
        total = len(predictions["paths"])
        low, high = wilson_interval(correct, total) if total else (math.nan,) * 2
        test = record["test"]
        rows.append(
            {
                "backbone": record["backbone"],
                "strategy": record["strategy"],
                "layer": record["layer"],
                "pooling": record["pooling"],
                "classifier": record["classifier"],
                "cv_accuracy": record["cv_accuracy"],
                "cv_std": record["cv_std"],
                "val_accuracy": record["val_accuracy"],
                "test_accuracy": test["accuracy"],
                "test_ci_low": low,
                "test_ci_high": high,
                "test_images": total,
                "test_balanced_accuracy": test["balanced_accuracy"],
                "test_macro_f1": test["macro_f1"],
                "params": json.dumps(record["params"], default=str),
                "fit_seconds": record["fit_seconds"],
                "step_seconds": record["seconds"],
                "depth": record["depth"],
                "store": record["store"],
                "test_store": record["test_store"],
                "model": record["model"],
                "step": record["key"],
            }
        )
    table = pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS[1:])
    training_side = table.cv_accuracy.where(
        table.strategy == "probe", table.val_accuracy
    )
    order = ["test_accuracy", "test_balanced_accuracy", "_training_side"]
    table = (
        table.assign(_training_side=training_side.astype(float))
        .sort_values(order, ascending=False, na_position="last", kind="stable")
        .drop(columns="_training_side")
        .reset_index(drop=True)
    )
    table.insert(0, "rank", range(1, len(table) + 1))
    return table


def _describe(row) -> str:
    """`vgg16 block4_pool (avg) + logreg, probe`: a leaderboard row in words."""
    if row.strategy == "probe":
        return f"{row.backbone} {row.layer} ({row.pooling}) + {row.classifier}, probe"
    return (
        f"{row.backbone} {row.strategy.replace('_', '-')} (unfreeze {row.layer}, "
        f"{row.classifier} head)"
    )


def _training_side(row) -> str:
    """A row's score on the training images: `CV 0.812` or `val 0.900`."""
    if row.strategy == "probe":
        return f"CV {row.cv_accuracy:.3f}"
    return f"val {row.val_accuracy:.3f}" if pd.notna(row.val_accuracy) else "-"


def verdict(table: pd.DataFrame, records: dict[str, dict]) -> list[str]:
    """Sentences: the winner, its test accuracy and interval; McNemar's test
    against the runner-up."""
    if table.empty:
        return ["No probe or fine-tune has finished."]
    winner = table.iloc[0]
    lines = [
        f"Winner: {_describe(winner)}. Test accuracy {winner.test_accuracy:.3f} on "
        f"{winner.test_images} images, {CONFIDENCE:.0%} interval "
        f"{winner.test_ci_low:.3f}–{winner.test_ci_high:.3f} (Wilson)."
    ]
    if len(table) < 2:
        return lines
    second = table.iloc[1]
    paired = paired_comparison(records[winner.step], records[second.step])
    if not paired.significant:
        meaning = (
            f"p ≥ {SIGNIFICANCE}: within chance, these test images do not show "
            f"the winner to be better"
        )
    elif paired.only_first > paired.only_second:
        meaning = f"p < {SIGNIFICANCE}: the winner is better by more than chance"
    else:
        meaning = f"p < {SIGNIFICANCE}: the runner-up is better on these images"
    lines.append(
        f"Runner-up: {_describe(second)}, test accuracy "
        f"{second.test_accuracy:.3f}. On the {paired.images} test images both "
        f"predicted, only the winner is right on {paired.only_first}, only the "
        f"runner-up on {paired.only_second}; McNemar's exact test: p = "
        f"{paired.p_value:.3g}; {meaning}."
    )
    return lines


def chosen_without_test(records: list[dict]) -> list[dict]:
    """The candidates a training-side criterion picks: the probe with the best CV
    accuracy (`probe_selection_key`) and, where fine-tunes have validation images,
    the fine-tune with the best validation accuracy (the first of equals in the
    plan's order). No test image played a part in choosing them, so their test
    accuracies are honest estimates. CV and validation accuracies are measured on
    other images and do not compare with each other: each strategy has its pick."""
    picks = []
    probes = [r for r in records if r["strategy"] == "probe"]
    if probes:
        picks.append(max(probes, key=probe_selection_key))
    tuned = [
        r for r in records if r["strategy"] != "probe" and r["val_accuracy"] is not None
    ]
    if tuned:
        picks.append(max(tuned, key=lambda record: record["val_accuracy"]))
    return picks


def _honest_estimates(table: pd.DataFrame, records: list[dict]) -> str:
    """`A (CV 0.750): test 0.750, 95% 0.301–0.954; B (val ...): ...`."""
    estimates = []
    for record in chosen_without_test(records):
        row = next(table[table.step == record["key"]].itertuples())
        estimates.append(
            f"{_describe(row)} ({_training_side(row)}): test "
            f"{row.test_accuracy:.3f}, {CONFIDENCE:.0%} interval "
            f"{row.test_ci_low:.3f}–{row.test_ci_high:.3f}"
        )
    return "; ".join(estimates)


def selection_line(table: pd.DataFrame, records: list[dict]) -> str:
    """The terminal's line on selection: the top row is optimistic, and the
    candidates chosen without the test images with their test accuracies. Empty
    for fewer than two candidates."""
    if len(table) < 2:
        return ""
    return (
        f"Optimistic: #1 is the best of {len(table)} on the same "
        f"{table.test_images.iloc[0]} test images. Chosen without them (the honest "
        f"estimate): {_honest_estimates(table, records)}."
    )


def selection_paragraph(table: pd.DataFrame, records: list[dict]) -> str:
    """The report's paragraph on selection (see `selection_line`)."""
    if len(table) < 2:
        return ""
    return (
        f"The winner is the maximum over {len(table)} candidates on the same "
        f"{table.test_images.iloc[0]} test images, so its test accuracy is "
        f"optimistic by construction: the interval holds for one model chosen in "
        f"advance, not for the best of many, and the closer the candidates, the "
        f"more luck the top place holds. The honest estimate is the test accuracy "
        f"of a candidate chosen without the test images, by the best CV accuracy "
        f"among the probes and the best validation accuracy among the fine-tunes: "
        f"{_honest_estimates(table, records)}."
    )


def format_top(table: pd.DataFrame, count: int = 10) -> str:
    """The top of the leaderboard as terminal text."""
    lines = [
        f"{'#':>3}  {'backbone':<14} {'strategy':<9} {'layer':<22} {'pool':<6} "
        f"{'classifier':<11} {'train side':>10} {'test acc':>8}  95% interval"
    ]
    for row in table.head(count).itertuples():
        lines.append(
            f"{row.rank:>3}  {row.backbone:<14} {row.strategy:<9} {row.layer:<22} "
            f"{row.pooling:<6} {row.classifier:<11} {_training_side(row):>10} "
            f"{row.test_accuracy:>8.3f}  {row.test_ci_low:.3f}–{row.test_ci_high:.3f}"
        )
    if len(table) > count:
        lines.append(f"... {len(table) - count} more in leaderboard.csv")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------
# Files


def write_report(plan: Plan, ran: list[str]) -> tuple[pd.DataFrame, Path]:
    """Write leaderboard.csv, results.csv/.json, the plots and report.html.

    Args:
        plan: the experiment's plan, its steps done.
        ran: the titles of the steps this run computed (the others were reused).

    Returns:
        The leaderboard and the path of report.html.
    """
    directory = plan.spec.output_dir
    plots = directory / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    records = plan.finished_records()
    table = leaderboard(records)
    table.to_csv(directory / "leaderboard.csv", index=False)
    rows = [row for record in records for row in record["rows"]]
    reports.write_results(rows, directory, reports.RESULT_COLUMNS + EXTRA_COLUMNS)
    figures = {}
    probes = table[table.strategy == "probe"]
    if len(probes):
        figures["Accuracy against layer depth"] = reports.plot_accuracy_by_depth(
            probes, plots / "accuracy_by_depth.png"
        )
    if (table.strategy != "probe").any():
        figures["Probes against fine-tuning"] = reports.plot_probe_vs_finetune(
            table, plots / "probe_vs_finetune.png"
        )
    low_shot = _low_shot_rows(records)
    if low_shot:
        depth = {row["layer"]: row["_depth"] for row in low_shot}
        figures["Low-shot curves"] = reports.plot_low_shot(
            low_shot, plots / "low_shot.png", depth
        )
    times = _step_times(plan, ran)
    figures["Time per step"] = reports.plot_step_times(times, plots / "step_times.png")
    page = _page(plan, table, records, figures, times)
    path = directory / "report.html"
    path.write_text(page, encoding="utf-8")
    return table, path


def _low_shot_rows(records: list[dict]) -> list[dict]:
    """Low-shot rows with each layer named `backbone/layer (pooling)`, and its depth."""
    return [
        {
            **row,
            "layer": f"{record['backbone']}/{row['layer']} ({record['pooling']})",
            "_depth": record["depth"],
        }
        for record in records
        for row in record["rows"]
        if row["protocol"] == "low_shot"
    ]


def _step_times(plan: Plan, ran: list[str]) -> pd.DataFrame:
    rows = []
    for step in plan.steps:
        if isinstance(step, ExtractStep):
            seconds = step.entry.record.get("seconds") if step.entry else None
        else:
            seconds = step.record["seconds"] if step.record else None
        rows.append(
            {
                "title": step.title.split(maxsplit=1)[1],
                "kind": step.kind,
                "seconds": seconds or 0.0,
                "reused": step.title not in ran,
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------
# The page

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px;
       color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta { color: #666; }
.verdict { background: #f4f8fb; border-left: 4px solid #3a78b5; padding: 0.6em 1em; }
table { border-collapse: collapse; font-size: 0.78em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: left; }
th { background: #f2f2f2; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.winner td { background: #fff7d6; font-weight: 600; }
img { max-width: 100%; border: 1px solid #eee; }
code { font-size: 0.95em; }
"""


def _page(
    plan: Plan,
    table: pd.DataFrame,
    records: list[dict],
    figures: dict[str, Path],
    times: pd.DataFrame,
) -> str:
    spec, data = plan.spec, plan.data
    selection = selection_paragraph(table, records)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(spec.name)}: tl experiment</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Experiment {_e(spec.name)}</h1>",
        f'<p class="meta">{_e(spec.source)} · {len(data.train)} training and '
        f"{len(data.test)} test images of {len(data.class_names)} classes "
        f"({_e(', '.join(data.class_names))}) · written {created}</p>",
        '<div class="verdict">',
        *(
            f"<p>{_e(line)}</p>"
            for line in verdict(table, {r["key"]: r for r in records})
        ),
        *([f'<p class="selection">{_e(selection)}</p>'] if selection else []),
        "</div>",
        "<h2>Leaderboard</h2>",
        f"<p>Ranked by accuracy on the {len(data.test)} test images, which every "
        "strategy shares and none was trained or tuned on (the interval: Wilson's "
        "95% score interval). Probes chose their hyper-parameters by "
        "cross-validation on the training images (CV acc); fine-tunes stopped on "
        "validation images taken from them (val acc).</p>",
        _leaderboard_html(table),
    ]
    for title, path in figures.items():
        parts += [f"<h2>{_e(title)}</h2>", _image(path)]
    parts += [
        _times_html(times),
        "<h2>Stores</h2>",
        "<p>Every feature store the probes read, by its cache key (the SHA-256 of "
        "what determines its codes).</p>",
        _stores_html(plan),
        "</body></html>",
    ]
    return "\n".join(parts)


def _e(value) -> str:
    return html.escape(str(value))


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(
    header: list[str], rows: list[tuple[list, str]], numeric: frozenset = frozenset()
) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells, css = row
        body.append(
            f"<tr{css}>"
            + "".join(
                f'<td class="n">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
                for i, cell in enumerate(cells)
            )
            + "</tr>"
        )
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _leaderboard_html(table: pd.DataFrame) -> str:
    header = [
        "#", "backbone", "strategy", "layer / unfrozen", "pooling", "classifier",
        "CV acc", "val acc", "test acc", "95% interval", "bal acc", "macro F1",
        "params", "fit s", "model",
    ]  # fmt: skip
    rows = []
    for row in table.itertuples():
        cv = (
            f"{row.cv_accuracy:.3f} ± {row.cv_std:.3f}"
            if pd.notna(row.cv_accuracy)
            else ""
        )
        rows.append(
            (
                [
                    row.rank,
                    _e(row.backbone),
                    _e(row.strategy),
                    _e(row.layer),
                    _e(row.pooling),
                    _e(row.classifier),
                    cv,
                    _number(row.val_accuracy),
                    _number(row.test_accuracy),
                    f"{row.test_ci_low:.3f}–{row.test_ci_high:.3f}",
                    _number(row.test_balanced_accuracy),
                    _number(row.test_macro_f1),
                    f"<code>{_e(row.params)}</code>",
                    _number(row.fit_seconds, 1),
                    _short_path(row.model),
                ],
                ' class="winner"' if row.rank == 1 else "",
            )
        )
    return _table(header, rows, numeric={0, 6, 7, 8, 9, 10, 11, 13})


def _short_path(path: str) -> str:
    """`probes/0ead10712bd8…`: a model folder named by its step's key, shortened;
    the whole path shows on hover."""
    folder, _, key = str(path).rpartition("/")
    shown = f"{folder}/{key[:12]}…" if len(key) > 12 else str(path)
    return f'<code title="{_e(path)}">{_e(shown)}</code>'


def _times_html(times: pd.DataFrame) -> str:
    total = times.seconds.sum()
    reused = times[times.reused].seconds.sum()
    return (
        f"<p>{len(times)} steps, {total:.1f} s of computation in all; "
        f"{int(times.reused.sum())} steps ({reused:.1f} s) were reused from earlier "
        f"runs or other experiments.</p>"
    )


def _stores_html(plan: Plan) -> str:
    header = [
        "key", "backbone", "split", "layers", "rows (skipped)", "weights",
        "image size, resize", "precision, preprocessing", "versions", "created",
    ]  # fmt: skip
    rows, seen = [], set()
    for step in plan.steps:
        if not isinstance(step, ExtractStep) or step.entry is None:
            continue
        if step.entry.key in seen:
            continue
        seen.add(step.entry.key)
        with FeatureStore(step.entry.path) as store:
            settings, provenance = store.settings, store.provenance
            layers = ", ".join(
                f"{info['layer']} ({info['pooling']}, "
                f"{'x'.join(map(str, info['shape']))})"
                for info in store.layer_info
            )
            count = f"{len(store)} ({len(store.skipped)})"
        weights = provenance.get("weights", {})
        versions = provenance.get("versions", {})
        rows.append(
            (
                [
                    f"<code>{_e(step.entry.key)}</code>",
                    _e(step.backbone.label),
                    _e(step.split),
                    _e(layers),
                    count,
                    _e(
                        f"{weights.get('source')} {weights.get('path') or ''} "
                        f"sha256 {weights.get('sha256') or '-'}"
                    ),
                    _e(
                        f"{'x'.join(map(str, settings.get('image_size', [])))}, "
                        f"{settings.get('resize')}"
                    ),
                    _e(
                        f"{settings.get('precision')}, "
                        f"{provenance.get('preprocessing')}"
                    ),
                    _e(", ".join(f"{k} {v}" for k, v in versions.items())),
                    _e(provenance.get("created", "")),
                ],
                "",
            )
        )
    return _table(header, rows)


def _image(path: Path) -> str:
    encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_e(Path(path).stem)}" src="data:image/png;base64,{encoded}">'
