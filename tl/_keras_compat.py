"""Every use of Keras' private API in tl, each with the reason no public one serves.

Keras is pinned below 4 (pyproject.toml), and tests/test_keras_compat.py checks each
function here against the installed Keras, so a release that moves one of these
fails those tests rather than a user's run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

# keras.applications fetch their weights through this module's `get_file`, looked up
# when called: replacing that attribute is the only way to learn which file they ask
# for and where it was cached (the public `keras.utils.get_file` is the same function,
# but replacing that name does not reach them).
from keras.src.utils import file_utils as keras_file_utils


@contextlib.contextmanager
def recorded_downloads() -> Iterator[list[dict]]:
    """Record the calls `keras.applications` make to Keras' `get_file`.

    Yields a list that receives `{fname, origin, path}` for each call (`path` once
    the file is there), so tl can hash the cached ImageNet file and, when the
    download fails, tell the user which file to fetch by hand. The replacement is
    undone on exit.
    """
    calls: list[dict] = []
    original = keras_file_utils.get_file

    def recording_get_file(fname=None, origin=None, *args, **kwargs):
        call = {"fname": fname, "origin": origin, "path": None}
        calls.append(call)
        call["path"] = original(fname, origin, *args, **kwargs)
        return call["path"]

    keras_file_utils.get_file = recording_get_file
    try:
        yield calls
    finally:
        keras_file_utils.get_file = original


def inbound_layer_names(layer) -> list[str]:
    """Names of the operations whose outputs `layer` takes, in the model that built
    it. Keras has no public accessor: `Model.get_config()` lists them only by
    serialising the whole model."""
    return [
        parent.operation.name
        for node in layer._inbound_nodes
        for parent in node.parent_nodes
    ]


def weights_cache() -> Path:
    """The folder where `keras.applications` cache downloaded weights.

    It lies in Keras' home, `$KERAS_HOME` or else `~/.keras`, which Keras settles
    once in a private function (its documented default is the fallback here); as in
    Keras' `get_file`, `/tmp/.keras` stands in for a home that cannot be written.
    """
    try:
        from keras.src.backend.config import keras_home

        home = keras_home()
    except ImportError:
        home = os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp", ".keras")
    return Path(home) / "models"
