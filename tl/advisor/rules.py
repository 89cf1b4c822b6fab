"""The advisor's decisions: measured numbers in, a scenario and a comparison out.

Pure functions: no file, no model, no TensorFlow. The thresholds are named here,
each with the reason for its value, and reported in advice.json.

The four scenarios are the cs231n rules of thumb (transfer learning notes):

    small, similar     a linear classifier on the top layer's codes
    small, different   a linear classifier or SVM on an earlier layer's codes
    large, similar     fine-tune (the top of the network)
    large, different   fine-tune through the whole network, or train from scratch

Size: the median images per class, and in between the two counts the learning
curve's slope: still rising steeply at 100% means more data or capacity pays,
which is what fine-tuning spends. Similarity: the layer profile; an intermediate
stage beating `last` by more than the CV spread means the top layers are
specialised to something else. The ImageNet head's confidence, when its weights are
at hand, confirms or questions that; without them it is reported missing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from tl.advisor.measure import HeadConfidence, LearningCurve, StageScore

# Below this median of images per class a dataset is small: cs231n's "small"; a
# linear probe on a few thousand dimensions fits it, while fine-tuning millions of
# weights on ~100 images a class overfits without strong regularisation.
SMALL_PER_CLASS = 150
# From this median a dataset is large: ~1,000 a class is ImageNet's own density,
# where fine-tuning the whole network is the usual, well-supported choice.
LARGE_PER_CLASS = 1000
# Accuracy gained per doubling of the training rows (between 50% and 100%) that
# counts as still rising steeply: 3 points a doubling is more than the spread of a
# 5-fold CV on a few hundred images, and what more data (or capacity) would buy.
STEEP_SLOPE = 0.03
# Mean top-1 probability of the ImageNet head below which the images do not look
# like its classes: a trained head averages well above it on ImageNet-like photos,
# and a 1000-way head spreads far below it on unrelated images.
HEAD_CONFIDENT = 0.5

SCENARIOS = {
    ("small", "similar"): "a linear classifier on the top layer's codes",
    ("small", "different"): "a linear classifier or SVM on an earlier layer's codes",
    ("large", "similar"): "fine-tune the top block, starting from the best probe",
    ("large", "different"): "fine-tune the whole network (or train from scratch)",
}


def thresholds() -> dict:
    """The thresholds the rules use, for advice.json."""
    return {
        "small_per_class": SMALL_PER_CLASS,
        "large_per_class": LARGE_PER_CLASS,
        "steep_slope_per_doubling": STEEP_SLOPE,
        "head_confident_top1": HEAD_CONFIDENT,
    }


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One axis decided: `value`, whether it was a close call, and the reasons in
    words with their numbers."""

    value: str
    close: bool
    reasons: tuple[str, ...]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def size_verdict(median_per_class: float, curve: LearningCurve | None) -> Verdict:
    """Small or large from the median images per class and, between the two
    counts, the learning curve's slope."""
    count = f"{median_per_class:g} images per class (median)"
    slope = curve.slope if curve else None
    spread = curve.slope_spread if curve else None
    rising = None
    if slope is not None:
        rising = (
            f"the learning curve gains {slope * 100:+.1f} points per doubling "
            f"(CV spread {spread * 100:.1f}; steep from {STEEP_SLOPE * 100:g})"
        )
    if median_per_class < SMALL_PER_CLASS:
        reasons = [f"{count} < {SMALL_PER_CLASS}: small"]
        if slope is not None and slope >= STEEP_SLOPE and slope > spread:
            reasons.append(f"{rising}: more images would pay")
        return Verdict("small", False, tuple(reasons))
    if median_per_class >= LARGE_PER_CLASS:
        return Verdict("large", False, (f"{count} >= {LARGE_PER_CLASS}: large",))
    between = f"{count} between {SMALL_PER_CLASS} and {LARGE_PER_CLASS}"
    if slope is None:
        middle = math.sqrt(SMALL_PER_CLASS * LARGE_PER_CLASS)
        value = "small" if median_per_class < middle else "large"
        return Verdict(
            value,
            True,
            (
                f"{between}, no learning curve: the nearer count decides "
                f"({value}, the geometric middle is {middle:.0f})",
            ),
        )
    steep = slope >= STEEP_SLOPE and slope > spread
    close = abs(slope - STEEP_SLOPE) <= spread or (slope >= STEEP_SLOPE) != steep
    value = "large" if steep else "small"
    effect = (
        "still rising: more data or capacity pays, lean to fine-tuning"
        if steep
        else "flattening: the probe has most of what the codes give"
    )
    return Verdict(value, close, (between, f"{rising}: {effect}"))


@dataclasses.dataclass(frozen=True)
class Similarity(Verdict):
    """`Verdict` with the stages it compared: the best one and `last`, the gap
    between their accuracies and its CV spread."""

    best: str = ""
    last: str = ""
    gap: float = 0.0
    spread: float = 0.0
    head: str = "missing"


def similarity_verdict(
    stages: Sequence[StageScore], head: HeadConfidence | None
) -> Similarity:
    """Similar or different from the layer profile (`stages`, the last one being
    `last`), questioned or confirmed by the head's confidence."""
    last = stages[-1]
    best = max(stages, key=lambda s: (s.mean, -s.std, s.depth))
    gap = best.mean - last.mean
    spread = math.hypot(best.std, last.std)
    profile = (
        f"{best.alias} {best.mean:.3f} ± {best.std:.3f} vs {last.alias} "
        f"{last.mean:.3f} ± {last.std:.3f}: gap {gap * 100:+.1f} points, CV spread "
        f"{spread * 100:.1f}"
    )
    if best is last:
        value, close = "similar", False
        runner_up = max(stages[:-1], key=lambda s: (s.mean, -s.std), default=None)
        versus = (
            f"; the best earlier stage, {runner_up.alias}, "
            f"{runner_up.mean:.3f} ± {runner_up.std:.3f}"
            if runner_up
            else ""
        )
        reasons = [
            f"{last.alias} is the best stage, {last.mean:.3f} ± {last.std:.3f}"
            f"{versus}: similar"
        ]
    elif gap > spread:
        value, close = "different", False
        reasons = [f"an earlier stage beats the top beyond the spread ({profile})"]
    else:
        value, close = "similar", True
        reasons = [f"an earlier stage is ahead within the spread ({profile}): close"]
    signal = "missing"
    if head is None or not head.available:
        reason = head.reason if head else "not measured"
        reasons.append(f"ImageNet head confidence missing ({reason})")
    else:
        confident = head.mean_top1 >= HEAD_CONFIDENT
        signal = "confident" if confident else "unsure"
        said = "similar" if confident else "different"
        note = (
            f"ImageNet head: mean top-1 {head.mean_top1:.2f} "
            f"({'>=' if confident else '<'} {HEAD_CONFIDENT}), entropy "
            f"{head.mean_entropy:.2f} nats on {head.images} images: {said}"
        )
        if close:
            value, close = said, False
            note += "; it decides the close call"
        elif said != value:
            close = True
            note += "; it disagrees with the layer profile: close"
        reasons.append(note)
    return Similarity(
        value,
        close,
        tuple(reasons),
        best=best.alias,
        last=last.alias,
        gap=gap,
        spread=spread,
        head=signal,
    )


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One strategy of the comparison, as the experiment file will run it.

    Attributes:
        role: `recommended` or `contrast`.
        strategy: `probe`, `fine_tune` or `scratch` (the leaderboard's column).
        stage: for a probe, the stage alias; for a fine-tune, what it unfreezes.
        layer: the Keras layer (probes; None for fine-tunes).
        classifiers: the probe's classifiers.
        init_head: a fine-tune's head (`best_probe`, `random`).
    """

    role: str
    strategy: str
    stage: str
    layer: str | None = None
    classifiers: tuple[str, ...] = ()
    init_head: str | None = None

    @property
    def title(self) -> str:
        if self.strategy == "probe":
            return f"{' / '.join(self.classifiers)} on {self.stage} ({self.layer})"
        what = "fine-tune" if self.strategy == "fine_tune" else "train from scratch"
        head = f", head from {self.init_head}" if self.init_head else ""
        return f"{what}, unfreeze {self.stage}{head}"

    def matches(self, row: dict) -> bool:
        """Whether a leaderboard row (strategy, layer, classifier) is this one."""
        if row["strategy"] != self.strategy:
            return False
        if self.strategy == "probe":
            return row["layer"] == self.layer and row["classifier"] in self.classifiers
        return row["layer"] == self.stage

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "title": self.title}


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """The scenario, what to do, and the comparison that checks it."""

    size: Verdict
    similarity: Similarity
    candidates: tuple[Candidate, ...]

    @property
    def scenario(self) -> str:
        return f"{self.size.value}, {self.similarity.value}"

    @property
    def rule(self) -> str:
        return SCENARIOS[(self.size.value, self.similarity.value)]

    @property
    def close(self) -> bool:
        return self.size.close or self.similarity.close

    def role(self, role: str) -> list[Candidate]:
        return [c for c in self.candidates if c.role == role]

    def to_json(self) -> dict:
        return {
            "scenario": self.scenario,
            "rule": self.rule,
            "close_call": self.close,
            "size": self.size.to_json(),
            "similarity": self.similarity.to_json(),
            "recommended": [c.to_json() for c in self.role("recommended")],
            "contrast": [c.to_json() for c in self.role("contrast")],
        }


LINEAR = ("logreg",)
LINEAR_AND_SVM = ("logreg", "linear_svm")


def recommend(
    size: Verdict, similarity: Similarity, stages: Sequence[StageScore]
) -> Recommendation:
    """The recommended strategy and the contrasting one worth checking.

    small, similar     logreg on `last`            vs the best earlier stage
    small, different   logreg / linear SVM on the best earlier stage  vs `last`
    large, similar     fine-tune the top block (LP-FT)   vs the best probe
    large, different   fine-tune everything (LP-FT)  vs from scratch, the best probe
    """
    last = stages[-1]
    earlier = [s for s in stages[:-1]]
    best_earlier = max(earlier, key=lambda s: (s.mean, -s.std, s.depth), default=None)
    best = max(stages, key=lambda s: (s.mean, -s.std, s.depth))

    def on(stage: StageScore, role: str, classifiers=LINEAR) -> Candidate:
        return Candidate(role, "probe", stage.alias, stage.layer, classifiers)

    scenario = (size.value, similarity.value)
    if scenario == ("small", "similar"):
        candidates = [on(last, "recommended")]
        if best_earlier is not None:
            candidates.append(on(best_earlier, "contrast"))
    elif scenario == ("small", "different"):
        candidates = [
            on(best_earlier or last, "recommended", LINEAR_AND_SVM),
            on(last, "contrast", LINEAR_AND_SVM),
        ]
    elif scenario == ("large", "similar"):
        candidates = [
            Candidate("recommended", "fine_tune", "last", init_head="best_probe"),
            on(best, "contrast"),
        ]
    else:
        candidates = [
            Candidate("recommended", "fine_tune", "all", init_head="best_probe"),
            Candidate("contrast", "scratch", "all", init_head="random"),
            on(best, "contrast"),
        ]
    # best_probe heads start from a linear probe of `last`, which must be measured
    if any(c.init_head == "best_probe" for c in candidates) and not any(
        c.layer == last.layer for c in candidates
    ):
        candidates.append(on(last, "contrast"))
    return Recommendation(size, similarity, tuple(candidates))


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the comparison measured against what was recommended."""

    consistent: bool | None
    winner: dict
    recommended_best: dict | None
    text: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def judge(recommendation: Recommendation, rows: Sequence[dict]) -> Outcome:
    """Compare the leaderboard (`rows`, best first: strategy, layer, classifier,
    test_accuracy, test_ci_low, test_ci_high) with the recommendation: the
    measurement wins when they disagree; a tie on the test images is consistent."""
    winner = dict(rows[0])
    recommended = recommendation.role("recommended")
    ours = [row for row in rows if any(c.matches(row) for c in recommended)]
    title, accuracy = _row_title(winner), _accuracy(winner)
    if not ours:
        return Outcome(
            None,
            winner,
            None,
            f"winner {title} ({accuracy}); the recommended strategy has no result, "
            f"so the comparison cannot confirm it",
        )
    best_ours = dict(ours[0])
    if best_ours["test_accuracy"] >= winner["test_accuracy"]:
        others = [row for row in rows if not any(c.matches(row) for c in recommended)]
        close = ""
        if others and others[0]["test_accuracy"] >= best_ours["test_ci_low"]:
            close = (
                f"; a close call: the best contrast, {_row_title(others[0])} "
                f"({others[0]['test_accuracy']:.3f}), lies within its 95% interval"
            )
        return Outcome(
            True,
            winner,
            best_ours,
            f"consistent with the advice: the recommended "
            f"{_row_title(best_ours)} wins ({_accuracy(best_ours)}){close}",
        )
    return Outcome(
        False,
        winner,
        best_ours,
        f"the measurement wins: {title} ({accuracy}) beat the recommended "
        f"{_row_title(best_ours)} ({_accuracy(best_ours)})",
    )


def _row_title(row: dict) -> str:
    if row["strategy"] == "probe":
        return f"{row['classifier']} probe on {row['layer']}"
    return f"{row['strategy']} (unfreeze {row['layer']})"


def _accuracy(row: dict) -> str:
    return (
        f"test accuracy {row['test_accuracy']:.3f} [95% CI {row['test_ci_low']:.3f}"
        f"-{row['test_ci_high']:.3f}]"
    )


# Extraction dominates the measurement: a VGG16 at 224x224 codes ~10 images a
# second on two CPU cores, ~600 a minute; 400 leaves time for the CV'd probes.
IMAGES_PER_MINUTE = 400
MIN_IMAGES, MAX_IMAGES = 200, 4000  # "at most a few thousand": the probes' search cap


@dataclasses.dataclass(frozen=True)
class Budget:
    """What `minutes` buys: images measured (a stratified subsample beyond), the
    deepest `stages` of the backbone, CV `folds`."""

    minutes: float
    images: int
    stages: int
    folds: int

    def to_json(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "how": f"images = {IMAGES_PER_MINUTE} a minute within [{MIN_IMAGES}, "
            f"{MAX_IMAGES}]; every stage from 2 minutes, else the deepest 3; "
            f"5-fold CV from 5 minutes, else 3",
        }


def plan_budget(minutes: float, stages: int) -> Budget:
    """The subsample size, number of stages and CV folds that fit `minutes`."""
    images = int(min(max(minutes * IMAGES_PER_MINUTE, MIN_IMAGES), MAX_IMAGES))
    return Budget(
        minutes,
        images,
        stages if minutes >= 2 else min(3, stages),
        5 if minutes >= 5 else 3,
    )
