"""Committed codes survive a second writer, readers, kills and full disks.

Each test reproduces a failure of a break-it pass: a concurrent `--overwrite` that
destroyed a running extraction, readers told to overwrite a store being written, and
a nearly full disk that gave h5py tracebacks, a segfault and an unreadable store
marked complete.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import (
    SMALL,
    assert_one_line_error,
    assert_same_store,
    settings,
    write_png_tree,
)

import extract_features
import train_classifier
from tl.errors import TLError
from tl.features import extract
from tl.locking import lock_path
from tl.store import FeatureStore, replacement_path

ROOT = Path(__file__).resolve().parents[1]
CLI = ["--backbone", "vgg16", "--weights", "none", "--image-size", str(SMALL), "-q"]
# 80 images of 32 KB codes: three chunks of 27 rows, so writes can fail partway
FLAT = ["--layers", "block2", "--pooling", "flatten", "--batch-size", "4"]


def _extraction(root, output, on_batch: str, **options) -> subprocess.Popen:
    """`extract(root, output, settings(), ...)` in a child process, calling the body
    `on_batch` (with `done`, `os`, `signal`, `time` at hand) after each batch."""
    body = textwrap.indent(textwrap.dedent(on_batch).strip(), "    ")
    script = "\n".join(
        [
            "import os, signal, sys, time",
            f"sys.path.insert(0, {str(ROOT / 'tests')!r})",
            "from conftest import settings",
            "from tl.features import extract",
            "def on_batch(done, total):",
            body,
            f"extract({str(root)!r}, {str(output)!r}, settings(), progress=False,",
            f"        on_batch=on_batch, **{options!r})",
        ]
    )
    return subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )


def _assert_last_line_is_one_error(stderr: str, *fragments: str) -> str:
    """A failed run of a script: its log lines, then exactly one error line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    for noise in ("Traceback", "Exception ignored", "HDF5-DIAG", "Segmentation"):
        assert noise not in stderr, stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def test_running_extraction_refuses_second_writer_and_readers_wait(tmp_path, capsys):
    root = write_png_tree(tmp_path / "images", {"a": 8, "b": 8}, seed=5)
    output = tmp_path / "codes.h5"
    progress, release = tmp_path / "progress", tmp_path / "release"
    writer = _extraction(
        root,
        output,
        f"""
        open({str(progress)!r}, "w").write(str(done))
        deadline = time.time() + 120
        while done >= 6 and not os.path.exists({str(release)!r}):
            time.sleep(0.05)
            assert time.time() < deadline
        """,
        batch_size=2,
    )
    try:
        deadline = time.time() + 120
        while not (progress.exists() and progress.read_text() == "6"):
            assert writer.poll() is None, writer.stderr.read()
            assert time.time() < deadline
            time.sleep(0.1)
        owner = f"pid {writer.pid} on "

        with pytest.raises(TLError) as refused:
            FeatureStore(output)
        message = str(refused.value)
        assert f"extraction in progress ({owner}" in message
        assert "wait for it or read with require_complete=False" in message
        assert "--overwrite" not in message
        code = train_classifier.main([str(output), "-q"])
        line = assert_one_line_error(capsys, code, "extraction in progress", owner)
        assert "--overwrite" not in line
        with FeatureStore(output, require_complete=False) as partial:
            assert len(partial) == 6  # committed rows only
            assert partial.read("block5_pool").shape == (6, 512)
            assert partial.paths == [f"a/img_{i:03d}.png" for i in range(6)]

        code = extract_features.main(
            [str(root), *CLI, "--layers", "block2", "block3", "block5",
             "--overwrite", "--output", str(output)]
        )  # fmt: skip
        line = assert_one_line_error(
            capsys, code, "being written by another extraction", owner, "--output"
        )
        assert "--overwrite" not in line
        assert writer.poll() is None  # all of that while it was running
    finally:
        release.touch()
        if writer.wait(timeout=120) != 0:
            pytest.fail(f"{writer.returncode}: {writer.stderr.read()}")
    assert not lock_path(output).exists()
    reference = tmp_path / "reference.h5"
    extract(root, reference, settings(), batch_size=5, progress=False)
    assert_same_store(reference, output)


def test_killed_overwrite_leaves_the_old_store_and_resumes(tmp_path):
    root = write_png_tree(tmp_path / "images", {"a": 8, "b": 8}, seed=6)
    output = tmp_path / "codes.h5"
    old = tmp_path / "old.h5"
    extract(root, output, settings(pooling="max"), progress=False)
    shutil.copy(output, old)

    writer = _extraction(
        root,
        output,
        "if done >= 6: os.kill(os.getpid(), signal.SIGKILL)",
        batch_size=2,
        overwrite=True,
    )
    assert writer.wait(timeout=120) == -signal.SIGKILL, writer.stderr.read()
    assert_same_store(old, output)  # untouched, complete and readable
    with FeatureStore(replacement_path(output), require_complete=False) as partial:
        assert len(partial) == 6

    result = extract(
        root, output, settings(), overwrite=True, batch_size=5, progress=False
    )
    assert result.images_processed == 16 - 6  # resumed the new store
    assert not replacement_path(output).exists()
    reference = tmp_path / "reference.h5"
    extract(root, reference, settings(), progress=False)
    assert_same_store(reference, output)


@pytest.fixture
def flat_store(tmp_path):
    """80 images and their store from an uninterrupted run: (root, store)."""
    root = write_png_tree(tmp_path / "images", {"a": 40, "b": 40}, seed=7)
    reference = tmp_path / "reference.h5"
    assert extract_features.main([str(root), *CLI, *FLAT, "-o", str(reference)]) == 0
    return root, reference


def test_writes_refused_by_the_os_stop_in_one_line_and_resume(flat_store, tmp_path):
    """extract_features.main in a child whose files may not grow past 0.8 x the
    store's size: the OS refuses writes past it with EFBIG, as a full disk would with
    ENOSPC. The store's own reservation meets the refusal; in a second run with the
    reservation turned off, HDF5 itself meets it."""
    root, reference = flat_store
    reserved, unreserved = tmp_path / "reserved.h5", tmp_path / "unreserved.h5"
    limit = int(0.8 * os.path.getsize(reference))
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        import extract_features
        from tl.store import StoreWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, hard))
        args = {[str(root), *CLI, *FLAT, "-o"]!r}
        codes = [extract_features.main([*args, {str(reserved)!r}])]
        print("--- without reservation", file=sys.stderr)
        StoreWriter._reserve = lambda self, nbytes: None
        codes.append(extract_features.main([*args, {str(unreserved)!r}]))
        print(*codes)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.split() == ["2", "2"], run.stderr
    first, second = run.stderr.split("--- without reservation")
    _assert_last_line_is_one_error(
        first,
        f"Could not write to {str(reserved)!r} (File too large)",
        "images are committed",
        "are free on",
        "Free some space, then re-run the same command to resume",
    )
    _assert_last_line_is_one_error(
        second, f"{str(unreserved)!r} (File too large)", "images are committed"
    )
    with pytest.raises(TLError, match="incomplete"):
        FeatureStore(reserved)
    with FeatureStore(reserved, require_complete=False) as partial:
        assert 0 < len(partial) < 80 and not partial.complete
        assert partial.read("block2_pool").shape == (len(partial), 8 * 8 * 128)
    # after HDF5's own failure the file may end before the end HDF5 recorded for
    # it: re-running repairs that and resumes, as it resumes the other
    for output in (reserved, unreserved):
        assert extract_features.main([str(root), *CLI, *FLAT, "-o", str(output)]) == 0
        assert_same_store(reference, output)


def test_free_space_is_checked_before_each_batch(tmp_path, capsys, monkeypatch):
    root = write_png_tree(tmp_path / "images", {"a": 6, "b": 6}, seed=8)
    reference = tmp_path / "reference.h5"
    extract(root, reference, settings(layers=["block2"]), progress=False)
    output = tmp_path / "codes.h5"
    real, calls = shutil.disk_usage, []

    def disk_usage(path):
        """Plenty for the up-front check and two batches, then 10 KB."""
        calls.append(path)
        usage = real(path)
        if len(calls) <= 3:
            return usage
        return shutil._ntuple_diskusage(usage.total, usage.total - 10_000, 10_000)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    args = [
        str(root),
        *CLI,
        "--layers",
        "block2",
        "--batch-size",
        "2",
        "-o",
        str(output),
    ]
    code = extract_features.main(args)
    assert code == 2
    _assert_last_line_is_one_error(
        capsys.readouterr().err,
        f"Could not write to {str(output)!r} (the next batch needs about",
        "4 images are committed (4 of 12 processed) and 10.0 KB are free",
        "Free some space, then re-run the same command to resume",
    )
    monkeypatch.setattr(shutil, "disk_usage", real)
    with FeatureStore(output, require_complete=False) as partial:
        assert len(partial) == 4
    assert extract_features.main(args) == 0
    assert_same_store(reference, output)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root only; skipped where mounting is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_filling_up_stops_between_batches_and_resumes(flat_store, small_disk):
    """A real file system runs out of space after two batches (another writer fills
    it): the run stops before the next batch, and resumes once space is freed."""
    root, reference = flat_store
    output, ballast = small_disk / "codes.h5", small_disk / "ballast"

    def fill_disk(done, total):
        if done == 8:
            ballast.write_bytes(b"x" * (shutil.disk_usage(small_disk).free - 100_000))

    flat = settings(layers=["block2"], pooling="flatten")
    with pytest.raises(TLError) as stopped:
        extract(root, output, flat, batch_size=4, progress=False, on_batch=fill_disk)
    assert "8 images are committed (8 of 80 processed)" in str(stopped.value)
    with FeatureStore(output, require_complete=False) as partial:
        assert len(partial) == 8
    ballast.unlink()
    extract(root, output, flat, batch_size=4, progress=False)
    assert_same_store(reference, output)
