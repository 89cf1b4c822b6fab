"""Settings: one flat JSON shape for stores and models, keyword overrides, and
derived values resolved where they are used."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import SMALL, write_png_tree

import tl.backbones
import tl.finetune.run
from tl.backbones import BackboneSettings
from tl.errors import TLError
from tl.features import ExtractionSettings
from tl.finetune import DEFAULT_DROPOUT, DEFAULT_HEAD_EPOCHS, FineTuneSettings
from tl.images import ImageSettings

# What feature stores written before the settings were split into parts hold.
STORE_KEYS = {
    "backbone", "weights", "precision", "seed", "image_size", "resize",
    "interpolation", "antialias", "max_pixels", "layers", "pooling", "dtype",
    "labels", "engine", "calibration_images", "calibration_source",
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
    with pytest.raises(TLError, match=r"backbone must be a BackboneSettings.*create"):
        ExtractionSettings(backbone="resnet50")


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
    assert resolved.head_init == "probe"
    plain = dataclasses.replace(lpft, init_head=None, head="mlp").resolved()
    assert plain.head_init == "random"
    assert (plain.head_epochs, plain.dropout) == (DEFAULT_HEAD_EPOCHS, DEFAULT_DROPOUT)
    scratch = FineTuneSettings.create(weights="none").resolved()
    assert (scratch.from_scratch, scratch.head_init, scratch.head_epochs) == (
        True, "random", 0,
    )  # fmt: skip
    assert scratch.learning_rate == 10 * lpft.resolved().learning_rate
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
    build_model = tl.finetune.run.build_model

    def record_model(settings, *args, **kwargs):
        seen["settings"] = settings
        return build_model(settings, *args, **kwargs)

    def record_backbone(spec, image_size, *args, **kwargs):
        seen["image_size"] = tuple(image_size)
        raise Built

    monkeypatch.setattr(tl.finetune.run, "build_model", record_model)
    monkeypatch.setattr(tl.backbones, "build_backbone", record_backbone)
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
        backbone="vgg16", weights="none", from_scratch=False, image_size=SMALL,
        init_head=str(tmp_path),
    )  # fmt: skip
    with pytest.raises(Built):
        tl.finetune.fine_tune(
            images, tmp_path / "run", lpft, init_head=None, head_init="random"
        )
    settings = built["settings"]
    assert (settings.head_epochs, settings.dropout) == (
        DEFAULT_HEAD_EPOCHS,
        DEFAULT_DROPOUT,
    )


def test_every_option_of_the_scripts_reaches_its_setting(tmp_path):
    """Each option's dest is a flat settings key: every key has its option, and
    every option given a value other than its default (a `--protocol` or an
    `--init-head` aside) comes through to the settings."""
    import extract_features
    import fine_tune
    import train_classifier

    weights = tmp_path / "w.h5"
    weights.write_bytes(b"")
    given = {
        "backbone": ("-b", "mobilenetv2"),
        "weights": ("-w", str(weights)),
        "precision": ("--precision", "bfloat16"),
        "seed": ("--seed", "7"),
        "image_size": ("-s", "40x48"),
        "resize": ("--resize", "pad"),
        "interpolation": ("--interpolation", "area"),
        "antialias": ("--antialias",),
        "max_pixels": ("--max-pixels", "1000"),
    }
    expected = {
        "backbone": "mobilenetv2",
        "weights": str(weights.resolve()),
        "precision": "bfloat16",
        "seed": 7,
        "image_size": [40, 48],
        "resize": "pad",
        "interpolation": "area",
        "antialias": True,
        "max_pixels": 1000,
    }
    shared = [text for option in given.values() for text in option]
    extraction = [*shared, "-l", "block1", "block2", "-p", "max", "--dtype", "float16"]
    extraction += ["--engine", "openvino"]
    args = extract_features.build_parser().parse_args(["src", *extraction])
    assert ExtractionSettings.json_keys() - {"labels"} <= vars(args).keys()
    settings = ExtractionSettings.from_json(vars(args))
    assert settings.to_json() == {
        **expected,
        "layers": ["block1", "block2"],
        "pooling": ["max", "max"],
        "dtype": "float16",
        "labels": "inferred",
        "engine": "openvino",
        "calibration_images": None,  # int8 only
        "calibration_source": None,
    }
    tuning = {
        "pooling": ("--pooling", "max", "max"),
        "head": ("--head", "mlp", "mlp"),
        "hidden_units": ("--hidden-units", "9", 9),
        "dropout": ("--dropout", "0.4", 0.4),
        "unfreeze": ("--unfreeze", "0.5", "0.5"),
        "head_epochs": ("--head-epochs", "2", 2),
        "epochs": ("--epochs", "3", 3),
        "batch_size": ("--batch-size", "5", 5),
        "head_learning_rate": ("--head-lr", "0.5", 0.5),
        "learning_rate": ("--lr", "0.25", 0.25),
        "warmup_epochs": ("--warmup-epochs", "0.5", 0.5),
        "patience": ("--patience", "4", 4),
        "augment": ("--augment", "flip", ["flip"]),
        "label_smoothing": ("--label-smoothing", "0.1", 0.1),
        "weight_decay": ("--weight-decay", "0.01", 0.01),
        "l2_sp": ("--l2-sp", "0.02", 0.02),
        "class_weight": ("--class-weight", "balanced", "balanced"),
        "val_split": ("--val-split", "0.3", 0.3),
        "test_split": ("--test-split", "0.4", 0.4),
        "head_init": ("--head-init", "random", "random"),
        "from_scratch": ("--no-from-scratch", None, False),
    }
    argv = ["src", *shared]
    for flag, text, _ in tuning.values():
        argv += [flag] + ([text] if text else [])
    args = fine_tune.build_parser().parse_args(argv)
    assert FineTuneSettings.json_keys() <= vars(args).keys()
    settings = FineTuneSettings.from_json(vars(args)).to_json()
    assert settings == {
        **expected,
        **{key: value for key, (_, _, value) in tuning.items()},
        "init_head": None,
    }
    comparison = {
        "classifiers": ("-c", "ridge", ["ridge"]),
        "layers": ("-l", "a", ["a"]),
        "normalization": ("--normalization", "l2", "l2"),
        "pca": ("--pca", "3", 3),
        "class_weight": ("--class-weight", "balanced", "balanced"),
        "protocol": ("--protocol", "holdout", "holdout"),  # cv takes no --shots
        "folds": ("--cv", "4", 4),
        "test_size": ("--test-size", "0.3", 0.3),
        "search_rows": ("--search-rows", "10", 10),
        "shots": ("--shots", "2", [2]),
        "shot_seeds": ("--shot-seeds", "2", 2),
        "seed": ("--seed", "3", 3),
        "jobs": ("-j", "2", 2),
        "out_of_core": ("--out-of-core", "never", "never"),
        "memory_limit_gb": ("--memory-limit", "1.5", 1.5),
        "drop_nonfinite": ("--drop-nonfinite", None, True),
    }
    argv = ["store.h5"]
    for flag, text, _ in comparison.values():
        argv += [flag] + ([text] if text else [])
    args = train_classifier.build_parser().parse_args(argv)
    from tl.evaluation import ComparisonSettings

    assert ComparisonSettings.json_keys() <= vars(args).keys()
    assert ComparisonSettings.from_json(vars(args)).to_json() == {
        key: value for key, (_, _, value) in comparison.items()
    }
