"""The export formats by name (``formats=[...]`` of ``conf/export.yaml``).

A new format is one module with a ``Format`` (``hwexp.export.base``) and one entry here.
"""

from __future__ import annotations

from hwexp.export import coreml, onnx, tflite
from hwexp.export.base import Format

FORMATS: dict[str, Format] = {
    "coreml": coreml.ML_PROGRAM,
    "coreml_nn": coreml.NEURAL_NETWORK,
    "tflite": tflite.FORMAT,
    "onnx": onnx.FORMAT,
}
