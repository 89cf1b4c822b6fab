"""Every user error in the four scripts is one line, exit code 2, no traceback.

Each case runs through a script's `main([...])`, as a user would type it, and is
checked with conftest's `assert_one_line_error`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import (
    SMALL,
    assert_one_line_error,
    blobs,
    settings,
    write_png_tree,
    write_store,
)

import extract_features
import fine_tune
import predict
import train_classifier
from tl.cli import ArgumentParser, run_cli
from tl.features import extract

NAMES = ["a", "b", "c"]
TINY = ["--backbone", "vgg16", "--weights", "none", "--image-size", str(SMALL), "-q"]


@pytest.fixture(scope="module", params=["read-only tmpfs", "/proc"])
def read_only(request, tmp_path_factory):
    """A folder where no file can be created, even by root (tests run as root here,
    so permissions do not stop them): a read-only tmpfs, where this machine lets us
    mount one, and /proc, whose entries only the kernel makes."""
    if request.param == "/proc":
        try:
            tempfile.TemporaryFile(dir="/proc").close()
        except OSError:
            yield Path("/proc")
            return
        pytest.skip("/proc takes new files here")
    folder = tmp_path_factory.mktemp("read_only")
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)]
    if (
        not shutil.which("mount")
        or subprocess.run(mount, capture_output=True).returncode
    ):
        pytest.skip("cannot mount a read-only tmpfs here")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], capture_output=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_png_tree(
        tmp_path_factory.mktemp("images") / "images", {"ant": 6, "bee": 6, "cat": 6}
    )


@pytest.fixture(scope="module")
def codes(images, tmp_path_factory):
    """A feature store of the images (tiny random-weight VGG16, one layer)."""
    path = tmp_path_factory.mktemp("codes") / "codes.h5"
    extract(images, path, settings(layers=["block5"]), progress=False)
    return path


def _never(*args, **kwargs):
    raise AssertionError("reached expensive work before refusing the output")


def _train(*arguments) -> int:
    return train_classifier.main([*arguments, "--cv", "2", "--jobs", "1", "-q"])


# ---------------------------------------------------------------------------------
# Outputs: refused in one line before any expensive work


@pytest.mark.parametrize(
    "script", ["extract", "merge", "train", "predict", "fine_tune"]
)
def test_unwritable_output_is_one_line_before_any_work(
    script, read_only, images, codes, tmp_path, monkeypatch, capsys
):
    target = read_only / "new" / "out"
    monkeypatch.setattr("tl.features.extract", _never)
    monkeypatch.setattr("tl.store.merge_stores", _never)
    monkeypatch.setattr("tl.evaluation.compare", _never)
    monkeypatch.setattr("tl.prediction.predict_images", _never)
    monkeypatch.setattr("tl.finetune.fine_tune", _never)
    code = {
        "extract": lambda: extract_features.main(
            [str(images), *TINY, "-o", f"{target}.h5"]
        ),
        "merge": lambda: extract_features.main(
            ["--merge", str(codes), "-o", f"{target}.h5"]
        ),
        "train": lambda: _train(str(codes), "-o", str(target)),
        "predict": lambda: predict.main(
            [str(tmp_path), str(images), "-o", f"{target}.csv"]
        ),
        "fine_tune": lambda: fine_tune.main([str(images), *TINY, "-o", str(target)]),
    }[script]()
    line = assert_one_line_error(capsys, code, "Cannot write", str(target))
    assert "writable location" in line


@pytest.mark.parametrize("script", ["extract", "predict"])
def test_a_folder_where_a_file_is_expected_is_one_line(
    script, images, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr("tl.features.extract", _never)
    monkeypatch.setattr("tl.prediction.predict_images", _never)
    if script == "extract":
        code = extract_features.main([str(images), *TINY, "-o", str(tmp_path)])
    else:
        code = predict.main([str(tmp_path), str(images), "-o", str(tmp_path)])
    assert_one_line_error(capsys, code, repr(str(tmp_path)), "is a folder")


def test_a_file_where_a_folder_is_expected_is_one_line(codes, tmp_path, capsys):
    taken = tmp_path / "results.txt"
    taken.write_text("mine")
    assert_one_line_error(capsys, _train(str(codes), "-o", str(taken)), "is a file")
    below = taken / "deeper"
    assert_one_line_error(
        capsys, _train(str(codes), "-o", str(below)), "which is a file, not a folder"
    )
    assert taken.read_text() == "mine"


def test_unexpected_os_errors_are_one_line_naming_the_file(capsys):
    def full_disk(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/codes.h5")

    code = run_cli(ArgumentParser, full_disk, [])
    assert_one_line_error(capsys, code, "No space left on device", "'/data/codes.h5'")

    def renamed(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/a.tmp", None, "/b")

    code = run_cli(ArgumentParser, renamed, [])
    assert_one_line_error(capsys, code, "Permission denied", "'/a.tmp' -> '/b'")


@pytest.mark.parametrize(
    "script, arguments, line",
    [
        (
            "fine_tune",
            ["--lr", "0"],
            "error: The --lr option must be > 0. Got 0.0 instead.",
        ),
        (
            "fine_tune",
            ["--head-lr", "-1"],
            "error: The --head-lr option must be > 0. Got -1.0 instead.",
        ),
        (
            "fine_tune",
            # random weights train from scratch, which unfreezes everything
            ["--unfreeze", "1.5", "--no-from-scratch"],
            "error: The --unfreeze option must be in (0, 1]. Got 1.5 instead. To "
            "train the head only, pass --epochs 0.",
        ),
        (
            "extract",
            ["--max-pixels", "0"],
            "error: The --max-pixels option must be an integer >= 1. Got 0 instead.",
        ),
        (
            "extract",
            ["--image-size", "32y32"],
            "error: The --image-size option must be N or HxW with positive sides "
            "(e.g. 224 or 224x299). Got '32y32' instead.",
        ),
        (
            "extract",
            ["--shard", "2-2"],
            "error: The --shard option must be I/N (e.g. 0/4). Got '2-2' instead.",
        ),
        (
            "extract",
            ["--pooling", "mean"],
            "error: The --pooling option must be one of 'avg', 'max', 'avgmax', "
            "'flatten', 'none' or 'grid:GHxGW' (e.g. 'grid:2x2'). Got 'mean' instead.",
        ),
    ],
)
def test_a_bad_value_is_named_by_its_option(
    script, arguments, line, images, tmp_path, monkeypatch, capsys
):
    """Settings fields and options may be spelt apart (learning_rate is --lr): the
    error names the option the user typed."""
    monkeypatch.setattr("tl.features.extract", _never)
    monkeypatch.setattr("tl.finetune.fine_tune", _never)
    main = {"extract": extract_features.main, "fine_tune": fine_tune.main}[script]
    code = main([str(images), *TINY, "-o", str(tmp_path / "out"), *arguments])
    assert assert_one_line_error(capsys, code) == line


def test_a_bad_value_of_a_comparison_is_named_by_its_option(codes, tmp_path, capsys):
    code = train_classifier.main([str(codes), "-o", str(tmp_path), "--cv", "1"])
    line = assert_one_line_error(capsys, code)
    assert line == "error: The --cv option must be an integer >= 2. Got 1 instead."


# ---------------------------------------------------------------------------------
# Classifiers: argument order, predictions into a new folder, data problems


@pytest.fixture(scope="module")
def model(codes, tmp_path_factory):
    """A logistic regression saved by train_classifier.py, its store before -c."""
    output = tmp_path_factory.mktemp("model")
    assert _train("-c", "logreg", str(codes), "-o", str(output)) == 0
    return output


def test_classifiers_before_the_store_equal_classifiers_after_it(
    model, codes, tmp_path
):
    assert _train(str(codes), "-c", "logreg", "-o", str(tmp_path)) == 0
    folders = (model, tmp_path)
    leaderboards = [pd.read_csv(f / "leaderboard.csv") for f in folders]
    pd.testing.assert_frame_equal(
        *[table.drop(columns="fit_seconds") for table in leaderboards]
    )
    results = [pd.read_csv(f / "results.csv") for f in folders]
    pd.testing.assert_frame_equal(
        *[table[table.metric != "fit_seconds"] for table in results]
    )
    run = json.loads((model / "run.json").read_text())
    assert run["arguments"]["classifiers"] == ["logreg"]
    assert run["arguments"]["store"] == str(codes)


def test_a_real_mistake_among_classifiers_is_still_one_line(codes, tmp_path, capsys):
    code = _train(str(codes), "-c", "logreg", "logregg", "-o", str(tmp_path))
    assert_one_line_error(capsys, code, "invalid choice: 'logregg'", "logreg, ")
    code = _train("-c", "logregg", str(codes), "-o", str(tmp_path))
    assert_one_line_error(capsys, code, "invalid choice: 'logregg'")
    assert_one_line_error(capsys, _train(str(codes), "--cv", "x"), "invalid int value")
    assert_one_line_error(capsys, _train("-o", str(tmp_path)), "Give the feature store")
    assert not any(tmp_path.iterdir())


def test_predictions_go_into_a_new_folder(model, images, tmp_path):
    csv = tmp_path / "new" / "deeper" / "predictions.csv"
    assert (
        predict.main([str(model / "best_model"), str(images), "-o", str(csv), "-q"])
        == 0
    )
    assert len(pd.read_csv(csv)) == 18


def test_a_layer_nan_in_every_row_is_one_line_naming_it(tmp_path, capsys):
    X, y = blobs(n_per_class=10)
    dead = np.full_like(X, np.nan)
    store = write_store(tmp_path / "s.h5", {"good": X, "dead": dead}, y, NAMES)
    code = _train(str(store), "--drop-nonfinite", "-o", str(tmp_path / "r"))
    assert_one_line_error(capsys, code, "in layer(s) dead", "--layers good")
    X[10:] = np.nan
    store = write_store(tmp_path / "t.h5", {"c": X}, y, NAMES)
    code = _train(str(store), "--drop-nonfinite", "-o", str(tmp_path / "r"))
    assert_one_line_error(capsys, code, "only 'a' (10 images) after dropping 20 rows")


def test_shots_beyond_the_smallest_class_use_what_is_possible(tmp_path, capsys):
    X, y = blobs(n_per_class=10)
    store = write_store(tmp_path / "s.h5", {"c": X}, y, NAMES)
    output = tmp_path / "r"
    code = _train(str(store), "-c", "logreg", "--shots", "2", "1000", "-o", str(output))
    assert code == 0
    note = "shots 1000 per class: the smallest class 'a' has only 8 training rows"
    assert note in capsys.readouterr().err
    assert any(
        note in a for a in json.loads((output / "run.json").read_text())["adjustments"]
    )
    results = pd.read_csv(output / "results.csv")
    assert sorted(set(results[results.protocol == "low_shot"].shots)) == [2, 8]
    assert (output / "low_shot.png").is_file()


# ---------------------------------------------------------------------------------
# Other scripts' list options leave the positional alone


def test_list_options_before_the_source_leave_it_to_the_source(images):
    parse = extract_features.build_parser().parse_args
    expected = parse([str(images), "--layers", "block3", "block4", "-p", "avg"])
    moved = parse(["--layers", "block3", "block4", "-p", "avg", str(images)])
    assert vars(moved) == vars(expected)
    assert moved.source == str(images) and moved.layers == ["block3", "block4"]
    given = parse([str(images), "--layers", "block3", str(images)])  # a real mistake
    assert given.layers == ["block3", str(images)]  # left to the layer check
    parse = fine_tune.build_parser().parse_args
    assert vars(parse(["--augment", "flip", "zoom", str(images)])) == vars(
        parse([str(images), "--augment", "flip", "zoom"])
    )
