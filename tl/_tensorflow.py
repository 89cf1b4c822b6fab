"""How tl starts TensorFlow: without its native start-up wall, with GPU memory growth.

TensorFlow writes its start-up notices (oneDNN, CUDA probing, CPU features) straight to
file descriptor 2 while it is imported and first looks for GPUs, before its log level
applies, so they would bury tl's own output in scripts and notebooks alike. `import tl`
installs a one-shot import hook: the first import of `tensorflow` (by Keras or tl),
and its first look for GPUs, run with descriptor 2 muted. Set TL_TF_LOGS=1 to see
those messages.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def _stderr_muted() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the duration (C++ writers included)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of `tensorflow` with stderr muted."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with _stderr_muted():
            self.loader.exec_module(module)
            # Probing for GPUs (cuInit) writes its own errors on machines without one.
            module.config.list_physical_devices("GPU")


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once, with the other finders, and wraps its loader."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def mute_tensorflow_start_up() -> None:
    """Install the one-shot hook, unless TensorFlow is loaded or TL_TF_LOGS is set."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or os.environ.get("TL_TF_LOGS"):
        return
    if not any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())


def start_tensorflow() -> None:
    """Import TensorFlow (quietly) and give every GPU memory growth, so that several
    processes (extraction shards, workers) can share one GPU."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(RuntimeError):  # already initialised: leave it be
            tf.config.experimental.set_memory_growth(gpu, True)
