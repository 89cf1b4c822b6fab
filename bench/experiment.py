"""Experiment benchmark: a rerun's time against the first run's, and a shared cache.

    python bench/experiment.py [--experiment examples/shapes.toml]

Runs the experiment file three times through run_experiment.py, each a fresh process
(wall time includes Python and TensorFlow start-up), with its output and cache
folders moved to bench/out/experiment so nothing is reused from earlier runs:

1. the first run (every extraction, probe and fine-tune);
2. the same file again: the issue's goal is under 10% of the first run's time, with
   no extraction and no training;
3. a second experiment over the same images and backbones with other classifiers
   and no fine-tune: it extracts nothing (the stores are shared).

Prints the times, the ratio and the steps each run computed. Needs the images and
weights the file names (`make demo` makes those of examples/shapes.toml).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out" / "experiment"
sys.path.insert(0, str(ROOT))

from tl.experiment.spec import read_experiment  # noqa: E402

DOES_WORK = re.compile(r": (extracting|training|CV .* \(\d)")


def timed_run(spec: dict, name: str) -> tuple[float, list[str]]:
    """(wall seconds, the step lines that did work) of run_experiment.py on `spec`."""
    path = OUT / f"{name}.toml"
    path.write_text(json_to_toml(spec))
    began = time.perf_counter()
    process = subprocess.run(
        [sys.executable, "run_experiment.py", str(path), "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - began
    if process.returncode:
        sys.exit(f"{name} failed:\n{process.stderr[-3000:]}")
    return seconds, [
        line for line in process.stdout.splitlines() if DOES_WORK.search(line)
    ]


def json_to_toml(spec: dict) -> str:
    """An experiment dict as TOML (the value types experiment files use)."""
    lines = []
    for section, content in spec.items():
        for table in content if isinstance(content, list) else [content]:
            lines.append(
                f"[[{section}]]" if isinstance(content, list) else f"[{section}]"
            )
            lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="examples/shapes.toml")
    args = parser.parse_args()
    _, spec = read_experiment(ROOT / args.experiment)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    spec["experiment"].update(
        output_dir=str(OUT / "first"), cache_dir=str(OUT / "cache")
    )
    first, work = timed_run(spec, "first")
    print(f"first run: {first:.1f} s, {len(work)} steps computed")
    second, work_again = timed_run(spec, "first")
    print(
        f"second run of the same file: {second:.1f} s ({second / first:.1%} of the "
        f"first; goal < 10%), steps computed: {len(work_again)}"
    )
    other = json.loads(json.dumps(spec))
    other["experiment"].update(name="other", output_dir=str(OUT / "other"))
    other["probe"] = {"classifiers": ["ridge"], "cv": 3}
    other.pop("finetune", None)
    shared, work_other = timed_run(other, "other")
    extractions = [line for line in work_other if "extracting" in line]
    print(
        f"another experiment on the same cache: {shared:.1f} s, "
        f"{len(extractions)} extractions, {len(work_other)} probes computed"
    )
    stores = sorted(path.name for path in (OUT / "cache").glob("*.h5"))
    print(f"stores in the cache: {len(stores)}")


if __name__ == "__main__":
    main()
