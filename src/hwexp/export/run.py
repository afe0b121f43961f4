"""Exporting one run: ``export_run`` loads the run's model, converts it to every requested
format in a staging folder beside ``<output_dir>/<run id>/``, verifies it
(``hwexp.export.verify``), and only then moves it into place, logs it to the run and registers
it. A failed conversion or check leaves the previous export (if any) untouched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig

from hwexp import __version__
from hwexp.contract import (
    CLASS_SET_KEY,
    CLASSES_FILE,
    DATASET_KEY,
    INK,
    INPUT_NAME,
    MODEL_CARD_FILE,
    MODEL_NAME_KEY,
    PREPROCESS_KEY,
    RUN_ID_KEY,
    SOURCE_KEY,
    TEST_ACCURACY_KEY,
    model_name,
    write_classes,
)
from hwexp.data.dataset import run_data_config
from hwexp.errors import ConfigError, ExportError
from hwexp.export.base import Conversion, Exported
from hwexp.export.card import SHOWN_CLASSES, model_card, registry_description
from hwexp.export.coreml import CORE_ML_LABEL, CORE_ML_PROBS
from hwexp.export.formats import FORMATS
from hwexp.export.verify import verify
from hwexp.fsutil import make_temporary_dir
from hwexp.quiet import Captured, captured_output, replay

if TYPE_CHECKING:
    import keras

    from hwexp.tracking.runs import TrainedModel

log = logging.getLogger(__name__)

EXPORT_RUN_TAG = "hwexp.export_folder"


@dataclass(frozen=True)
class ExportResult:
    """Where ``export_run`` put the files, what it measured, and how it was registered."""

    run_id: str
    folder: Path
    files: dict[str, Path]  # variant -> file in ``folder``
    metrics: dict[str, float]  # export/<variant>/<metric>, export/keras/accuracy, ...
    report: dict[str, Any]  # the content of export.json
    registered: str | None  # "<registered model name>/<version>"


def inference_model(model: keras.Model) -> keras.Model:
    """``model`` without augmentation/dropout layers (``strip_augmentation``: same weights,
    same inference function), checked to have one ``(S, S, 1)`` uint8 image input.

    Raises:
        ExportError: the model does not follow the ``hwexp.model`` contract.
    """
    from hwexp.model import is_training_only, strip_augmentation

    stripped = strip_augmentation(model)
    left = [layer.name for layer in stripped.layers if is_training_only(layer)]
    if left:
        raise ExportError(f"training-only layers survived strip_augmentation: {left}")
    shape = tuple(stripped.input_shape)
    if len(stripped.inputs) != 1 or len(shape) != 4 or shape[1] != shape[2] or shape[3] != 1:
        raise ExportError(f"expected one (S, S, 1) image input, got input shape {shape}")
    if stripped.inputs[0].dtype != "uint8":
        raise ExportError(f"expected a uint8 image input, got {stripped.inputs[0].dtype}")
    return stripped


def _requested_formats(cfg: Mapping[str, Any]) -> list[str]:
    """``cfg.formats`` without repeats; raises ``ConfigError`` for an unknown format or an
    invalid format option."""
    formats = cfg["formats"]
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"formats={formats}: choose one or more of {list(FORMATS)}")
    for check_options in dict.fromkeys(f.check_options for f in FORMATS.values()):
        check_options(cfg, formats)
    return list(dict.fromkeys(formats))


def export_name(cfg: Mapping[str, Any], trained: TrainedModel) -> str:
    """The file stem of an export: ``cfg.name``, else ``hwexp.contract.model_name``."""
    return str(cfg.get("name") or model_name(trained.config.get("dataset", {}), trained.classes))


def registry_name(cfg: Mapping[str, Any], trained: TrainedModel) -> str:
    """The registered model an export becomes a version of: ``cfg.register_name``, else
    ``hwexp.contract.model_name``."""
    return str(
        cfg.get("register_name") or model_name(trained.config.get("dataset", {}), trained.classes)
    )


def check_registry_name(cfg: Mapping[str, Any], client: Any, trained: TrainedModel) -> None:
    """Refuse (before anything is written) to add a version that reads other classes than the
    registered model's newest version: a 5-class run never replaces a 48-class model.

    Raises:
        ExportError: naming both class sets and what to do.
    """
    from hwexp.tracking.runs import registered_classes

    if not (cfg.get("log", True) and cfg.get("register", True)):
        return
    name = registry_name(cfg, trained)
    existing = registered_classes(client, name)
    if existing is None or tuple(existing) == tuple(trained.classes):
        return
    raise ExportError(
        f"registered model {name!r} reads {len(existing)} classes ({''.join(existing[:10])}…); "
        f"run {trained.run_id} reads {len(trained.classes)} ({''.join(trained.classes[:10])}…), "
        "so it cannot become a version of it. Leave register_name unset (the default name "
        "says what a model reads) or choose a new name; nothing was written"
    )


def _describe(
    cfg: Mapping[str, Any], trained: TrainedModel, size: int
) -> tuple[str, dict[str, str], dict[str, str]]:
    """``(file stem, metadata, feature descriptions)`` for the exported files."""
    dataset = trained.config.get("dataset", {})
    dataset_name = str(dataset.get("name", "model"))
    name = export_name(cfg, trained)
    preprocess = trained.config.get("preprocess", {})
    margin = float(preprocess.get("margin", 0.08))
    fitted = (
        f"centre the ink's centre of mass, {preprocess.get('moment_span')} standard deviations "
        "of the ink across"
        if preprocess.get("fit") == "moments"
        else "crop the strokes to their bounding box"
    )
    test_accuracy = trained.metrics.get("test/accuracy")
    meta = cfg.get("metadata") or {}
    metadata = {
        "short_description": (
            f"Handwritten character classifier {model_name(dataset, trained.classes)}: "
            f"{len(trained.classes)} characters of {dataset_name} ({dataset.get('classes')}), "
            f"hwexp run {trained.run_id}"
        ),
        "author": str(meta.get("author") or "hwexp"),
        "license": str(
            meta.get("license")
            or f"weights trained on the {dataset_name} data ({dataset.get('source')}); "
            "that data's licence applies to them"
        ),
        "version": str(meta.get("version") or f"{__version__}+{trained.run_id[:8]}"),
        RUN_ID_KEY: trained.run_id,
        MODEL_NAME_KEY: model_name(dataset, trained.classes),
        DATASET_KEY: dataset_name,
        SOURCE_KEY: str(dataset.get("source")),
        CLASS_SET_KEY: str(dataset.get("classes")),
        "hwexp.num_classes": str(len(trained.classes)),
        "hwexp.model": str(trained.config.get("model", {}).get("name")),
        TEST_ACCURACY_KEY: "unknown" if test_accuracy is None else f"{test_accuracy:.4f}",
        "hwexp.image_size": str(size),
        "hwexp.ink": INK,
        PREPROCESS_KEY: json.dumps(preprocess, sort_keys=True, default=str),
    }
    descriptions = {
        INPUT_NAME: (
            f"{size}x{size} grayscale character, ink WHITE (255) on BLACK (0): {fitted}, "
            f"pad to a square with a {margin:.0%} margin "
            "(hwexp.data.preprocess); pixel scaling is inside the model"
        ),
        CORE_ML_LABEL: "the most probable character",
        CORE_ML_PROBS: "probability of each character",
    }
    return name, metadata, descriptions


def _replace_folder(staging: Path, final: Path) -> None:
    """Move ``staging`` to ``final``, replacing an older export (renames on one filesystem)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    try:
        staging.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_run(cfg: DictConfig) -> ExportResult:
    """Export ``cfg.run`` as ``conf/export.yaml`` says; see the module docstring.

    Raises:
        RunNotFound: no such run, or it has no model.
        ConfigError: an invalid option (format, weights) or unpreparable data.
        ExportError: a conversion or a check failed (nothing was written).
    """
    from hwexp.data.dataset import load_splits
    from hwexp.tracking.runs import client_for, load_selected_model

    formats = _requested_formats(cfg)
    client = client_for(cfg.tracking)
    select = cfg.select
    with _step(f"loading the model of run {cfg.run}"):
        trained = load_selected_model(
            client, str(cfg.run), select.experiment, select.metric, select.parent_run
        )
    run_id = trained.run_id
    check_registry_name(cfg, client, trained)
    model = inference_model(trained.model)
    with _step("preparing the run's data"):
        splits = load_splits(run_data_config(cfg, trained.config), progress=False)
    if tuple(splits.classes) != tuple(trained.classes):
        raise ExportError(
            f"run {run_id}: its {CLASSES_FILE} and its dataset config disagree on the classes "
            f"({''.join(trained.classes[:10])}… vs {''.join(splits.classes[:10])}…)"
        )
    out_root = Path(str(cfg.output_dir)).expanduser().resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    final = out_root / run_id
    staging = make_temporary_dir(out_root, f".{run_id}-")
    try:
        try:
            cv = _conversion(cfg, model, trained, splits.train, staging)
            exported = []
            for fmt in formats:
                with _step(f"converting to {fmt}"):
                    exported += _convert(fmt, cv)
        except (ConfigError, ExportError):
            raise
        except Exception as error:  # a converter's own failure, with its message
            raise ExportError(f"conversion failed: {type(error).__name__}: {error}") from error
        with _step(f"checking {len(exported)} files against Keras on the test split"):
            keras_metrics = verify(cv, splits.test, exported)
        failed = {e.variant: e.failed_checks for e in exported if e.failed_checks}
        metrics = {f"export/{k}": v for k, v in keras_metrics.items()}
        for item in exported:
            metrics.update({f"export/{item.variant}/{k}": v for k, v in item.metrics.items()})
        report = {
            "run_id": run_id,
            "name": cv.name,
            "formats": formats,
            "dataset": trained.config.get("dataset", {}).get("name"),
            "classes": len(trained.classes),
            "image_size": int(model.input_shape[1]),
            "ink": INK,
            "hwexp_version": __version__,
            "metrics": metrics,
            "files": {
                e.variant: {"file": e.path.name, "checks": e.checks, **e.metrics} for e in exported
            },
        }
        if failed:
            details = "; ".join(f"{v}: {', '.join(c)}" for v, c in failed.items())
            raise ExportError(
                f"export of run {run_id} failed its checks ({details}); nothing was written. "
                f"Details: {json.dumps(report['files'], default=str)}"
            )
        write_classes(staging / CLASSES_FILE, trained.classes)
        (staging / "export.json").write_text(json.dumps(report, indent=2, default=str), "utf-8")
        (staging / MODEL_CARD_FILE).write_text(model_card(cv, splits, metrics, exported), "utf-8")
        _add_mlflow_model(cv, exported, splits.test)
        _replace_folder(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = {e.variant: final / e.path.name for e in exported}
    description = registry_description(
        model_card(cv, splits, metrics, exported, shown_classes=SHOWN_CLASSES)
    )
    with _step("logging to the run and registering"):
        registered = _log_and_register(cfg, client, trained, final, metrics, files, description)
    return ExportResult(run_id, final, files, metrics, report, registered)


def _add_mlflow_model(cv: Conversion, exported: list[Exported], test: Any) -> None:
    """Make the staging folder an MLflow model with the ONNX flavour over the exported ONNX
    file (``hwexp.tracking.mlmodels.add_onnx_flavour``); without one, say what is missing."""
    from hwexp.tracking.mlmodels import add_onnx_flavour, example_images

    onnx_files = [e.path for e in exported if e.variant == "onnx"]
    if not onnx_files:
        log.warning(
            "no onnx in formats: the export is no MLflow model (no MLmodel, no signature in "
            "the registry); add onnx to formats for one"
        )
        return
    example = example_images(test.images, cv.size)[..., np.newaxis]
    add_onnx_flavour(
        cv.staging, onnx_files[0], cv.trained.classes, example, {**cv.metadata, "name": cv.name}
    )


def _log_and_register(
    cfg: Mapping[str, Any],
    client: Any,
    trained: TrainedModel,
    folder: Path,
    metrics: Mapping[str, float],
    files: Mapping[str, Path],
    description: str,
) -> str | None:
    """Log the export to its run and register it (``description``: the version's), as
    ``cfg.log`` / ``cfg.register`` say."""
    from hwexp.tracking.runs import log_export, register_model

    if not cfg.get("log", True):
        return None
    source = log_export(client, trained.run_id, folder, metrics, {EXPORT_RUN_TAG: str(folder)})
    if not cfg.get("register", True):
        return None
    name = registry_name(cfg, trained)
    coreml = files.get("coreml") or files.get("coreml_nn")
    tags = {
        "run_id": trained.run_id,
        "formats": ",".join(sorted(files)),
        "coreml_package": coreml.name if coreml else "",
        "coreml_weights": str(cfg["coreml"]["weights"]),
        "ink": INK,
        **{
            k.removeprefix("export/"): f"{v:.4f}"
            for k, v in metrics.items()
            if k.endswith(("/accuracy", "/agreement"))
        },
    }
    version = register_model(
        client, name, trained.run_id, source, tags, description, classes=trained.classes
    )
    return f"{name}/{version}"


def summary(result: ExportResult) -> str:
    """A few lines: one per exported file (size, test accuracy, agreement with Keras)."""
    m = result.metrics
    lines = [
        f"exported run {result.run_id} to {result.folder} "
        f"(Keras test accuracy {m['export/keras/accuracy']:.4f} on "
        f"{int(m['export/test_samples'])} images)"
    ]
    for variant, path in result.files.items():
        size = m[f"export/{variant}/size_bytes"] / 1e6
        accuracy = m.get(f"export/{variant}/accuracy")
        parity = (
            "checked (spec only)"
            if accuracy is None
            else f"accuracy {accuracy:.4f}, agreement {m[f'export/{variant}/agreement']:.4f}"
        )
        lines.append(f"  {variant:<12} {path.name:<28} {size:7.2f} MB  {parity}")
    if result.registered:
        lines.append(f"registered as {result.registered} in the MLflow Model Registry")
    return "\n".join(lines)


def _conversion(
    cfg: Mapping[str, Any],
    model: keras.Model,
    trained: TrainedModel,
    train: Any,
    staging: Path,
) -> Conversion:
    name, metadata, descriptions = _describe(cfg, trained, int(model.input_shape[1]))
    return Conversion(cfg, model, trained, train, staging, name, metadata, descriptions)


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """Export's own progress on stderr: ``what …`` and, when the block is done, its seconds.
    What converters print meanwhile (progress bars, notes; C++ included) is shown only if the
    block fails; hwexp's own warnings always are."""
    print(f"{what} …", end="", file=sys.stderr, flush=True)
    started = time.monotonic()
    captured = Captured()
    try:
        with captured_output(keep_logger="hwexp") as captured:
            yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        replay(captured)
        raise
    print(f" {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


def _convert(fmt: str, cv: Conversion) -> list[Exported]:
    log.info("exporting %s", fmt)
    return FORMATS[fmt].convert(cv)
