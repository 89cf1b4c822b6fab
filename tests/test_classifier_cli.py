"""train_classifier.py and predict.py end to end on tiny generated images."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import skops.io
from conftest import (
    SMALL,
    assert_one_line_error,
    blobs,
    edit_json,
    record_sha256,
    settings,
    truncate,
    write_png_tree,
)

import predict
import train_classifier
from tl.classifiers import load_classifier, make_pipeline
from tl.features import extract
from tl.store import FeatureStore


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Codes of 3 classes of random PNGs (a weights file), and a comparison of them."""
    root = tmp_path_factory.mktemp("cli")
    images = write_png_tree(root / "images", {"ant": 8, "bee": 8, "cat": 8}, seed=4)
    weights = root / "vgg16.weights.h5"
    keras.utils.set_random_seed(1)
    keras.applications.VGG16(
        include_top=False, weights=None, input_shape=(SMALL, SMALL, 3)
    ).save_weights(weights)
    store = root / "codes.h5"
    extract(
        images,
        store,
        settings(layers=["block3", "block5"], weights=str(weights)),
        progress=False,
    )
    output = root / "results"
    code = train_classifier.main(
        [
            str(store),
            "--classifiers",
            "logreg",
            "ridge",
            "--cv",
            "3",
            "--jobs",
            "1",
            "--output-dir",
            str(output),
            "--save",
            "all",
            "-q",
        ]
    )
    assert code == 0
    return {
        "root": root,
        "images": images,
        "store": store,
        "output": output,
        "weights": weights,
    }


def test_writes_leaderboard_results_plots_and_models(trained, capsys):
    output = trained["output"]
    for name in [
        "results.csv",
        "results.json",
        "leaderboard.csv",
        "run.json",
        "accuracy_per_layer.png",
        "confusion_matrix.png",
        "best_model/model.skops",
        "best_model/metadata.json",
        "models/block3_pool__ridge/model.skops",
    ]:
        assert (output / name).is_file(), name
    results = pd.read_csv(output / "results.csv")
    assert set(results.layer) == {"block3_pool", "block5_pool"}
    assert set(results.classifier) == {"logreg", "ridge"}
    assert set(results.metric) >= {"accuracy", "balanced_accuracy", "macro_f1"}
    run = json.loads((output / "run.json").read_text())
    assert run["protocol"] == "holdout"
    assert run["store_settings"]["backbone"] == "vgg16"
    assert run["arguments"]["classifiers"] == ["logreg", "ridge"]
    assert "scikit-learn" in run["versions"]


def test_saved_model_predicts_like_the_winner_on_the_store(trained):
    """The saved model is the leaderboard's winner: the same predictions as its
    pipeline refit independently on the training rows with the chosen parameters,
    and the reported test accuracy on the held-out rows."""
    model = load_classifier(trained["output"] / "best_model")
    best = pd.read_csv(trained["output"] / "leaderboard.csv").iloc[0]
    assert (model.layer, model.metadata["classifier"]) == (best.layer, best.classifier)
    with FeatureStore(trained["store"]) as store:
        model.check_codes(store)
        codes, labels = store.read(model.layer).astype(np.float64), store.labels
    run = json.loads((trained["output"] / "run.json").read_text())
    test = np.array(run["split"]["test_rows"])
    train = np.setdiff1d(np.arange(len(labels)), test)
    params = {f"classifier__{k}": v for k, v in json.loads(best.params).items()}
    winner = make_pipeline(best.classifier).set_params(**params)
    winner.fit(codes[train], labels[train])
    predicted = model.predict(codes)
    np.testing.assert_array_equal(predicted, winner.predict(codes))
    accuracy = (predicted[test] == labels[test]).mean()
    assert accuracy == pytest.approx(best.test_accuracy)


def test_predict_on_images_equals_extract_then_classify(trained, tmp_path):
    images = shutil.copytree(trained["images"], tmp_path / "images")
    (images / "bee" / "zz_broken.png").write_bytes(b"\x89PNG nope")
    csv = tmp_path / "predictions.csv"
    model_dir = str(trained["output"] / "best_model")
    code = predict.main([model_dir, str(images), "-o", str(csv), "-q"])
    assert code == 0
    table = pd.read_csv(csv, keep_default_na=False)
    model = load_classifier(trained["output"] / "best_model")
    with FeatureStore(trained["store"]) as store:
        expected = dict(
            zip(
                store.paths,
                [model.class_names[i] for i in model.predict(store.read(model.layer))],
                strict=True,
            )
        )
    ok = table[table.error == ""]
    assert len(ok) == 24
    assert dict(zip(ok.path, ok.predicted, strict=True)) == expected
    assert (ok.true == [p.split("/")[0] for p in ok.path]).all()
    broken = table[table.path == "bee/zz_broken.png"]
    assert broken.error.item().startswith("cannot decode")


def test_predict_shows_absolute_paths_of_files_given_one_by_one(
    trained, tmp_path, monkeypatch
):
    monkeypatch.chdir(trained["images"])
    first = trained["images"] / "ant" / "img_000.png"
    csv = tmp_path / "predictions.csv"
    model = str(trained["output"] / "best_model")
    args = [model, str(first), "bee/img_001.png", "-o", str(csv), "-q"]
    assert predict.main(args) == 0
    table = pd.read_csv(csv, keep_default_na=False)
    assert table.path.tolist() == [
        str(first),
        str(trained["images"] / "bee" / "img_001.png"),
    ]
    assert (table.error == "").all()


def test_predict_refuses_when_the_weights_file_changed(trained, tmp_path, capsys):
    folder = copy_of_best_model(trained, tmp_path)
    weights = tmp_path / "vgg16.weights.h5"
    edit_json(folder, lambda m: m["extraction"].update(weights=str(weights)))
    keras.utils.set_random_seed(2)  # other weights than the model was trained with
    keras.applications.VGG16(
        include_top=False, weights=None, input_shape=(SMALL, SMALL, 3)
    ).save_weights(weights)
    code = predict_with(folder, trained, tmp_path)
    trained_with = json.loads((folder / "metadata.json").read_text())["extraction"]
    assert_one_line_error(
        capsys,
        code,
        f"weights_sha256: at training {trained_with['weights_sha256']!r}, now",
        f"Use the weights file it was trained with ({str(weights)!r})",
    )


def test_incomplete_store_is_refused_with_how_to_finish(tmp_path, png_tree, capsys):
    store = tmp_path / "codes.h5"

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(
            png_tree,
            store,
            settings(layers=["block2"]),
            batch_size=4,
            progress=False,
            on_batch=stop,
        )
    code = train_classifier.main([str(store), "-o", str(tmp_path / "r"), "-q"])
    assert code == 2
    assert "incomplete (4 of 15 images processed)" in capsys.readouterr().err
    assert not np.any([p.exists() for p in (tmp_path / "r").glob("*")])


# ---------------------------------------------------------------------------------
# Model folders are data: damaged, edited or foreign folders are refused in one line


def copy_of_best_model(trained, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(trained["output"] / "best_model", folder)
    return folder


def predict_with(folder: Path, trained, tmp_path) -> int:
    csv = tmp_path / "predictions.csv"
    return predict.main([str(folder), str(trained["images"]), "-o", str(csv), "-q"])


def edit_layer(metadata):
    """Point the model at the store's other layer (block3_pool or block5_pool)."""
    other = ({"block3_pool", "block5_pool"} - {metadata["layer"]}).pop()
    metadata["layer"] = metadata["layer_info"]["key"] = other
    metadata["layer_info"]["layer"] = other


def replace_with_a_bare_pipeline(folder):
    """A pipeline of trusted types saved with skops by hand: not tl's format."""
    skops.io.dump(make_pipeline("logreg").fit(*blobs()), folder / "model.skops")
    record_sha256(folder, "model.skops")


def truncate_model_and_rehash(folder):
    truncate(folder / "model.skops")
    record_sha256(folder, "model.skops")


@pytest.mark.parametrize(
    "damage, fragments",
    [
        (  # was json.JSONDecodeError
            lambda folder: truncate(folder / "metadata.json"),
            ["metadata.json", "not valid JSON"],
        ),
        (  # was KeyError
            lambda folder: edit_json(folder, lambda m: m.pop("extraction")),
            ["metadata.json", "lacks 'extraction'", "train_classifier.py"],
        ),
        (  # was a scikit-learn ValueError (codes of another width)
            lambda folder: edit_json(folder, edit_layer),
            ["metadata.json", "was edited: its layer '"],
        ),
        (  # was silently relabelled
            lambda folder: edit_json(folder, lambda m: m["class_names"].reverse()),
            ["was edited: its class_names ['cat', 'bee', 'ant']", "model.skops"],
        ),
        (  # was ValueError / KeyError from the deserialiser
            lambda folder: truncate(folder / "model.skops"),
            ["model.skops", "changed or truncated"],
        ),
        (
            truncate_model_and_rehash,
            ["model.skops", "cannot be read (BadZipFile"],
        ),
        (
            replace_with_a_bare_pipeline,
            ["model.skops", "does not hold a tl pipeline"],
        ),
        (
            lambda folder: (folder / "model.skops").unlink(),
            ["model.skops", "is missing"],
        ),
    ],
    ids=[
        "truncated metadata.json",
        "missing key",
        "edited layer",
        "reordered class_names",
        "truncated model file",
        "truncated model file with its hash updated",
        "a pipeline saved by hand",
        "missing model file",
    ],
)
def test_damaged_or_edited_model_folders_are_refused_in_one_line(
    trained, tmp_path, capsys, damage, fragments
):
    folder = copy_of_best_model(trained, tmp_path)
    damage(folder)
    assert_one_line_error(capsys, predict_with(folder, trained, tmp_path), *fragments)
    assert not (tmp_path / "predictions.csv").exists()


class ShellCommand:
    """What a foreign model file can hold: unpickling it runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_foreign_pickle_never_runs(trained, tmp_path, capsys):
    """The report: a model.joblib replaced by a pickle whose `__reduce__` calls
    `os.system` ran its command inside predict.py."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(ShellCommand(f"touch {marker}"))
    old = copy_of_best_model(trained, tmp_path / "old")  # a folder of an older tl
    (old / "model.skops").unlink(missing_ok=True)
    (old / "model.joblib").write_bytes(payload)
    edit_json(old, lambda m: m.update(schema_version=1) or m.pop("files", None))
    code = predict_with(old, trained, tmp_path)
    assert not marker.exists()
    assert_one_line_error(capsys, code, "model.joblib", "no longer loads pickles")

    disguised = copy_of_best_model(trained, tmp_path / "disguised")
    (disguised / "model.skops").write_bytes(payload)
    record_sha256(disguised, "model.skops")
    code = predict_with(disguised, trained, tmp_path)
    assert not marker.exists()
    assert_one_line_error(capsys, code, "model.skops", "cannot be read")

    pickle.loads(payload)  # the payload is live: unpickled, it runs
    assert marker.exists()


class Payload:
    """A class from outside tl: skops would build it by calling its __setstate__."""

    def __setstate__(self, state):
        Path(state["marker"]).touch()


def test_a_model_file_with_an_untrusted_type_is_refused_naming_it(
    trained, tmp_path, capsys
):
    marker = tmp_path / "ran"
    folder = copy_of_best_model(trained, tmp_path)
    metadata = json.loads((folder / "metadata.json").read_text())
    payload = Payload()
    payload.__dict__["marker"] = str(marker)
    content = {key: metadata[key] for key in ("class_names", "layer", "layer_info")}
    skops.io.dump({"pipeline": payload, **content}, folder / "model.skops")
    record_sha256(folder, "model.skops")
    name = f"{Payload.__module__}.{Payload.__qualname__}"
    code = predict_with(folder, trained, tmp_path)
    assert not marker.exists()
    assert_one_line_error(capsys, code, f"types tl does not trust: {name}")

    skops.io.load(folder / "model.skops", trusted=[name])  # trusted, its code runs
    assert marker.exists()
