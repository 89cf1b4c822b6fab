"""Fine-tuning benchmark: what the cache and stage 1 on codes save, and what default
fine-tuning scores.

    python bench/finetune.py [--images 240] [--parts a b c]

(a) Stage-2 epoch time with the cache against without (images decoded and the whole
    backbone run every epoch), VGG16 `--unfreeze block5` and ResNet50 `--unfreeze
    conv5` at 224x224 on generated 500x375 JPEGs; and the frozen part's share of
    each backbone's multiply-adds, which bounds the ratio.
(b) Stage-1 wall time: the frozen pass (codes, and stage 2's cache) and the CV-chosen
    probe, against 5 head epochs through the frozen backbone as tl trained them
    before (images decoded every epoch, validation every epoch).
(c) Test accuracy of default fine-tuning against the best linear probe on the README's
    Fashion-MNIST example (bench/real_data.py: 2,000 training, 500 validation and
    1,000 test images at 64x64, VGG16 with learned weights).

Each ratio is measured in one run, both sides on the same images, one after the
other. The machine may be shared: timings are noisy, so run it again before trusting
a figure. VGG16 has learned weights when bench/hed_weights.py has written them,
ResNet50 random ones: the time does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

CASES = [("vgg16", "block5"), ("resnet50", "conv5")]
# Learned VGG16 weights when bench/hed_weights.py has written them (the probe's
# convergence, not the time, depends on them); random ones otherwise.
HED = HERE / "out" / "vgg16_hed_notop.weights.h5"


def weights_of(backbone: str) -> dict:
    """The weights settings for `backbone` in this benchmark."""
    if backbone == "vgg16" and HED.exists():
        return {"weights": str(HED)}
    return {"weights": "none", "from_scratch": False}


def multiply_adds(model) -> dict[str, int]:
    """Multiply-adds per image of each Conv2D, DepthwiseConv2D and Dense layer."""
    import keras

    counts = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            height, width = layer.output.shape[1:3]
            kernel = layer.kernel.shape
            counts[layer.name] = height * width * kernel[0] * kernel[1] * kernel[2]
        elif isinstance(layer, keras.layers.Conv2D):
            height, width = layer.output.shape[1:3]
            counts[layer.name] = height * width * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.Dense):
            counts[layer.name] = int(np.prod(layer.kernel.shape))
    return counts


def frozen_share(backbone: str, unfreeze: str, size: int) -> float:
    """The fraction of the backbone's multiply-adds below its first unfrozen layer."""
    from tl.finetune import FineTuneSettings, build_model

    settings = FineTuneSettings.create(
        backbone=backbone, weights="none", from_scratch=False, image_size=size,
        unfreeze=unfreeze,
    )  # fmt: skip
    net = build_model(settings, 2)
    counts = multiply_adds(net.backbone)
    trained = set(net.unfrozen)
    return sum(v for k, v in counts.items() if k not in trained) / sum(counts.values())


def epoch_seconds(history) -> float:
    """The median stage-2 epoch, the first left out (it traces the step)."""
    seconds = history.loc[history["stage"] == 2, "seconds"].tolist()
    return statistics.median(seconds[1:] or seconds)


def part_a(images: Path, work: Path, size: int) -> None:
    from tl.finetune import fine_tune

    print(f"(a) stage-2 epoch, cached vs uncached, {size}x{size}")
    for backbone, unfreeze in CASES:
        times = {}
        for cache in (True, False):
            result = fine_tune(
                images, work / f"a_{backbone}_{cache}", backbone=backbone,
                image_size=size, unfreeze=unfreeze, epochs=3, val_split=0.1,
                test_split=0.05, cache=cache, overwrite=True, progress=False,
                **weights_of(backbone),
            )  # fmt: skip
            times[cache] = epoch_seconds(result.history)
        share = frozen_share(backbone, unfreeze, size)
        print(
            f"  {backbone} --unfreeze {unfreeze}: {times[False]:.1f} s uncached, "
            f"{times[True]:.1f} s cached: {times[False] / times[True]:.1f}x; frozen "
            f"part {share:.0%} of the multiply-adds (forward)",
            flush=True,
        )


def part_b(images: Path, work: Path, size: int) -> None:
    """Both stage 1s on the same images and model: tl's own pieces, timed."""
    import keras

    from tl.engines.keras import compiled_extractor
    from tl.finetune import FineTuneSettings, build_model, labelled_index
    from tl.finetune.cache import CachePlan, frozen_pass
    from tl.finetune.data import _over_images, _training_batches, prepare_splits
    from tl.finetune.head_init import fit_probe, initialise_head, linear_probe

    print(f"(b) stage 1 on VGG16 --unfreeze block5 at {size}x{size}")
    settings = FineTuneSettings.create(
        backbone="vgg16", image_size=size, unfreeze="block5", epochs=1,
        val_split=0.1, test_split=0.05, **weights_of("vgg16"),
    ).resolved()  # fmt: skip
    splits = prepare_splits(labelled_index(images), settings)
    classes = len(splits.train.class_names)
    net = build_model(settings, classes)

    began = time.perf_counter()
    frozen = frozen_pass(net, CachePlan.choose(net), {"train": splits.train,
                         "val": splits.val}, work, batch_size=32)  # fmt: skip
    codes = frozen.splits["train"].codes
    pipeline, _ = fit_probe(codes, splits.train.labels, settings)
    initialise_head(net, linear_probe(pipeline, classes), codes)
    new = time.perf_counter() - began

    old_settings = settings.updated(head_init="random", head_epochs=5, dropout=0.2)
    net = build_model(old_settings, classes)
    net.set_stage(1)
    net.model.compile(
        optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy"
    )
    predict = compiled_extractor(net.model)
    began = time.perf_counter()
    for epoch in range(5):
        net.model.fit(_training_batches(splits.train, old_settings, epoch, None, False),
                      verbose=0)  # fmt: skip
        _over_images(splits.val.absolute_paths(), settings.image, 32, predict)
    old = time.perf_counter() - began
    print(
        f"  {len(splits.train)} training + {len(splits.val)} validation images: 5 "
        f"head epochs {old:.1f} s, frozen pass + probe {new:.1f} s: {old / new:.1f}x "
        f"(the frozen pass also fills stage 2's cache)",
        flush=True,
    )


def part_c() -> None:
    import real_data

    print("(c) default fine-tuning against the best linear probe, Fashion-MNIST")
    real_data.main(["--only", "ft_default"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=240, help="generated JPEGs")
    parser.add_argument("--parts", nargs="+", default=["a", "b", "c"])
    parser.add_argument("--size", type=int, default=224, help="input side (a, b)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(HERE))
    from tl.synthetic import make_shapes_dataset

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        images = make_shapes_dataset(work / "images", per_class=args.images // 4)
        if "a" in args.parts:
            part_a(images, work, args.size)
        if "b" in args.parts:
            part_b(images, work, args.size)
    if "c" in args.parts:
        part_c()
    print(json.dumps({"note": "timings on a shared machine are noisy; rerun"}))


if __name__ == "__main__":
    main()
