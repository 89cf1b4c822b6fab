"""The images of a run: labelled indexes, readable files, splits, training batches
(decoded from the files, or read from a cache)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from tl.errors import TLError
from tl.finetune.cache import Rows
from tl.finetune.settings import AUGMENTATIONS, FineTuneSettings
from tl.images import (
    ImageIndex,
    ImageSettings,
    decoded_batches,
    index_images,
    load_image,
)

log = logging.getLogger("tl")


@dataclasses.dataclass
class Splits:
    """The images of a run: training, validation (None without) and test."""

    train: ImageIndex
    val: ImageIndex | None
    test: ImageIndex
    skipped: list[tuple[str, str]]  # (path, reason) of files that cannot be used

    def items(self) -> list[tuple[str, ImageIndex]]:
        named = [("train", self.train), ("val", self.val), ("test", self.test)]
        return [(name, index) for name, index in named if index is not None]

    def fingerprints(self) -> dict[str, str]:
        return {name: index.fingerprint() for name, index in self.items()}


def _subset(index: ImageIndex, positions: np.ndarray) -> ImageIndex:
    positions = np.sort(positions)
    return ImageIndex(
        index.root,
        [index.paths[p] for p in positions],
        index.labels[positions],
        index.class_names,
    )


def _class_counts(index: ImageIndex) -> dict[str, int]:
    counts = np.bincount(index.labels, minlength=len(index.class_names))
    return dict(zip(index.class_names, counts.tolist(), strict=True))


def _names(names: list[str]) -> str:
    return ", ".join(map(repr, names))


def labelled_index(source: str | Path, role: str = "training") -> ImageIndex:
    """Index `source`, refusing unlabeled data, a single class or an empty class."""
    index = index_images(source)
    if not index.class_names:
        raise TLError(
            f"The {role} images {str(source)!r} have no labels: fine-tuning needs one "
            f"sub-folder per class (or a path,label CSV)."
        )
    empty = [name for name, count in _class_counts(index).items() if not count]
    if empty:
        raise TLError(
            f"Class {_names(empty)} of {str(index.root)!r} has no images; add images "
            f"or remove the empty folder."
        )
    if len(index.class_names) < 2:
        raise TLError(
            f"{str(index.root)!r} has one class ({index.class_names[0]!r}); "
            f"classification needs at least two."
        )
    return index


def _over_images(
    paths: list[str],
    settings: ImageSettings,
    batch_size: int,
    apply: Callable | None = None,
    progress: bool = False,
    description: str = "",
) -> tuple[np.ndarray, list[np.ndarray], list[tuple[int, str]]]:
    """Decode `paths` in parallel, optionally calling `apply` on each batch.

    Returns:
        Positions of the decoded files, `apply`'s outputs per batch, and
        (position, reason) for each file that could not be decoded.
    """
    kept, outputs, skipped = [np.empty(0, np.int64)], [], []
    with tqdm(
        total=len(paths), desc=description, unit="img", disable=not progress
    ) as bar:
        for batch in decoded_batches(paths, settings, batch_size):
            kept.append(batch.positions)
            skipped += batch.skipped
            if apply is not None and batch.images is not None:
                outputs.append(np.asarray(apply(batch.images)))
            bar.update(batch.end - bar.n)
    return np.concatenate(kept), outputs, skipped


def _readable(
    index: ImageIndex, settings: ImageSettings, batch_size: int, progress: bool
) -> tuple[ImageIndex, list[tuple[str, str]]]:
    """`index` without the files that cannot be decoded, and why each was dropped."""
    paths = index.absolute_paths()
    kept, _, skipped = _over_images(
        paths, settings, batch_size, progress=progress, description="checking images"
    )
    for position, reason in skipped:
        log.warning("skipped %s: %s", paths[position], reason)
    readable = _subset(index, kept)
    empty = [name for name, count in _class_counts(readable).items() if not count]
    if empty:
        raise TLError(
            f"No image of class {_names(empty)} in {str(index.root)!r} could be "
            f"decoded (see the warnings above)."
        )
    return readable, [(paths[p], reason) for p, reason in skipped]


def _split(
    index: ImageIndex, fraction: float, seed: int, role: str
) -> tuple[ImageIndex, ImageIndex]:
    """Stratified split: (the rest, `fraction` of each class held out for `role`)."""
    small = [f"{name!r} ({n})" for name, n in _class_counts(index).items() if n < 2]
    if small:
        raise TLError(
            f"Cannot hold out a stratified {role} split: class {', '.join(small)} "
            f"has fewer than 2 images. Add images, or pass --{role}-dir."
        )
    try:
        rest, held = train_test_split(
            np.arange(len(index)),
            test_size=fraction,
            stratify=index.labels,
            random_state=seed,
        )
    except ValueError as error:
        raise TLError(
            f"Cannot hold out {fraction:g} of {len(index)} images as a stratified "
            f"{role} split over {len(index.class_names)} classes: "
            f"{str(error).rstrip('.')}. Change "
            f"--{role}-split or pass --{role}-dir."
        ) from None
    return _subset(index, rest), _subset(index, held)


def prepare_splits(
    index: ImageIndex,
    settings: FineTuneSettings,
    *,
    val: ImageIndex | None = None,
    test: ImageIndex | None = None,
    progress: bool = False,
) -> Splits:
    """Drop undecodable files and split train/val/test.

    Args:
        index: the labelled images (see `labelled_index`).
        settings: the run's settings (image settings, splits, seed).
        val, test: separate validation and test images, with the same classes.
        progress: show a progress bar while checking that the images decode.

    Without separate images, `settings.test_split` and then `settings.val_split` of
    each class are held out (stratified, seeded by `settings.seed`).
    """
    for role, other in (("val", val), ("test", test)):
        if other is not None and other.class_names != index.class_names:
            raise TLError(
                f"The {role} images {str(other.root)!r} have classes "
                f"{other.class_names}, the training images {index.class_names}; "
                f"they must be the same."
            )
    check = settings.image, settings.batch_size, progress
    index, skipped = _readable(index, *check)
    if test is None:
        index, test = _split(index, settings.test_split, settings.seed, "test")
    else:
        test, dropped = _readable(test, *check)
        skipped += dropped
    if val is not None:
        val, dropped = _readable(val, *check)
        skipped += dropped
    elif settings.val_split:
        index, val = _split(index, settings.val_split, settings.seed, "val")
    return Splits(index, val, test, skipped)


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Balanced class weights n / (K·n_k), as scikit-learn's `balanced`."""
    counts = np.bincount(labels, minlength=num_classes)
    return len(labels) / (num_classes * np.maximum(counts, 1))


def _epoch_order(settings: FineTuneSettings, epoch: int, rows: int):
    """An epoch's seed and shuffled order of `rows`: the same in a resumed run, and
    the same whether the batches come from files or from a cache."""
    seed = int(np.random.SeedSequence([settings.seed, epoch]).generate_state(1)[0])
    return seed, np.random.default_rng(seed).permutation(rows)  # not TF's seeds


def _augmented(
    dataset: tf.data.Dataset, settings: FineTuneSettings, seed: int
) -> tf.data.Dataset:
    """`dataset`'s image batches transformed by the settings' `augment`."""
    if not settings.augment:
        return dataset
    augment = keras.Sequential(
        [AUGMENTATIONS[name](seed + i) for i, name in enumerate(settings.augment)]
    )

    @tf.autograph.experimental.do_not_convert
    def augmented(images, *rest):
        return (augment(images, training=True), *rest)

    return dataset.map(augmented)  # sequential: random state in order


def _training_batches(
    index: ImageIndex,
    settings: FineTuneSettings,
    epoch: int,
    sample_weights: np.ndarray | None,
    full_batches: bool,
) -> tf.data.Dataset:
    """One epoch of (pixels, one-hot labels[, sample weights]), decoded in parallel.

    Shuffled and augmented with seeds derived from (seed, epoch), so an epoch's
    batches are the same in a resumed run. `full_batches` drops a last, smaller batch.
    """
    image_settings = settings.image
    paths = tf.constant(index.absolute_paths())
    labels = tf.constant(index.labels)
    classes = len(index.class_names)
    weights = None
    if sample_weights is not None:
        weights = tf.constant(sample_weights[index.labels], tf.float32)

    @tf.autograph.experimental.do_not_convert
    def load(position):
        image = load_image(paths[position], image_settings)
        example = (image, tf.one_hot(labels[position], classes))
        return example if weights is None else (*example, weights[position])

    seed, order = _epoch_order(settings, epoch, len(index))
    dataset = tf.data.Dataset.from_tensor_slices(order)
    # Every file decoded once already (`prepare_splits`): a failure now is an error.
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(settings.batch_size, drop_remainder=full_batches)
    return _augmented(dataset, settings, seed).prefetch(tf.data.AUTOTUNE)


def cached_batches(
    rows: Rows,
    labels: np.ndarray,
    num_classes: int,
    settings: FineTuneSettings,
    epoch: int,
    sample_weights: np.ndarray | None,
    full_batches: bool,
    augment: bool,
) -> tf.data.Dataset:
    """One epoch of (cached rows, one-hot labels[, sample weights]) in the order
    and batches `_training_batches` gives the same images; image rows are
    augmented as there when `augment`."""
    seed, order = _epoch_order(settings, epoch, len(rows))
    size = settings.batch_size
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    if full_batches and len(batches[-1]) < size:
        batches.pop()
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    weights = None if sample_weights is None else sample_weights[labels]

    def generate():
        for positions in batches:
            example = (rows.take(positions), one_hot[positions])
            if weights is None:
                yield example
            else:
                yield (*example, weights[positions].astype(np.float32))

    signature = (
        tf.TensorSpec((None, *rows.shape), tf.float32),
        tf.TensorSpec((None, num_classes), tf.float32),
    )
    if weights is not None:
        signature = (*signature, tf.TensorSpec((None,), tf.float32))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(batches)))
    if augment:
        dataset = _augmented(dataset, settings, seed)
    return dataset.prefetch(tf.data.AUTOTUNE)
