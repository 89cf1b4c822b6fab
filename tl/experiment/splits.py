"""One split for every strategy: an experiment's training and test images.

Without `[data] test`, the training images are split once, stratified and seeded
(`test_size`, `seed`). Both lists are written as `path,label` CSVs with absolute
paths, `splits/train.csv` and `splits/test.csv` in the output folder. Extraction,
the probes and fine-tuning all read these two files, so every strategy is scored on
the same test images (which McNemar's test needs) and none is trained on them;
fine-tuning takes its validation images from the training list only
(`fine_tune_lists`). Two
experiments over the same images write the same lists, so their codes share one
cache entry.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from tl.errors import TLError
from tl.experiment.spec import ExperimentSpec, FineTuneEntry
from tl.images import ImageIndex, index_images


@dataclasses.dataclass(frozen=True)
class ExperimentData:
    """The two image lists of an experiment, as files and as indexes of them."""

    train_csv: Path
    test_csv: Path
    train: ImageIndex
    test: ImageIndex

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names


def prepare_data(spec: ExperimentSpec, *, write: bool = True) -> ExperimentData:
    """Index the experiment's images, split them, and write the two lists.

    Args:
        write: write the CSVs (unchanged files are left alone); False (a plan)
            only computes them, in memory.
    """
    train = _labelled(spec, spec.train, "data.train")
    if spec.test is not None:
        test = _labelled(spec, spec.test, "data.test")
        if test.class_names != train.class_names:
            raise TLError(
                f"{spec.source}: data.test: its classes {test.class_names} differ "
                f"from the training images' {train.class_names}; they must be the "
                f"same."
            )
        train_rows, test_rows = _rows(train), _rows(test)
    else:
        train_rows, test_rows = _split(
            train,
            spec.test_size,
            spec.seed,
            f"{spec.source}: data.test_size",
            "give a separate data.test folder",
        )
    folder = spec.output_dir / "splits"
    files = {folder / "train.csv": train_rows, folder / "test.csv": test_rows}
    indexes = []
    for path, rows in files.items():
        text = csv_text(rows)
        if write:
            write_if_changed(path, text)
            indexes.append(index_images(path))
        else:
            indexes.append(_index_of(path, rows))
    return ExperimentData(*files, *indexes)


def _labelled(spec: ExperimentSpec, source: Path, where: str) -> ImageIndex:
    try:
        index = index_images(source)
    except TLError as error:
        raise TLError(f"{spec.source}: {where}: {error}") from None
    if len(index.class_names) < 2:
        raise TLError(
            f"{spec.source}: {where}: {str(source)!r} has "
            f"{len(index.class_names) or 'no'} class(es); an experiment compares "
            f"classifiers, which needs one sub-folder (or CSV label) per class, at "
            f"least two."
        )
    return index


def _rows(index: ImageIndex) -> list[tuple[str, str]]:
    return [
        (path, index.class_names[label])
        for path, label in zip(index.absolute_paths(), index.labels, strict=True)
    ]


def _split(
    index: ImageIndex, fraction: float, seed: int, where: str, instead: str
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Stratified, seeded: (the rest, `fraction` of each class held out), each
    class in both, as rows; a refusal names the key `where` and says what to do
    `instead` besides changing it or adding images."""
    rows = _rows(index)
    what = f"{where}: cannot hold out {fraction:g} of {len(rows)} images, stratified"
    advice = f"change {where.rsplit('.', 1)[-1]}, add images, or {instead}."
    try:
        kept, held = train_test_split(
            np.arange(len(rows)),
            test_size=fraction,
            stratify=index.labels,
            random_state=seed,
        )
    except ValueError as error:
        raise TLError(
            f"{what} over {len(index.class_names)} classes "
            f"({str(error).rstrip('.')}); {advice}"
        ) from None
    for part in (kept, held):
        missing = sorted(set(range(len(index.class_names))) - set(index.labels[part]))
        if missing:
            names = ", ".join(repr(index.class_names[m]) for m in missing)
            raise TLError(
                f"{what}, with an image of class {names} on each side; {advice}"
            )
    return [rows[i] for i in sorted(kept)], [rows[i] for i in sorted(held)]


def fine_tune_lists(
    spec: ExperimentSpec, data: ExperimentData, entry: FineTuneEntry
) -> tuple[Path, Path | None]:
    """A fine-tune's training and validation lists.

    Its `val_split` of each class of the experiment's training images is held out
    (stratified, seeded by its seed) and both parts written under
    `splits/finetune-<val_split>-<seed>/`: the probe an LP-FT starts from is then
    refit on the training part, so the validation images that choose its epoch are
    new to the whole model. No validation split: (the training list, None).
    """
    settings = entry.settings
    if not settings.val_split:
        return data.train_csv, None
    train, val = _split(
        data.train,
        settings.val_split,
        settings.seed,
        f"{spec.source}: {entry.where}.val_split",
        "set it to 0 (no validation)",
    )
    folder = data.train_csv.parent / f"finetune-{settings.val_split:g}-{settings.seed}"
    paths = folder / "train.csv", folder / "val.csv"
    for path, rows in zip(paths, (train, val), strict=True):
        write_if_changed(path, csv_text(rows))
    return paths


def csv_text(rows: list[tuple[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("path", "label"))
    writer.writerows(rows)
    return buffer.getvalue()


def write_if_changed(path: Path, text: str) -> None:
    """Write `path` atomically, unless it holds `text` already."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def _index_of(path: Path, rows: list[tuple[str, str]]) -> ImageIndex:
    """The index `index_images(path)` gives for the CSV of `rows`, without it."""
    class_names = sorted({label for _, label in rows})
    number = {name: i for i, name in enumerate(class_names)}
    return ImageIndex(
        path.parent,
        [path for path, _ in rows],
        np.asarray([number[label] for _, label in rows], np.int32),
        class_names,
    )
