"""Fine-tuning: a head on a registry backbone, trained in two stages, exported whole.

The package, one concept per module:

    settings.py     FineTuneSettings: what determines a fine-tuned model
    model.py        pixels → preprocessing → backbone (inference mode) → pooling → head
    head_init.py    stage 1's probe (fitted, or saved: LP-FT), folded into the head
    cache.py        the frozen pass: codes and stage 2's inputs, computed once
    data.py         labelled indexes, readable files, splits, training batches
    checkpoint.py   the run's state, checkpoints, opening (and resuming) a run folder
    training.py     the two stages, epoch by epoch
    outputs.py      progress bars; history, confusion matrix, splits as tables, plots
    saved.py        the saved model: its format, its layers, `load_finetuned`
    run.py          `fine_tune`: a run from image folder to exported model
"""

from tl.finetune.data import class_weights, labelled_index, prepare_splits
from tl.finetune.head_init import (
    LinearProbe,
    check_init_head,
    fit_probe,
    initialise_head,
    linear_probe,
    saved_probe,
)
from tl.finetune.model import FineTuneModel, HeadInput, build_model, unfrozen_layers
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
    HEAD_INITS,
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
    "HEAD_INITS",
    "MODEL_FILE",
    "MODEL_FORMAT",
    "BackbonePreprocessing",
    "ClassNames",
    "FineTuneModel",
    "FineTuneResult",
    "FineTuneSettings",
    "FineTunedModel",
    "HeadInput",
    "InferenceMode",
    "LinearProbe",
    "build_model",
    "check_init_head",
    "class_weights",
    "fine_tune",
    "fit_probe",
    "initialise_head",
    "labelled_index",
    "linear_probe",
    "load_finetuned",
    "prepare_splits",
    "saved_probe",
    "unfrozen_layers",
]
