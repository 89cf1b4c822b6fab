"""Fine-tuning: a head on a registry backbone, trained in two stages, exported whole.

The package, one concept per module:

    settings.py     FineTuneSettings: what determines a fine-tuned model
    model.py        pixels → preprocessing → backbone (inference mode) → pooling → head
    head_init.py    LP-FT: a saved linear probe folded exactly into the head
    data.py         labelled indexes, readable files, splits, training batches
    checkpoint.py   the run's state, checkpoints, opening (and resuming) a run folder
    training.py     the two stages, epoch by epoch
    outputs.py      history, confusion matrix and splits as tables and plots
    saved.py        the saved model: its format, its layers, `load_finetuned`
    run.py          `fine_tune`: a run from image folder to exported model
"""

from tl.finetune.data import class_weights, labelled_index, prepare_splits
from tl.finetune.head_init import check_init_head, initialise_head, linear_head_weights
from tl.finetune.model import FineTuneModel, build_model, unfrozen_layers
from tl.finetune.run import FineTuneResult, fine_tune
from tl.finetune.saved import (
    MODEL_FILE,
    MODEL_FORMAT,
    BackbonePreprocessing,
    ClassNames,
    FineTunedModel,
    InferenceMode,
    load_finetuned,
)
from tl.finetune.settings import (
    AUGMENTATIONS,
    DEFAULT_BACKBONE,
    DEFAULT_DROPOUT,
    DEFAULT_HEAD_EPOCHS,
    GLOBAL_POOLINGS,
    HEADS,
    FineTuneSettings,
)

__all__ = [
    "AUGMENTATIONS",
    "DEFAULT_BACKBONE",
    "DEFAULT_DROPOUT",
    "DEFAULT_HEAD_EPOCHS",
    "GLOBAL_POOLINGS",
    "HEADS",
    "MODEL_FILE",
    "MODEL_FORMAT",
    "BackbonePreprocessing",
    "ClassNames",
    "FineTuneModel",
    "FineTuneResult",
    "FineTuneSettings",
    "FineTunedModel",
    "InferenceMode",
    "build_model",
    "check_init_head",
    "class_weights",
    "fine_tune",
    "initialise_head",
    "labelled_index",
    "linear_head_weights",
    "load_finetuned",
    "prepare_splits",
    "unfrozen_layers",
]
