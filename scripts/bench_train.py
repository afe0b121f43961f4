"""Training speed: throughput against the CPU's peak, and time to a validation accuracy.

``throughput`` (the default) times training of each model on random data through the real
pipeline, model builders and ``hwexp.train.fit``, with the repository's config groups
(``conf/model/*.yaml``, ``conf/augment/<augment>.yaml``, ``conf/trainer/default.yaml``) and
callbacks off. It counts training batches only and leaves out the first epoch (graph tracing).
Per model it prints samples/s, the FLOPs a training sample costs (counted from the model's
convolution and dense layers, x3 for the backward pass) and the share of the CPU's peak that
reaches; the peak comes from the core count, clock and vector width read off this machine.

``time-to-accuracy`` trains the main command's data and model (``python -m hwexp``'s config,
plus each arm's overrides) without MLflow and prints, per arm, the data preparation time and the
wall time and epochs until the validation accuracy first reaches ``--target``.

    python scripts/bench_train.py [throughput] [--models article vgg_bn] [--sizes 48 64]
    python scripts/bench_train.py --models vgg_bn:pool_first=false vgg_bn   # a variant
    python scripts/bench_train.py time-to-accuracy --target 0.98 \\
        --arm default --arm onecycle8 trainer.lr_schedule=onecycle trainer.epochs=8
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import hwexp  # noqa: E402, F401  (before TensorFlow: sets its environment defaults)

CONF_DIR = Path(hwexp.CONF_DIR)
FMA_UNITS_PER_CORE = 2  # most server cores since Haswell / Zen; one FMA counts 2 FLOPs


# --------------------------------------------------------------------------- the CPU


@dataclass(frozen=True)
class Cpu:
    """What this machine's CPU can do: name, cores, clock (GHz) and fp32 lanes per vector."""

    name: str
    cores: int
    ghz: float
    fp32_lanes: int
    isa: str

    @property
    def peak_gflops(self) -> float:
        """fp32 peak: cores x clock x FMA units x lanes x 2 (a fused multiply-add)."""
        return self.cores * self.ghz * FMA_UNITS_PER_CORE * self.fp32_lanes * 2


def detect_cpu(cpuinfo: str | None = None, cores: int | None = None) -> Cpu:
    """Read ``/proc/cpuinfo`` (or ``cpuinfo``): model name, flags and clock.

    The clock is the nominal one from the model name (``@ 2.10GHz``) when it has one, else the
    highest ``cpu MHz`` listed. The vector width honours ``ONEDNN_MAX_CPU_ISA=AVX2`` (which
    makes oneDNN, hence TensorFlow's convolutions, use 256-bit vectors only).
    """
    from hwexp.train import cpu_flags

    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    name = names[0].strip() if names else (platform.processor() or platform.machine())
    flags = cpu_flags(cpuinfo)
    nominal = re.search(r"@\s*([\d.]+)\s*GHz", name)
    mhz = [float(v) for v in re.findall(r"^cpu MHz\s*:\s*([\d.]+)$", cpuinfo, re.M)]
    ghz = float(nominal.group(1)) if nominal else (max(mhz) / 1000 if mhz else 0.0)
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith("AVX2")
    if "avx512f" in flags and not capped:
        lanes, isa = 16, "AVX-512" + (" + AMX" if "amx_tile" in flags else "")
    elif "avx2" in flags and "fma" in flags:
        lanes, isa = 8, "AVX2" + (" (AVX-512 capped by ONEDNN_MAX_CPU_ISA)" if capped else "")
    else:
        lanes, isa = 4, "SSE"
    return Cpu(name, cores or os.cpu_count() or 1, ghz, lanes, isa)


# --------------------------------------------------------------------------- the model


def training_flops_per_sample(model) -> float:
    """FLOPs of one training sample: 3x the forward pass of every convolution and dense
    layer (the backward pass costs about twice the forward); batch norm, activations,
    pooling and augmentation are left out (a few percent for these models)."""
    import keras

    forward = 0.0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            forward += 2.0 * h * w * kh * kw * c_in * c_out / layer.groups
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            forward += 2.0 * h * w * kh * kw * c_out
        elif isinstance(layer, keras.layers.Dense):
            forward += 2.0 * layer.input.shape[-1] * layer.units
    return 3.0 * forward


# --------------------------------------------------------------------------- throughput


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

    name, _, changes = model.partition(":")  # vgg_bn:pool_first=false,widths=[16,32]
    dotlist = re.split(r",(?![^\[]*\])", changes) if changes else []  # commas outside [...]
    model_cfg = OmegaConf.merge(group("model", name), OmegaConf.from_dotlist(dotlist))
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "model": model_cfg,
            "augment": group("augment", augment),
            "callbacks": group("callbacks", "default"),
            "trainer": group("trainer", "default"),
        }
    )
    for block in ("early_stopping", "reduce_lr", "checkpoint"):
        cfg.callbacks[block].enabled = False
    cfg.trainer.update(epochs=epochs, batch_size=batch_size, verbose=0, mixed_precision=mixed)
    return cfg


def throughput(args: argparse.Namespace, cpu: Cpu) -> None:
    import keras

    from hwexp.train import fit

    print(
        "| model | size | params | training MFLOP/sample | samples/s | ms/batch | GFLOP/s "
        "| share of peak | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
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
            flops = training_flops_per_sample(result.model)
            achieved = rate * flops / 1e9
            print(
                f"| {model} | {size} | {result.model.count_params():,} | {flops / 1e6:.0f} "
                f"| {rate:,.0f} | {1000 * args.batch_size / rate:.1f} | {achieved:.1f} "
                f"| {100 * achieved / cpu.peak_gflops:.0f}% | {wall:.0f} |",
                flush=True,
            )
            keras.backend.clear_session()


# --------------------------------------------------------------------------- time to accuracy


def main_command_config(root: Path, overrides: list[str]) -> DictConfig:
    """``python -m hwexp``'s composed config under ``root``, MLflow off, plus ``overrides``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(
            "config",
            overrides=[f"paths.root_dir={root}", "tracking.enabled=false", *overrides],
        )


def time_to_accuracy(args: argparse.Namespace) -> None:
    import keras

    from hwexp.config_check import check_config
    from hwexp.data.dataset import load_splits
    from hwexp.model import strip_augmentation
    from hwexp.train import evaluate, fit

    print(
        f"| arm | overrides | data s | s to val acc >= {args.target} | epochs to it | epochs run "
        "| train s | best val acc | test acc |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, *overrides in args.arm:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            root = Path(args.root) if args.root else Path(tmp)
            cfg = main_command_config(root, [*args.common, *overrides])
            check_config(cfg)
            start = time.perf_counter()
            splits = load_splits(cfg, progress=False)
            data_seconds = time.perf_counter() - start
            reached: list[tuple[int, float]] = []
            best = [0.0]

            def hook(
                epoch: int, logs: dict[str, float], reached=reached, best=best, start=start
            ) -> None:
                accuracy = float(logs.get("val_accuracy", 0.0))
                best[0] = max(best[0], accuracy)
                if accuracy >= args.target and not reached:
                    reached.append((epoch, time.perf_counter() - start))

            train_start = time.perf_counter()
            result = fit(splits, cfg, epoch_hook=hook)
            train_seconds = time.perf_counter() - train_start
            report = evaluate(strip_augmentation(result.model), splits.test, splits.classes)
            test = report.metrics("test")["test/accuracy"]
            when = f"{reached[0][1]:.0f}" if reached else "not reached"
            epochs = str(reached[0][0]) if reached else "-"
            print(
                f"| {name} | {' '.join(overrides) or '(defaults)'} | {data_seconds:.0f} | {when} "
                f"| {epochs} | {result.epochs_run} | {train_seconds:.0f} | {best[0]:.4f} "
                f"| {test:.4f} |",
                flush=True,
            )
            keras.backend.clear_session()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "mode", nargs="?", choices=["throughput", "time-to-accuracy"], default="throughput"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["article", "vgg_bn", "resnet_small"],
        help="model configs, each optionally with changes: vgg_bn:pool_first=false,widths=[16,32]",
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[48, 64])
    parser.add_argument("--samples", type=int, default=2048, help="training samples per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="the first is not timed")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=75)
    parser.add_argument("--augment", choices=["on", "off"], default="on")
    parser.add_argument("--mixed-precision", action="store_true")
    parser.add_argument("--target", type=float, default=0.98, help="validation accuracy")
    parser.add_argument(
        "--arm",
        nargs="+",
        action="append",
        metavar=("NAME", "OVERRIDE"),
        help="time-to-accuracy: an arm's name, then its Hydra overrides; repeatable",
    )
    parser.add_argument("--common", nargs="*", default=["trainer.verbose=0"])
    parser.add_argument(
        "--root", default=None, help="time-to-accuracy: HWEXP_ROOT to reuse (default: a fresh one)"
    )
    args = parser.parse_args()
    if args.mode == "time-to-accuracy" and not args.arm:
        args.arm = [["default"]]

    import keras
    import tensorflow as tf

    cpu = detect_cpu()
    print(
        f"# {cpu.name}, {cpu.cores} CPUs, {cpu.ghz:.2f} GHz, {cpu.isa}: fp32 peak "
        f"{cpu.peak_gflops:.0f} GFLOP/s (assuming {FMA_UNITS_PER_CORE} FMA units a core); "
        f"GPUs: {len(tf.config.list_physical_devices('GPU'))}, TF {tf.__version__}, "
        f"Keras {keras.__version__}; TF_ENABLE_ONEDNN_OPTS="
        f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', '-')}; load average before: "
        f"{os.getloadavg()[0]:.2f}\n"
    )
    if args.mode == "throughput":
        print(
            f"batch {args.batch_size}, {args.classes} classes, augment {args.augment}, "
            f"{args.samples} samples x {args.epochs - 1} timed epochs\n"
        )
        throughput(args, cpu)
    else:
        time_to_accuracy(args)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
