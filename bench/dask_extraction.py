"""Dask extraction benchmark: prints its figures (ratios measured in one run).

    python bench/dask_extraction.py [--images 320] [--backbone mobilenetv2]
        [--repeats 3] [--merge-rows 10000 100000 400000]

(a) `--dask local:2` (two worker processes, one task thread each) against one
    process on the same generated 500x375 JPEGs at 224x224: throughput of the
    extraction itself, end to end on a running cluster, CPU seconds per image over
    all processes (which other programs' load barely changes), the merge, the rest
    (plan, scheduling), and the one-off start of the workers (TensorFlow import,
    model build). Runs alternate; the best of `--repeats` of each is kept.
(b) merging synthetic shard stores (4 shards, 512 float32 codes per row, realistic
    paths) of 10k, 100k and 400k rows: seconds and microseconds per row (linear:
    about the same per row at every size).

Needs the dask extra (`pip install 'tl[dask]'`). The machine may be shared: the load
average is printed with the figures. Results also go to bench/out/dask_extraction.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(ROOT))
BATCH = 32


def jpeg_folder(count: int) -> Path:
    from tl.synthetic import make_shapes_dataset

    folder = OUT / f"jpegs_{count}"
    if not folder.exists():
        make_shapes_dataset(folder, per_class=count // 4, size=(375, 500), seed=count)
    return folder


def timed(function, *args, **kwargs):
    began = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - began


def cpu_seconds(client) -> float:
    """CPU seconds used so far by this process (the client, and the scheduler of a
    local cluster) and by every worker process."""
    return time.process_time() + sum(client.run(time.process_time).values())


def section_a(results: dict, images: int, backbone: str, repeats: int) -> None:
    from tl.distributed import connected
    from tl.features import ExtractionSettings, extract
    from tl.store import merge_stores

    print(f"\n(a) local:2 vs one process: {images} JPEGs 500x375, {backbone} at 224")
    folder = jpeg_folder(images)
    settings = ExtractionSettings.create(
        backbone=backbone, weights="none", layers=["last"], image_size=224
    )
    options = dict(batch_size=BATCH, overwrite=True, progress=False)
    single, on_dask = [], []
    with tempfile.TemporaryDirectory(dir=OUT) as scratch:
        scratch = Path(scratch)
        began = time.perf_counter()
        with connected("local:2") as client:
            start = time.perf_counter() - began
            result, cold = timed(
                extract, folder, scratch / "cold.h5", settings, client=client, **options
            )
            for _ in range(repeats):
                cpu = time.process_time()
                result, wall = timed(
                    extract, folder, scratch / "one.h5", settings, **options
                )
                cpu = time.process_time() - cpu
                single.append({"wall": wall, "extraction": result.seconds, "cpu": cpu})
                cpu = cpu_seconds(client)
                result, wall = timed(
                    extract,
                    folder,
                    scratch / "dask.h5",
                    settings,
                    client=client,
                    keep_shards=True,
                    **options,
                )
                cpu = cpu_seconds(client) - cpu
                shards = sorted((scratch / "dask.h5.shards").glob("*.h5"))
                _, merge = timed(merge_stores, shards, scratch / "m.h5", overwrite=True)
                on_dask.append(
                    {
                        "wall": wall,
                        "extraction": result.seconds,
                        "merge": merge,
                        "cpu": cpu,
                    }
                )
            closing = time.perf_counter()
        stop = time.perf_counter() - closing
    best_single = min(single, key=lambda run: run["extraction"])
    best_dask = min(on_dask, key=lambda run: run["extraction"])
    rate_single = images / best_single["extraction"]
    rate_dask = images / best_dask["extraction"]
    rest = best_dask["wall"] - best_dask["extraction"] - best_dask["merge"]
    cpu_single = min(run["cpu"] for run in single) / images
    cpu_dask = min(run["cpu"] for run in on_dask) / images
    figures = {
        "backbone": backbone,
        "images": images,
        "single_images_per_s": rate_single,
        "dask_images_per_s": rate_dask,
        "throughput_ratio": rate_dask / rate_single,
        "single_wall_s": best_single["wall"],
        "dask_wall_s": best_dask["wall"],
        "end_to_end_ratio": best_single["wall"] / best_dask["wall"],
        "single_cpu_ms_per_image": cpu_single * 1e3,
        "dask_cpu_ms_per_image": cpu_dask * 1e3,
        "cpu_ratio": cpu_single / cpu_dask,
        "merge_s": best_dask["merge"],
        "merge_share": best_dask["merge"] / best_dask["wall"],
        "rest_s": rest,
        "rest_share": rest / best_dask["wall"],
        "cluster_start_s": start,
        "first_run_wall_s": cold,
        "worker_start_s": cold - best_dask["wall"],
        "cluster_close_s": stop,
        "runs": {"single": single, "dask": on_dask},
    }
    results["a"] = figures
    print(
        f"extraction:  one process {rate_single:6.1f} img/s, local:2 "
        f"{rate_dask:6.1f} img/s: ratio {figures['throughput_ratio']:.2f} "
        f"(target >= 0.90)"
    )
    print(
        f"end to end (cluster running): one process {best_single['wall']:.1f} s, "
        f"local:2 {best_dask['wall']:.1f} s: ratio {figures['end_to_end_ratio']:.2f}"
    )
    print(
        f"CPU per image (all processes, whole run): one process "
        f"{cpu_single * 1e3:.1f} ms, local:2 {cpu_dask * 1e3:.1f} ms: ratio "
        f"{figures['cpu_ratio']:.2f} (under load, the fairer measure of waste)"
    )
    print(
        f"  of the local:2 run: merge {best_dask['merge']:.2f} s "
        f"({figures['merge_share']:.1%}), plan + scheduling + client model build "
        f"{rest:.2f} s ({figures['rest_share']:.1%})"
    )
    print(
        f"one-off: cluster start {start:.1f} s, workers' TensorFlow import and model "
        f"build {figures['worker_start_s']:.1f} s (first run {cold:.1f} s), cluster "
        f"close {stop:.1f} s"
    )


def synthetic_shards(folder: Path, rows: int, count: int = 4) -> list[Path]:
    """`count` complete shard stores of `rows` rows in all (512 float32 per row)."""
    import numpy as np

    from tl.store import StoreWriter

    layers = [{"key": "block5_pool", "shape": [512], "dtype": "float32"}]
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        start, stop = index * rows // count, (index + 1) * rows // count
        paths.append(folder / f"shard-{index:05d}-of-{count:05d}.h5")
        writer = StoreWriter.create(
            paths[-1],
            settings={"backbone": "vgg16"},
            provenance={},
            layers=layers,
            class_names=[f"class_{i:02d}" for i in range(37)],
            num_images=stop - start,
            index_sha256="0" * 64,
            shard={"index": index, "count": count},
        )
        with writer:
            for first in range(start, stop, 1024):
                numbers = np.arange(first, min(first + 1024, stop))
                writer.write_batch(
                    {"block5_pool": rng.random((len(numbers), 512), np.float32)},
                    numbers,
                    numbers % 37,
                    [
                        f"class_{n % 37:02d}/IMG_2019{n:07d}_holiday.jpg"
                        for n in numbers
                    ],
                    [],
                    numbers[-1] + 1 - start,
                )
            writer.finish()
    return paths


def section_b(results: dict, sizes: list[int]) -> None:
    from tl.store import merge_stores

    print("\n(b) merging 4 synthetic shard stores (512 float32 codes per row)")
    results["b"] = {}
    for rows in sizes:
        with tempfile.TemporaryDirectory(dir=OUT) as scratch:
            shards = synthetic_shards(Path(scratch), rows)
            _, seconds = timed(merge_stores, shards, Path(scratch) / "merged.h5")
        results["b"][rows] = seconds
        print(f"{rows:>9} rows: {seconds:6.2f} s, {seconds / rows * 1e6:6.1f} us/row")
    small, large = min(sizes), max(sizes)
    per_row = (results["b"][large] / large) / (results["b"][small] / small)
    results["b"]["per_row_ratio"] = per_row
    print(
        f"time per row at {large} / at {small} rows: {per_row:.2f} (linear: about 1, "
        f"or less where fixed costs weigh on the small merge)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--backbone", default="mobilenetv2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--merge-rows", type=int, nargs="+", default=[10_000, 100_000, 400_000]
    )
    parser.add_argument("--sections", nargs="+", default=["a", "b"])
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} "
        f"{load[2]:.1f} (a shared machine makes the figures noisy)"
    )
    results = {"cores": os.cpu_count(), "load_before": load}
    if "a" in args.sections:
        section_a(results, args.images, args.backbone, args.repeats)
    if "b" in args.sections:
        section_b(results, args.merge_rows)
    results["load_after"] = os.getloadavg()
    print(f"load average after: {results['load_after'][0]:.1f}")
    (OUT / "dask_extraction.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
