"""Fine-tuning: training, BatchNorm and frozen layers, LP-FT folding, resume, errors.

Backbones have random weights at 32x32; data are generated. Expectations are computed
independently of tl: reference Keras models loaded from the same weights file,
scikit-learn's own predictions and class weights, numpy for the L2-SP penalty.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import (
    SMALL,
    assert_one_line_error,
    edit_json,
    load_pngs,
    record_sha256,
    truncate,
    write_png_tree,
)
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

import fine_tune
import predict
from tl.backbones import build_backbone, get_backbone
from tl.classifiers import load_classifier, make_pipeline, save_classifier
from tl.errors import TLError
from tl.features import extract
from tl.finetune import (
    FineTuneSettings,
    build_model,
    class_weights,
    initialise_head,
    load_finetuned,
    saved_probe,
    unfrozen_layers,
)
from tl.finetune import fine_tune as run_fine_tune
from tl.reports import RESULT_COLUMNS, classification_metrics
from tl.store import FeatureStore


def write_brightness_tree(root, per_class: int, seed: int = 0):
    """Two classes a linear probe on any features separates: dark and bright noise."""
    rng = np.random.default_rng(seed)
    for name, mean in (("bright", 185), ("dark", 70)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(mean, 35, (SMALL, SMALL, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


def weights_of(layer) -> dict[str, np.ndarray]:
    return {w.path.split("/")[-1]: np.asarray(w) for w in layer.weights}


# ---------------------------------------------------------------------------------
# A VGG16 run: training, outputs, prediction, resume


VGG_SETTINGS = FineTuneSettings.create(
    backbone="vgg16", weights="none", from_scratch=False, image_size=SMALL,
    head_init="random", head_epochs=2, epochs=2, unfreeze="block5", batch_size=4,
    head_learning_rate=1e-2, dropout=0.3, augment=("flip", "contrast"),
    val_split=0.2, test_split=0.25,
)  # fmt: skip


@pytest.fixture(scope="module")
def vgg_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vgg_run")
    images = write_brightness_tree(root / "images", per_class=16)
    result = run_fine_tune(images, root / "run", VGG_SETTINGS, progress=False)
    return images, result


def test_fine_tuning_trains_above_chance_and_reports_like_the_leaderboard(vgg_run):
    _, result = vgg_run
    directory = result.directory
    for name in ("model.keras", "metadata.json", "history.png", "confusion_matrix.png"):
        assert (directory / name).is_file(), name
    results = pd.read_csv(directory / "results.csv")
    assert list(results.columns) == RESULT_COLUMNS
    assert set(results["method"]) == {"fine_tune"}
    assert set(results["layer"]) == {"block5"}
    assert set(results["classifier"]) == {"linear"}
    reported = dict(zip(results["metric"], results["value"], strict=True))
    assert reported["accuracy"] >= 0.85  # chance is 0.5

    # The saved model, reloaded, gives the reported metrics on the test split.
    splits = pd.read_csv(directory / "splits.csv")
    test = splits[splits["split"] == "test"]
    model = load_finetuned(directory)
    classes, probabilities, skipped = model.predict_images(list(test["path"]))
    assert skipped == []
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    truth = np.array([model.class_names.index(label) for label in test["label"]])
    expected = classification_metrics(truth, classes)
    for metric, value in expected.items():
        assert reported[metric] == pytest.approx(value)
    matrix = pd.read_csv(directory / "confusion_matrix.csv", index_col=0)
    assert matrix.to_numpy().sum() == len(test) == 8

    history = pd.read_csv(directory / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2, 3]
    assert history["stage"].tolist() == [1, 1, 2, 2]
    assert history["learning_rate"].iloc[:2].tolist() == pytest.approx([1e-2, 1e-2])
    metadata = json.loads((directory / "metadata.json").read_text())
    assert metadata["format"] == "tl-finetuned"
    assert metadata["class_names"] == ["bright", "dark"]
    assert model.model.get_layer("class_names").class_names == ["bright", "dark"]
    model_bytes = (directory / "model.keras").read_bytes()
    assert metadata["files"] == {"model.keras": hashlib.sha256(model_bytes).hexdigest()}
    assert metadata["image_size"] == [SMALL, SMALL]
    assert not (directory / "checkpoints").exists()


def test_predict_images_lists_files_it_cannot_read(vgg_run, tmp_path):
    model = load_finetuned(vgg_run[1].directory)
    write_brightness_tree(tmp_path, per_class=1, seed=5)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    paths = [tmp_path / "dark" / "00.png", broken, tmp_path / "bright" / "00.png"]
    classes, probabilities, skipped = model.predict_images(paths)
    assert probabilities.shape == (2, 2)
    assert [(position, path) for position, path, _ in skipped] == [(1, str(broken))]
    assert "cannot decode" in skipped[0][2]
    assert classes.tolist() == probabilities.argmax(axis=1).tolist()


def test_predict_py_classifies_with_a_fine_tuned_model(vgg_run, tmp_path):
    images, result = vgg_run
    csv = tmp_path / "predictions.csv"
    assert predict.main([str(result.directory), str(images), "-o", str(csv), "-q"]) == 0
    table = pd.read_csv(csv, keep_default_na=False)
    model = load_finetuned(result.directory)
    paths = [str(images / path) for path in table["path"]]
    classes, probabilities, _ = model.predict_images(paths)
    assert table["predicted"].tolist() == [model.class_names[c] for c in classes]
    np.testing.assert_allclose(table["score"], probabilities.max(axis=1), rtol=1e-6)
    assert (table["true"] == [path.split("/")[0] for path in table["path"]]).all()
    assert set(table["score_kind"]) == {"probability"}


def tiny_model(with_lambda: bool) -> keras.Model:
    """A model of registered layers, or one with a Lambda layer (Python code)."""
    pixels = keras.Input((SMALL, SMALL, 3))
    x = keras.layers.GlobalAveragePooling2D()(pixels)
    if with_lambda:
        x = keras.layers.Lambda(lambda x: x * 2)(x)
    return keras.Model(pixels, keras.layers.Dense(2, activation="softmax")(x))


def replace_model(with_lambda: bool):
    def replace(folder):
        tiny_model(with_lambda).save(folder / "model.keras")
        record_sha256(folder, "model.keras")

    return replace


@pytest.mark.parametrize(
    "damage, fragments",
    [
        (
            lambda folder: truncate(folder / "metadata.json"),
            ["metadata.json", "not valid JSON"],
        ),
        (
            lambda folder: edit_json(folder, lambda m: m.pop("image_size")),
            ["metadata.json", "lacks 'image_size'", "fine_tune.py"],
        ),
        (  # was Keras' "File not found" for a file that exists
            lambda folder: truncate(folder / "model.keras"),
            ["model.keras", "changed or truncated"],
        ),
        (  # was silently relabelled
            lambda folder: edit_json(folder, lambda m: m["class_names"].reverse()),
            ["was edited: its class_names ['dark', 'bright']", "model.keras"],
        ),
        (  # was a traceback from the model's input signature
            lambda folder: edit_json(folder, lambda m: m.update(image_size=[64, 64])),
            ["was edited: its image_size [64, 64] differs from [32, 32]"],
        ),
        (
            replace_model(with_lambda=True),
            ["model.keras", "`Lambda` layer", "safe mode"],
        ),
        (
            replace_model(with_lambda=False),
            ["model.keras", "has no ClassNames layer"],
        ),
    ],
    ids=[
        "truncated metadata.json",
        "missing key",
        "truncated model.keras",
        "reordered class_names",
        "edited image_size",
        "a Lambda layer",
        "no class names in the model",
    ],
)
def test_damaged_edited_or_foreign_run_folders_are_refused_in_one_line(
    vgg_run, tmp_path, capsys, damage, fragments
):
    images, result = vgg_run
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("metadata.json", "model.keras"):
        shutil.copy(result.directory / name, folder / name)
    damage(folder)
    code = predict.main([str(folder), str(images), "-o", str(tmp_path / "p.csv")])
    assert_one_line_error(capsys, code, *fragments)
    assert not (tmp_path / "p.csv").exists()


class StopAfter(keras.callbacks.Callback):
    """Interrupts training as Ctrl-C would, at the end of epoch `epoch`."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


class EpochLog(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(epoch)


def test_an_interrupted_run_resumes_where_it_stopped(vgg_run, tmp_path):
    images, whole = vgg_run
    with pytest.raises(KeyboardInterrupt):  # in stage 2, after its first epoch
        run_fine_tune(images, tmp_path, VGG_SETTINGS, progress=False,
                      callbacks=[StopAfter(3)])  # fmt: skip
    state = json.loads((tmp_path / "state.json").read_text())
    assert (state["stage"], state["epoch"], state["complete"]) == (2, 3, False)
    log = EpochLog()
    resumed = run_fine_tune(
        images, tmp_path, VGG_SETTINGS, progress=False, callbacks=[log]
    )
    assert log.epochs == [3]  # only the epoch that was lost
    assert resumed.epochs_run == whole.epochs_run == 4
    # Same shuffling, augmentation, dropout and optimizer state as without a break.
    columns = ["epoch", "stage", "loss", "val_loss", "learning_rate"]
    pd.testing.assert_frame_equal(resumed.history[columns], whole.history[columns])
    ours = load_finetuned(tmp_path).model.get_weights()
    theirs = load_finetuned(whole.directory).model.get_weights()
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # A finished run is not redone; other settings are refused.
    log = EpochLog()
    run_fine_tune(images, tmp_path, VGG_SETTINGS, progress=False, callbacks=[log])
    assert log.epochs == []
    with pytest.raises(TLError, match="epochs: file has 2, this run asks 3"):
        run_fine_tune(images, tmp_path, VGG_SETTINGS, epochs=3, progress=False)


def test_mirrored_strategy_trains_as_one_device_does(tmp_path):
    """Two logical CPUs stand in for two GPUs (set before TensorFlow starts). With
    full batches and no randomness in training, two replicas compute the same
    updates as one device."""
    images = write_brightness_tree(tmp_path / "images", per_class=20)  # 24 to train
    script = textwrap.dedent(
        f"""
        import dataclasses, sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_finetune import VGG_SETTINGS
        from tl.finetune import fine_tune
        settings = dataclasses.replace(
            VGG_SETTINGS, head_epochs=1, epochs=1, dropout=0.0, augment=())
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        for name, choice in (("one", None), ("two", strategy)):
            fine_tune({str(images)!r}, {str(tmp_path)!r} + "/" + name, settings,
                      progress=False, strategy=choice)
        print("replicas", strategy.num_replicas_in_sync)
        """
    )
    process = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert process.returncode == 0, process.stderr.decode()[-3000:]
    assert "replicas 2" in process.stdout.decode()
    one, two = (pd.read_csv(tmp_path / name / "history.csv") for name in ("one", "two"))
    columns = ["loss", "accuracy", "val_loss", "val_accuracy"]
    np.testing.assert_allclose(two[columns], one[columns], rtol=1e-4, atol=1e-5)
    weights = [
        load_finetuned(tmp_path / name).model.get_weights() for name in ("one", "two")
    ]
    for a, b in zip(*weights, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------
# A ResNet50 run through the command line: BatchNorm and frozen layers


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """A random ResNet50 whose BatchNorm statistics are not the initial 0 and 1, so
    that any update of them shows."""
    path = tmp_path_factory.mktemp("weights") / "resnet50_random.weights.h5"
    keras.utils.set_random_seed(7)
    model = keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=(SMALL, SMALL, 3)
    )
    rng = np.random.default_rng(7)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.1, shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2, shape).astype("float32"))
    model.save_weights(path)
    return path


def test_batchnorm_statistics_and_frozen_layers_stay_unchanged(
    tmp_path, resnet_weights
):
    images = write_brightness_tree(tmp_path / "images", per_class=8)
    code = fine_tune.main(
        [str(images), "-o", str(tmp_path / "run"), "--backbone", "resnet50",
         "--weights", str(resnet_weights), "--image-size", str(SMALL),
         "--head-epochs", "0", "--epochs", "1", "--unfreeze", "conv5",
         "--batch-size", "4", "--lr", "1e-3", "--val-split", "0", "--quiet"]
    )  # fmt: skip
    assert code == 0  # without validation, the model is the last epoch's
    tuned = load_finetuned(tmp_path / "run").model.get_layer("backbone").layer
    reference = keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=(SMALL, SMALL, 3)
    )
    reference.load_weights(resnet_weights)
    unfrozen = {
        layer.name for layer in reference.layers if layer.name.startswith("conv5_")
    }
    changed_gammas = 0
    for layer in reference.layers[1:]:  # after the input layer
        before, after = weights_of(layer), weights_of(tuned.get_layer(layer.name))
        for name, value in before.items():
            if layer.name not in unfrozen or name.startswith("moving_"):
                np.testing.assert_array_equal(
                    after[name], value, f"{layer.name}/{name}"
                )
        if layer.name in unfrozen and isinstance(layer, keras.layers.Conv2D):
            assert not np.array_equal(after["kernel"], before["kernel"]), layer.name
        if layer.name in unfrozen and isinstance(
            layer, keras.layers.BatchNormalization
        ):
            changed_gammas += not np.array_equal(after["gamma"], before["gamma"])
    assert changed_gammas > 0  # BatchNorm weights train, their statistics do not


# ---------------------------------------------------------------------------------
# LP-FT: a head folded from a saved linear probe


@pytest.fixture(scope="module")
def probe_codes(tmp_path_factory):
    """VGG16 (random, seed 0) codes of 3 classes of images at two layers."""
    root = tmp_path_factory.mktemp("probe")
    images = write_png_tree(root / "images", {"ant": 8, "bee": 7, "cat": 9})
    extract(images, root / "codes.h5", backbone="vgg16", weights="none",
            image_size=SMALL, layers=["block4", "last"], pooling="avg",
            progress=False)  # fmt: skip
    with FeatureStore(root / "codes.h5") as store:
        pixels = load_pngs(images, store.paths)
    return root, pixels


def save_probe(root, name, classifier="logreg", normalization="standard", pca=None,
               layer="block5_pool", binary=False, whiten=False):  # fmt: skip
    """Fit and save a probe on `layer` of the probe store; binary: cat vs other."""
    with FeatureStore(root / "codes.h5") as codes:
        X, y = codes.read(layer), codes.labels
        if binary:
            y = (y == 2).astype(int)
        pipeline = make_pipeline(classifier, normalization, pca)
        if pca:
            pipeline.set_params(pca__whiten=whiten)
        pipeline.fit(X, y)
        names = ["other", "cat"] if binary else None
        save_classifier(root / name, pipeline, store=codes, layer=layer,
                        classifier=classifier, params={}, normalization=normalization,
                        pca=pca, class_names=names)  # fmt: skip
    return load_classifier(root / name), X


@pytest.mark.parametrize(
    "classifier, normalization, pca, whiten, binary",
    [
        ("logreg", "standard", None, False, False),
        ("logreg", "l2", None, False, False),
        ("logreg", "standard", None, False, True),
        ("linear_svm", "none", 6, True, False),
        ("ridge", "standard", 4, False, True),
        ("sgd", "l2", None, False, False),
    ],
)
def test_init_head_predicts_what_the_saved_probe_predicts(
    probe_codes, classifier, normalization, pca, whiten, binary
):
    root, pixels = probe_codes
    name = f"{classifier}_{normalization}_{pca}_{whiten}_{binary}"
    saved, codes = save_probe(root, name, classifier, normalization, pca,
                              binary=binary, whiten=whiten)  # fmt: skip
    settings = FineTuneSettings.create(
        backbone="vgg16", weights="none", from_scratch=False, image_size=SMALL,
        init_head=str(root / name),
    )  # fmt: skip
    names = saved.class_names
    net = build_model(settings, len(names))
    initialise_head(net, saved_probe(saved, names), codes)
    model = net.model
    pooled = keras.Model(model.input, model.get_layer("pool").output)(pixels)
    head_logits = keras.Model(net.head.input, net.head.get_layer("logits").output)
    logits = np.asarray(head_logits(pooled))
    probabilities = np.asarray(model(pixels))

    np.testing.assert_array_equal(probabilities.argmax(axis=1), saved.predict(codes))
    decision = saved.pipeline.decision_function(codes)
    if binary:  # logits [0, z] with z the binary decision value
        np.testing.assert_array_equal(logits[:, 0], 0.0)
        logits = logits[:, 1]
    np.testing.assert_allclose(logits, decision, rtol=1e-4, atol=1e-4)
    if classifier == "logreg":
        expected = saved.pipeline.predict_proba(codes)
        np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_an_lpft_run_without_training_reports_what_the_probe_predicts(
    probe_codes, tmp_path
):
    root, _ = probe_codes
    saved, _ = save_probe(root, "lpft_probe")
    images = root / "images"
    code = fine_tune.main(
        [str(images), "-o", str(tmp_path), "--backbone", "vgg16", "--weights",
         "none", "--no-from-scratch", "--image-size", str(SMALL), "--init-head",
         str(root / "lpft_probe"), "--epochs", "0", "--val-split", "0.2", "--quiet"]
    )  # fmt: skip
    assert code == 0
    results = pd.read_csv(tmp_path / "results.csv")
    assert set(results["classifier"]) == {"linear+lpft"}
    test = pd.read_csv(tmp_path / "splits.csv").query("split == 'test'")
    with FeatureStore(root / "codes.h5") as store:
        row = {path: i for i, path in enumerate(store.paths)}
        relative = [str(Path(p).relative_to(images.resolve())) for p in test["path"]]
        codes = store.read("block5_pool")[[row[path] for path in relative]]
    truth = [saved.class_names.index(label) for label in test["label"]]
    expected = classification_metrics(truth, saved.predict(codes))
    reported = dict(zip(results["metric"], results["value"], strict=True))
    for metric, value in expected.items():
        assert reported[metric] == pytest.approx(value)


def test_init_head_refuses_probes_of_other_codes_or_classifiers(
    probe_codes, tmp_path, capsys
):
    root, _ = probe_codes
    images = write_png_tree(tmp_path / "images", {"ant": 3, "bee": 3, "cat": 3})
    base = [str(images), "-o", str(tmp_path / "run"), "--backbone", "vgg16",
            "--weights", "none", "--no-from-scratch",
            "--image-size", str(SMALL)]  # fmt: skip

    def refused(probe: str, *extra: str) -> str:
        assert fine_tune.main([*base, "--init-head", str(root / probe), *extra]) == 2
        return capsys.readouterr().err

    save_probe(root, "block4_probe", layer="block4_pool")
    assert "layer: probe has 'block4_pool', this model 'block5_pool'" in refused(
        "block4_probe"
    )
    save_probe(root, "good_probe")
    assert "seed: probe has 0, this model 3" in refused("good_probe", "--seed", "3")
    assert "image_size: probe has [32, 32], this model [48, 48]" in refused(
        "good_probe", "--image-size", "48"
    )
    assert "pooling: probe has 'avg', this model 'max'" in refused(
        "good_probe", "--pooling", "max"
    )
    other = root / "other_backbone"
    shutil.copytree(root / "good_probe", other, dirs_exist_ok=True)
    meta = json.loads((other / "metadata.json").read_text())
    meta["extraction"]["backbone"] = "vgg19"
    (other / "metadata.json").write_text(json.dumps(meta))
    assert "backbone: probe has 'vgg19', this model 'vgg16'" in refused(
        "other_backbone"
    )
    edited = root / "relabelled_probe"
    shutil.copytree(root / "good_probe", edited, dirs_exist_ok=True)
    edit_json(edited, lambda metadata: metadata["class_names"].reverse())
    assert "was edited: its class_names ['cat', 'bee', 'ant']" in refused(
        "relabelled_probe"
    )
    save_probe(root, "knn_probe", classifier="knn")
    assert "needs a linear classifier" in refused("knn_probe")
    save_probe(root, "binary_probe", binary=True)
    assert "trained on classes ['other', 'cat']" in refused("binary_probe")
    assert "cannot initialise --head mlp" in refused("good_probe", "--head", "mlp")


# ---------------------------------------------------------------------------------
# Unfreezing, regularisation, errors


def names_of(layers) -> list[str]:
    return [layer.name for layer in layers]


def test_unfreeze_selects_blocks_layers_and_fractions():
    spec = get_backbone("vgg16")
    vgg, _ = build_backbone(spec, (SMALL, SMALL), "none")
    layers = [layer.name for layer in vgg.layers[1:]]  # after the input layer
    convs = [name for name in layers if "conv" in name]

    def select(unfreeze):
        return names_of(unfrozen_layers(vgg, spec, unfreeze))

    assert select("block5") == [n for n in layers if n.startswith("block5_")]
    assert select("last") == select("block5")
    assert select("block4") == [n for n in layers if n[:6] in ("block4", "block5")]
    assert select("block4_conv2") == layers[layers.index("block4_conv2") :]
    assert select("all") == layers
    start = convs[-math.ceil(0.5 * len(convs))]  # the top half of 13 conv layers
    assert select("0.5") == layers[layers.index(start) :]
    with pytest.raises(
        TLError, match=r"Unknown layer 'conv9' for vgg16\..*Or pass all"
    ):
        select("conv9")
    with pytest.raises(TLError, match="no weights to train"):
        select("block5_pool")

    spec = get_backbone("resnet50")
    resnet, _ = build_backbone(spec, (SMALL, SMALL), "none")
    conv5 = [layer.name for layer in resnet.layers if layer.name.startswith("conv5_")]
    assert names_of(unfrozen_layers(resnet, spec, "conv5")) == conv5


def test_l2_sp_penalises_distance_to_the_pretrained_weights_of_trained_layers():
    settings = FineTuneSettings.create(
        backbone="vgg16", weights="none", from_scratch=False, image_size=SMALL,
        l2_sp=0.1, unfreeze="block5",
    )  # fmt: skip
    net = build_model(settings, 3)
    kernel = net.backbone.get_layer("block5_conv1").kernel
    delta = np.random.default_rng(0).normal(0, 0.01, kernel.shape).astype("float32")
    kernel.assign(np.asarray(kernel) + delta)
    net.set_stage(2)
    penalty = sum(float(loss) for loss in net.model.losses)
    expected = 0.05 * np.sum(delta.astype(np.float64) ** 2)
    assert penalty == pytest.approx(expected, rel=1e-4)
    net.set_stage(1)  # a frozen backbone is not penalised
    assert sum(float(loss) for loss in net.model.losses) == 0.0


def test_balanced_class_weights_match_scikit_learn():
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose(class_weights(labels, 3), expected)


def test_half_precision_model_keeps_a_float32_head():
    base = dict(backbone="vgg16", weights="none", from_scratch=False,
                image_size=SMALL, dropout=0.0)  # fmt: skip
    pixels = np.random.default_rng(0).uniform(0, 255, (4, SMALL, SMALL, 3))
    full = build_model(FineTuneSettings.create(**base), 3).model
    half = build_model(FineTuneSettings.create(**base, precision="bfloat16"), 3).model
    assert half.get_layer("backbone").compute_dtype == "bfloat16"
    assert half.get_layer("head").get_layer("logits").compute_dtype == "float32"
    outputs = np.asarray(half(pixels.astype("float32")))
    assert outputs.dtype == np.float32
    np.testing.assert_allclose(outputs, np.asarray(full(pixels)), atol=0.05)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--unfreeze", "conv9"], "Unknown layer 'conv9' for vgg16"),
        (["--val-split", "1"], "The --val-split option must be in [0, 1). Got 1.0"),
        (
            ["--head-init", "random", "--head-epochs", "0", "--epochs", "0"],
            "Nothing to train",
        ),
    ],
)
def test_bad_arguments_are_named(png_tree, tmp_path, capsys, arguments, message):
    argv = [str(png_tree), "-o", str(tmp_path / "run"), "--backbone", "vgg16",
            "--weights", "none", "--no-from-scratch", "--image-size", str(SMALL),
            *arguments]  # fmt: skip
    assert fine_tune.main(argv) == 2
    assert message in capsys.readouterr().err


def test_empty_or_single_classes_are_refused(tmp_path, capsys):
    images = write_png_tree(tmp_path / "images", {"ant": 3, "bee": 3})
    (images / "cat").mkdir()
    argv = [str(images), "-o", str(tmp_path / "run"), "--backbone", "vgg16",
            "--weights", "none", "--image-size", str(SMALL)]  # fmt: skip
    assert fine_tune.main(argv) == 2
    assert "Class 'cat' of" in capsys.readouterr().err
    shutil.rmtree(images / "cat")
    shutil.rmtree(images / "bee")
    assert fine_tune.main(argv) == 2
    assert "has one class ('ant')" in capsys.readouterr().err
