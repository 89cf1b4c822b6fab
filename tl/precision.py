"""Compute precision: Keras mixed-precision policies, and whether the hardware pays.

`float32` is the default everywhere. `bfloat16` and `float16` run the layers in half
precision with float32 variables (Keras' `mixed_*` policies); tl pools and stores in
float32 whatever the compute precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import keras

from tl._checks import check_choice

PRECISIONS = {
    "float32": "float32",
    "bfloat16": "mixed_bfloat16",
    "float16": "mixed_float16",
}


def check_precision(precision: str) -> str:
    """`precision` if it is one tl knows, else a clear error."""
    return check_choice("precision", precision, PRECISIONS)


@contextlib.contextmanager
def compute_policy(precision: str) -> Iterator[None]:
    """Build layers under the Keras dtype policy of `precision`, then restore it."""
    policy = PRECISIONS[check_precision(precision)]
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# bfloat16 / float32 inference throughput measured on an AVX512-BF16 CPU without AMX
# (AMD EPYC; README, Performance). Backbones of other families gained nothing there
# (MobileNetV2 0.73x, EfficientNetB0 0.97x), so the hint names only these.
AVX512_BF16_SPEEDUP = {"vgg": ("VGG16", 1.95), "resnet": ("ResNet50", 1.32)}


def half_precision_hint(
    precision: str, backbone: str, *, training: bool = False
) -> str | None:
    """A one-line hint when this machine would run `backbone` much faster in bfloat16.

    GPUs of compute capability 8.0+ have bfloat16 tensor cores; CPUs with AMX (Intel
    Sapphire Rapids and later) have bfloat16 matrix units; AVX512-BF16 CPUs (AMD Zen
    4) only bfloat16 dot products, which paid for the families in
    `AVX512_BF16_SPEEDUP` alone, and were measured for inference, not training.
    Returns None when `precision` is already a half type or nothing is known to pay.
    """
    if precision != "float32":
        return None
    import tensorflow as tf

    from tl.backbones import get_backbone

    spec = get_backbone(backbone)
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get(
            "compute_capability", (0, 0)
        )
        if capability >= (8, 0):
            return (
                "This GPU has bfloat16 tensor cores: --precision bfloat16 is usually "
                "much faster, with codes close to float32."
            )
    if spec.family not in AVX512_BF16_SPEEDUP:
        return None
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return (
            f"This CPU has AMX: --precision bfloat16 is typically several times "
            f"faster for {spec.name}, with codes close to float32."
        )
    if "avx512_bf16" in flags and not training:
        measured, speedup = AVX512_BF16_SPEEDUP[spec.family]
        return (
            f"This CPU has AVX512-BF16: --precision bfloat16 extracted {measured} "
            f"codes {speedup}x faster than float32 on such a CPU, with codes close to "
            f"float32."
        )
    return None
