"""When the bfloat16 hint appears: only where it was measured to pay."""

from __future__ import annotations

import pytest

from tl import precision


@pytest.fixture
def cpu(monkeypatch):
    """Pretend this machine's CPU has the given flags (and no GPU is used here)."""

    def set_flags(*flags):
        monkeypatch.setattr(precision, "_cpu_flags", lambda: set(flags))

    return set_flags


def test_avx512_bf16_hint_names_the_measured_gain_for_heavy_backbones(cpu):
    cpu("avx512f", "avx512_bf16")
    hint = precision.half_precision_hint("float32", "vgg16")
    assert "1.95x" in hint and "VGG16" in hint
    assert "1.32x" in precision.half_precision_hint("float32", "resnet101")


@pytest.mark.parametrize("backbone", ["mobilenetv2", "efficientnetb0", "densenet121"])
def test_no_hint_for_backbones_that_gained_nothing(cpu, backbone):
    cpu("avx512f", "avx512_bf16", "amx_bf16")
    assert precision.half_precision_hint("float32", backbone) is None


def test_no_hint_for_training_on_avx512_or_without_bf16_or_in_half_precision(cpu):
    cpu("avx512f", "avx512_bf16")
    assert precision.half_precision_hint("float32", "vgg16", training=True) is None
    assert precision.half_precision_hint("bfloat16", "vgg16") is None
    cpu("avx2")
    assert precision.half_precision_hint("float32", "vgg16") is None
    cpu("amx_bf16", "avx512_bf16")
    assert "AMX" in precision.half_precision_hint("float32", "vgg16", training=True)
