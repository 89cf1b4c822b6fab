"""One split for every strategy: an experiment's training and test images.

Without `[data] test`, the training images are split once, stratified and seeded
(`test_size`, `seed`). Both lists are written as `path,label` CSVs with absolute
paths, `splits/train.csv` and `splits/test.csv` in the output folder. Extraction,
the probes and fine-tuning all read these two files, so every strategy is scored on
the same test images (which McNemar's test needs) and none is trained on them;
fine-tuning takes its validation images from the training list only. Two
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
from tl.experiment.spec import ExperimentSpec
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
        train_rows, test_rows = _split(spec, train)
    folder = spec.output_dir / "splits"
    files = {folder / "train.csv": train_rows, folder / "test.csv": test_rows}
    indexes = []
    for path, rows in files.items():
        text = _csv_text(rows)
        if write:
            _write_if_changed(path, text)
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
    spec: ExperimentSpec, index: ImageIndex
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Stratified, seeded: (training rows, test rows), each class in both."""
    rows = _rows(index)
    try:
        train, test = train_test_split(
            np.arange(len(rows)),
            test_size=spec.test_size,
            stratify=index.labels,
            random_state=spec.seed,
        )
    except ValueError as error:
        raise TLError(
            f"{spec.source}: data.test_size: cannot hold out {spec.test_size:g} of "
            f"{len(rows)} images, stratified over {len(index.class_names)} classes "
            f"({str(error).rstrip('.')}); change test_size, add images, or give a "
            f"separate data.test folder."
        ) from None
    for part, name in ((train, "training"), (test, "test")):
        missing = sorted(set(range(len(index.class_names))) - set(index.labels[part]))
        if missing:
            names = ", ".join(repr(index.class_names[m]) for m in missing)
            raise TLError(
                f"{spec.source}: data.test_size: the {name} split of {len(rows)} "
                f"images has no image of class {names}; change test_size, add "
                f"images, or give a separate data.test folder."
            )
    return [rows[i] for i in sorted(train)], [rows[i] for i in sorted(test)]


def _csv_text(rows: list[tuple[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("path", "label"))
    writer.writerows(rows)
    return buffer.getvalue()


def _write_if_changed(path: Path, text: str) -> None:
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
