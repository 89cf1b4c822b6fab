"""Registry of keras.applications backbones: constructor, preprocessing, size, taps.

Each `BackboneSpec` carries what differs between families (Keras' own
`preprocess_input` of its module, the default input size, friendly layer aliases), so
the rest of tl never branches on a backbone's name. `build_backbone` resolves the
weights (`imagenet`, a local file or `none`) and records where they came from;
`layer_taps` names the layers a user is likely to want (family aliases,
`stage1..stageN` by output stride, `last`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import math
import random
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import keras
import numpy as np

from tl._checks import check_choice
from tl._keras_compat import inbound_layer_names, recorded_downloads, weights_cache
from tl._settings import FlatSettings
from tl.engines import PRECISIONS
from tl.errors import TLError, known_names
from tl.precision import compute_policy

PREPROCESSING_MODES = {
    "caffe": "RGB→BGR, minus the ImageNet mean pixel, no scaling",
    "tf": "scaled to [-1, 1]",
    "torch": "scaled to [0, 1], then ImageNet mean/std per channel",
    "none": "raw 0–255 pixels; the model rescales inside",
}


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What tl needs to know about one `keras.applications` model.

    Attributes:
        name: registry key, lower case (`resnet50`).
        constructor: attribute of `keras.applications` that builds it (`ResNet50`).
        module: submodule of `keras.applications` holding its `preprocess_input`.
        preprocessing: the mode that `preprocess_input` applies (see
            `PREPROCESSING_MODES`), recorded in feature stores.
        default_size: input side the ImageNet weights were trained at.
        family: models that share layer names and aliases.
    """

    name: str
    constructor: str
    module: str
    preprocessing: str
    default_size: int
    family: str

    def preprocess(self, images):
        """Map raw RGB pixels in [0, 255] to this model's input, with Keras' own code.

        Works on symbolic Keras tensors and backend tensors; numpy inputs are copied
        first because Keras' numpy path writes over its argument.
        """
        if isinstance(images, np.ndarray):
            images = images.astype("float32")  # a copy: Keras writes over numpy input
        module = getattr(keras.applications, self.module)
        return module.preprocess_input(images)


def _family(family, module, preprocessing, models):
    return {
        name: BackboneSpec(name, ctor, module, preprocessing, size, family)
        for name, ctor, size in models
    }


_EFFICIENTNET_SIZES = (224, 240, 260, 300, 380, 456, 528, 600)
_REGISTRY: dict[str, BackboneSpec] = {
    **_family("vgg", "vgg16", "caffe", [("vgg16", "VGG16", 224)]),
    **_family("vgg", "vgg19", "caffe", [("vgg19", "VGG19", 224)]),
    **_family(
        "resnet",
        "resnet",
        "caffe",
        [(f"resnet{d}", f"ResNet{d}", 224) for d in (50, 101, 152)],
    ),
    **_family(
        "resnet_v2",
        "resnet_v2",
        "tf",
        [(f"resnet{d}v2", f"ResNet{d}V2", 224) for d in (50, 101, 152)],
    ),
    **_family("inception", "inception_v3", "tf", [("inceptionv3", "InceptionV3", 299)]),
    **_family(
        "inception_resnet",
        "inception_resnet_v2",
        "tf",
        [("inceptionresnetv2", "InceptionResNetV2", 299)],
    ),
    **_family("xception", "xception", "tf", [("xception", "Xception", 299)]),
    **_family("mobilenet", "mobilenet", "tf", [("mobilenet", "MobileNet", 224)]),
    **_family(
        "mobilenet_v2", "mobilenet_v2", "tf", [("mobilenetv2", "MobileNetV2", 224)]
    ),
    **_family(
        "mobilenet_v3",
        "mobilenet_v3",
        "none",
        [
            ("mobilenetv3small", "MobileNetV3Small", 224),
            ("mobilenetv3large", "MobileNetV3Large", 224),
        ],
    ),
    **_family(
        "densenet",
        "densenet",
        "torch",
        [(f"densenet{d}", f"DenseNet{d}", 224) for d in (121, 169, 201)],
    ),
    **_family(
        "efficientnet",
        "efficientnet",
        "none",
        [
            (f"efficientnetb{i}", f"EfficientNetB{i}", size)
            for i, size in enumerate(_EFFICIENTNET_SIZES)
        ],
    ),
    **_family(
        "efficientnet_v2",
        "efficientnet_v2",
        "none",
        [
            ("efficientnetv2b0", "EfficientNetV2B0", 224),
            ("efficientnetv2b1", "EfficientNetV2B1", 240),
            ("efficientnetv2b2", "EfficientNetV2B2", 260),
            ("efficientnetv2b3", "EfficientNetV2B3", 300),
            ("efficientnetv2s", "EfficientNetV2S", 384),
            ("efficientnetv2m", "EfficientNetV2M", 480),
            ("efficientnetv2l", "EfficientNetV2L", 480),
        ],
    ),
    **_family(
        "convnext",
        "convnext",
        "none",
        [
            (f"convnext{s.lower()}", f"ConvNeXt{s}", 224)
            for s in ("Tiny", "Small", "Base", "Large", "XLarge")
        ],
    ),
    **_family(
        "nasnet",
        "nasnet",
        "tf",
        [("nasnetmobile", "NASNetMobile", 224), ("nasnetlarge", "NASNetLarge", 331)],
    ),
}


def list_backbones() -> list[str]:
    """Names accepted by `get_backbone`, in registry order."""
    return list(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    """The spec registered under `name` (case and `-`/`_` insensitive)."""
    key = re.sub(r"[-_\s]", "", name.lower())
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise TLError(
            f"Unknown backbone {name!r}.{hint} Known backbones: {', '.join(_REGISTRY)}."
        )
    return _REGISTRY[key]


# ---------------------------------------------------------------------------------
# Settings and weights


@dataclasses.dataclass(frozen=True)
class BackboneSettings(FlatSettings):
    """Which network computes, and how: part of every extraction and fine-tuning.

    Stored flat beside the other settings (`backbone`, `weights`, `precision`,
    `seed`); a field added here is stored, read back, offered as an override and
    part of the codes' identity (`tl.provenance`) without being listed elsewhere.

    Attributes:
        name: registry name (`tl.list_backbones()`), normalised (`ResNet-50` →
            `resnet50`).
        weights: `imagenet`, `none` (random) or a weights file, made absolute.
        precision: compute precision (`float32`, `bfloat16`, `float16`; `int8` for
            extraction with the openvino engine, see `tl.engines`).
        seed: random initialisation seed (`weights=none`).
    """

    name: str
    weights: str = "imagenet"
    precision: str = "float32"
    seed: int = 0

    JSON_NAMES: ClassVar[dict[str, str]] = {"name": "backbone"}

    def __post_init__(self):
        object.__setattr__(self, "name", get_backbone(self.name).name)
        object.__setattr__(self, "weights", normalize_weights(self.weights))
        check_choice("precision", self.precision, PRECISIONS)  # any engine's

    @property
    def spec(self) -> BackboneSpec:
        return get_backbone(self.name)

    def build(self, image_size: tuple[int, int]) -> tuple[keras.Model, WeightsInfo]:
        """The backbone these settings name, built at `image_size` (see
        `build_backbone`)."""
        return build_backbone(
            self.spec,
            image_size,
            self.weights,
            precision=self.precision,
            seed=self.seed,
        )


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from, as recorded in feature stores.

    Attributes:
        source: `imagenet`, `file` or `none` (random initialisation from `seed`).
        path: the file loaded (Keras' cache file for `imagenet`), if any.
        sha256: SHA-256 of that file, if any.
        seed: the random seed of the initialisation (`none` only).
    """

    source: str
    path: str | None = None
    sha256: str | None = None
    seed: int | None = None


def sha256_of_file(path: str | Path, block_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def _offline_message(spec: BackboneSpec, calls: list[dict], error: Exception) -> str:
    fname = calls[-1]["fname"] if calls else f"the {spec.name} no-top weights file"
    origin = calls[-1]["origin"] if calls else "the Keras applications URL"
    cache = weights_cache()
    return (
        f"Could not download the ImageNet weights of {spec.name} ({error}). "
        f"This machine may have no internet access. On a machine that has, fetch "
        f"{origin} and either copy it to {cache}/{fname} (Keras' cache) or pass "
        f"--weights /path/to/{fname} (weights=<path> in Python). "
        f"Use --weights none for random weights (tests only)."
    )


def normalize_weights(weights: str | Path | None) -> str:
    """`imagenet`, `none` or an existing weights file path, checked up front."""
    if weights is None or str(weights).lower() == "none":
        return "none"
    if str(weights).lower() == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise TLError(
            f"Weights file {str(weights)!r} does not exist. Pass --weights imagenet "
            f"(downloads via Keras), --weights none (random) or the path of an "
            f"existing weights file."
        )
    return str(path.resolve())


_PYTHON_RANDOM = ("random", "randint", "randrange", "getrandbits", "uniform")
_python_random_lock = threading.Lock()


@contextlib.contextmanager
def _seeded_python_random(seed: int) -> Iterator[None]:
    """Python's module-level random functions give this thread the numbers of a
    generator of its own, seeded with `seed`, for the duration; other threads keep
    the shared one.

    Keras draws the seed of each weight initializer from Python's shared generator
    (`random.randint`) as it makes each layer, so a thread that draws numbers
    meanwhile (the event loop of a Dask worker or client) would change random
    weights that `seed` must fix. Seeded the same way, the numbers are those the
    shared generator gives after `random.seed(seed)` in a process of one thread.
    """
    own = random.Random(seed)
    builder = threading.get_ident()
    with _python_random_lock:  # builds one at a time: no nested replacements
        shared = {name: getattr(random, name) for name in _PYTHON_RANDOM}

        def dispatch(name: str) -> Callable:
            mine, theirs = getattr(own, name), shared[name]

            def draw(*args, **kwargs):
                chosen = mine if threading.get_ident() == builder else theirs
                return chosen(*args, **kwargs)

            return draw

        for name in _PYTHON_RANDOM:
            setattr(random, name, dispatch(name))
        try:
            yield
        finally:
            for name, function in shared.items():
                setattr(random, name, function)


def build_backbone(
    spec: BackboneSpec,
    image_size: tuple[int, int],
    weights: str | Path | None = "imagenet",
    *,
    precision: str = "float32",
    seed: int = 0,
) -> tuple[keras.Model, WeightsInfo]:
    """Build `spec` without its classifier top at `image_size` and load its weights.

    Args:
        spec: the backbone to build.
        image_size: input (height, width).
        weights: `imagenet` (Keras' download and cache), a path to a weights file of
            the same architecture without top, or `none`/None for random weights.
        precision: compute precision (`float32`, `bfloat16`, `float16`; `int8` for
            extraction with the openvino engine, see `tl.engines`).
        seed: seed of the random initialisation, so that `weights=none` models are
            the same in every process (a resumed extraction must see the same net).

    Keras' session state is cleared first: auto-generated layer names
    (`activation_12`) then do not depend on what the process built before, so the
    layer names stored with codes always denote the same layers. Random weights do
    not depend on other threads either (see `_seeded_python_random`).

    Returns:
        The Keras model (outputs the last feature map) and a record of its weights.

    Raises:
        TLError: when the weights cannot be obtained or do not fit the model.
    """
    weights = normalize_weights(weights)
    constructor = getattr(keras.applications, spec.constructor)
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    keras_weights = None if weights == "none" else weights
    with (
        _seeded_python_random(seed),
        compute_policy(precision),
        recorded_downloads() as calls,
        warnings.catch_warnings(),
    ):
        # A mismatched file raises after Keras warns once per layer; the error says it.
        warnings.filterwarnings("ignore", "Skipping nested container", UserWarning)
        try:
            model = constructor(
                include_top=False,
                weights=keras_weights,
                input_shape=(*image_size, 3),
            )
        except Exception as error:  # Keras raises bare Exception on URL failures
            if weights == "imagenet" and "fetch failure" in str(error).lower():
                raise TLError(_offline_message(spec, calls, error)) from error
            if weights not in ("imagenet", "none"):
                raise TLError(
                    f"Could not load weights file {weights!r} into {spec.name} "
                    f"without its top at input {image_size}: {error}. The file must "
                    f"hold weights of the same architecture without the classifier "
                    f"(Keras' *_notop.h5 files, or model.save_weights() of "
                    f"keras.applications.{spec.constructor}(include_top=False))."
                ) from error
            raise TLError(
                f"Could not build {spec.name} at input size {image_size}: {error}"
            ) from error
    if weights == "none":
        info = WeightsInfo("none", seed=seed)
    elif weights == "imagenet":
        path = calls[-1]["path"] if calls else None
        info = WeightsInfo("imagenet", path, sha256_of_file(path) if path else None)
    else:
        info = WeightsInfo("file", weights, sha256_of_file(weights))
    return model, info


# ---------------------------------------------------------------------------------
# Layer taps


@dataclasses.dataclass(frozen=True)
class Tap:
    """A layer one can extract, with the metadata timm calls feature info.

    Attributes:
        layer: the Keras layer name.
        shape: its output shape for one image (e.g. `(28, 28, 256)`).
        stride: input side divided by output side, rounded to a power of two
            (None for non-spatial outputs).
        aliases: friendly names that resolve to this layer.
        depth: position of the layer in the network's topological order.
    """

    layer: str
    shape: tuple[int, ...]
    stride: int | None
    aliases: tuple[str, ...] = ()
    depth: int = 0


def _output_shape(layer) -> tuple[int | None, ...] | None:
    try:
        return tuple(layer.output.shape[1:])
    except (AttributeError, ValueError):  # layers with several outputs or inputs
        return None


def _stride(input_side: int, output_side: int | None) -> int | None:
    if not output_side:
        return None
    return 2 ** round(math.log2(input_side / output_side))


def _last_matching(names: list[str], pattern: str) -> str | None:
    matches = [n for n in names if re.fullmatch(pattern, n)]
    return matches[-1] if matches else None


def _vgg_aliases(names: list[str]) -> dict[str, str]:
    return {f"block{i}": f"block{i}_pool" for i in range(1, 6)}


def _resnet_aliases(names: list[str]) -> dict[str, str]:
    aliases = {"conv1": "conv1_relu" if "conv1_relu" in names else "pool1_pool"}
    for stage in range(2, 6):
        aliases[f"conv{stage}"] = _last_matching(names, rf"conv{stage}_block\d+_out")
    if "post_relu" in names:  # pre-activation (V2) nets normalise the last stage after
        aliases["conv5"] = "post_relu"
    return aliases


_FAMILY_ALIASES: dict[str, Callable[[list[str]], dict[str, str]]] = {
    "vgg": _vgg_aliases,
    "resnet": _resnet_aliases,
    "resnet_v2": _resnet_aliases,
}


def _cut_points(layers: list) -> set[str]:
    """Layers that every path from the input to the output passes through.

    In topological order, layer i is such a cut when no earlier layer feeds a layer
    after i: then the only tensor alive past i is i's own output.
    """
    position = {layer.name: i for i, layer in enumerate(layers)}
    last_consumer = dict.fromkeys(position, -1)
    for layer in layers:
        for name in inbound_layer_names(layer):
            if name in last_consumer:
                last_consumer[name] = max(last_consumer[name], position[layer.name])
    cuts, reach = set(), -1
    for i, layer in enumerate(layers):
        if reach <= i:
            cuts.add(layer.name)
        reach = max(reach, last_consumer[layer.name])
    return cuts


_PLUMBING = (keras.layers.ZeroPadding2D, keras.layers.Cropping2D)


def layer_taps(model: keras.Model, spec: BackboneSpec) -> list[Tap]:
    """Every layer of `model` as a `Tap`, in topological order, aliases attached.

    Aliases are those of `ALIASES`: the family's own (`block1`..`block5` for VGG,
    `conv1`..`conv5` for ResNets), `stage1`..`stageN` (as timm's feature_info) and
    `last`.
    """
    input_side = model.input_shape[1]
    layers = [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]
    names = [layer.name for layer in layers]
    shapes = {layer.name: _output_shape(layer) for layer in layers}
    strides = {
        name: _stride(input_side, shape[0]) if shape and len(shape) == 3 else None
        for name, shape in shapes.items()
    }

    aliases = _FAMILY_ALIASES.get(spec.family, lambda names: {})(names)
    cuts = _cut_points(layers)
    stage_last: dict[int, str] = {}
    seen_trainable = False
    for layer in layers:
        seen_trainable = seen_trainable or bool(layer.trainable_weights)
        stride = strides[layer.name]
        plumbing = isinstance(layer, _PLUMBING)
        if seen_trainable and stride and layer.name in cuts and not plumbing:
            stage_last[stride] = layer.name
    for number, stride in enumerate(sorted(stage_last), start=1):
        aliases[f"stage{number}"] = stage_last[stride]
    aliases["last"] = layers[-1].name  # the output: layers are in topological order

    by_layer: dict[str, list[str]] = {}
    for alias, layer_name in aliases.items():
        if layer_name is not None:
            by_layer.setdefault(layer_name, []).append(alias)
    return [
        Tap(
            name,
            shapes[name] or (),
            strides[name],
            tuple(by_layer.get(name, ())),
            depth,
        )
        for depth, name in enumerate(names)
    ]


ALIASES = (
    ("block1..block5", "VGG: the pooling layer that ends each block"),
    ("conv1..conv5", "ResNets: the output of each stage"),
    (
        "stage1..stageN",
        "every backbone: at each output stride, the last layer that all of the "
        "network's paths go through",
    ),
    (
        "last",
        "the final feature map, before global pooling (pooled: the classic CNN codes)",
    ),
)


def resolve_layers(taps: list[Tap], requested: list[str], backbone: str) -> list[Tap]:
    """The taps for `requested` names (aliases or Keras layer names), checked up front.

    Raises:
        TLError: for an unknown name (listing aliases and close layer names) or for
            two names that resolve to the same layer.
    """
    by_name = {tap.layer: tap for tap in taps}
    by_alias = {alias: tap for tap in taps for alias in tap.aliases}
    if not requested:
        raise TLError(
            f"No layers requested. Aliases of {backbone}: {', '.join(by_alias)}."
        )
    resolved: list[Tap] = []
    for name in requested:
        tap = by_alias.get(name) or by_name.get(name)
        if tap is None:
            close = difflib.get_close_matches(name, [*by_alias, *by_name], n=5)
            hint = f" Closest: {', '.join(close)}." if close else ""
            raise TLError(
                f"Unknown layer {name!r} for {backbone}.{hint} Aliases: "
                f"{', '.join(by_alias)}. Layers: {known_names(by_name)}. "
                f"See all with --list-layers {backbone}."
            )
        if any(tap.layer == other.layer for other in resolved):
            raise TLError(
                f"Layer {name!r} resolves to {tap.layer!r}, which is already "
                f"requested; ask for each layer once."
            )
        resolved.append(tap)
    return resolved


# ---------------------------------------------------------------------------------
# Layer ranges: the top of a backbone, from a block, a layer or a fraction up


def layer_fraction(text: str) -> float | None:
    """`text` as a number when it is one (`0.3`), else None (a layer name)."""
    try:
        return float(text)
    except ValueError:
        return None


def _numbered_alias(alias: str) -> tuple[str, int] | None:
    match = re.fullmatch(r"(.*?)(\d+)", alias)
    return (match[1], int(match[2])) if match else None


def layers_from(model: keras.Model, spec: BackboneSpec, start: str) -> list:
    """The layers of `model` from `start` up, in topological order.

    A numbered alias (`conv5`, `block5`, `stage4`) starts at its block, the layer
    after the previous alias of the same kind (`conv4`); `last` starts at the final
    block (the family's alias when there is one, else the last stage). A Keras layer
    name starts at that layer, `all` at the first layer, a fraction F at the top F of
    the layers with weights.

    Raises:
        TLError: for an unknown name, or a selection with no weights to train.
    """
    layers = [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]
    fraction = layer_fraction(start)
    if start == "all":
        first = 0
    elif fraction is not None:
        weighted = [i for i, layer in enumerate(layers) if layer.weights]
        first = weighted[-math.ceil(fraction * len(weighted))]
    else:
        taps = layer_taps(model, spec)
        position = {tap.layer: i for i, tap in enumerate(taps)}
        by_alias = {alias: tap for tap in taps for alias in tap.aliases}
        if start in by_alias:
            numbered = [
                _numbered_alias(alias)
                for alias in [start, *by_alias[start].aliases]
                if _numbered_alias(alias)
            ]
            numbered.sort(key=lambda alias: alias[0] == "stage")  # family first
            prefix, number = numbered[0]
            previous = by_alias.get(f"{prefix}{number - 1}")
            first = position[previous.layer] + 1 if previous else 0
        elif start in position:
            first = position[start]
        else:
            try:
                resolve_layers(taps, [start], spec.name)  # raises, listing names
            except TLError as error:
                raise TLError(
                    f"{error} Or pass all, or a fraction such as 0.3."
                ) from None
    selected = layers[first:]
    if not any(layer.weights for layer in selected):
        names = ", ".join(layer.name for layer in selected)
        raise TLError(
            f"{start!r} selects {names} of {spec.name}, which have no weights to "
            f"train. Choose an earlier block (see --list-layers {spec.name})."
        )
    return selected


def cut_below(model: keras.Model, layer: str) -> str | None:
    """The deepest layer before `layer` that every path from the input to the output
    goes through (see `_cut_points`): the output of the part of `model` below
    `layer` is that layer's output alone. None when there is none (`layer` comes
    first)."""
    layers = [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]
    names = [item.name for item in layers]
    cuts = _cut_points(layers)
    below = [name for name in names[: names.index(layer)] if name in cuts]
    return below[-1] if below else None


def describe_backbones() -> str:
    """A table of the registry: name, default input size, preprocessing, family."""
    lines = [f"{'backbone':<20} {'size':>5}  {'preprocessing':<14} family"]
    lines += [
        f"{s.name:<20} {s.default_size:>5}  {s.preprocessing:<14} {s.family}"
        for s in _REGISTRY.values()
    ]
    return "\n".join(lines)


def describe_layers(name: str, image_size: tuple[int, int]) -> str:
    """Aliases, then every layer with its output shape and stride, for `--list-layers`.

    Builds the model with random weights (nothing is downloaded).
    """
    spec = get_backbone(name)
    size = image_size
    model, _ = build_backbone(spec, size, "none")
    taps = layer_taps(model, spec)
    rows = [
        (", ".join(tap.aliases), tap.layer, "x".join(map(str, tap.shape)), tap.stride)
        for tap in taps
    ]
    alias_rows = [row for row in rows if row[0]]
    header = f"{'alias':<28} {'layer':<40} {'shape':>14} {'stride':>6}"

    def table(selected):
        return [header] + [
            f"{alias:<28} {layer:<40} {shape:>14} {stride or '-':>6}"
            for alias, layer, shape, stride in selected
        ]

    return "\n".join(
        [
            *(f"{alias:<15} {meaning}" for alias, meaning in ALIASES),
            "",
            f"{spec.name} at {size[0]}x{size[1]}: aliases",
            *table(alias_rows),
            "",
            f"all {len(rows)} layers",
            *table(rows),
        ]
    )
