"""Extraction end to end: codes against an independent computation, order, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import SMALL, assert_same_store, load_pngs, settings, write_png_tree

from tl.errors import TLError
from tl.features import Pooling, extract, resume
from tl.locking import lock_path
from tl.store import FeatureStore, merge_stores


def numpy_pool(maps: np.ndarray, pooling: str) -> np.ndarray:
    """Reference pooling of (N, H, W, C) maps, written independently of tl."""
    n, h, w, _c = maps.shape
    if pooling == "avg":
        return maps.mean(axis=(1, 2))
    if pooling == "max":
        return maps.max(axis=(1, 2))
    if pooling == "avgmax":
        return np.concatenate([maps.mean(axis=(1, 2)), maps.max(axis=(1, 2))], axis=1)
    if pooling == "flatten":
        return maps.reshape(n, -1)
    if pooling == "none":
        return maps
    gh, gw = (int(v) for v in pooling.split(":")[1].split("x"))
    cells = []
    for i in range(gh):  # PyTorch adaptive_avg_pool2d bins
        top, bottom = (i * h) // gh, -((-(i + 1) * h) // gh)
        for j in range(gw):
            left, right = (j * w) // gw, -((-(j + 1) * w) // gw)
            cells.append(maps[:, top:bottom, left:right, :].mean(axis=(1, 2)))
    return np.concatenate(cells, axis=1)


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    """A random VGG16 (no top) saved as a weights file: the independent computation
    loads the same file into a plain Keras model."""
    path = tmp_path_factory.mktemp("weights") / "vgg16_random.weights.h5"
    keras.utils.set_random_seed(123)
    model = keras.applications.VGG16(
        include_top=False, weights=None, input_shape=(SMALL, SMALL, 3)
    )
    model.save_weights(path)
    return path


@pytest.mark.parametrize(
    "layers, poolings",
    [
        (["block1_conv2", "block3_pool", "block5_pool"], ["avg"]),
        (["block2_pool", "block4_conv3"], ["max", "avgmax"]),
        (["block3_pool", "block4_pool"], ["grid:2x2", "grid:3x2"]),
        (["block2_pool", "block5_pool"], ["flatten", "none"]),
    ],
)
def test_codes_equal_plain_keras_model_and_numpy_pooling(
    png_tree, tmp_path, vgg_weights, layers, poolings
):
    output = tmp_path / "codes.h5"
    extract(
        png_tree,
        output,
        settings(layers=layers, pooling=poolings, weights=str(vgg_weights)),
        batch_size=4,
        progress=False,
    )
    model = keras.applications.VGG16(
        include_top=False, weights=None, input_shape=(SMALL, SMALL, 3)
    )
    model.load_weights(vgg_weights)
    with FeatureStore(output) as store:
        pixels = load_pngs(png_tree, store.paths)
        inputs = keras.applications.vgg16.preprocess_input(pixels.copy())
        poolings = poolings * len(layers) if len(poolings) == 1 else poolings
        for layer, pooling in zip(layers, poolings, strict=True):
            plain = keras.Model(model.input, model.get_layer(layer).output)
            expected = numpy_pool(plain.predict(inputs, verbose=0), pooling)
            got = store.read(layer)
            assert got.shape == expected.shape
            np.testing.assert_allclose(
                got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
            )


def test_rows_follow_sorted_classes_and_files(png_tree, tmp_path):
    output = tmp_path / "codes.h5"
    extract(png_tree, output, settings(layers=["block2"]), batch_size=4, progress=False)
    with FeatureStore(output) as store:
        assert store.class_names == ["ant", "bee", "cat"]
        expected_paths = [
            f"{name}/img_{i:03d}.png"
            for name, count in (("ant", 5), ("bee", 4), ("cat", 6))
            for i in range(count)
        ]
        assert store.paths == expected_paths
        assert store.labels.tolist() == [0] * 5 + [1] * 4 + [2] * 6
        assert store.positions.tolist() == list(range(15))
        # the codes of each row are those of the image at that path
        single = tmp_path / "single.h5"
        write_png_tree(tmp_path / "one", {"x": 0})
        (tmp_path / "one" / "x" / "a.png").write_bytes(
            (png_tree / expected_paths[7]).read_bytes()
        )
        extract(tmp_path / "one", single, settings(layers=["block2"]), progress=False)
        with FeatureStore(single) as alone:
            np.testing.assert_allclose(
                alone.read("block2_pool")[0],
                store.read("block2_pool")[7],
                rtol=1e-5,
                atol=1e-6,
            )


def test_three_layers_in_one_pass_equal_separate_runs(png_tree, tmp_path):
    together = tmp_path / "together.h5"
    extract(png_tree, together, settings(), progress=False)
    with FeatureStore(together) as store:
        for layer in store.layers:
            alone = tmp_path / f"{layer}.h5"
            requested = store.layer_info[store.layers.index(layer)]["requested"]
            extract(png_tree, alone, settings(layers=[requested]), progress=False)
            with FeatureStore(alone) as single:
                np.testing.assert_allclose(
                    store.read(layer), single.read(layer), rtol=1e-5, atol=1e-6
                )


def test_metadata_records_how_codes_were_made(png_tree, tmp_path, vgg_weights):
    from tl.backbones import sha256_of_file

    output = tmp_path / "codes.h5"
    extract(
        png_tree,
        output,
        settings(weights=str(vgg_weights), dtype="float16"),
        progress=False,
    )
    with FeatureStore(output) as store:
        assert store.settings["backbone"] == "vgg16"
        assert store.settings["weights_sha256"] == sha256_of_file(vgg_weights)
        provenance = store.provenance
        assert provenance["weights"]["source"] == "file"
        assert provenance["preprocessing"] == "caffe"
        assert provenance["versions"]["keras"] == keras.__version__
        info = {i["requested"]: i for i in store.layer_info}
        assert info["block3"]["layer"] == "block3_pool"
        assert info["block3"]["raw_shape"] == [4, 4, 256]
        assert info["block3"]["stride"] == 8
        assert store.read("block3_pool").dtype == np.float16


def test_bfloat16_codes_close_to_float32(png_tree, tmp_path):
    full = tmp_path / "f32.h5"
    half = tmp_path / "bf16.h5"
    extract(png_tree, full, settings(layers=["block3"]), progress=False)
    extract(
        png_tree,
        half,
        settings(layers=["block3"], precision="bfloat16"),
        progress=False,
    )
    with FeatureStore(full) as a, FeatureStore(half) as b:
        x, y = a.read("block3_pool"), b.read("block3_pool")
        assert b.read("block3_pool").dtype == np.float32
        cosine = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert cosine.min() > 0.99
        assert not np.array_equal(x, y)  # it really ran in another precision


def test_bad_files_are_listed_with_reasons_and_the_rest_kept(png_tree, tmp_path):
    (png_tree / "bee" / "notes.jpg").write_text("this is text, not a JPEG")
    data = (png_tree / "ant" / "img_000.png").read_bytes()
    (png_tree / "cat" / "zz_truncated.png").write_bytes(data[: len(data) // 2])
    output = tmp_path / "codes.h5"
    result = extract(
        png_tree, output, settings(layers=["block2"]), batch_size=4, progress=False
    )
    with FeatureStore(output) as store:
        assert len(store) == 15
        skipped = {path: reason for _, path, reason in store.skipped}
        assert set(skipped) == {"bee/notes.jpg", "cat/zz_truncated.png"}
        assert "Unknown image file format" in skipped["bee/notes.jpg"]
        assert "cannot decode" in skipped["cat/zz_truncated.png"]
        assert "bee/notes.jpg" not in store.paths
    assert len(result.skipped) == 2


def test_every_image_bad_gives_empty_complete_store(tmp_path):
    root = tmp_path / "bad"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        (root / "a" / f"{i}.jpg").write_bytes(b"\xff\xd8 not really")
    output = tmp_path / "codes.h5"
    extract(root, output, settings(layers=["block2"]), progress=False)
    with FeatureStore(output) as store:
        assert len(store) == 0
        assert len(store.skipped) == 3


class Interrupt(Exception):
    pass


def _interrupt_after(batches: int):
    seen = []

    def on_batch(done, total):
        seen.append(done)
        if len(seen) == batches:
            raise KeyboardInterrupt

    return on_batch


def test_interrupted_run_resumes_to_exactly_the_uninterrupted_rows(png_tree, tmp_path):
    (png_tree / "bee" / "broken.png").write_bytes(b"\x89PNG broken")
    reference = tmp_path / "reference.h5"
    extract(png_tree, reference, settings(), batch_size=3, progress=False)

    output = tmp_path / "codes.h5"
    with pytest.raises(KeyboardInterrupt):
        extract(
            png_tree,
            output,
            settings(),
            batch_size=3,
            progress=False,
            on_batch=_interrupt_after(2),
        )
    with pytest.raises(TLError, match="incomplete"):
        FeatureStore(output)
    with FeatureStore(output, require_complete=False) as partial:
        assert len(partial) == 6  # two batches of three rows
        assert len(partial.skipped) == 1  # bee/broken.png sorts at position 5
    result = extract(png_tree, output, settings(), batch_size=3, progress=False)
    assert result.images_processed == 16 - 7
    assert_same_store(reference, output)


def test_sigkilled_process_resumes_with_no_duplicate_or_missing_rows(tmp_path):
    root = write_png_tree(tmp_path / "images", {"a": 9, "b": 8}, seed=3)
    (root / "a" / "img_004.png").write_text("corrupt")
    reference = tmp_path / "reference.h5"
    extract(root, reference, settings(), batch_size=2, progress=False)

    output = tmp_path / "killed.h5"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from conftest import settings
        from tl.features import extract

        def kill(done, total):
            if done >= 7:
                os.kill(os.getpid(), signal.SIGKILL)

        extract({str(root)!r}, {str(output)!r}, settings(), batch_size=2,
                progress=False, on_batch=kill)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stderr=subprocess.PIPE, text=True
    )
    assert process.wait() == -signal.SIGKILL, process.stderr.read()[-2000:]
    with FeatureStore(output, require_complete=False) as partial:
        assert 0 < len(partial) < 16
    # the dead writer's lock is left behind, and taken over by the next run
    assert json.loads(lock_path(output).read_text())["pid"] == process.pid
    resume(output, progress=False, batch_size=5)
    assert not lock_path(output).exists()
    assert_same_store(reference, output)


def test_changed_settings_are_refused_unless_overwrite(png_tree, tmp_path):
    output = tmp_path / "codes.h5"
    extract(png_tree, output, settings(layers=["block2"]), progress=False)
    with pytest.raises(
        TLError, match=r"pooling: file has \['avg'\], this run asks \['max'\]"
    ):
        extract(
            png_tree, output, settings(layers=["block2"], pooling="max"), progress=False
        )
    write_png_tree(png_tree, {"dog": 1}, seed=9)
    with pytest.raises(TLError, match="input: the file indexed 15 images"):
        extract(png_tree, output, settings(layers=["block2"]), progress=False)
    extract(
        png_tree,
        output,
        settings(layers=["block2"], pooling="max"),
        overwrite=True,
        progress=False,
    )
    with FeatureStore(output) as store:
        assert store.settings["pooling"] == ["max"]
        assert len(store) == 16


def test_shards_merge_into_the_single_run_store(png_tree, tmp_path):
    (png_tree / "bee" / "broken.jpg").write_text("nope")
    (png_tree / "loose.png").write_bytes(
        (png_tree / "ant" / "img_000.png").read_bytes()
    )
    reference = tmp_path / "reference.h5"
    extract(png_tree, reference, settings(), batch_size=4, progress=False)
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"shard{i}.h5")
        extract(
            png_tree, shards[-1], settings(), shard=(i, 3), batch_size=4, progress=False
        )
    with pytest.raises(TLError, match=r"each of 0\.\.2 exactly once"):
        merge_stores(shards[:2], tmp_path / "partial.h5")
    merged = merge_stores(list(reversed(shards)), tmp_path / "merged.h5")
    assert_same_store(reference, merged)
    with FeatureStore(merged) as store:
        assert store.ignored == [("loose.png", "not inside a class folder")]


def test_interrupted_shard_keeps_its_committed_skipped_files(png_tree, tmp_path):
    """Skipped positions count from the start of the index, a shard's progress from
    the start of its slice: resuming the second shard kept none of its skipped files.
    """
    (png_tree / "cat" / "img_001.png").write_text("broken")  # position 10, shard 1
    reference = tmp_path / "reference.h5"
    extract(png_tree, reference, settings(), shard=(1, 2), batch_size=2, progress=False)
    output = tmp_path / "shard.h5"
    with pytest.raises(KeyboardInterrupt):
        extract(
            png_tree,
            output,
            settings(),
            shard=(1, 2),
            batch_size=2,
            progress=False,
            on_batch=_interrupt_after(2),
        )
    with FeatureStore(output, require_complete=False) as partial:
        assert partial.skipped == [(10, "cat/img_001.png", partial.skipped[0][2])]
    extract(png_tree, output, settings(), shard=(1, 2), batch_size=2, progress=False)
    assert_same_store(reference, output)


def test_refuses_when_codes_do_not_fit_on_disk(png_tree, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(
        shutil,
        "disk_usage",
        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000),
    )
    with pytest.raises(TLError, match=r"need about .* but only 1.0 KB are free"):
        extract(
            png_tree, tmp_path / "codes.h5", settings(pooling="flatten"), progress=False
        )


def test_pooling_parse_and_shapes():
    assert Pooling.parse("grid:2x3").output_shape((7, 7, 10)) == (60,)
    assert Pooling.parse("grid:2").grid == (2, 2)
    assert Pooling.parse("avgmax").output_shape((7, 7, 10)) == (20,)
    assert Pooling.parse("none").output_shape((7, 7, 10)) == (7, 7, 10)
    assert Pooling.parse("avg").output_shape((10,)) == (10,)
    with pytest.raises(TLError, match="grid:GHxGW"):
        Pooling.parse("mean")
    with pytest.raises(TLError, match="one per layer: 3 layers but 2 poolings"):
        settings(layers=("block1", "block2", "block3"), pooling=("avg", "max"))
    assert math.prod(Pooling.parse("flatten").output_shape((2, 3, 4))) == 24
