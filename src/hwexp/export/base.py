"""The interface every export format implements, and what a conversion is given and gives back.

A format is a ``Format``: ``convert`` writes its file(s) into the staging folder, ``check``
reads one back and returns named checks (False = failed), ``predictor`` runs it for the parity
check (None: it cannot run on this machine). ``hwexp.export.formats.FORMATS`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras

    from hwexp.data.dataset import SplitArrays
    from hwexp.tracking.runs import TrainedModel

Predict = Callable[[np.ndarray], np.ndarray]
"""``(n, S, S, 1)`` uint8 images -> ``(n, classes)`` float32 probabilities."""


@dataclass
class Exported:
    """One exported file (or package folder) and what was checked about it."""

    format: str  # the FORMATS key that wrote it
    variant: str  # coreml | coreml_nn | tflite_fp32 | tflite_int8 | onnx
    path: Path
    quantized: bool = False  # accuracy drop reported, agreement with Keras not enforced
    checks: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def failed_checks(self) -> list[str]:
        return [name for name, ok in self.checks.items() if ok is False]


@dataclass(frozen=True)
class Conversion:
    """What every format's ``convert`` / ``check`` / ``predictor`` is given."""

    cfg: Mapping[str, Any]  # conf/export.yaml
    model: keras.Model  # the inference model (hwexp.export.run.inference_model)
    trained: TrainedModel
    train: SplitArrays  # for calibration (int8)
    staging: Path  # the folder files are written to
    name: str  # file stem
    metadata: dict[str, str]
    descriptions: dict[str, str]  # feature name -> description

    @property
    def size(self) -> int:
        return int(self.model.input_shape[1])


@dataclass(frozen=True)
class Format:
    """One export format: how it is written, read back and run."""

    convert: Callable[[Conversion], list[Exported]]
    check: Callable[[Exported, Conversion], dict[str, Any]]
    predictor: Callable[[Exported, Conversion], Predict | None]
    check_options: Callable[[Mapping[str, Any], list[str]], None] = lambda cfg, formats: None
    """Raises ``ConfigError`` for an invalid option of this format (given all requested)."""


def evenly_spread(count: int, limit: int | None) -> np.ndarray:
    """``min(count, limit)`` indices spread over ``range(count)`` (all when ``limit`` is None)."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, int(limit)).round().astype(np.int64))
