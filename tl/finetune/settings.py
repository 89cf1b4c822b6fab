"""Fine-tuning settings: what determines a fine-tuned model, stored flat with it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import keras

from tl._checks import check_choice, check_interval
from tl._settings import FlatSettings
from tl.backbones import BackboneSettings, layer_fraction
from tl.classifiers import CLASS_WEIGHTS
from tl.errors import TLError
from tl.features import ExtractionSettings
from tl.images import ImageSettings

HEADS = ("linear", "mlp")
HEAD_INITS = ("probe", "random")
GLOBAL_POOLINGS = ("avg", "max")
DEFAULT_HEAD_EPOCHS = 5
DEFAULT_DROPOUT = 0.2
DEFAULT_LEARNING_RATE = 1e-4  # fine-tuning pretrained weights
SCRATCH_LEARNING_RATE = 1e-3  # training random weights

# Keras preprocessing layers for `augment`; factors suit photographs (see README).
AUGMENTATIONS: dict[str, Callable[[int], keras.layers.Layer]] = {
    "flip": lambda seed: keras.layers.RandomFlip("horizontal", seed=seed),
    "vflip": lambda seed: keras.layers.RandomFlip("vertical", seed=seed),
    "rotation": lambda seed: keras.layers.RandomRotation(0.05, seed=seed),  # ±18°
    "zoom": lambda seed: keras.layers.RandomZoom(0.1, seed=seed),  # ±10%
    "contrast": lambda seed: keras.layers.RandomContrast(0.2, seed=seed),
}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise TLError(message)


# Each training step costs about a quarter of vgg16's (4.1 vs 15.5 GFLOPs per image
# at 224x224, backward pass not counted); extraction keeps vgg16's classic codes.
DEFAULT_BACKBONE = "resnet50"


@dataclasses.dataclass(frozen=True)
class FineTuneSettings(FlatSettings):
    """Everything that determines a fine-tuned model; stored flat with it and
    compared when a run resumes.

    Derived values (the image size from the backbone; `head_init`, `head_epochs`,
    `dropout`, `from_scratch` and `learning_rate` from the others) stay None here
    and are filled in by `resolved`, which `fine_tune` and `build_model` call: a
    copy made with `dataclasses.replace` or `updated` (another backbone, another
    `init_head`) derives them afresh.

    Attributes:
        backbone: as in `tl.features.ExtractionSettings`; its seed also drives the
            head's initialisation, the splits, shuffling and augmentation.
        image: as in `tl.features.ExtractionSettings`.
        pooling: global pooling of the last feature map, `avg` or `max`.
        head: `linear` (one Dense layer) or `mlp` (Dense + ReLU, dropout, Dense).
        hidden_units: width of the MLP's hidden layer.
        dropout: dropout rate before the head's Dense layers (0 disables); None
            means 0 for a head that starts as a probe (fitted without dropout) and
            `DEFAULT_DROPOUT` for a random one.
        head_init: how stage 1 makes the head, on the frozen codes of the training
            images: `probe` (a standardised logistic regression, C chosen by CV on
            the training images, folded exactly into a linear head) or `random`
            (a new head trained for `head_epochs` on the codes). None means `probe`
            for a linear head and `random` for an MLP or from scratch.
        init_head: folder of a linear classifier saved by `train_classifier.py` on
            the final pooled codes of the same backbone and weights: the probe
            stage 1 folds into the head instead of fitting one (LP-FT).
        unfreeze: what stage 2 trains besides the head: a block alias (`conv5`,
            `block5`, `stage4`, `last`: that block and everything above it), a Keras
            layer name (that layer and everything above it), `all`, or a fraction
            F in (0, 1] (the top F of the backbone's layers that have weights).
        from_scratch: train every layer from random weights, BatchNorm in
            training mode, head and backbone together (no stage 1); None means
            True for `weights="none"`.
        head_epochs: stage-1 epochs on the codes; None means 0 for a probe head
            (the probe is the trained head) and `DEFAULT_HEAD_EPOCHS` for a random
            one.
        epochs: stage-2 epochs (0 trains the head only).
        batch_size: images per step, over all replicas.
        head_learning_rate: stage-1 learning rate (constant).
        learning_rate: stage-2 peak learning rate, reached after `warmup_epochs` of
            linear warmup from 0, then cosine decay to 0; None means
            `DEFAULT_LEARNING_RATE`, or `SCRATCH_LEARNING_RATE` from scratch.
        warmup_epochs: stage-2 warmup length in epochs (fractions allowed).
        augment: names of `AUGMENTATIONS` applied to training batches.
        label_smoothing: cross-entropy label smoothing.
        weight_decay: AdamW decoupled weight decay (biases and normalisation
            parameters excluded; with `l2_sp`, the backbone too: then it is the
            L2-SP paper's penalty on the head).
        l2_sp: strength α of L2-SP, (α/2)·‖w − w₀‖² over the trainable backbone
            weights w with pretrained values w₀ (Li et al., ICML 2018).
        class_weight: None or `balanced` (loss weights n / (K·n_k)); `none` is read
            as None.
        val_split: fraction of the non-test images held out, stratified, for
            validation (early stopping, best checkpoint); 0 disables validation.
        test_split: fraction held out, stratified, for the final evaluation.
        patience: stop a stage after this many epochs without a better model on
            validation (see `tl.finetune.training.better`; 0: never stop early).
    """

    backbone: BackboneSettings = dataclasses.field(
        default_factory=lambda: BackboneSettings(DEFAULT_BACKBONE)
    )
    image: ImageSettings = dataclasses.field(default_factory=ImageSettings)
    pooling: str = "avg"
    head: str = "linear"
    hidden_units: int = 256
    dropout: float | None = None
    head_init: str | None = None
    init_head: str | None = None
    unfreeze: str = "all"
    from_scratch: bool | None = None
    head_epochs: int | None = None
    epochs: int = 10
    batch_size: int = 32
    head_learning_rate: float = 1e-3
    learning_rate: float | None = None
    warmup_epochs: float = 1.0
    augment: tuple[str, ...] = ()
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    l2_sp: float = 0.0
    class_weight: str | None = None
    val_split: float = 0.1
    test_split: float = 0.2
    patience: int = 3

    def __post_init__(self):
        def set_(name, value):
            object.__setattr__(self, name, value)

        self.check_parts()
        set_("unfreeze", str(self.unfreeze))
        set_("augment", tuple(self.augment))
        if self.class_weight == "none":  # as the command line spells it
            set_("class_weight", None)
        check_choice("pooling", self.pooling, GLOBAL_POOLINGS)
        for name in self.augment:
            check_choice("augment", name, AUGMENTATIONS)
        check_choice("head", self.head, HEADS)
        check_choice("head_init", self.head_init, (*HEAD_INITS, None))
        check_choice("class_weight", self.class_weight, CLASS_WEIGHTS)
        check_choice("from_scratch", self.from_scratch, (True, False, None))
        if self.init_head is not None:
            set_("init_head", str(Path(self.init_head).expanduser().resolve()))
        self._check_numbers()
        fraction = layer_fraction(self.unfreeze)
        if fraction is not None:
            check_interval(
                "unfreeze",
                fraction,
                low=0,
                high=1,
                closed="right",
                advice="To train the head only, pass --epochs 0.",
            )
        # Each value is checked before the combinations: a bad value is named as such.
        self._check_head()
        self._check_scratch()

    def _check_head(self) -> None:
        if self.init_head is not None:
            _require(
                self.head == "linear",
                f"--init-head starts a linear head from a saved linear classifier; "
                f"it cannot initialise --head {self.head}. Use --head linear.",
            )
            _require(
                self.head_init != "random",
                "--init-head starts the head from a saved probe; leave out "
                "--head-init random, or --init-head.",
            )
        if self.head_init == "probe":
            _require(
                self.head == "linear",
                f"--head-init probe folds a linear probe into a linear head; it "
                f"cannot initialise --head {self.head}. Use --head-init random.",
            )

    def _check_scratch(self) -> None:
        if self.from_scratch and self.backbone.weights != "none":
            raise TLError(
                f"--from-scratch trains from random weights; it cannot start from "
                f"--weights {self.backbone.weights}. Pass --weights none."
            )
        if not self._from_scratch():
            return
        conflicts = [
            f"{option} {value}"
            for option, value, allowed in [
                ("--unfreeze", self.unfreeze, ("all",)),
                ("--head-init", self.head_init, ("random", None)),
                ("--init-head", self.init_head, (None,)),
                ("--head-epochs", self.head_epochs, (0, None)),
            ]
            if value not in allowed
        ]
        _require(
            not conflicts,
            f"Training from scratch (--weights none) trains every layer and the "
            f"head together, from random weights; it takes no {', '.join(conflicts)}. "
            f"To fine-tune random weights like pretrained ones (tests), pass "
            f"--no-from-scratch.",
        )

    def _check_numbers(self) -> None:
        whole = {"low": 0, "integer": True}
        for name, bounds in [
            ("epochs", whole),
            ("head_epochs", whole),
            ("batch_size", {"low": 1, "integer": True}),
            ("hidden_units", {"low": 1, "integer": True}),
            ("dropout", {"low": 0, "high": 1, "closed": "left"}),
            ("head_learning_rate", {"low": 0, "closed": "neither"}),
            ("learning_rate", {"low": 0, "closed": "neither"}),
            ("warmup_epochs", {"low": 0}),
            ("label_smoothing", {"low": 0, "high": 1, "closed": "left"}),
            ("weight_decay", {"low": 0}),
            ("l2_sp", {"low": 0}),
            ("val_split", {"low": 0, "high": 1, "closed": "left"}),
            ("test_split", {"low": 0, "high": 1, "closed": "neither"}),
            ("patience", whole),
        ]:
            value = getattr(self, name)
            if value is not None:  # derived when used
                check_interval(name, value, **bounds)
        _require(
            self.epochs + self._head_epochs() > 0 or self._head_init() == "probe",
            "Nothing to train: --head-epochs and --epochs are both 0.",
        )

    def _from_scratch(self) -> bool:
        if self.from_scratch is not None:
            return self.from_scratch
        return self.backbone.weights == "none"

    def _head_init(self) -> str:
        if self.head_init is not None:
            return self.head_init
        if self.init_head is not None:
            return "probe"
        return "random" if self._from_scratch() or self.head == "mlp" else "probe"

    def _head_epochs(self) -> int:
        if self.head_epochs is not None:
            return self.head_epochs
        if self._from_scratch() or self._head_init() == "probe":
            return 0
        return DEFAULT_HEAD_EPOCHS

    def _dropout(self) -> float:
        if self.dropout is not None:
            return self.dropout
        return DEFAULT_DROPOUT if self._head_init() == "random" else 0.0

    def _learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return SCRATCH_LEARNING_RATE if self._from_scratch() else DEFAULT_LEARNING_RATE

    def resolved(self) -> FineTuneSettings:
        """These settings with the derived values filled in (see the class
        docstring)."""
        return dataclasses.replace(
            self,
            image=self.image.resolved(self.backbone.spec),
            head_init=self._head_init(),
            from_scratch=self._from_scratch(),
            head_epochs=self._head_epochs(),
            dropout=self._dropout(),
            learning_rate=self._learning_rate(),
        )

    @property
    def seed(self) -> int:
        """The backbone's seed, which seeds everything random in a run."""
        return self.backbone.seed

    def extraction_settings(self) -> ExtractionSettings:
        """The settings `extract_features.py` would use for this model's pooled
        final-layer codes: what a probe for `init_head` must have been trained on."""
        return ExtractionSettings(
            self.backbone, self.image, layers=("last",), pooling=(self.pooling,)
        )
