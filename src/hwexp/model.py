"""Keras 3 functional CNNs for character classification.

Every model built here has the same contract:

* input: ``(S, S, 1)`` ``uint8`` images, ink bright (255) on a dark background (0);
* a ``Rescaling(1/255)`` layer, so pixel scaling happens exactly once, inside the model;
* optional geometric augmentation layers that act only when called with ``training=True``;
* a body (``article``, ``vgg_bn`` or ``resnet_small``);
* output: ``(num_classes,)`` float32 class probabilities (softmax), in ``PreparedSplits.classes``
  order; the final softmax stays float32 under a mixed-precision dtype policy.

The models are written with ``keras.layers`` / ``keras.ops`` only (no ``tf.*``), so they also
run on the torch or jax backends, and they are functional (not ``Sequential``) so that converters
such as coremltools can read them. This module knows nothing of data files or tracking.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import layers, ops

INPUT_LAYER_NAME = "image"
OUTPUT_LAYER_NAME = "probabilities"

# Layers that are the identity at inference but random in training; ``strip_augmentation``
# removes them (they hold no weights, so the stripped model computes the same function).
_TRAINING_ONLY_LAYERS: tuple[type[layers.Layer], ...] = (
    layers.Dropout,
    layers.SpatialDropout1D,
    layers.SpatialDropout2D,
    layers.SpatialDropout3D,
    layers.GaussianNoise,
    layers.GaussianDropout,
    layers.AlphaDropout,
)


@keras.saving.register_keras_serializable(package="hwexp")
class RandomSlant(layers.Layer):
    """Random horizontal shear about the image centre (handwriting slant), training only.

    ``keras.layers.RandomShear`` shears about the top-left corner, which also shifts the
    character sideways by up to ``tan(angle) * S`` pixels; this layer keeps the centre fixed:
    ``x_in = x_out + tan(a) * (y_out - (S - 1) / 2)`` with ``a`` uniform in
    ``[-max_degrees, max_degrees]`` per image. Points from outside the image read as
    ``fill_value`` (the dark background). Input: a float ``(n, h, w, c)`` batch.
    """

    def __init__(
        self, max_degrees: float, fill_value: float = 0.0, seed: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= max_degrees < 90.0:
            raise ValueError(f"max_degrees must be in [0, 90), got {max_degrees}")
        self.max_degrees = float(max_degrees)
        self.fill_value = float(fill_value)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def call(self, images: Any, training: bool | None = None) -> Any:
        if not training or self.max_degrees == 0.0:
            return images
        batch = ops.shape(images)[0]
        height = images.shape[1]
        max_slope = math.tan(math.radians(self.max_degrees))
        slope = keras.random.uniform(
            (batch,), -max_slope, max_slope, dtype="float32", seed=self.seed_generator
        )
        ones = ops.ones_like(slope)
        zeros = ops.zeros_like(slope)
        centre_y = (height - 1) / 2.0
        # affine_transform maps output (x, y) to input (a0 x + a1 y + a2, b0 x + b1 y + b2).
        transform = ops.stack(
            [ones, slope, -slope * centre_y, zeros, ones, zeros, zeros, zeros], axis=1
        )
        sheared = ops.image.affine_transform(
            ops.cast(images, "float32"),
            transform,
            interpolation="bilinear",
            fill_mode="constant",
            fill_value=self.fill_value,
        )
        return ops.cast(sheared, images.dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(max_degrees=self.max_degrees, fill_value=self.fill_value, seed=self.seed)
        return config


@keras.saving.register_keras_serializable(package="hwexp")
class RandomStrokeWidth(layers.Layer):
    """Random stroke thickness, training only: each image is dilated (a 3 x 3 grey maximum:
    strokes about 2 px thicker) with probability ``rate / 2``, eroded (3 x 3 minimum) with
    probability ``rate / 2``, else left alone, so pen width cannot tell classes apart.
    Input: a float ``(n, h, w, c)`` batch, ink high."""

    def __init__(self, rate: float, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images: Any, training: bool | None = None) -> Any:
        if not training or self.rate == 0.0:
            return images
        thick = ops.max_pool(images, pool_size=3, strides=1, padding="same")
        thin = -ops.max_pool(-images, pool_size=3, strides=1, padding="same")
        draw = keras.random.uniform(
            (ops.shape(images)[0], 1, 1, 1), dtype=images.dtype, seed=self.seed_generator
        )
        out = ops.where(draw < self.rate / 2, thick, images)
        return ops.where(draw > 1.0 - self.rate / 2, thin, out)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed)
        return config


def augmentation_layers(
    augment_cfg: Mapping[str, Any], seed: int | None = None
) -> list[layers.Layer]:
    """The geometric augmentation layers described by ``augment_cfg`` (empty when disabled).

    Keys: ``enabled`` (bool), ``rotation`` (max degrees), ``zoom`` (max fraction, in and out),
    ``shift`` (max fraction of the image size, both axes), ``shear`` (max slant in degrees),
    ``stroke_width`` (share of images made thicker or thinner; absent in old configs: 0).
    A zero amount leaves its layer out. Uncovered pixels are filled with 0 (background), never
    reflected (a reflection would add ghost strokes). All layers are identities unless called
    with ``training=True``.
    """
    if not augment_cfg["enabled"]:
        return []
    fill = {"fill_mode": "constant", "fill_value": 0.0}
    rotation, zoom = float(augment_cfg["rotation"]), float(augment_cfg["zoom"])
    shift, shear = float(augment_cfg["shift"]), float(augment_cfg["shear"])

    def layer_seed(offset: int) -> int | None:
        return None if seed is None else seed + offset

    chosen: list[layers.Layer] = []
    if rotation > 0:
        chosen.append(
            layers.RandomRotation(
                rotation / 360.0, seed=layer_seed(1), name="augment_rotation", **fill
            )
        )
    if zoom > 0:
        chosen.append(layers.RandomZoom(zoom, seed=layer_seed(2), name="augment_zoom", **fill))
    if shift > 0:
        chosen.append(
            layers.RandomTranslation(shift, shift, seed=layer_seed(3), name="augment_shift", **fill)
        )
    if shear > 0:
        chosen.append(RandomSlant(shear, seed=layer_seed(4), name="augment_shear"))
    stroke_width = float(augment_cfg.get("stroke_width", 0.0))
    if stroke_width > 0:
        chosen.append(
            RandomStrokeWidth(stroke_width, seed=layer_seed(5), name="augment_stroke_width")
        )
    return chosen


def _batch_norm(x: Any, cfg: Mapping[str, Any], name: str) -> Any:
    """Batch norm with the config's ``bn_momentum`` (moving-statistics decay; Keras' 0.99 needs
    a few hundred steps to settle, 0.9 a few dozen)."""
    return layers.BatchNormalization(momentum=float(cfg["bn_momentum"]), name=name)(x)


def _conv_bn_act(
    x: Any,
    filters: int,
    cfg: Mapping[str, Any],
    name: str,
    strides: int = 1,
    act: bool = True,
    pool: str | None = None,
) -> Any:
    """3x3 convolution (no bias) -> [MaxPool 2x2 named ``pool``] -> batch norm -> activation
    (unless ``act`` is False)."""
    x = layers.Conv2D(
        filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    if pool:
        x = layers.MaxPooling2D(2, name=pool)(x)
    x = _batch_norm(x, cfg, f"{name}_bn")
    activation = cfg["activation"]
    return layers.Activation(activation, name=f"{name}_act")(x) if act else x


def _article_body(x: Any, cfg: Mapping[str, Any]) -> Any:
    """The reference article's CNN (the Keras CIFAR-10 example layout).

    Two blocks of [Conv(f, same) -> Conv(f, valid) -> MaxPool 2x2 -> Dropout] with
    f = ``filters`` (default [32, 64]), then Flatten -> Dense(``dense_units``) -> Dropout.
    """
    activation = cfg["activation"]
    for block, filters in enumerate(cfg["filters"], start=1):
        for conv, padding in enumerate(("same", "valid"), start=1):
            x = layers.Conv2D(
                filters, 3, padding=padding, activation=activation, name=f"b{block}_conv{conv}"
            )(x)
        x = layers.MaxPooling2D(2, name=f"b{block}_pool")(x)
        x = layers.Dropout(cfg["conv_dropout"], name=f"b{block}_dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(cfg["dense_units"], activation=activation, name="dense")(x)
    return layers.Dropout(cfg["dense_dropout"], name="dense_dropout")(x)


def _head(x: Any, cfg: Mapping[str, Any]) -> Any:
    """``gap`` (global average pooling) or ``flatten``, then optional Dense-BN-act, Dropout."""
    if cfg["head"] == "gap":
        x = layers.GlobalAveragePooling2D(name="gap")(x)
    elif cfg["head"] == "flatten":
        x = layers.Flatten(name="flatten")(x)
    else:
        raise ValueError(f"model.head must be 'gap' or 'flatten', got {cfg['head']!r}")
    if cfg["dense_units"]:
        x = layers.Dense(cfg["dense_units"], use_bias=False, name="dense")(x)
        x = _batch_norm(x, cfg, "dense_bn")
        x = layers.Activation(cfg["activation"], name="dense_act")(x)
    return layers.Dropout(cfg["dense_dropout"], name="dense_dropout")(x)


def _vgg_bn_body(x: Any, cfg: Mapping[str, Any]) -> Any:
    """VGG-style blocks: ``convs_per_block`` x [Conv3x3 -> BN -> act], MaxPool 2x2, Dropout.

    With ``pool_first`` the block's last convolution is pooled before its batch norm and
    activation, which then run on a map 4 times smaller (the same layers and weights; max
    pooling commutes with a per-channel increasing function, but the batch statistics are the
    pooled map's). One block per entry of ``widths``; then the ``head`` (see ``_head``).
    """
    pool_first = bool(cfg.get("pool_first", False))
    convs = cfg["convs_per_block"]
    for block, width in enumerate(cfg["widths"], start=1):
        pool = f"b{block}_pool"
        for conv in range(1, convs + 1):
            early_pool = pool if pool_first and conv == convs else None
            x = _conv_bn_act(x, width, cfg, name=f"b{block}_{conv}", pool=early_pool)
        if not pool_first:
            x = layers.MaxPooling2D(2, name=pool)(x)
        x = layers.Dropout(cfg["conv_dropout"], name=f"b{block}_dropout")(x)
    return _head(x, cfg)


def _residual_block(x: Any, width: int, strides: int, cfg: Mapping[str, Any], name: str) -> Any:
    """Basic residual block: two 3x3 conv-BN, projection shortcut when the shape changes,
    activation after the addition."""
    shortcut = x
    y = _conv_bn_act(x, width, cfg, name=f"{name}_a", strides=strides)
    y = _conv_bn_act(y, width, cfg, name=f"{name}_b", act=False)
    if strides != 1 or x.shape[-1] != width:
        shortcut = layers.Conv2D(
            width, 1, strides=strides, use_bias=False, name=f"{name}_proj_conv"
        )(x)
        shortcut = _batch_norm(shortcut, cfg, f"{name}_proj_bn")
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.Activation(cfg["activation"], name=f"{name}_out")(y)


def _resnet_small_body(x: Any, cfg: Mapping[str, Any]) -> Any:
    """Small ResNet: stem conv, one stage per ``widths`` entry (stride 2 from the second
    stage on) of ``blocks_per_stage`` basic blocks, then global average pooling -> Dropout."""
    x = _conv_bn_act(x, cfg["widths"][0], cfg, name="stem")
    for stage, width in enumerate(cfg["widths"], start=1):
        for block in range(1, cfg["blocks_per_stage"] + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _residual_block(x, width, strides, cfg, name=f"s{stage}_{block}")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return layers.Dropout(cfg["dense_dropout"], name="dense_dropout")(x)


BODIES: dict[str, Callable[[Any, Mapping[str, Any]], Any]] = {
    "article": _article_body,
    "vgg_bn": _vgg_bn_body,
    "resnet_small": _resnet_small_body,
}


def build_model(
    model_cfg: Mapping[str, Any],
    augment_cfg: Mapping[str, Any],
    num_classes: int,
    image_size: int,
    seed: int | None = None,
) -> keras.Model:
    """Build the functional model named by ``model_cfg["name"]`` (a key of ``BODIES``).

    ``model_cfg`` holds the body's parameters (see ``conf/model/*.yaml``), ``augment_cfg`` the
    augmentation (see ``augmentation_layers``). Input ``(image_size, image_size, 1)`` uint8,
    output ``(num_classes,)`` float32 probabilities. Layers follow the global Keras dtype
    policy (e.g. ``mixed_float16``) except the final softmax, which is always float32.
    ``seed`` seeds the augmentation layers (None: nondeterministic).
    """
    name = model_cfg["name"]
    if name not in BODIES:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(BODIES)}")
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    inputs = keras.Input((image_size, image_size, 1), dtype="uint8", name=INPUT_LAYER_NAME)
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    for layer in augmentation_layers(augment_cfg, seed):
        x = layer(x)
    x = BODIES[name](x, model_cfg)
    logits = layers.Dense(num_classes, name="logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name=OUTPUT_LAYER_NAME)(logits)
    return keras.Model(inputs, outputs, name=name)


def is_training_only(layer: layers.Layer) -> bool:
    """True for layers that are random in training and the identity at inference."""
    return isinstance(layer, _TRAINING_ONLY_LAYERS) or type(layer).__name__.startswith("Random")


def strip_augmentation(model: keras.Model) -> keras.Model:
    """An inference model: the same layer objects (hence identical, shared weights) with every
    augmentation/dropout layer removed (see ``is_training_only``).

    ``strip_augmentation(model)(x)`` equals ``model(x, training=False)``. The result is a
    functional model of standard Keras layers only (no ``RandomSlant``), uncompiled, so it
    saves to a ``.keras`` file that loads without importing hwexp.
    """

    def skip_training_only(layer: layers.Layer, *args: Any, **kwargs: Any) -> Any:
        return args[0] if is_training_only(layer) else layer(*args, **kwargs)

    return keras.models.clone_model(
        model, clone_function=lambda layer: layer, call_function=skip_training_only
    )


# --------------------------------------------------------------------------- another's weights


class IncompatibleWeights(ValueError):
    """A source model's weights do not fit a model (another architecture or input size)."""


def classifier_layer(model: keras.Model) -> layers.Dense:
    """The model's last ``Dense`` layer, whose output units are the classes (``logits``)."""
    dense = [layer for layer in model.layers if isinstance(layer, layers.Dense)]
    if not dense:
        raise IncompatibleWeights(f"model {model.name!r} has no Dense layer")
    return dense[-1]


def shared_outputs(classes: Sequence[str], source_classes: Sequence[str]) -> dict[int, int]:
    """Output index in ``classes`` -> output index of the same character in ``source_classes``,
    for every character that both have."""
    source_index = {char: i for i, char in enumerate(source_classes)}
    return {i: source_index[char] for i, char in enumerate(classes) if char in source_index}


def copy_weights(
    model: keras.Model,
    source: keras.Model,
    classes: Sequence[str],
    source_classes: Sequence[str],
) -> dict[int, int]:
    """Overwrite ``model``'s weights with ``source``'s, in place; returns ``shared_outputs``.

    Layers are matched by name; layers without weights (augmentation, dropout: a stripped
    inference model lacks them) are skipped. The classifier (``classifier_layer``) is copied
    by character: output ``i`` of ``model`` (class ``classes[i]``) gets the kernel column and
    bias of the source output with the same character; classes the source lacks keep
    ``model``'s own (fresh) initialisation.

    Raises:
        IncompatibleWeights: a layer with weights exists in one model only, or its weights
            differ in shape (other widths, or another input size before a flatten head); the
            message names the layer.
    """
    head, source_head = classifier_layer(model), classifier_layer(source)
    body = {layer.name: layer for layer in model.layers if layer.weights and layer is not head}
    source_body = {
        layer.name: layer for layer in source.layers if layer.weights and layer is not source_head
    }
    only_one = sorted(body.keys() ^ source_body.keys())
    if only_one:
        where = "the new model" if only_one[0] in body else "the source model"
        raise IncompatibleWeights(f"layer {only_one[0]!r} has weights only in {where}")
    for name, layer in body.items():
        values = source_body[name].get_weights()
        _check_shapes(name, [w.shape for w in layer.get_weights()], [v.shape for v in values])
        layer.set_weights(values)
    values, source_values = head.get_weights(), source_head.get_weights()
    _check_shapes(head.name, [v.shape[:-1] for v in values], [v.shape[:-1] for v in source_values])
    shared = shared_outputs(classes, source_classes)
    if shared:
        outputs = np.fromiter(shared.keys(), np.int64)
        source_outputs = np.fromiter(shared.values(), np.int64)
        for value, source_value in zip(values, source_values, strict=True):
            value[..., outputs] = source_value[..., source_outputs]  # kernel columns, bias
        head.set_weights(values)
    return shared


def _check_shapes(
    name: str, shapes: Sequence[tuple[int, ...]], source_shapes: Sequence[tuple[int, ...]]
) -> None:
    if list(shapes) != list(source_shapes):
        raise IncompatibleWeights(
            f"layer {name!r} has weights of shapes {list(shapes)} here but "
            f"{list(source_shapes)} in the source model"
        )
