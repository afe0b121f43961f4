"""Training throughput (samples/s) of each model at 48x48 and 64x64 on random data.

Uses the real pipeline, model builders and ``hwexp.train.fit`` with the repository's config
groups (``conf/model/*.yaml``, ``conf/augment/<augment>.yaml``, ``conf/trainer/default.yaml``),
callbacks off. Throughput counts training batches only (no validation) and leaves out the
first epoch (graph tracing). Prints a markdown table.

    python scripts/bench_train.py [--models article vgg_bn] [--sizes 48 64] [--samples 2048]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import hwexp  # noqa: E402, F401  (before TensorFlow: sets its environment defaults)

CONF_DIR = Path(hwexp.CONF_DIR)


def random_split(n: int, size: int, num_classes: int, rng: np.random.Generator):
    from hwexp.data.dataset import SplitArrays

    return SplitArrays(
        images=rng.integers(0, 256, (n, size, size), dtype=np.uint8),
        labels=rng.integers(0, num_classes, n).astype(np.int32),
        writers=np.array(["w0"] * n),
        sources=np.array(["random"] * n),
    )


def random_splits(n: int, size: int, num_classes: int, seed: int = 0):
    from hwexp.data.dataset import PreparedSplits

    rng = np.random.default_rng(seed)
    return PreparedSplits(
        classes=tuple(chr(0x4E00 + i) for i in range(num_classes)),
        train=random_split(n, size, num_classes, rng),
        val=random_split(64, size, num_classes, rng),
        test=random_split(64, size, num_classes, rng),
        image_size=size,
        source_weights={"random": 1.0},
        name="random",
    )


def bench_config(model: str, augment: str, batch_size: int, epochs: int, mixed: bool) -> DictConfig:
    def group(name: str, option: str) -> DictConfig:
        return OmegaConf.load(CONF_DIR / name / f"{option}.yaml")

    cfg = OmegaConf.create(
        {
            "seed": 0,
            "model": group("model", model),
            "augment": group("augment", augment),
            "callbacks": group("callbacks", "default"),
            "trainer": group("trainer", "default"),
        }
    )
    for block in ("early_stopping", "reduce_lr", "checkpoint"):
        cfg.callbacks[block].enabled = False
    cfg.trainer.update(epochs=epochs, batch_size=batch_size, verbose=0, mixed_precision=mixed)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["article", "vgg_bn", "resnet_small"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[48, 64])
    parser.add_argument("--samples", type=int, default=2048, help="training samples per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="the first is not timed")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=75)
    parser.add_argument("--augment", choices=["on", "off"], default="on")
    parser.add_argument("--mixed-precision", action="store_true")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from hwexp.train import fit

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"GPUs: {len(tf.config.list_physical_devices('GPU'))}, TF {tf.__version__}, "
        f"Keras {keras.__version__}; batch {args.batch_size}, {args.classes} classes, "
        f"augment {args.augment}, {args.samples} samples x {args.epochs - 1} timed epochs; "
        f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', '-')}; "
        f"load average before: {os.getloadavg()[0]:.2f}\n"
    )
    print("| model | size | params | dtype policy | samples/s | ms/batch | wall s |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        for size in args.sizes:
            splits = random_splits(args.samples, size, args.classes)
            cfg = bench_config(
                model, args.augment, args.batch_size, args.epochs, args.mixed_precision
            )
            start = time.perf_counter()
            result = fit(splits, cfg)
            wall = time.perf_counter() - start
            rate = result.samples_per_second
            print(
                f"| {model} | {size} | {result.model.count_params():,} | {result.dtype_policy} "
                f"| {rate:,.0f} | {1000 * args.batch_size / rate:.1f} | {wall:.0f} |",
                flush=True,
            )
            keras.backend.clear_session()


if __name__ == "__main__":
    main()
