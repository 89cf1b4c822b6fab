"""Fine-tuning's stages: stage 1 on codes computed once (the probe, a standardised
head), stage 2 on a cache, the model kept, training from scratch.

Backbones have random weights at 32x32; data are generated. Expectations come from
scikit-learn on codes that `tl.features.extract` computes, from runs without a
cache, and from the arithmetic of the rule that keeps a model.
"""

from __future__ import annotations

import json
import logging
import math

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import SMALL, assert_one_line_error, write_png_tree
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from test_finetune import write_brightness_tree

import fine_tune
from tl.features import extract
from tl.finetune import FineTuneSettings, load_finetuned
from tl.finetune import fine_tune as run_fine_tune
from tl.finetune.checkpoint import _State
from tl.finetune.training import better
from tl.store import FeatureStore

RANDOM_VGG = FineTuneSettings.create(
    backbone="vgg16", weights="none", from_scratch=False, image_size=SMALL,
    unfreeze="block5", batch_size=4, val_split=0.2, test_split=0.25,
)  # fmt: skip


def rows_of(directory, split: str) -> pd.DataFrame:
    table = pd.read_csv(directory / "splits.csv")
    return table[table["split"] == split]


# ---------------------------------------------------------------------------------
# Stage 1: the probe


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """A run that stops after stage 1 (the probe), on three classes."""
    root = tmp_path_factory.mktemp("probe_run")
    images = write_png_tree(root / "images", {"ant": 9, "bee": 9, "cat": 9})
    run_fine_tune(images, root / "run", RANDOM_VGG, epochs=0, progress=False)
    return images, root / "run"


def test_before_stage_2_the_model_predicts_what_the_cv_chosen_probe_predicts(
    probe_run, tmp_path
):
    images, run = probe_run
    extract(images, tmp_path / "codes.h5", backbone="vgg16", weights="none",
            image_size=SMALL, layers=["last"], pooling="avg",
            progress=False)  # fmt: skip
    with FeatureStore(tmp_path / "codes.h5") as store:
        row = {str(images.resolve() / path): i for i, path in enumerate(store.paths)}
        codes, labels = store.read("block5_pool"), store.labels
    train, test = rows_of(run, "train"), rows_of(run, "test")
    X, y = (
        codes[[row[p] for p in train["path"]]],
        labels[[row[p] for p in train["path"]]],
    )

    # C chosen as train_classifier.py chooses it: stratified 5-fold CV, accuracy
    search = GridSearchCV(
        make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=2000, random_state=0)
        ),
        {"logisticregression__C": [1e-3, 1e-2, 1e-1, 1.0, 10.0]},
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
    ).fit(X, y)
    chosen = search.best_params_["logisticregression__C"]
    metadata = json.loads((run / "metadata.json").read_text())
    assert metadata["probe"]["params"] == {"C": chosen}
    assert metadata["probe"]["cv_accuracy"] == pytest.approx(search.best_score_)
    expected = search.best_estimator_.predict_proba(
        codes[[row[p] for p in test["path"]]]
    )
    _, probabilities, _ = load_finetuned(run).predict_images(list(test["path"]))
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    results = pd.read_csv(run / "results.csv")
    assert set(results["classifier"]) == {"linear+probe"}


@pytest.fixture(scope="module")
def loud_codes_weights(tmp_path_factory):
    """VGG16 weights whose pooled codes are in the hundreds, as learned weights'
    are (random ones give about 0.1): the last convolution scaled up 1,000-fold
    (ReLU networks are positively homogeneous, so the codes scale with it)."""
    path = tmp_path_factory.mktemp("weights") / "vgg16_loud.weights.h5"
    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(
        include_top=False, weights=None, input_shape=(SMALL, SMALL, 3)
    )
    conv = model.get_layer("block5_conv3")
    conv.set_weights([1000 * weight for weight in conv.get_weights()])
    model.save_weights(path)
    return path


def test_a_random_head_starts_with_a_loss_of_order_log_classes(
    tmp_path, loud_codes_weights
):
    """The report: a first epoch's loss of 74, the head reading codes in the
    hundreds. Standardised, they give a loss of order log(classes)."""
    images = write_png_tree(tmp_path / "images", {"ant": 8, "bee": 8, "cat": 8})
    result = run_fine_tune(
        images, tmp_path / "run", RANDOM_VGG, weights=str(loud_codes_weights),
        head_init="random", head_epochs=1, epochs=0, progress=False,
    )  # fmt: skip
    with FeatureStore(
        extract(images, tmp_path / "codes.h5", weights=str(loud_codes_weights),
                backbone="vgg16", image_size=SMALL, progress=False).path
    ) as store:  # fmt: skip
        assert np.abs(store.read("block5_pool")).mean() > 50
    first = result.history.iloc[0]
    assert first["stage"] == 1
    assert first["loss"] < 3 * math.log(3)


# ---------------------------------------------------------------------------------
# Stage 2: the cache changes nothing but the time


@pytest.mark.parametrize(
    "options, kind",
    [
        ({"head_init": "random", "head_epochs": 1, "dropout": 0.3}, "prefix"),
        ({"augment": ("flip",), "cache_memory_gb": 0, "keep_cache": True}, "images"),
    ],
    ids=["frozen prefix in memory", "images in a kept file"],
)
def test_cached_and_uncached_stage_2_train_the_same_model(tmp_path, options, kind):
    images = write_brightness_tree(tmp_path / "images", per_class=12)
    runs = {}
    for cache in (True, False):
        runs[cache] = run_fine_tune(
            images, tmp_path / str(cache), RANDOM_VGG, epochs=1, progress=False,
            cache=cache, **options,
        )  # fmt: skip
    columns = ["epoch", "stage", "loss", "val_loss", "val_accuracy"]
    pd.testing.assert_frame_equal(
        runs[True].history[columns], runs[False].history[columns], rtol=1e-5
    )
    cached, uncached = (load_finetuned(tmp_path / str(c)).model for c in (True, False))
    for a, b in zip(cached.get_weights(), uncached.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    metadata = json.loads((tmp_path / "True" / "metadata.json").read_text())
    assert metadata["cache"]["kind"] == kind
    kept = tmp_path / "True" / "cache" / "frozen.h5"
    assert kept.exists() == bool(options.get("keep_cache"))
    assert not (tmp_path / "False" / "cache").exists()


# ---------------------------------------------------------------------------------
# The model kept


def state(stage: int, best: float | None, start_accuracy: float | None) -> _State:
    return _State({}, stage=stage, best=best, start_accuracy=start_accuracy)


@pytest.mark.parametrize(
    "stage, val_loss, val_accuracy, kept",
    [
        (1, 0.4, 0.2, True),  # stage 1: a lower loss suffices
        (1, 0.6, 1.0, False),
        (2, 0.4, 0.75, True),  # as accurate as the start, lower loss
        (2, 0.4, 0.7, False),  # lower loss, less accurate than the start
        (2, 0.6, 1.0, False),  # more accurate, higher loss
    ],
)
def test_an_epoch_is_kept_for_a_lower_loss_never_below_the_start_accuracy(
    stage, val_loss, val_accuracy, kept
):
    logs = {"val_loss": val_loss, "val_accuracy": val_accuracy}
    assert better(state(stage, 0.5, 0.75 if stage == 2 else None), logs) is kept


def test_a_stage_2_that_wrecks_the_model_returns_the_probe(probe_run, tmp_path, caplog):
    images, probe = probe_run
    with caplog.at_level(logging.WARNING, logger="tl"):
        wrecked = run_fine_tune(images, tmp_path / "run", RANDOM_VGG, epochs=2,
                                learning_rate=10.0, progress=False)  # fmt: skip
    assert wrecked.best_epoch == -1
    assert (wrecked.history["val_loss"] > 1.5).all()
    probe, kept = (load_finetuned(folder).model for folder in (probe, tmp_path / "run"))
    for a, b in zip(probe.get_weights(), kept.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # 1 or 2 validation images per class: the run says choosing on them is noise
    metadata = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert metadata["validation"]["noisy"] is True
    assert "early stopping and the choice of the kept model" in caplog.text


# ---------------------------------------------------------------------------------
# From scratch


def test_from_scratch_a_batchnorm_network_learns(tmp_path):
    """The report: BatchNorm in inference mode made random MobileNet codes vanish
    (about 1e-12), so nothing learned. From scratch, BatchNorm trains."""
    images = write_brightness_tree(tmp_path / "images", per_class=40)
    result = run_fine_tune(
        images, tmp_path / "run", backbone="mobilenet", weights="none",
        image_size=SMALL, batch_size=16, epochs=8, progress=False,
    )  # fmt: skip
    assert result.metrics["accuracy"] >= 0.8  # chance: 0.5
    metadata = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert metadata["from_scratch"] is True and metadata["probe"] is None
    model = load_finetuned(tmp_path / "run").model
    backbone = next(layer for layer in model.layers if layer.name.startswith("mobile"))
    means = [
        np.asarray(layer.moving_mean)
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert all(np.abs(mean).max() > 0 for mean in means)  # estimated, not 0


# ---------------------------------------------------------------------------------
# Settings that contradict each other


@pytest.mark.parametrize(
    "arguments, fragments",
    [
        (["--weights", "none", "--unfreeze", "block5"],
         ["from scratch", "takes no --unfreeze block5", "--no-from-scratch"]),
        (["--weights", "WEIGHTS", "--from-scratch"],
         ["--from-scratch trains from random weights", "--weights none"]),
        (["--weights", "none", "--no-from-scratch", "--head", "mlp",
          "--head-init", "probe"], ["--head-init random"]),
        (["--weights", "none", "--no-from-scratch", "--init-head", "PROBE",
          "--head-init", "random"], ["leave out --head-init random"]),
    ],
    ids=["scratch and unfreeze", "scratch and weights", "probe and mlp",
         "saved and random head"],
)  # fmt: skip
def test_contradicting_options_are_refused_in_one_line(
    png_tree, tmp_path, capsys, arguments, fragments
):
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"")
    arguments = [
        {"WEIGHTS": str(weights), "PROBE": str(tmp_path)}.get(a, a) for a in arguments
    ]
    code = fine_tune.main(
        [str(png_tree), "-o", str(tmp_path / "run"), "--backbone", "vgg16",
         "--image-size", str(SMALL), *arguments]
    )  # fmt: skip
    assert_one_line_error(capsys, code, *fragments)
    assert not (tmp_path / "run").exists()
