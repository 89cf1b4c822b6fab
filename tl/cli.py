"""What the command-line scripts share: logging, clean errors, default outputs."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


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
    from tl._tensorflow import start_tensorflow
    from tl.errors import TLError

    try:
        start_tensorflow()
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
