"""What the tensor formats (TFLite, ONNX) share: their input signature and their I/O checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hwexp.export.base import Conversion

if TYPE_CHECKING:
    import keras


def input_signature(model: keras.Model) -> list[Any]:
    """The uint8 ``(None, S, S, 1)`` ``image`` input that TFLite and ONNX exports take."""
    import tensorflow as tf

    from hwexp.contract import INPUT_NAME

    size = int(model.input_shape[1])
    return [tf.TensorSpec((None, size, size, 1), tf.uint8, name=INPUT_NAME)]


def tensor_io_checks(
    dtype: np.dtype, in_shape: list[int], out_shape: list[int], random_ops: bool, cv: Conversion
) -> dict[str, bool]:
    """Checks of a tensor model (TFLite, ONNX): a uint8 ``(n, S, S, 1)`` input, a
    ``(n, classes)`` output (dynamic dimensions as -1), no random ops."""
    return {
        "input_uint8": dtype == np.uint8,
        "input_shape": in_shape[1:] == [cv.size, cv.size, 1],
        "output_shape": out_shape[1:] == [len(cv.trained.classes)],
        "no_random_ops": not random_ops,
    }
