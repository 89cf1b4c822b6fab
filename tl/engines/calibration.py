"""int8 calibration: a stratified sample of the user's own images, and a held-back
sample to check the quantised codes against float32.

Post-training quantisation picks the int8 ranges of every activation from the
images it sees, so those images must look like the data. Calibrate on training
images only: extract a separate test folder with the model calibrated on the
training images (`--calibration-source TRAIN_FOLDER`, which finds it in the cache)
rather than on the test images themselves. The sample is identified by a SHA-256 of
its files (relative paths and contents); that hash is part of a store's settings, so
codes calibrated on other images never pass for the same codes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tl.backbones import sha256_of_file
from tl.errors import TLError
from tl.images import ImageSettings, image_batches, index_images

# Images kept out of the calibration sample to compare int8 with float32 codes: at
# most this many, and at most a fifth of the source.
HELD_BACK_IMAGES = 64
_SEED = 0


def stratified_order(labels: np.ndarray, seed: int = _SEED) -> np.ndarray:
    """Positions in a random order whose every prefix holds each class in
    proportion to its size (up to rounding)."""
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keys[members] = (rng.permutation(len(members)) + 0.5) / len(members)
    return np.argsort(keys, kind="stable")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The images to calibrate on and those held back to check the result.

    Attributes:
        root: folder the paths are relative to.
        calibration_paths: the calibration sample.
        held_back_paths: a disjoint sample for the int8 vs float32 check.
        sha256: identity of the calibration sample (paths and file contents).
        image_settings: how the files become model inputs.
    """

    root: Path
    calibration_paths: tuple[str, ...]
    held_back_paths: tuple[str, ...]
    sha256: str
    image_settings: ImageSettings

    def identity(self) -> dict:
        """What determines a model calibrated on these images (JSON values)."""
        return {
            "images": len(self.calibration_paths),
            "sha256": self.sha256,
            "image_settings": self.image_settings.to_json(),
        }

    def _pixels(self, paths, batch_size: int) -> Iterator[np.ndarray]:
        absolute = [str(self.root / path) for path in paths]
        batches = image_batches(
            absolute, np.arange(len(paths)), self.image_settings, batch_size
        )
        for _, images in batches:
            yield images.numpy()

    def calibration_images(self) -> Iterator[np.ndarray]:
        """The calibration sample, one (1, H, W, 3) image at a time (unreadable
        files are left out)."""
        return self._pixels(self.calibration_paths, 1)

    def held_back_images(self, batch_size: int = 16) -> Iterator[np.ndarray]:
        """The held-back sample in batches."""
        return self._pixels(self.held_back_paths, batch_size)


def sample_calibration(
    source: str | Path, count: int, image_settings: ImageSettings
) -> Calibration:
    """A sample of `count` images of `source` to calibrate on, stratified by its
    class folders (or CSV labels) if it has any, and up to `HELD_BACK_IMAGES` others
    to check with. It depends on the source alone, so that a test folder extracted
    with `--calibration-source TRAIN` gets the training run's very sample."""
    if not Path(source).exists():
        raise TLError(
            f"Calibration source {str(source)!r} does not exist; give the folder (or "
            f"CSV) of the training images (--calibration-source)."
        )
    index = index_images(source)
    order = stratified_order(index.labels)
    held = min(HELD_BACK_IMAGES, len(index) // 5)
    calibration = [index.paths[i] for i in order[held : held + count]]
    digest = hashlib.sha256()
    for path in calibration:
        digest.update(f"{path}\t{sha256_of_file(index.root / path)}\n".encode())
    return Calibration(
        index.root,
        tuple(calibration),
        tuple(index.paths[i] for i in order[:held]),
        digest.hexdigest(),
        image_settings,
    )
