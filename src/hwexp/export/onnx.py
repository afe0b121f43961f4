"""ONNX export (``formats=[onnx]``): ``<name>.onnx`` via Keras' exporter (tf2onnx), with the
classes and preprocessing in its metadata; and the ONNX Runtime session that export checks and
``hwexp.serve`` both run it with."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hwexp.contract import CLASSES_KEY, INPUT_NAME, OUTPUT_NAME
from hwexp.export.base import Conversion, Exported, Format, Predict
from hwexp.export.tensor import input_signature, tensor_io_checks

if TYPE_CHECKING:
    import keras


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session (quiet, threads that do not spin); ``threads``: intra-op
    threads (None: ONNX Runtime's default). Raises ONNX Runtime's own errors."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def to_onnx(model: keras.Model, path: Path, opset: int, metadata: Mapping[str, str]) -> Path:
    """Convert to ONNX at ``path`` (Keras' exporter, i.e. tf2onnx, with its numpy-2 patches);
    the output is renamed ``probabilities`` and ``metadata`` is stored as metadata_props."""
    import onnx

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    model.export(
        str(path),
        format="onnx",
        verbose=False,
        input_signature=input_signature(model),
        opset_version=int(opset),
    )
    proto = onnx.load(str(path))
    graph = proto.graph
    old = graph.output[0].name
    for node in graph.node:
        node.output[:] = [OUTPUT_NAME if name == old else name for name in node.output]
        node.input[:] = [OUTPUT_NAME if name == old else name for name in node.input]
    graph.output[0].name = OUTPUT_NAME
    onnx.helper.set_model_props(proto, {key: str(value) for key, value in metadata.items()})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def onnx_predictor(path: Path, threads: int | None = None) -> Predict:
    """Run an ``.onnx`` model with ONNX Runtime on the CPU (``threads`` intra-op threads)."""
    session = onnx_session(path, threads)

    def predict(images: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]

    return predict


def convert(cv: Conversion) -> list[Exported]:
    """``<name>.onnx`` with the run's metadata and its classes (``hwexp.classes``)."""
    metadata = {**cv.metadata, CLASSES_KEY: json.dumps(list(cv.trained.classes))}
    path = to_onnx(cv.model, cv.staging / f"{cv.name}.onnx", cv.cfg["onnx"]["opset"], metadata)
    return [Exported("onnx", "onnx", path)]


def check(item: Exported, cv: Conversion) -> dict[str, Any]:
    """Tensor names ``image`` / ``probabilities``, shapes, dtype and ops."""
    import onnx

    session = onnx_session(item.path)
    given, out = session.get_inputs()[0], session.get_outputs()[0]
    if given.name != INPUT_NAME or out.name != OUTPUT_NAME:
        return {"io_names": False}
    in_shape = [d if isinstance(d, int) else -1 for d in given.shape]
    out_shape = [d if isinstance(d, int) else -1 for d in out.shape]
    dtype = np.dtype(np.uint8) if given.type == "tensor(uint8)" else np.dtype(np.float32)
    graph = onnx.load(str(item.path)).graph
    random_ops = any(node.op_type.startswith("Random") for node in graph.node)
    return tensor_io_checks(dtype, in_shape, out_shape, random_ops, cv)


FORMAT = Format(
    convert=convert,
    check=check,
    predictor=lambda item, cv: onnx_predictor(item.path),
)
