"""What a resumed run needs: the run's state, checkpoints, and opening a run folder.

A run writes into its output folder, epoch by epoch, what it needs to resume after an
interruption (`state.json`: settings, data fingerprints, progress, early-stopping
state, history; `checkpoints/`: weights, random seed states and optimizer state;
`best.npz`); at the end the checkpoints are removed and `state.json` is kept, so that
a re-run returns at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import keras
import numpy as np

from tl.errors import TLError
from tl.finetune.cache import CACHE_FOLDER
from tl.finetune.settings import FineTuneSettings
from tl.images import ImageIndex
from tl.provenance import identity_differences

# Files of a run (all of them; `overwrite` deletes exactly these).
_STATE = "state.json"
_CHECKPOINTS = "checkpoints"
_BEST = "best.npz"
_OUTPUTS = (
    "model.keras",
    "metadata.json",
    "results.csv",
    "results.json",
    "confusion_matrix.csv",
    "confusion_matrix.png",
    "history.csv",
    "history.png",
    "splits.csv",
)


@dataclasses.dataclass
class _State:
    """Progress of a run, committed to `state.json` after every epoch.

    `epoch` counts finished epochs over both stages; `stage_epochs` those of the
    current `stage`. The kept model (`best.npz`) is that of epoch `best_epoch` (-1:
    the model before training), with validation loss `best` and accuracy
    `best_accuracy`; `start_accuracy` is the validation accuracy of the model stage
    2 started from (see `tl.finetune.training.better`). `probe` describes the probe
    stage 1 fitted. `checkpoint` names the file holding the weights and optimizer
    state after the last finished epoch.
    """

    identity: dict
    stage: int = 1
    epoch: int = 0
    stage_epochs: int = 0
    best: float | None = None
    best_accuracy: float | None = None
    best_epoch: int | None = None
    start_accuracy: float | None = None
    probe: dict | None = None
    wait: int = 0
    stopped: bool = False
    fit_seconds: float = 0.0
    checkpoint: str | None = None
    complete: bool = False
    history: list[dict] = dataclasses.field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> _State | None:
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))

    def commit(self, path: Path) -> None:
        """Write atomically: a kill leaves the previous or the new state."""
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        os.replace(temporary, path)


def _save_variables(path: Path, variables: list) -> None:
    """Write variables' values to an .npz file, atomically."""
    temporary = path.with_name(f"{path.name}.tmp")
    with open(temporary, "wb") as handle:
        np.savez(handle, *[np.asarray(variable) for variable in variables])
    os.replace(temporary, path)


def _load_variables(path: Path, variables: list) -> None:
    with np.load(path) as saved:
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(arrays) != len(variables):
        raise TLError(
            f"{str(path)!r} holds {len(arrays)} variables, this model has "
            f"{len(variables)}: it was written by another version of tl. Pass "
            f"--overwrite to start over."
        )
    for variable, array in zip(variables, arrays, strict=True):
        variable.assign(array)


def _checkpointed(model: keras.Model) -> list:
    """What an epoch's checkpoint holds: the model's weights and random seed states,
    and the optimizer's state (moments, step count: the schedule's position)."""
    if not model.optimizer.built:  # before the first step of a resumed stage
        model.optimizer.build(model.trainable_variables)
    return [*model.variables, *model.optimizer.variables]


def _remove_run_files(directory: Path) -> None:
    for name in (*_OUTPUTS, _STATE, _BEST):
        (directory / name).unlink(missing_ok=True)
    for folder in (_CHECKPOINTS, CACHE_FOLDER):
        shutil.rmtree(directory / folder, ignore_errors=True)


def _open_run(
    directory: Path,
    settings: FineTuneSettings,
    images: dict[str, ImageIndex],
    overwrite: bool,
) -> _State:
    """The state of the run in `directory`: new, to resume, or complete.

    Raises:
        TLError: when `directory` holds a run with other settings or images.
    """
    identity = {
        "settings": settings.to_json(),
        "data": {role: index.fingerprint() for role, index in images.items()},
    }
    if overwrite:
        _remove_run_files(directory)
    state = _State.load(directory / _STATE)
    if state is None:
        return _State(identity)
    differences = identity_differences(
        state.identity["settings"],
        identity["settings"],
        names=("file has", "this run asks"),
    )
    if state.identity["data"] != identity["data"]:
        differences.append("data: other images or labels")
    if differences:
        raise TLError(
            f"{str(directory)!r} holds a run with other settings: "
            f"{'; '.join(differences)}. Pass --overwrite to replace it, or choose "
            f"another --output-dir."
        )
    return state
