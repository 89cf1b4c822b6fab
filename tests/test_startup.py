"""Importing tl (and through it TensorFlow) prints nothing of TensorFlow's start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stderr_of(code: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    environment.pop("TL_TF_LOGS", None)
    process = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**environment, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return process.stderr


def test_importing_tl_modules_does_not_print_tensorflows_wall():
    assert _stderr_of("import tl.features, tl.finetune") == ""


def test_tl_tf_logs_shows_it_again():
    # TensorFlow's notices on this machine (oneDNN, CUDA probing) appear on request.
    assert _stderr_of("import tl.features", TL_TF_LOGS="1") != ""
