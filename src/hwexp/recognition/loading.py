"""Loading a ``Recognizer``: from files, the MLflow Model Registry, or a training run; and the
list of registered models. Nothing here imports TensorFlow (mlflow only to reach a store).

Model files
-----------
The layout ``hwexp export formats=[onnx]`` writes into ``<output_dir>/<run id>/`` (and logs to
the run as ``export/``, the folder registered in the MLflow Model Registry)::

    <name>.onnx       input ``image``: uint8 (n, S, S, 1), ink WHITE (255) on BLACK (0), prepared
                      by hwexp.data.preprocess; output ``probabilities``: float32 (n, classes)
    classes.txt       UTF-8, one character per line; line i is output i
    preprocess.json   optional: the run's ``preprocess`` options, a JSON object
    config.yaml       optional: a run config (its ``preprocess:`` block is used)

Where the preprocessing options come from, first found: ``preprocess.json``, ``config.yaml``,
the ONNX metadata ``hwexp.preprocess`` (JSON, written by the exporter). Classes: ``classes.txt``,
else the ONNX metadata ``hwexp.classes`` (a JSON list). A model with neither is refused: a
recognizer never guesses how a model's training data was prepared. Options of runs made before
an option existed keep that run's behaviour (``PreprocessOptions.from_config``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hwexp.contract import (
    CLASS_SET_KEY,
    CLASSES_FILE,
    CLASSES_KEY,
    CONFIG_FILE,
    DATASET_KEY,
    EXPORT_DIR,
    INPUT_NAME,
    OUTPUT_NAME,
    PREPROCESS_KEY,
    RUN_ID_KEY,
    SOURCE_KEY,
    TEST_ACCURACY_KEY,
    default_exports_dir,
    default_mlruns_dir,
    default_tracking_uri,
    read_classes,
)
from hwexp.data.preprocess import PreprocessOptions
from hwexp.errors import ConfigError, ModelLoadError
from hwexp.recognition.recognizer import ModelInfo, Recognizer

log = logging.getLogger(__name__)

PREPROCESS_FILE = "preprocess.json"
_BESIDE_MODEL = (CLASSES_FILE, PREPROCESS_FILE, CONFIG_FILE)  # what a model needs beside it
# ONNX metadata the exporter writes (hwexp.export.run) -> ModelInfo field.
_INFO_KEYS = {
    RUN_ID_KEY: "run_id",
    DATASET_KEY: "dataset",
    CLASS_SET_KEY: "class_set",
    SOURCE_KEY: "data_source",
}

# --------------------------------------------------------------------------- files


def _onnx_session(path: Path, threads: int | None) -> Any:
    """``hwexp.export.onnx.onnx_session``; its errors become ``ModelLoadError``."""
    from hwexp.export.onnx import onnx_session

    try:
        return onnx_session(path, threads)
    except Exception as error:  # onnxruntime raises its own, unexported exception types
        raise ModelLoadError(f"{path}: not a loadable ONNX model: {error}") from error


def _preprocess_options(folder: Path, metadata: Mapping[str, str]) -> tuple[dict, str]:
    """``(options mapping, where from)``; see the module docstring for the order."""
    json_path, yaml_path = folder / PREPROCESS_FILE, folder / CONFIG_FILE
    if json_path.is_file():
        return json.loads(json_path.read_text("utf-8")), str(json_path)
    if yaml_path.is_file():
        config = yaml.safe_load(yaml_path.read_text("utf-8")) or {}
        if isinstance(config, Mapping) and isinstance(config.get("preprocess"), Mapping):
            return dict(config["preprocess"]), str(yaml_path)
    if PREPROCESS_KEY in metadata:
        return json.loads(metadata[PREPROCESS_KEY]), f"ONNX metadata {PREPROCESS_KEY}"
    raise ModelLoadError(
        f"no preprocessing options for the model in {folder}: expected {PREPROCESS_FILE}, a "
        f"{CONFIG_FILE} with a preprocess block, or ONNX metadata {PREPROCESS_KEY} (hwexp export "
        "writes it)"
    )


def _classes(folder: Path, metadata: Mapping[str, str], outputs: int) -> tuple[str, ...]:
    path = folder / CLASSES_FILE
    if path.is_file():
        classes, where = read_classes(path), str(path)
    elif CLASSES_KEY in metadata:
        classes, where = json.loads(metadata[CLASSES_KEY]), f"ONNX metadata {CLASSES_KEY}"
    else:
        raise ModelLoadError(f"no {CLASSES_FILE} beside the model in {folder}")
    if len(classes) != outputs:
        raise ModelLoadError(f"{where} lists {len(classes)} classes; the model has {outputs}")
    return tuple(classes)


def _info(metadata: Mapping[str, str], origin: str, version: str | None) -> ModelInfo:
    fields: dict[str, Any] = {
        field: metadata[key] for key, field in _INFO_KEYS.items() if metadata.get(key)
    }
    with contextlib.suppress(KeyError, ValueError):  # absent, or "unknown"
        fields["test_accuracy"] = float(metadata[TEST_ACCURACY_KEY])
    return ModelInfo(origin=origin, version=version, **fields)


def load_onnx(
    path: str | Path,
    name: str | None = None,
    origin: str | None = None,
    threads: int | None = None,
    version: str | None = None,
) -> Recognizer:
    """Load ``path`` (``.onnx``) with its classes and preprocessing from the files beside it
    (see the module docstring); ``name`` defaults to the file's stem, ``origin`` (where it
    came from) to its path, ``version`` is its Model Registry version.

    Raises:
        ModelLoadError: missing or inconsistent files, or not an hwexp image classifier.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"no model file {path}")
    session = _onnx_session(path, threads)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    names = ([i.name for i in inputs], [o.name for o in outputs])
    if names != ([INPUT_NAME], [OUTPUT_NAME]) or len(inputs[0].shape) != 4:
        raise ModelLoadError(
            f"{path}: expected one input {INPUT_NAME!r} (n, S, S, 1) and one output "
            f"{OUTPUT_NAME!r}, as hwexp export writes; got inputs/outputs {names}"
        )
    dtypes = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}
    if inputs[0].type not in dtypes:
        raise ModelLoadError(f"{path}: input type {inputs[0].type}; expected uint8 or float")
    metadata = session.get_modelmeta().custom_metadata_map
    n_out = outputs[0].shape[-1]
    if not isinstance(n_out, int):
        raise ModelLoadError(f"{path}: the number of classes (output shape) is not fixed")
    classes = _classes(path.parent, metadata, n_out)
    raw_options, where = _preprocess_options(path.parent, metadata)
    try:
        options = PreprocessOptions.from_config(raw_options)
    except (ConfigError, TypeError) as error:
        raise ModelLoadError(f"{where}: invalid preprocess options: {error}") from error
    shape = inputs[0].shape
    if shape[1:] != [options.size, options.size, 1]:
        raise ModelLoadError(
            f"{path}: input shape {shape} does not match preprocess.size={options.size} "
            f"from {where}"
        )
    info = _info(metadata, origin or str(path), version)
    return Recognizer(name or path.stem, classes, options, session, dtypes[inputs[0].type], info)


def _single_onnx(folder: Path, what: str) -> Path:
    found = sorted(folder.rglob("*.onnx"))
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise ModelLoadError(
            f"{what} should hold exactly one .onnx file (found: {listed}); export the run with "
            "`hwexp export run=<run id> formats=[onnx]` (or add onnx to its formats)"
        )
    return found[0]


def load_files(
    path: str | os.PathLike, name: str | None = None, threads: int | None = None
) -> Recognizer:
    """Load an export folder (its one ``.onnx`` file) or an ``.onnx`` file (see the module
    docstring).

    Raises:
        ModelLoadError: no such folder or file, or what ``load_onnx`` refuses.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = _single_onnx(path, f"model folder {path}")
    return load_onnx(path, name, threads=threads)


# --------------------------------------------------------------------------- tracking store


def tracking_client(uri: str | None = None) -> Any:
    """An ``MlflowClient`` of ``uri``, else ``$MLFLOW_TRACKING_URI``, else the project's store
    (``conf/paths``: ``sqlite:///<$HWEXP_ROOT or .>/mlruns/mlflow.db``), which must exist.

    Raises:
        ModelLoadError: the default store does not exist yet.
    """
    from mlflow import MlflowClient

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = default_tracking_uri(default_mlruns_dir(), create=False)
        database = Path(uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise ModelLoadError(
                f"no MLflow store at {database}: train and export a model first "
                "(hwexp train; hwexp export formats=[onnx]), set $HWEXP_ROOT to the project, "
                "or give the tracking URI or a model folder"
            )
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow without its download progress bars (one per small file is noise)."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    name = MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _download_export(client: Any, artifact_uri: str, run_id: str | None, dst: Path) -> Path:
    """Download what a model needs from the export folder at ``artifact_uri`` (its ``.onnx``
    files and ``_BESIDE_MODEL``; not the Core ML or TFLite files) into ``dst``, with run
    ``run_id``'s ``config.yaml`` when the export has none (its preprocess block is the run's
    own)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    uri = artifact_uri.rstrip("/")
    try:
        listed = mlflow.artifacts.list_artifacts(artifact_uri=uri, tracking_uri=client.tracking_uri)
        wanted = [
            Path(item.path).name
            for item in listed
            if not item.is_dir
            and (item.path.endswith(".onnx") or Path(item.path).name in _BESIDE_MODEL)
        ]
        for file in wanted:
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{uri}/{file}", dst_path=str(dst), tracking_uri=client.tracking_uri
            )
    except (MlflowException, OSError) as error:
        raise ModelLoadError(f"cannot download the model files at {uri}: {error}") from error
    if run_id and CONFIG_FILE not in wanted:
        try:
            client.download_artifacts(run_id, CONFIG_FILE, str(dst))
        except (MlflowException, OSError):
            log.warning(
                "run %s has no %s; the export's own preprocessing is used", run_id, CONFIG_FILE
            )
    return dst


def _load_export(
    client: Any,
    run_id: str | None,
    artifact_uri: str,
    name: str | None,
    origin: str,
    threads: int | None,
    version: str | None = None,
) -> Recognizer:
    with tempfile.TemporaryDirectory(prefix="hwexp-model-") as tmp, _no_progress_bars():
        folder = _download_export(client, artifact_uri, run_id, Path(tmp))
        model_file = _single_onnx(folder, origin)
        # The session holds the model in memory: the downloaded files may go.
        return load_onnx(model_file, name or model_file.stem, origin, threads, version)


# --------------------------------------------------------------------------- registry


def registered_names(client: Any) -> list[str]:
    """The names in ``client``'s Model Registry, sorted."""
    return sorted(model.name for model in client.search_registered_models())


def _versions(client: Any, name: str) -> list[Any]:
    """Every ``ModelVersion`` of registered model ``name`` (none when it does not exist)."""
    escaped = name.replace("'", "\\'")
    return client.search_model_versions(f"name = '{escaped}'")


def _no_such_model(client: Any, name: str) -> ModelLoadError:
    names = registered_names(client)
    listed = (
        f"registered: {', '.join(names)}"
        if names
        else "none is registered yet: export one (hwexp export run=best formats=[onnx])"
    )
    return ModelLoadError(f"no registered model {name!r} in {client.tracking_uri}; {listed}")


def _model_version(client: Any, ref: str, version: int | str | None) -> Any:
    """The ``ModelVersion`` that ``ref`` (``NAME``, ``NAME/VERSION``, ``NAME@ALIAS``) and
    ``version`` (None or ``"latest"``: the highest; a number; an alias) name."""
    from mlflow.exceptions import MlflowException

    match = re.fullmatch(r"(.+?)(?:/(\d+)|@([\w.-]+))?", ref)
    registered, number, alias = match.groups() if match else (ref, None, None)
    if version is not None and str(version) != "latest":
        if number or alias:
            raise ModelLoadError(
                f"registered model {ref!r}: give the version once, not also {version!r}"
            )
        number, alias = (str(version), None) if str(version).isdigit() else (None, str(version))
    versions = _versions(client, registered)
    if not versions:
        raise _no_such_model(client, registered)
    if alias:
        try:
            return client.get_model_version_by_alias(registered, alias)
        except MlflowException:
            aliases = client.get_registered_model(registered).aliases or {}
            raise ModelLoadError(
                f"registered model {registered!r} has no alias {alias!r}; its aliases: "
                f"{', '.join(sorted(aliases)) or 'none'}"
            ) from None
    numbers = sorted(int(v.version) for v in versions)
    if number is None:
        return max(versions, key=lambda v: int(v.version))
    if int(number) not in numbers:
        raise ModelLoadError(
            f"registered model {registered!r} has no version {number}; its versions: "
            f"{', '.join(map(str, numbers))}"
        )
    return next(v for v in versions if int(v.version) == int(number))


def load_registered(
    client: Any,
    ref: str,
    name: str | None = None,
    threads: int | None = None,
    version: int | str | None = None,
) -> Recognizer:
    """Load registered model ``ref`` = ``<name>`` (its highest version), ``<name>/<version>``
    or ``<name>@<alias>`` (or ``version``) from ``client``'s Model Registry; named ``name`` or
    the registered name.

    Raises:
        ModelLoadError: no such model (the message lists the registered names), version or
            alias, or the version holds no ONNX file.
    """
    found = _model_version(client, ref, version)
    origin = f"models:/{found.name}/{found.version}"
    return _load_export(
        client, found.run_id, found.source, name or found.name, origin, threads, str(found.version)
    )


def load_all_registered(client: Any, threads: int | None = None) -> list[Recognizer]:
    """The highest version of every registered model that holds an ONNX file (others are
    skipped with a warning), by name."""
    models = []
    for registered in registered_names(client):
        try:
            models.append(load_registered(client, registered, threads=threads))
        except ModelLoadError as error:
            log.warning("skipping registered model %s: %s", registered, error)
    return models


@dataclass(frozen=True)
class RegisteredModel:
    """One registered model as ``hwexp serve --list`` shows it: its highest version and what
    that version's run trained on (from the run: None where the run is gone)."""

    name: str
    versions: tuple[int, ...]
    classes: int | None  # how many
    info: ModelInfo


def registered_models(client: Any) -> list[RegisteredModel]:
    """Every registered model of ``client``'s Model Registry, by name (see ``RegisteredModel``);
    reads the registry and the runs, downloads nothing."""
    from mlflow.exceptions import MlflowException

    listed = []
    for name in registered_names(client):
        versions = _versions(client, name)
        if not versions:
            continue
        latest = max(versions, key=lambda v: int(v.version))
        tags: dict[str, str] = {}
        params: dict[str, str] = {}
        metrics: dict[str, float] = {}
        try:
            run = client.get_run(latest.run_id) if latest.run_id else None
        except MlflowException:
            run = None
        if run is not None:
            tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        count = tags.get("num_classes", "")
        info = ModelInfo(
            origin=f"models:/{name}/{latest.version}",
            run_id=latest.run_id,
            dataset=tags.get("dataset"),
            class_set=params.get("dataset.classes"),
            data_source=tags.get("source"),
            version=str(latest.version),
            test_accuracy=metrics.get("test/accuracy"),
        )
        numbers = tuple(sorted(int(v.version) for v in versions))
        listed.append(RegisteredModel(name, numbers, int(count) if count.isdigit() else None, info))
    return listed


# --------------------------------------------------------------------------- runs


def _logged_export(client: Any, run: Any) -> str | None:
    """The artifact URI of the ``export/`` folder logged to ``run`` when it holds an ONNX file."""
    from mlflow.exceptions import MlflowException

    try:
        files = client.list_artifacts(run.info.run_id, EXPORT_DIR)
    except (MlflowException, OSError):
        return None
    if not any(item.path.endswith(".onnx") for item in files):
        return None
    return f"{run.info.artifact_uri.rstrip('/')}/{EXPORT_DIR}"


def load_run(
    client: Any,
    ref: str,
    name: str | None = None,
    threads: int | None = None,
    experiment: str | None = None,
    metric: str = "test/accuracy",
    export: bool = False,
) -> Recognizer:
    """Load the ONNX export of run ``ref`` (a run id, or ``best`` in ``experiment``; see
    ``hwexp.tracking.runs.find_run``): the one logged to the run (``export/``), else the one in
    ``default_exports_dir()/<run id>/``; with ``export``, a run with neither is exported first
    (:func:`export_onnx`).

    Raises:
        RunNotFound: no such run, or no finished run to call best.
        ModelLoadError: the run has no ONNX export (and ``export`` is false), or exporting it
            failed.
    """
    from hwexp.tracking.runs import find_run

    run_id = find_run(client, ref, experiment, metric)
    run = client.get_run(run_id)
    origin = f"runs:/{run_id}/{EXPORT_DIR}"
    logged = _logged_export(client, run)
    if logged is not None:
        return _load_export(client, run_id, logged, name, origin, threads)
    local = default_exports_dir() / run_id
    if any(local.glob("*.onnx")):
        model_file = _single_onnx(local, f"export folder {local}")
        return load_onnx(model_file, name or model_file.stem, str(local), threads)
    if not export:
        raise ModelLoadError(
            f"run {run_id} has no ONNX export (neither logged to the run nor in {local}): "
            f"export it with `hwexp export run={run_id} formats=[onnx]`"
        )
    with tempfile.TemporaryDirectory(prefix="hwexp-export-") as tmp:
        folder = export_onnx(client, run_id, Path(tmp))
        model_file = _single_onnx(folder, f"the export of run {run_id}")
        return load_onnx(model_file, name or model_file.stem, origin, threads)


def export_onnx(client: Any, run_id: str, output_dir: Path) -> Path:
    """Export run ``run_id`` to ONNX with ``hwexp export`` in a subprocess (TensorFlow is
    imported there, not here): verified against the Keras model on the run's test split,
    logged to the run (so the next load finds it), not registered. Returns the export folder
    (``output_dir/<run id>``).

    Raises:
        ModelLoadError: the export failed; the message holds the exporter's error lines.
    """
    from hwexp.sweep.overrides import override_value

    log.warning(
        "run %s has no ONNX export: exporting it now with `hwexp export run=%s formats=[onnx]` "
        "(this needs TensorFlow, once: the export is logged to the run)",
        run_id,
        run_id,
    )
    command = [
        sys.executable,
        "-m",
        "hwexp.export",
        f"run={run_id}",
        "formats=[onnx]",
        "register=false",
        f"output_dir={override_value(str(output_dir))}",
        f"tracking.uri={override_value(client.tracking_uri)}",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        detail = "\n".join(lines or done.stderr.strip().splitlines()[-15:])
        raise ModelLoadError(f"exporting run {run_id} to ONNX failed:\n{detail}")
    return output_dir / run_id
