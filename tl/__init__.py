"""tl: transfer learning for images on Keras 3.

Extract CNN codes of several layers of a `keras.applications` backbone in one pass
(`tl.extract`), read them back (`tl.FeatureStore`), compare classifiers per layer
(`tl.compare`), classify new images (`tl.predict_images`), fine-tune
(`tl.fine_tune`), ask which of these a dataset calls for (`tl.advise`).
Names are imported lazily, so `import tl` (and a script's --help) does not load
TensorFlow; when something does, its native start-up messages are muted
(`tl._tensorflow`; TL_TF_LOGS=1 shows them).
"""

import importlib

from tl._tensorflow import mute_tensorflow_start_up

mute_tensorflow_start_up()

__version__ = "0.1.0"

_EXPORTS = {
    "BackboneSettings": "tl.backbones",
    "ImageSettings": "tl.images",
    "ExtractionSettings": "tl.features",
    "extract": "tl.features",
    "resume": "tl.features",
    "FeatureStore": "tl.store",
    "merge_stores": "tl.store",
    "get_backbone": "tl.backbones",
    "list_backbones": "tl.backbones",
    "ComparisonSettings": "tl.evaluation",
    "compare": "tl.evaluation",
    "load_classifier": "tl.classifiers",
    "predict_images": "tl.prediction",
    "FineTuneSettings": "tl.finetune",
    "fine_tune": "tl.finetune",
    "load_finetuned": "tl.finetune",
    "TLError": "tl.errors",
    "advise": "tl.advisor",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tl' has no attribute {name!r}")
