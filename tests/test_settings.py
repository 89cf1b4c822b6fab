"""Settings: one flat JSON shape for stores and models, keyword overrides, and
derived values resolved where they are used."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import SMALL, write_png_tree

import tl.finetune
from tl.backbones import BackboneSettings
from tl.errors import TLError
from tl.features import ExtractionSettings
from tl.finetune import DEFAULT_DROPOUT, DEFAULT_HEAD_EPOCHS, FineTuneSettings
from tl.images import ImageSettings

# What feature stores written before the settings were split into parts hold.
STORE_KEYS = {
    "backbone", "weights", "precision", "seed", "image_size", "resize",
    "interpolation", "antialias", "max_pixels", "layers", "pooling", "dtype",
    "labels",
}  # fmt: skip


def test_extraction_settings_keep_the_flat_shape_of_existing_stores():
    settings = ExtractionSettings.create(
        backbone="VGG-16", weights="none", image_size="32x48", layers="block5"
    )
    stored = settings.to_json()
    assert set(stored) == STORE_KEYS
    assert stored["backbone"] == "vgg16"
    assert stored["image_size"] == [32, 48]
    assert stored["layers"] == ["block5"]
    # read back, with the keys a store adds beside them
    again = ExtractionSettings.from_json({**stored, "weights_sha256": None})
    assert again == settings
    assert again.backbone == BackboneSettings("vgg16", weights="none")
    assert again.image == ImageSettings((32, 48))


def test_keyword_overrides_reach_the_parts_through_one_mapping():
    base = ExtractionSettings()
    changed = base.updated(backbone="resnet50", image_size=64, layers=["conv4"])
    assert changed.backbone.name == "resnet50"
    assert changed.backbone.weights == base.backbone.weights
    assert changed.image.size == (64, 64)
    assert changed.layers == ("conv4",)
    whole = base.updated(image=ImageSettings(40, resize="pad"))
    assert whole.image == ImageSettings((40, 40), resize="pad")
    with pytest.raises(TLError, match=r"Unknown setting 'imagesize'.*'image_size'"):
        base.updated(imagesize=64)


def test_the_image_size_follows_the_backbone_until_it_is_set():
    settings = ExtractionSettings()
    assert settings.image.size is None
    assert settings.resolved().image.size == (224, 224)
    other = dataclasses.replace(settings, backbone=BackboneSettings("efficientnetb3"))
    assert other.resolved().image.size == (300, 300)
    assert other.updated(image_size=SMALL).resolved().image.size == (SMALL, SMALL)


def test_fine_tuning_derives_head_epochs_dropout_and_size_when_used(tmp_path):
    probe = str(tmp_path)
    lpft = FineTuneSettings.create(init_head=probe)
    assert (lpft.head_epochs, lpft.dropout) == (None, None)
    resolved = lpft.resolved()
    assert (resolved.head_epochs, resolved.dropout) == (0, 0.0)
    plain = dataclasses.replace(lpft, init_head=None).resolved()
    assert (plain.head_epochs, plain.dropout) == (DEFAULT_HEAD_EPOCHS, DEFAULT_DROPOUT)
    given = lpft.updated(head_epochs=2, dropout=0.1).resolved()
    assert (given.head_epochs, given.dropout) == (2, 0.1)
    assert FineTuneSettings().resolved().image.size == (224, 224)  # resnet50
    assert FineTuneSettings().updated(
        backbone="efficientnetb3"
    ).resolved().image.size == (300, 300)


class Built(Exception):
    """Stops `fine_tune` once it builds its model."""


@pytest.fixture
def built(monkeypatch):
    """What `fine_tune` built: the settings and image size it passed on."""
    seen = {}
    build_model = tl.finetune.build_model

    def record_model(settings, *args, **kwargs):
        seen["settings"] = settings
        return build_model(settings, *args, **kwargs)

    def record_backbone(spec, image_size, *args, **kwargs):
        seen["image_size"] = tuple(image_size)
        raise Built

    monkeypatch.setattr(tl.finetune, "build_model", record_model)
    monkeypatch.setattr(tl.finetune, "build_backbone", record_backbone)
    return seen


def test_another_backbone_by_keyword_gets_its_own_image_size(tmp_path, built):
    """The report: `fine_tune(..., backbone="efficientnetb3")` built EfficientNetB3
    at ResNet50's 224x224, fixed when the default settings were made."""
    images = write_png_tree(tmp_path / "images", {"ant": 3, "bee": 3})
    with pytest.raises(Built):
        tl.finetune.fine_tune(
            images, tmp_path / "run", weights="none", backbone="efficientnetb3"
        )
    assert built["image_size"] == (300, 300)


def test_dropping_init_head_by_keyword_trains_the_head_again(tmp_path, built):
    """The report: replacing `init_head` by None kept the head_epochs=0 and
    dropout=0 derived from it, so the new head was never trained."""
    images = write_png_tree(tmp_path / "images", {"ant": 3, "bee": 3})
    lpft = FineTuneSettings.create(
        backbone="vgg16", weights="none", image_size=SMALL, init_head=str(tmp_path)
    )
    with pytest.raises(Built):
        tl.finetune.fine_tune(images, tmp_path / "run", lpft, init_head=None)
    settings = built["settings"]
    assert (settings.head_epochs, settings.dropout) == (
        DEFAULT_HEAD_EPOCHS,
        DEFAULT_DROPOUT,
    )
