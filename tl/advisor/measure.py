"""The advisor's measurements: each a small dataclass holding its numbers and how
they were computed, so that every figure of the advice traces back to one of them.

    measure_counts      images per class, class balance, image sizes (headers only)
    profile_stages      CV'd logistic regression on the codes of every stage
    learning_curve      the same on 25 / 50 / 100% of the training rows of one stage
    head_confidence     the ImageNet head's top-1 probability and entropy

The accuracies come from `tl.evaluation.choose_hyperparameters`, the comparison's
own search:
standardised logistic regression, C chosen by stratified k-fold CV, the fold scores
those of the chosen C (as every probe reports them; being the best of five, they
lean optimistic by the same amount for every stage).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from tl.errors import TLError
from tl.evaluation import ComparisonSettings, choose_hyperparameters
from tl.images import ImageIndex

CURVE_FRACTIONS = (0.25, 0.5, 1.0)
MIN_PER_CLASS = 2  # a stratified CV needs two images of each class (one per fold)
SIZE_SAMPLE = 200  # image headers read to report sizes: enough for their spread


@dataclasses.dataclass(frozen=True)
class DatasetCounts:
    """How many images, of which classes, how large.

    Attributes:
        per_class: images of each class.
        image_sizes: (width, height) of `sampled` images, read from their headers.
        unreadable: sampled files whose header did not open, with the reason.
    """

    per_class: dict[str, int]
    image_sizes: list[tuple[int, int]]
    sampled: int
    unreadable: list[tuple[str, str]]

    @property
    def images(self) -> int:
        return sum(self.per_class.values())

    @property
    def classes(self) -> int:
        return len(self.per_class)

    @property
    def min_per_class(self) -> int:
        return min(self.per_class.values())

    @property
    def median_per_class(self) -> float:
        return float(np.median(list(self.per_class.values())))

    @property
    def max_per_class(self) -> int:
        return max(self.per_class.values())

    @property
    def balance(self) -> float:
        """Smallest class over largest: 1.0 is balanced."""
        return self.min_per_class / self.max_per_class

    def to_json(self) -> dict:
        sides = np.asarray(self.image_sizes or [(0, 0)])
        return {
            "how": f"class folders or CSV labels counted; the headers of "
            f"{self.sampled} images (seeded sample) read with Pillow, not decoded",
            "images": self.images,
            "classes": self.classes,
            "per_class": self.per_class,
            "min_per_class": self.min_per_class,
            "median_per_class": self.median_per_class,
            "max_per_class": self.max_per_class,
            "balance": self.balance,
            "image_width": _spread(sides[:, 0]),
            "image_height": _spread(sides[:, 1]),
            "unreadable": [list(item) for item in self.unreadable],
        }


@dataclasses.dataclass(frozen=True)
class ProbeScore:
    """CV'd logistic regression on one set of codes.

    Attributes:
        rows: training rows used; `per_class_min`: of its smallest class.
        folds: CV folds (fewer than asked when a class has fewer rows).
        fold_scores: accuracy of each fold, at the chosen C.
        C: the inverse regularisation chosen by CV.
    """

    rows: int
    per_class_min: int
    folds: int
    fold_scores: list[float]
    C: float

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_scores))

    @property
    def std(self) -> float:
        return float(np.std(self.fold_scores))

    def to_json(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "mean": self.mean,
            "std": self.std,
        }


@dataclasses.dataclass(frozen=True)
class StageScore:
    """The probe of one stage: its alias (`stage3`, `last`), Keras layer, depth
    (0 to 1 through the network) and width."""

    alias: str
    layer: str
    depth: float
    dims: int
    score: ProbeScore

    @property
    def mean(self) -> float:
        return self.score.mean

    @property
    def std(self) -> float:
        return self.score.std

    def to_json(self) -> dict:
        return {
            "alias": self.alias,
            "layer": self.layer,
            "depth": self.depth,
            "dims": self.dims,
            **self.score.to_json(),
        }


@dataclasses.dataclass(frozen=True)
class LearningCurve:
    """Probe accuracy against the amount of training rows, on one stage.

    Attributes:
        points: (fraction of the rows, its probe), smallest first.
        skipped: the fractions left out, each with its reason.
    """

    alias: str
    layer: str
    points: list[tuple[float, ProbeScore]]
    skipped: list[tuple[float, str]]

    @property
    def slope(self) -> float | None:
        """Accuracy gained per doubling of the rows, between the two largest
        points (None with fewer than two)."""
        if len(self.points) < 2:
            return None
        (f1, p1), (f2, p2) = self.points[-2:]
        return (p2.mean - p1.mean) / math.log2(f2 / f1)

    @property
    def slope_spread(self) -> float | None:
        """The CV spread of that gain: the two points' fold std combined."""
        if len(self.points) < 2:
            return None
        (f1, p1), (f2, p2) = self.points[-2:]
        return math.hypot(p1.std, p2.std) / math.log2(f2 / f1)

    def to_json(self) -> dict:
        return {
            "how": "the stage's codes, stratified seeded subsamples of the training "
            "rows; slope = accuracy gain per doubling between the two largest "
            "points, spread = their fold std combined (root sum of squares)",
            "alias": self.alias,
            "layer": self.layer,
            "points": [
                {"fraction": fraction, **score.to_json()}
                for fraction, score in self.points
            ],
            "skipped": [
                {"fraction": fraction, "reason": reason}
                for fraction, reason in self.skipped
            ],
            "slope_per_doubling": self.slope,
            "slope_spread": self.slope_spread,
        }


@dataclasses.dataclass(frozen=True)
class HeadConfidence:
    """The source classifier's confidence on the images; `available` False (with
    the `reason`) when its weights are not at hand: the signal is missing."""

    available: bool
    reason: str
    images: int = 0
    mean_top1: float | None = None
    mean_entropy: float | None = None
    classes: int = 1000

    @property
    def normalized_entropy(self) -> float | None:
        """Mean entropy over its maximum, log(classes): 0 sure, 1 uniform."""
        if self.mean_entropy is None:
            return None
        return self.mean_entropy / math.log(self.classes)

    def to_json(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "normalized_entropy": self.normalized_entropy,
            "how": "softmax of the backbone's ImageNet head on the subsample: mean "
            "top-1 probability, mean entropy in nats",
        }


# ---------------------------------------------------------------------------------
# Measuring


def measure_counts(index: ImageIndex, seed: int = 0) -> DatasetCounts:
    """Count the images per class and read the size of a sample from its headers."""
    from PIL import Image

    per_class = {
        name: int(np.sum(index.labels == number))
        for number, name in enumerate(index.class_names)
    }
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(index), min(SIZE_SAMPLE, len(index)), replace=False)
    paths = index.absolute_paths()
    sizes, unreadable = [], []
    for position in sorted(chosen.tolist()):
        try:
            with Image.open(paths[position]) as image:  # reads the header only
                sizes.append(image.size)
        except (OSError, ValueError) as error:
            unreadable.append((index.paths[position], str(error)))
    return DatasetCounts(per_class, sizes, len(chosen), unreadable)


def probe(
    X: np.ndarray, y: np.ndarray, folds: int, seed: int, jobs: int = 1
) -> ProbeScore:
    """CV'd standardised logistic regression, as `compare` chooses its C
    (`choose_hyperparameters`: folds reduced to the smallest class's rows).

    Raises:
        TLError: when a class has fewer than two rows.
    """
    per_class_min = int(np.bincount(y).min()) if len(y) else 0
    if per_class_min < MIN_PER_CLASS:
        raise TLError(
            f"A class has {per_class_min} training image(s); measuring needs at "
            f"least {MIN_PER_CLASS} of each class. Add images."
        )
    settings = ComparisonSettings(
        classifiers=("logreg",), folds=folds, search_rows=len(y), seed=seed, jobs=jobs
    )
    params, fold_scores = choose_hyperparameters("logreg", X, y, settings)
    return ProbeScore(len(y), per_class_min, len(fold_scores), fold_scores, params["C"])


def profile_stages(
    read: Callable[[str], np.ndarray],
    y: np.ndarray,
    stages: Sequence[tuple[str, str, float]],
    folds: int,
    seed: int,
) -> list[StageScore]:
    """The probe of each stage, given as (alias, layer, depth); `read(layer)`
    returns its codes as a 2-D matrix."""
    scores = []
    for alias, layer, depth in stages:
        X = read(layer)
        score = probe(X, y, folds, seed)
        scores.append(StageScore(alias, layer, depth, X.shape[1], score))
    return scores


def learning_curve(
    X: np.ndarray,
    y: np.ndarray,
    stage: StageScore,
    folds: int,
    seed: int,
    fractions: Sequence[float] = CURVE_FRACTIONS,
) -> LearningCurve:
    """The stage's probe on stratified, seeded subsamples of the rows. A fraction
    that leaves a class fewer than two rows is skipped, with the reason; the full
    rows reuse the stage's own probe."""
    from sklearn.model_selection import train_test_split

    points, skipped = [], []
    for fraction in fractions:
        if fraction >= 1.0:
            points.append((1.0, stage.score))
            continue
        size = round(fraction * len(y))
        try:
            rows, _ = train_test_split(
                np.arange(len(y)), train_size=size, stratify=y, random_state=seed
            )
            smallest = int(np.bincount(y[rows], minlength=y.max() + 1).min())
        except ValueError:  # fewer rows than classes
            smallest = 0
        if smallest < MIN_PER_CLASS:
            skipped.append(
                (
                    fraction,
                    f"{fraction:.0%} of the rows ({size}) leaves a class "
                    f"{smallest} image(s); CV needs {MIN_PER_CLASS} of each",
                )
            )
            continue
        points.append((fraction, probe(X[rows], y[rows], folds, seed)))
    return LearningCurve(stage.alias, stage.layer, points, skipped)


def head_confidence(model, batches, classes: int = 1000) -> HeadConfidence:
    """Mean top-1 probability and entropy of a classifier `model` (softmax
    outputs) over `batches` of preprocessed images."""
    top1, entropy, images = [], [], 0
    for batch in batches:
        probabilities = np.asarray(model(batch, training=False), np.float64)
        probabilities = np.clip(probabilities, 1e-12, 1.0)
        top1.append(probabilities.max(axis=1))
        entropy.append(-(probabilities * np.log(probabilities)).sum(axis=1))
        images += len(probabilities)
    if not images:
        return HeadConfidence(False, "no image could be decoded for the head")
    return HeadConfidence(
        True,
        "the head's weights were loaded",
        images,
        float(np.mean(np.concatenate(top1))),
        float(np.mean(np.concatenate(entropy))),
        classes,
    )


def _spread(values: np.ndarray) -> dict:
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "max": int(values.max()),
    }
