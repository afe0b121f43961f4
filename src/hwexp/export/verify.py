"""Verification of an export against the Keras model it came from: each file is read back
(its format's ``check``) and run (its ``predictor``) on the run's test split; it must agree
with Keras on the top-1 class of at least ``verify.min_agreement`` of the images (quantized
variants: the accuracy drop is reported, not enforced)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hwexp.errors import ExportError
from hwexp.export.base import Conversion, Exported, Predict, evenly_spread
from hwexp.export.formats import FORMATS

if TYPE_CHECKING:
    import keras

    from hwexp.data.dataset import SplitArrays

log = logging.getLogger(__name__)


def compare_on_split(
    model: keras.Model,
    split: SplitArrays,
    predictors: Mapping[str, Predict],
    batch_size: int = 256,
    rows: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Top-1 parity of each predictor with ``model`` (inference mode) on ``split``'s ``rows``.

    Returns ``{"keras": {"accuracy", "source/<source>/accuracy" for each source},
    <variant>: {"accuracy", "agreement", "max_abs_diff", "accuracy_drop"}}`` (accuracy drop =
    Keras accuracy - variant accuracy), streaming the split batch by batch (never the full
    probability matrix).
    """
    rows = np.arange(len(split)) if rows is None else rows
    if not len(rows):
        raise ExportError("the run's test split is empty: nothing to verify the export on")
    keras_correct = 0
    sources = np.asarray(split.sources)[rows]
    correct_by_row = np.zeros(len(rows), bool)
    totals = {name: {"agree": 0, "correct": 0, "max_abs_diff": 0.0} for name in predictors}
    for start in range(0, len(rows), batch_size):
        chosen = rows[start : start + batch_size]
        images = np.asarray(split.images[chosen], np.uint8)[..., np.newaxis]
        labels = np.asarray(split.labels[chosen])
        reference = np.asarray(model.predict_on_batch(images), np.float32)
        top = reference.argmax(axis=1)
        keras_correct += int((top == labels).sum())
        correct_by_row[start : start + len(chosen)] = top == labels
        for name, predict in predictors.items():
            probs = predict(images)
            totals[name]["agree"] += int((probs.argmax(axis=1) == top).sum())
            totals[name]["correct"] += int((probs.argmax(axis=1) == labels).sum())
            diff = float(np.abs(probs - reference).max())
            totals[name]["max_abs_diff"] = max(totals[name]["max_abs_diff"], diff)
    n = float(len(rows))
    result = {"keras": {"accuracy": keras_correct / n}}
    for source in np.unique(sources):
        mine = sources == source
        result["keras"][f"source/{source}/accuracy"] = float(correct_by_row[mine].mean())
    for name, total in totals.items():
        result[name] = {
            "accuracy": total["correct"] / n,
            "agreement": total["agree"] / n,
            "max_abs_diff": total["max_abs_diff"],
            "accuracy_drop": (keras_correct - total["correct"]) / n,
        }
    return result


def _size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def verify(cv: Conversion, test: SplitArrays, exported: list[Exported]) -> dict[str, float]:
    """Fill each ``Exported``'s checks and metrics; returns the Keras-side metrics
    (``keras/accuracy``, ``keras/source/<source>/accuracy``, ``test_samples``)."""
    predictors: dict[str, Predict] = {}
    for item in exported:
        item.metrics["size_bytes"] = float(_size_bytes(item.path))
        fmt = FORMATS[item.format]
        item.checks.update(fmt.check(item, cv))
        predict = fmt.predictor(item, cv)
        if predict is not None:
            predictors[item.variant] = predict
    verify_cfg = cv.cfg["verify"]
    rows = evenly_spread(len(test), verify_cfg.get("max_samples"))
    parity = compare_on_split(cv.model, test, predictors, int(verify_cfg["batch_size"]), rows)
    minimum = float(verify_cfg["min_agreement"])
    for item in exported:
        if item.variant not in parity:
            continue
        item.metrics.update(parity[item.variant])
        agreement = parity[item.variant]["agreement"]
        if item.quantized:
            item.checks["agreement"] = f"{agreement:.4f} (quantized: reported, not enforced)"
        else:
            item.checks["agreement"] = agreement >= minimum
    keras_accuracy = parity["keras"]["accuracy"]
    metrics = {f"keras/{key}": value for key, value in parity["keras"].items()}
    metrics["test_samples"] = float(len(rows))
    logged = cv.trained.metrics.get("test/accuracy")
    if logged is not None and len(rows) == len(test) and abs(logged - keras_accuracy) > 1e-6:
        log.warning(
            "Keras accuracy on the test split (%.4f) differs from the run's test/accuracy "
            "(%.4f): the data prepared here is not exactly what the run was tested on",
            keras_accuracy,
            logged,
        )
    return metrics
