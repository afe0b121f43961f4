"""Finding and loading finished runs, the Model Registry, and sweep bookkeeping on runs.

Run states: a training run is RUNNING while its process trains it, with a heartbeat (tags
``hwexp.process``: host, pid and start time of that process, and ``hwexp.heartbeat``: the time
of its last beat, every 30 s; see ``Tracker.heartbeat``). It ends FINISHED once the model is
trained, evaluated and saved (``hwexp.has_model=true`` is the last thing logged), FAILED on an
error and KILLED on Ctrl-C. A run whose process died without ending it (SIGKILL, a crash, a lost
machine) is marked FAILED (tag ``hwexp.error``) by the next lookup (``find_run``) or training
start in its experiment: on the same host as soon as the process is gone, elsewhere once its
heartbeat is 5 minutes old (``fail_orphaned_runs``). Only FINISHED runs are ever selected.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from omegaconf import OmegaConf

from hwexp.contract import (
    BEST_TRIAL_TAG,
    CLASSES_DIGEST_TAG,
    CLASSES_FILE,
    CONFIG_FILE,
    ERROR_TAG,
    EXPORT_DIR,
    EXPORTED_TAG,
    HAS_MODEL_TAG,
    MODEL_DIR,
    MODEL_FILE,
    SWEEP_ID_TAG,
    classes_digest,
    default_tracking_uri,
    read_classes,
    trained_model_files,
)
from hwexp.errors import RunNotFound
from hwexp.liveness import identity_alive
from hwexp.tracking.writer import (
    DEFAULT_EXPERIMENT,
    HEARTBEAT_STALE_S,
    HEARTBEAT_TAG,
    PROCESS_TAG,
    Tracker,
)

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

RUN_STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")


# --------------------------------------------------------------------------- finished runs


@dataclass(frozen=True)
class TrainedModel:
    """A finished run's model, its classes (output order) and its resolved config."""

    run_id: str
    model: keras.Model
    classes: tuple[str, ...]
    config: dict[str, Any]
    metrics: dict[str, float]


def client_for(tracking_cfg: Mapping[str, Any]) -> MlflowClient:
    """The MLflow client of ``conf/tracking/mlflow.yaml``-style settings."""
    return MlflowClient(
        tracking_uri=tracking_cfg.get("uri") or default_tracking_uri(tracking_cfg["mlruns_dir"])
    )


def orphaned(run: Any, now: float | None = None) -> str | None:
    """Why ``run`` (an MLflow ``Run``) is RUNNING with no process training it any more, or
    None when it is not RUNNING, its process is alive, or it has no heartbeat to judge by
    (runs without ``Tracker.heartbeat``: evaluations, sweep parents, older hwexp)."""
    tags = run.data.tags
    identity = tags.get(PROCESS_TAG)
    if run.info.status != "RUNNING" or identity is None:
        return None
    alive = identity_alive(identity)
    if alive is not None:
        return None if alive else f"its process ({identity}) is gone"
    try:
        age = (time.time() if now is None else now) - float(tags.get(HEARTBEAT_TAG, "0"))
    except ValueError:
        return None
    if age <= HEARTBEAT_STALE_S:
        return None
    return f"its process ({identity}) sent no heartbeat for {age:.0f} s"


def fail_orphaned_runs(client: MlflowClient, experiment_ids: Sequence[str]) -> list[str]:
    """End FAILED (tag ``hwexp.error`` says why) every RUNNING run in ``experiment_ids`` whose
    training process is gone (see ``orphaned``); returns their ids."""
    if not experiment_ids:
        return []
    running = client.search_runs(
        list(experiment_ids), "attributes.status = 'RUNNING'", max_results=1000
    )
    failed = []
    for run in running:
        reason = orphaned(run)
        if reason is not None:
            _fail_orphan(client, run.info.run_id, reason)
            failed.append(run.info.run_id)
    return failed


def _fail_orphan(client: MlflowClient, run_id: str, reason: str) -> None:
    client.set_tag(run_id, ERROR_TAG, f"ended by hwexp: {reason}")
    client.set_terminated(run_id, "FAILED")
    log.warning("run %s was still RUNNING but %s: marked FAILED", run_id, reason)


def find_run(
    client: MlflowClient,
    ref: str,
    experiment: str | None = None,
    metric: str = "test/accuracy",
    parent_run_id: str | None = None,
    option: str = "run",
) -> str:
    """The run id that ``ref`` names: a FINISHED run's id, or ``best`` — the FINISHED run with
    a model and the highest ``metric`` in ``experiment`` (or among the children of
    ``parent_run_id``). Runs whose process died are marked FAILED first (``fail_orphaned_runs``
    on the experiment searched, or on the run named); RUNNING, FAILED and KILLED runs are never
    returned. ``option`` is the setting that ``ref`` came from, named in the messages' advice.

    Raises:
        RunNotFound: no such run / experiment, the run named is not FINISHED, or no finished
            run with a model and ``metric``.
    """
    if ref != "best":
        try:
            run = client.get_run(ref)
        except MlflowException as error:
            raise RunNotFound(
                f"run {ref!r} does not exist in {client.tracking_uri}; list runs with "
                f"`mlflow ui --backend-store-uri {client.tracking_uri}` or use {option}=best"
            ) from error
        reason = orphaned(run)
        if reason is not None:
            _fail_orphan(client, run.info.run_id, reason)
            run = client.get_run(ref)
        status = run.info.status
        if status != "FINISHED":
            why = run.data.tags.get(ERROR_TAG) or {
                "RUNNING": "it is still training",
                "KILLED": "it was stopped (Ctrl-C or pruned) before its model was complete",
            }.get(status, "it ended with an error")
            raise RunNotFound(
                f"run {ref} is {status} ({why}); choose a FINISHED run, or {option}=best"
            )
        return run.info.run_id
    filters = ["attributes.status = 'FINISHED'", f"tags.`{HAS_MODEL_TAG}` = 'true'"]
    if parent_run_id:
        filters.append(f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'")
    if parent_run_id and not experiment:
        experiment_ids = [client.get_run(parent_run_id).info.experiment_id]
    else:
        experiment = experiment or DEFAULT_EXPERIMENT
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise RunNotFound(
                f"experiment {experiment!r} does not exist in {client.tracking_uri}; train a run "
                f"there first, or set {option} to a run id"
            )
        experiment_ids = [found.experiment_id]
    fail_orphaned_runs(client, experiment_ids)
    runs = client.search_runs(
        experiment_ids,
        " and ".join(filters),
        order_by=[f"metrics.`{metric}` DESC"],
        max_results=50,
    )
    runs = [r for r in runs if metric in r.data.metrics]
    if not runs:
        where = f"children of run {parent_run_id}" if parent_run_id else repr(experiment)
        raise RunNotFound(
            f"no finished run with a model and metric {metric!r} among {where}; train one "
            f"there first, or set {option} to a run id"
        )
    return runs[0].info.run_id


def trained_model_uri(client: MlflowClient, run: Any) -> str:
    """Where the files of ``run``'s (an MLflow ``Run``) model are: the artifact location of
    its logged model ``model``, or, for runs logged before hwexp logged MLflow models, its
    ``model/`` artifact folder. (``runs:/<id>/model`` means the same, but MLflow resolves a
    logged model there through the global tracking URI, which hwexp never sets.)"""
    for output in run.outputs.model_outputs if run.outputs else []:
        logged = client.get_logged_model(output.model_id)
        if logged.name == MODEL_DIR:
            return logged.artifact_location
    return f"{run.info.artifact_uri.rstrip('/')}/{MODEL_DIR}"


def download_trained_model(client: MlflowClient, run: Any, dst: str | Path) -> Path:
    """Download ``run``'s model folder (``trained_model_uri``) into ``dst``; returns it.

    Raises:
        RunNotFound: the run has no model (e.g. it failed before saving one).
    """
    import mlflow.artifacts

    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=trained_model_uri(client, run),
                dst_path=str(dst),
                tracking_uri=client.tracking_uri,
            )
        )
    except (MlflowException, OSError) as error:
        raise RunNotFound(
            f"run {run.info.run_id} has no model artifact (status {run.info.status}); "
            "choose a run that finished training"
        ) from error


def load_trained_model(client: MlflowClient, run_id: str) -> TrainedModel:
    """Download the run's model (``download_trained_model``) and load its Keras model and
    classes (``hwexp.contract.trained_model_files``), and the run's ``config.yaml``.

    Raises:
        RunNotFound: the run has no model artifact (e.g. it failed before saving one).
    """
    import keras

    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory(prefix="hwexp-load-") as tmp:
        model_file, classes_file = trained_model_files(download_trained_model(client, run, tmp))
        if not model_file.is_file():
            raise RunNotFound(f"run {run_id} has no {MODEL_DIR}/{MODEL_FILE} artifact")
        model = keras.saving.load_model(model_file, compile=False)
        classes = read_classes(classes_file)[: model.output_shape[-1]]
        config_path = Path(client.download_artifacts(run_id, CONFIG_FILE, tmp))
        config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
    return TrainedModel(run_id, model, classes, config, dict(run.data.metrics))


def load_selected_model(client: MlflowClient, ref: str, *args: Any, **kwargs: Any) -> TrainedModel:
    """``load_trained_model`` of the run that ``find_run(client, ref, *args, **kwargs)``
    selects (``experiment``, ``metric``, ``parent_run_id``, ``option``).

    Raises:
        RunNotFound: no such run, or it has no model.
    """
    return load_trained_model(client, find_run(client, ref, *args, **kwargs))


# --------------------------------------------------------------------------- exports and registry


def log_export(
    client: MlflowClient,
    run_id: str,
    folder: str | Path,
    metrics: Mapping[str, float],
    tags: Mapping[str, str] | None = None,
    artifact_path: str = EXPORT_DIR,
) -> str:
    """Log a verified export to an existing (usually finished) run without changing its status:
    every file under ``folder`` as artifacts under ``artifact_path``, ``metrics`` (step 0) and
    ``tags`` plus ``hwexp.exported=true``. Returns the artifact URI of ``artifact_path``."""
    run = client.get_run(run_id)
    tracker = Tracker(client, run_id, run.info.experiment_id)
    client.log_artifacts(run_id, str(folder), artifact_path)
    tracker.log_metrics(metrics)
    tracker.set_tags({**(tags or {}), EXPORTED_TAG: "true"})
    return f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"


def registered_classes(client: MlflowClient, name: str) -> tuple[str, ...] | None:
    """The classes (output order) of the newest version of registered model ``name`` that holds
    a ``classes.txt``, or None when there is no such model or version."""
    import mlflow.artifacts

    escaped = name.replace("'", "\\'")
    try:
        versions = client.search_model_versions(f"name = '{escaped}'")
    except MlflowException:
        return None
    with tempfile.TemporaryDirectory(prefix="hwexp-classes-") as tmp:
        for version in sorted(versions, key=lambda v: -int(v.version)):
            try:
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{version.source.rstrip('/')}/{CLASSES_FILE}",
                    dst_path=tmp,
                    tracking_uri=client.tracking_uri,
                )
            except (MlflowException, OSError):
                continue
            return read_classes(path)
    return None


def register_model(
    client: MlflowClient,
    name: str,
    run_id: str,
    source: str,
    tags: Mapping[str, str] | None = None,
    description: str | None = None,
    classes: Sequence[str] | None = None,
) -> str:
    """Register ``source`` (an artifact URI of run ``run_id``, e.g. from ``log_export``) as a new
    version of registered model ``name`` (created when missing). Returns the version number.
    ``classes``: what the version reads, tagged ``hwexp.classes_digest``.

    Raises:
        MlflowException: the tracking store has no model registry (e.g. a plain file store).
    """
    tags = {**(tags or {}), **({CLASSES_DIGEST_TAG: classes_digest(classes)} if classes else {})}
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:  # created meanwhile by another process
            client.get_registered_model(name)
    version = client.create_model_version(
        name,
        source,
        run_id=run_id,
        tags={key: str(value) for key, value in (tags or {}).items()},
        description=description,
    )
    return str(version.version)


def find_sweep_parent(client: MlflowClient, sweep_id: str) -> str:
    """Id of the parent run tagged ``hwexp.sweep_id = sweep_id`` (the newest when several).

    Raises:
        RunNotFound: no run in any experiment carries that tag.
    """
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    escaped = sweep_id.replace("'", "\\'")
    runs = (
        client.search_runs(
            experiment_ids,
            f"tags.`{SWEEP_ID_TAG}` = '{escaped}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if experiment_ids
        else []
    )
    if not runs:
        raise RunNotFound(
            f"no MLflow run in {client.tracking_uri} has tag {SWEEP_ID_TAG}={sweep_id!r}; the "
            "sweep's parent run must carry it (see hwexp.export.after_sweep)"
        )
    return runs[0].info.run_id


def tagged_child(
    client: MlflowClient, parent_run_id: str, tag: str, value: str = "true"
) -> str | None:
    """The newest finished child of ``parent_run_id`` that has a model and ``tag = value``
    (e.g. a sweep's best trial, tagged by the sweeper), or None."""
    parent = client.get_run(parent_run_id)
    filters = [
        "attributes.status = 'FINISHED'",
        f"tags.`{HAS_MODEL_TAG}` = 'true'",
        f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'",
        f"tags.`{tag}` = '{value}'",
    ]
    runs = client.search_runs(
        [parent.info.experiment_id],
        " and ".join(filters),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


# --------------------------------------------------------------------------- sweeps


def open_run(tracking_cfg: Mapping[str, Any], run_id: str) -> Tracker:
    """A ``Tracker`` for the existing run ``run_id`` (any status), e.g. a sweep's parent run
    reached from a trial's process.

    Raises:
        RunNotFound: no such run in the configured store.
    """
    client = client_for(tracking_cfg)
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise RunNotFound(f"run {run_id!r} does not exist in {client.tracking_uri}") from error
    return Tracker(client, run_id, run.info.experiment_id)


def run_status(tracker: Tracker) -> str:
    """The run's MLflow status: ``RUNNING`` | ``FINISHED`` | ``FAILED`` | ``KILLED`` | ..."""
    return tracker.client.get_run(tracker.run_id).info.status


def set_run_status(tracker: Tracker, status: str) -> None:
    """Set the run's status, any number of times (unlike ``Tracker.end``): a study's parent run
    is reopened (``RUNNING``) on every resume. Ending statuses also set the end time."""
    if status not in RUN_STATUSES:
        raise ValueError(f"unknown run status {status!r}: {' | '.join(RUN_STATUSES)}")
    if status == "RUNNING":
        tracker.client.update_run(tracker.run_id, status=status)
    else:
        tracker.client.set_terminated(tracker.run_id, status)


def mark_best_child(parent: Tracker, child_run_id: str | None) -> None:
    """Tag ``child_run_id`` with ``hwexp.best_trial=true`` and remove that tag from every other
    child of ``parent`` (``child_run_id`` None: from all of them)."""
    tagged = parent.client.search_runs(
        [parent.experiment_id],
        f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.run_id}' and tags.`{BEST_TRIAL_TAG}` = 'true'",
        max_results=1000,
    )
    for run in tagged:
        if run.info.run_id != child_run_id:
            parent.client.delete_tag(run.info.run_id, BEST_TRIAL_TAG)
    if child_run_id:
        parent.client.set_tag(child_run_id, BEST_TRIAL_TAG, "true")
