"""What the command-line scripts share: logging, quiet TensorFlow, clean errors.

Import this before TensorFlow is loaded: it sets TensorFlow's C++ log level so the
scripts print tl's messages, not TensorFlow's start-up chatter.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and set up its GPUs with native stderr muted.

    TensorFlow's native start-up messages (oneDNN notice, CUDA probing on machines
    without a GPU) are written before its log level applies; they would bury the
    scripts' own output. Set TL_TF_LOGS=1 to see them. GPUs get memory growth, so
    that several shard processes can share one GPU.
    """
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        if not os.environ.get("TL_TF_LOGS"):
            os.dup2(devnull, 2)
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def default_output(folder: str, source: str, backbone: str, suffix: str = "") -> str:
    """`<folder>/<source name>_<backbone><suffix>`: where a script writes by default."""
    name = Path(source.rstrip("/")).stem or "images"
    return str(Path(folder) / f"{name}_{backbone.lower()}{suffix}")


def run_cli(command: Callable[[], int | None]) -> int:
    """Run a script's command: tl errors become one line on stderr and exit code 2,
    Ctrl-C exits 130 with a note (the work done so far is kept)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("tl")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    from tl.errors import TLError

    try:
        import_tensorflow_quietly()
        return command() or 0
    except TLError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(
            "\ninterrupted: what was done so far is saved; re-run the same command "
            "to continue.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
