"""Size, single-image CPU latency and test accuracy of every export format of one run.

Exports the run with ``hwexp.export.run.export_run`` (into a temporary folder, nothing logged or
registered): Core ML with each ``--coreml-weights`` option, TFLite float32 and int8, ONNX. Then
times single-image inference for TFLite (LiteRT interpreter) and ONNX Runtime, one thread,
``--calls`` calls each after a warm-up, cycling through the run's test images, and prints a
markdown table (sizes in MB = 10^6 bytes; accuracy on the run's test split; Core ML accuracy is
measured on macOS only).

    python scripts/bench_export.py [--calls 1000] [--coreml-weights fp16,int8,palette4] \
        [export overrides, e.g. run=<id> paths.root_dir=/path/to/project]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def latency_ms(predict, images: np.ndarray, calls: int, warmup: int = 50) -> tuple[float, float]:
    """(p50, p99) milliseconds of ``predict`` on one ``(1, S, S, 1)`` image per call."""
    for i in range(warmup):
        predict(images[i % len(images)][np.newaxis])
    times = np.empty(calls)
    for i in range(calls):
        image = images[i % len(images)][np.newaxis]
        start = time.perf_counter_ns()
        predict(image)
        times[i] = (time.perf_counter_ns() - start) / 1e6
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument(
        "--coreml-weights",
        type=lambda text: text.split(","),
        default=["fp16", "int8", "palette4"],
        help="comma-separated Core ML weight options, each exported once",
    )
    parser.add_argument("overrides", nargs="*", help="overrides of conf/export.yaml")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from hwexp import CONF_DIR
    from hwexp.data.dataset import load_splits
    from hwexp.export.onnx import onnx_predictor
    from hwexp.export.run import export_run, run_data_config
    from hwexp.export.tflite import tflite_predictor
    from hwexp.tracking.runs import client_for, load_trained_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="hwexp-bench-export-") as out:
        first = None
        for i, weights in enumerate(args.coreml_weights):
            formats = "[coreml,tflite,onnx]" if i == 0 else "[coreml]"
            with initialize_config_dir(CONF_DIR, version_base="1.3"):
                cfg = compose(
                    "export",
                    overrides=[
                        *args.overrides,
                        f"formats={formats}",
                        f"coreml.weights={weights}",
                        f"output_dir={out}/{weights}",
                        "log=false",
                        "register=false",
                    ],
                )
            result = export_run(cfg)
            first = first or (cfg, result)
            m = result.metrics
            for variant, path in result.files.items():
                label = f"coreml ({weights})" if variant == "coreml" else variant
                size = m[f"export/{variant}/size_bytes"]
                rows.append((variant, label, path, size, m.get(f"export/{variant}/accuracy")))
        cfg, result = first
        client = client_for(cfg.tracking)
        run_id = result.run_id
        trained = load_trained_model(client, run_id)
        test = load_splits(run_data_config(cfg, trained.config), progress=False).test
        images = np.asarray(test.images[np.arange(min(len(test), 256))])[..., np.newaxis]
        keras_accuracy = result.metrics["export/keras/accuracy"]
        print(
            f"\nrun {run_id} ({trained.config['dataset']['name']}, "
            f"{trained.config['dataset']['classes']}, model {trained.config['model']['name']}), "
            f"{int(result.metrics['export/test_samples'])} test images, Keras accuracy "
            f"{keras_accuracy:.4f}; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, one thread, {args.calls} calls\n"
        )
        print("| format | file | size (MB) | test accuracy | p50 (ms) | p99 (ms) |")
        print("|---|---|---:|---:|---:|---:|")
        for variant, label, path, size, accuracy in rows:
            p50 = p99 = None
            if variant.startswith("tflite"):
                p50, p99 = latency_ms(tflite_predictor(path, threads=1), images, args.calls)
            elif variant == "onnx":
                p50, p99 = latency_ms(onnx_predictor(path, threads=1), images, args.calls)
            cells = [
                label,
                path.name,
                f"{size / 1e6:.2f}",
                "n/a (macOS only)" if accuracy is None else f"{accuracy:.4f}",
                "" if p50 is None else f"{p50:.3f}",
                "" if p99 is None else f"{p99:.3f}",
            ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
