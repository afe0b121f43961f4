"""TFLite export (``formats=[tflite]``): ``<name>.tflite`` (float32) and, unless
``tflite.int8=false``, ``<name>_int8.tflite`` (full integer, calibrated on
``tflite.representative_samples`` training images); builtin ops only (no Flex delegate)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hwexp.export.base import Conversion, Exported, Format, Predict
from hwexp.export.tensor import input_signature, tensor_io_checks

if TYPE_CHECKING:
    import keras

    from hwexp.data.dataset import SplitArrays


def representative_images(
    train: SplitArrays, samples: int, seed: int
) -> Callable[[], Iterator[list[np.ndarray]]]:
    """A TFLite ``representative_dataset``: ``samples`` random training images (seeded), one
    ``(1, S, S, 1)`` uint8 batch at a time."""
    rows = np.random.default_rng(seed).permutation(len(train))[:samples]
    images = train.images[np.sort(rows)]

    def batches() -> Iterator[list[np.ndarray]]:
        for image in images:
            yield [image[np.newaxis, :, :, np.newaxis]]

    return batches


def to_tflite(
    model: keras.Model,
    path: Path,
    representative: Callable[[], Iterator[list[np.ndarray]]] | None = None,
) -> Path:
    """Convert to TFLite builtin ops only (no Flex delegate needed) at ``path``: float32, or,
    with a ``representative`` dataset, full-integer int8 (uint8 image input, float32
    probabilities out)."""
    import tensorflow as tf

    options: dict[str, Any] = {"target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}}
    if representative is not None:
        options = {
            "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
            "optimizations": [tf.lite.Optimize.DEFAULT],
            "representative_dataset": representative,
            "inference_input_type": tf.uint8,
        }
    model.export(
        str(path),
        format="litert",
        verbose=False,
        input_signature=input_signature(model),
        **options,
    )
    return path


def _tflite_interpreter(path: Path, threads: int | None) -> Any:
    """LiteRT's interpreter (``ai-edge-litert``), else TensorFlow's own."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - ai-edge-litert is a dependency
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    return Interpreter(model_path=str(path), num_threads=threads)


def tflite_predictor(path: Path, threads: int | None = None) -> Predict:
    """Run a ``.tflite`` model (any batch size; quantized outputs are dequantized)."""
    interpreter = _tflite_interpreter(path, threads)
    input_index = interpreter.get_input_details()[0]["index"]
    output = interpreter.get_output_details()[0]
    scale, zero_point = output["quantization"]
    state = {"shape": None}

    def predict(images: np.ndarray) -> np.ndarray:
        if state["shape"] != images.shape:
            interpreter.resize_tensor_input(input_index, images.shape)
            interpreter.allocate_tensors()
            state["shape"] = images.shape
        interpreter.set_tensor(input_index, np.ascontiguousarray(images, np.uint8))
        interpreter.invoke()
        probs = interpreter.get_tensor(output["index"])
        if scale:
            return (probs.astype(np.float32) - zero_point) * scale
        return np.array(probs, np.float32)

    return predict


def convert(cv: Conversion) -> list[Exported]:
    """``<name>.tflite`` and, with ``tflite.int8``, ``<name>_int8.tflite``."""
    done = [
        Exported("tflite", "tflite_fp32", to_tflite(cv.model, cv.staging / f"{cv.name}.tflite"))
    ]
    if cv.cfg["tflite"]["int8"]:
        data = representative_images(
            cv.train, int(cv.cfg["tflite"]["representative_samples"]), int(cv.cfg["seed"])
        )
        path = to_tflite(cv.model, cv.staging / f"{cv.name}_int8.tflite", data)
        done.append(Exported("tflite", "tflite_int8", path, quantized=True))
    return done


def check(item: Exported, cv: Conversion) -> dict[str, Any]:
    """Tensor names are not kept by the converter: shapes, dtype and ops are checked."""
    interpreter = _tflite_interpreter(item.path, 1)
    given, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    ops_details = getattr(interpreter, "_get_ops_details", list)  # absent: parity shows it
    op_names = {str(op.get("op_name", "")) for op in ops_details()}
    random_ops = any("RANDOM" in name or name == "MULTINOMIAL" for name in op_names)
    in_shape, out_shape = list(given["shape_signature"]), list(out["shape_signature"])
    return tensor_io_checks(np.dtype(given["dtype"]), in_shape, out_shape, random_ops, cv)


FORMAT = Format(
    convert=convert,
    check=check,
    predictor=lambda item, cv: tflite_predictor(item.path),
)
