"""Shared fixtures for the model/train/track tests: tiny learnable data and tiny configs.

Importing this module first sets ``KERAS_BACKEND=tensorflow`` and quiets TensorFlow's C++
logging, so it must be imported before keras/tensorflow/hwexp.model.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import hwexp  # noqa: E402
from hwexp.data.dataset import PreparedSplits, SplitArrays  # noqa: E402

CONF_DIR = Path(hwexp.CONF_DIR)
CLASSES = ("あ", "い", "う", "え")

# Small bodies so a test trains in seconds; the remaining keys come from conf/model/*.yaml.
TINY_MODELS: dict[str, dict[str, Any]] = {
    "article": {"filters": [8, 16], "dense_units": 32},
    "vgg_bn": {"widths": [8, 16], "convs_per_block": 1, "dense_units": 16, "bn_momentum": 0.9},
    "resnet_small": {"widths": [8, 16], "blocks_per_stage": 1, "bn_momentum": 0.9},
}


def glyph(label: int, size: int) -> np.ndarray:
    """A bright (255) stroke pattern per class on a dark ``(size, size)`` canvas: 0 horizontal
    bar, 1 vertical bar, 2 hollow square, 3 diagonal; other labels: cross (unused by CLASSES)."""
    canvas = np.zeros((size, size), np.uint8)
    lo, hi, mid = size // 4, size - size // 4, size // 2
    if label == 0:
        canvas[mid - 1 : mid + 1, lo:hi] = 255
    elif label == 1:
        canvas[lo:hi, mid - 1 : mid + 1] = 255
    elif label == 2:
        canvas[lo:hi, lo:hi] = 255
        canvas[lo + 2 : hi - 2, lo + 2 : hi - 2] = 0
    elif label == 3:
        steps = np.arange(lo, hi)
        canvas[steps, steps] = canvas[steps[:-1], steps[1:]] = 255
    else:
        canvas[mid - 1 : mid + 1, lo:hi] = canvas[lo:hi, mid - 1 : mid + 1] = 255
    return canvas


def glyph_images(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Class-dependent strokes (``glyph``) shifted by up to 2 pixels, plus dim noise: learnable
    in a few dozen steps by any of the models. ``(n, size, size)`` uint8, ink bright on dark."""
    images = rng.integers(0, 40, (len(labels), size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        shifted = np.roll(glyph(int(label), size), tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
        images[i] = np.maximum(images[i], shifted)
    return images


def glyph_split(
    n: int,
    size: int,
    rng: np.random.Generator,
    num_classes: int = len(CLASSES),
    sources: Sequence[str] = ("etl8g",),
    writers: int = 5,
) -> SplitArrays:
    """``n`` samples with balanced labels, writers ``w0..``, sources assigned round-robin."""
    labels = (np.arange(n) % num_classes).astype(np.int32)
    rng.shuffle(labels)
    return SplitArrays(
        images=glyph_images(labels, size, rng),
        labels=labels,
        writers=np.array([f"w{i % writers}" for i in range(n)]),
        sources=np.array([sources[i % len(sources)] for i in range(n)]),
    )


def glyph_splits(
    size: int = 16,
    n_train: int = 256,
    n_eval: int = 64,
    sources: Sequence[str] = ("etl8g",),
    source_weights: dict[str, float] | None = None,
    seed: int = 0,
) -> PreparedSplits:
    """A complete tiny ``PreparedSplits`` over ``CLASSES``."""
    rng = np.random.default_rng(seed)
    return PreparedSplits(
        classes=CLASSES,
        train=glyph_split(n_train, size, rng, sources=sources),
        val=glyph_split(n_eval, size, rng, sources=sources),
        test=glyph_split(n_eval, size, rng, sources=sources),
        image_size=size,
        source_weights=source_weights or {s: 1.0 for s in sources},
        name="glyphs",
    )


def load_group(group: str, option: str) -> DictConfig:
    return OmegaConf.load(CONF_DIR / group / f"{option}.yaml")


def tiny_config(
    model: str = "article", augment: str = "off", mlruns_dir: str | Path = "mlruns", **dotlist: Any
) -> DictConfig:
    """The repository's config groups composed as the app does, shrunk for tests (2 epochs,
    batch 32, silent), then ``dotlist`` overrides (``{"trainer.lr": 0.0}``)."""
    model_cfg = OmegaConf.merge(load_group("model", model), TINY_MODELS[model])
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "paths": {"mlruns_dir": str(mlruns_dir)},
            "model": model_cfg,
            "augment": load_group("augment", augment),
            "callbacks": load_group("callbacks", "default"),
            "trainer": load_group("trainer", "default"),
            "tracking": load_group("tracking", "mlflow"),
        }
    )
    shrink = {"trainer.epochs": 2, "trainer.batch_size": 32, "trainer.verbose": 0}
    for key, value in {**shrink, **dotlist}.items():
        OmegaConf.update(cfg, key, value, force_add=False)
    return cfg
