"""hwexp.model: functional builders, augmentation only in training, strip_augmentation."""

from __future__ import annotations  # noqa: I001 (_train_helpers must precede keras: env vars)

from _train_helpers import CLASSES, TINY_MODELS, load_group, glyph_images

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from hwexp.model import (
    RandomSlant,
    RandomStrokeWidth,
    augmentation_layers,
    build_model,
    is_training_only,
    strip_augmentation,
)
from hwexp.train import dtype_policy

# TensorFlow's EagerTensor.__array__ predates numpy 2's copy keyword; Keras triggers it.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = 16
NUM_CLASSES = len(CLASSES)


def tiny_model(name: str, augment: str = "on", **changes: object) -> keras.Model:
    model_cfg = OmegaConf.merge(load_group("model", name), TINY_MODELS[name], changes)
    return build_model(model_cfg, load_group("augment", augment), NUM_CLASSES, SIZE, seed=1)


def batch(n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % NUM_CLASSES).astype(np.int32)
    return glyph_images(labels, SIZE, rng)[..., None], labels


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_every_model_is_functional_and_trains_a_step(name: str) -> None:
    model = tiny_model(name)
    assert model.__class__.__name__ == "Functional"
    assert model.input.dtype == "uint8"
    assert tuple(model.input.shape) == (None, SIZE, SIZE, 1)
    assert tuple(model.output.shape) == (None, NUM_CLASSES)
    assert model.get_layer("rescale").scale == pytest.approx(1 / 255)

    images, labels = batch()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    loss = float(model.train_on_batch(images, labels))
    assert np.isfinite(loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    probs = np.asarray(model(images, training=False))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_article_has_the_reference_layout_and_configurable_activation() -> None:
    model = tiny_model("article", augment="off", activation="tanh", dense_units=24)
    kinds = [type(layer).__name__ for layer in model.layers]
    body = kinds[kinds.index("Rescaling") + 1 :]
    block = ["Conv2D", "Conv2D", "MaxPooling2D", "Dropout"]
    assert body == [*block, *block, "Flatten", "Dense", "Dropout", "Dense", "Activation"]
    assert model.get_layer("b1_conv1").activation.__name__ == "tanh"
    assert model.get_layer("dense").units == 24


def test_vgg_flatten_head_and_unknown_names_are_handled() -> None:
    model = tiny_model("vgg_bn", head="flatten")
    assert model.get_layer("flatten") is not None
    with pytest.raises(ValueError, match="head"):
        tiny_model("vgg_bn", head="mean")
    with pytest.raises(ValueError, match="unknown model"):
        build_model({"name": "lenet"}, load_group("augment", "off"), NUM_CLASSES, SIZE)


def test_vgg_pool_first_pools_before_batch_norm_with_the_same_weights() -> None:
    plain = tiny_model("vgg_bn", augment="off", pool_first=False)
    early = tiny_model("vgg_bn", augment="off", pool_first=True)
    order = [type(layer).__name__ for layer in early.layers]
    first = order.index("Conv2D")
    assert order[first : first + 5] == [
        "Conv2D", "MaxPooling2D", "BatchNormalization", "Activation", "Dropout"
    ]  # fmt: skip
    assert [w.shape for w in early.get_weights()] == [w.shape for w in plain.get_weights()]
    # Batch norm and activation run on the pooled map, a quarter of the convolution's.
    conv, norm = early.get_layer("b1_1_conv"), early.get_layer("b1_1_bn")
    assert norm.input.shape[1] * 2 == conv.output.shape[1] == SIZE
    # With the same weights and a positive batch-norm scale, inference is the same function:
    # max pooling commutes with a per-channel increasing map.
    early.set_weights(plain.get_weights())
    images, _ = batch()
    np.testing.assert_allclose(
        early(images, training=False), plain(images, training=False), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_augmentation_is_inactive_at_inference_and_stripped_model_matches(name: str) -> None:
    model = tiny_model(name, augment="on")
    images, _ = batch()
    # (training=True first: it updates batch-norm statistics, which inference then uses)
    training = np.asarray(model(images, training=True))
    inference = np.asarray(model(images, training=False))
    np.testing.assert_array_equal(inference, np.asarray(model(images, training=False)))
    assert not np.allclose(inference, training)

    stripped = strip_augmentation(model)
    assert stripped.__class__.__name__ == "Functional"
    assert not any(is_training_only(layer) for layer in stripped.layers)
    assert any(is_training_only(layer) for layer in model.layers)
    np.testing.assert_allclose(np.asarray(stripped(images)), inference, rtol=1e-5, atol=1e-6)
    # Shared layers, not copies: a weight change in the trained model shows in the stripped one.
    assert stripped.get_layer("logits") is model.get_layer("logits")


def test_stripped_model_saves_and_reloads_without_custom_layers(tmp_path) -> None:
    model = tiny_model("resnet_small", augment="on")
    stripped = strip_augmentation(model)
    assert not any(isinstance(layer, RandomSlant) for layer in stripped.layers)
    path = tmp_path / "model.keras"
    stripped.save(path)
    reloaded = keras.saving.load_model(path)
    images, _ = batch()
    np.testing.assert_allclose(
        np.asarray(reloaded(images)), np.asarray(stripped(images)), rtol=1e-5, atol=1e-6
    )


def test_augmentation_layers_follow_config_and_only_act_in_training() -> None:
    on = load_group("augment", "on")
    names = [layer.name for layer in augmentation_layers(on, seed=3)]
    assert names == ["augment_rotation", "augment_zoom", "augment_shift", "augment_shear"]
    assert augmentation_layers(load_group("augment", "off")) == []
    only_zoom = OmegaConf.merge(on, {"rotation": 0, "shift": 0, "shear": 0})
    assert [layer.name for layer in augmentation_layers(only_zoom)] == ["augment_zoom"]

    images = batch()[0].astype("float32") / 255.0
    for layer in augmentation_layers(on, seed=3):
        np.testing.assert_array_equal(np.asarray(layer(images, training=False)), images)
        assert not np.allclose(np.asarray(layer(images, training=True)), images), layer.name


def test_random_stroke_width_thickens_or_thins_whole_images_in_training_only() -> None:
    image = np.zeros((1, 15, 15, 1), np.float32)
    image[0, 3:12, 6:9, 0] = 1.0  # a stroke 3 px wide
    images = np.repeat(image, 64, axis=0)
    layer = RandomStrokeWidth(1.0, seed=0)
    widths = np.asarray(layer(images, training=True))[:, 7, :, 0].sum(axis=1)
    assert set(np.unique(widths)) == {1.0, 5.0}  # every image eroded or dilated by a pixel
    half = np.asarray(RandomStrokeWidth(0.5, seed=0)(images, training=True))[:, 7, :, 0]
    assert set(np.unique(half.sum(axis=1))) == {1.0, 3.0, 5.0}
    np.testing.assert_array_equal(np.asarray(layer(images, training=False)), images)
    assert RandomStrokeWidth.from_config(layer.get_config()).rate == 1.0
    on = OmegaConf.merge(load_group("augment", "on"), {"stroke_width": 0.3})
    assert augmentation_layers(on)[-1].name == "augment_stroke_width"
    assert is_training_only(augmentation_layers(on)[-1])


def test_random_slant_keeps_the_centre_and_tilts_a_vertical_stroke() -> None:
    size = 21
    image = np.zeros((1, size, size, 1), np.float32)
    image[0, :, size // 2, 0] = 1.0  # a vertical stroke through the centre
    slant = RandomSlant(30.0, seed=0)
    out = np.asarray(slant(np.repeat(image, 4, axis=0), training=True))[..., 0]
    centre_row = out[:, size // 2, :]
    assert (np.argmax(centre_row, axis=1) == size // 2).all()  # centre row does not move
    top, bottom = np.argmax(out[:, 1, :], axis=1), np.argmax(out[:, -2, :], axis=1)
    tilted = top != bottom
    assert tilted.any()
    # about the centre: the top and bottom move by the same amount in opposite directions
    np.testing.assert_allclose((top - size // 2)[tilted], -(bottom - size // 2)[tilted], atol=1)
    assert RandomSlant.from_config(slant.get_config()).max_degrees == 30.0
    np.testing.assert_array_equal(np.asarray(slant(image, training=False)), image)


def test_mixed_precision_keeps_softmax_float32_and_restores_policy() -> None:
    with dtype_policy("mixed_float16"):
        model = tiny_model("vgg_bn")
    assert keras.config.dtype_policy().name == "float32"
    assert model.get_layer("b1_1_conv").compute_dtype == "float16"
    assert model.get_layer("probabilities").compute_dtype == "float32"
    assert np.asarray(model(batch()[0], training=False)).dtype == np.float32


def test_every_activation_the_option_table_offers_is_a_keras_activation() -> None:
    from hwexp.config_check import ACTIVATIONS, MODEL_OPTIONS
    from hwexp.model import BODIES

    for name in ACTIVATIONS:
        assert callable(keras.activations.get(name)), name
    assert set(MODEL_OPTIONS) == set(BODIES)
