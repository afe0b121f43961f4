"""One MLflow run, written through ``MlflowClient``: ``Tracker`` (params, tags, metrics,
text, figures, the training data, the model, evaluation reports, a heartbeat).

A ``Tracker`` is one MLflow run, driven through ``MlflowClient`` (no global "active run"
state, so parent/child runs and several trackers at once are explicit and safe).

Default store: ``sqlite:///<abs mlruns_dir>/mlflow.db`` with artifacts under
``<abs mlruns_dir>/artifacts`` (set explicitly when the experiment is created: MLflow >= 3.13
refuses the plain ``./mlruns`` file store, and absolute paths make Hydra's working directory
irrelevant). Any other tracking URI (e.g. ``http://127.0.0.1:5000``) can be passed instead.
Keras is imported only by the methods that need it (``log_model``, ``keras_callback``).
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)
from omegaconf import DictConfig, OmegaConf

from hwexp.contract import (
    CONFIG_FILE,
    HAS_MODEL_TAG,
    MODEL_NAME_TAG,
    default_tracking_uri,
    epoch_metric_name,
)
from hwexp.liveness import Heartbeat, process_identity
from hwexp.tracking.reports import (
    codepoints,
    confusion_figure,
    csv_text,
    curves_figure,
    markdown_table,
    misclassified_grid,
)

if TYPE_CHECKING:
    import keras
    import numpy as np

    from hwexp.data.dataset import PreparedSplits
    from hwexp.metrics import EvaluationReport

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "hwexp"
PROCESS_TAG = "hwexp.process"  # on a training run: JSON host, pid, start of its process
HEARTBEAT_TAG = "hwexp.heartbeat"  # on a training run: unix time of its process's last beat
HEARTBEAT_INTERVAL_S = 30.0
HEARTBEAT_STALE_S = 300.0  # a RUNNING run on another host without a beat this long is dead
_INVALID_KEY_CHARS = re.compile(r"[^\w\-./ ]")  # MLflow also allows ":", but not on Windows
REMOTE_SCHEMES = ("http://", "https://", "databricks")
# Config blocks not logged as params (config.yaml keeps them): where files are, a sweep trial's
# bookkeeping, what to do after a sweep. They say nothing about what was trained.
NOT_PARAMS = ("paths", "sweep_trial", "export")


def flatten_config(cfg: Mapping[str, Any] | DictConfig, prefix: str = "") -> dict[str, str]:
    """Nested (resolved) config -> ``{"trainer.lr": "0.001", ...}``; lists stay one value
    (``"[32, 64]"``); values longer than MLflow's limit (6000 chars) are truncated."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            flat[mlflow_key(name)] = str(value)[:MAX_PARAM_VAL_LENGTH]
    return flat


def run_name(class_set: str, model: str, seed: int, trial: int | None = None) -> str:
    """What a training run is, as its MLflow name: ``hiragana75 vgg_bn s42`` (class set, model,
    seed), ``... trial 3`` for a sweep's trial."""
    name = f"{class_set} {model} s{seed}"
    return name if trial is None else f"{name} trial {trial}"


def mlflow_key(key: str) -> str:
    """``key`` made acceptable to MLflow as a metric/param name: characters other than
    letters, digits, ``_ - . /`` and space become ``_``; at most 250 characters."""
    return _INVALID_KEY_CHARS.sub("_", key)[:MAX_ENTITY_KEY_LENGTH]


def runs_page_url(experiment_id: str, server: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page listing an experiment's training runs (not the GenAI traces view
    that MLflow 3 opens by default)."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _git(*args: str) -> str | None:
    """Output of a git command run in this source tree, or None (no git, no repo, no commit)."""
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def provenance_tags() -> dict[str, str]:
    """``hostname``, and ``git_commit`` / ``git_dirty`` / ``mlflow.source.git.commit`` when
    this code runs from a git checkout with at least one commit."""
    tags = {"hostname": socket.gethostname()}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags.update({"git_commit": commit, MLFLOW_GIT_COMMIT: commit})
        status = _git("status", "--porcelain", "--untracked-files=no")
        if status is not None:
            tags["git_dirty"] = str(bool(status)).lower()
    return tags


# --------------------------------------------------------------------------- tracker


def local_path_of(uri: str) -> str:
    """The local path of a ``file:`` URI; any other URI (or a plain path) unchanged."""
    if uri.startswith("file:"):
        return url2pathname(urlparse(uri).path)
    return uri


class Tracker:
    """One MLflow run. Create with ``Tracker.start`` / ``from_config`` / ``child``; use as a
    context manager (ends FINISHED, or FAILED when an exception escapes, KILLED on Ctrl-C).

    All ``log_*`` methods write straight to the store; files go through a temporary
    directory, never the working directory.
    """

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self._ended = False

    # ----------------------------------------------------------------- creation

    @classmethod
    def start(
        cls,
        experiment: str = DEFAULT_EXPERIMENT,
        *,
        tracking_uri: str | None = None,
        mlruns_dir: str | Path = "mlruns",
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent: Tracker | None = None,
    ) -> Tracker:
        """Start a run in ``experiment`` (created if needed).

        ``tracking_uri`` None: ``default_tracking_uri(mlruns_dir)``. For local stores the
        experiment's artifact location is ``<abs mlruns_dir>/artifacts``; remote servers
        (``http(s)://``, databricks) choose their own. ``parent``: make this a nested run.
        """
        uri = tracking_uri or default_tracking_uri(mlruns_dir)
        client = MlflowClient(tracking_uri=uri)
        artifacts = None
        if not uri.startswith(REMOTE_SCHEMES):
            artifact_root = Path(mlruns_dir).expanduser().resolve() / "artifacts"
            artifact_root.mkdir(parents=True, exist_ok=True)
            artifacts = artifact_root.as_uri()
        experiment_id = _experiment_id(client, experiment, artifacts)
        all_tags = {**provenance_tags(), **(tags or {})}
        if parent is not None:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent.run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        log.info("MLflow run %s in experiment %r at %s", run.info.run_id, experiment, uri)
        return cls(client, run.info.run_id, experiment_id)

    @classmethod
    def from_config(
        cls,
        tracking_cfg: Mapping[str, Any],
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent: Tracker | None = None,
    ) -> Tracker | None:
        """A run as ``conf/tracking/mlflow.yaml`` says (``uri``, ``mlruns_dir``, ``experiment``,
        ``run_name``), or None when ``enabled`` is false. ``run_name`` overrides the config."""
        if not tracking_cfg.get("enabled", True):
            return None
        return cls.start(
            tracking_cfg["experiment"],
            tracking_uri=tracking_cfg["uri"],
            mlruns_dir=tracking_cfg["mlruns_dir"],
            run_name=run_name or tracking_cfg.get("run_name"),
            tags=tags,
            parent=parent,
        )

    def child(self, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> Tracker:
        """A nested run (same experiment, ``mlflow.parentRunId`` = this run)."""
        all_tags = {**provenance_tags(), **(tags or {}), MLFLOW_PARENT_RUN_ID: self.run_id}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        return Tracker(self.client, run.info.run_id, self.experiment_id)

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def artifact_location(self, artifact_path: str) -> str:
        """Where the run's ``artifact_path`` is: a local path for a local artifact store, else
        its URI."""
        return local_path_of(f"{self.artifact_uri.rstrip('/')}/{artifact_path}")

    # ----------------------------------------------------------------- life cycle

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED`` | ``FAILED`` | ``KILLED`` (once; later calls do nothing)."""
        if not self._ended:
            self.client.set_terminated(self.run_id, status)
            self._ended = True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            already = self._ended
            self.end("KILLED")
            if exc is not None and not already:
                exc.add_note(f"MLflow run {self.run_id} marked KILLED")
        else:
            self.end("FAILED")

    def heartbeat(self, interval_s: float = HEARTBEAT_INTERVAL_S) -> Heartbeat:
        """A context manager that marks this run as trained by this process: tags
        ``hwexp.process`` (host, pid, start time) and ``hwexp.heartbeat`` (now), set on entry
        and every ``interval_s`` seconds until exit. Without it, a run whose process dies stays
        RUNNING; with it, ``fail_orphaned_runs`` can end such a run FAILED."""
        identity = process_identity()

        def beat() -> None:
            self.set_tags({PROCESS_TAG: identity, HEARTBEAT_TAG: f"{time.time():.0f}"})

        return Heartbeat(beat, interval_s, name=f"heartbeat of run {self.run_id}")

    # ----------------------------------------------------------------- values

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values stringified, truncated to 6000 chars), 100 per request."""
        entries = [
            Param(mlflow_key(key), str(value)[:MAX_PARAM_VAL_LENGTH])
            for key, value in params.items()
        ]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        entries = [RunTag(key, str(value)) for key, value in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log numeric metrics at ``step``; non-numeric values are skipped with a warning."""
        now = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            try:
                entries.append(Metric(mlflow_key(key), float(value), now, step))
            except (TypeError, ValueError):
                log.warning("metric %r is not a number (%r); not logged", key, value)
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_config(self, cfg: Mapping[str, Any] | DictConfig) -> None:
        """The resolved config as ``config.yaml``, and as params (flattened) but for the blocks
        that say where, not what (``NOT_PARAMS``: ``paths``, ...)."""
        config = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
        resolved = OmegaConf.to_container(config, resolve=True)
        self.log_params(flatten_config({k: v for k, v in resolved.items() if k not in NOT_PARAMS}))
        self.log_text(OmegaConf.to_yaml(config, resolve=True), CONFIG_FILE)

    # ----------------------------------------------------------------- files

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` (UTF-8) to the run's artifact path ``artifact_file``."""
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        """Save a matplotlib figure (PNG at 110 dpi) as ``artifact_file``."""
        self.client.log_figure(self.run_id, figure, artifact_file, save_kwargs={"dpi": 110})

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_model(
        self,
        model: keras.Model,
        classes: Sequence[str],
        name: str | None = None,
        example: np.ndarray | None = None,
    ) -> str:
        """Log the inference ``model`` with its ``classes`` as this run's MLflow model ``model``
        (``runs:/<run id>/model``, ``hwexp.tracking.mlmodels.log_keras_model``), named ``name``
        (tag ``hwexp.model_name``, on the run too); ``example``: prepared images, ``(n, S, S)``
        uint8. Last, tags the run ``hwexp.has_model=true``. Returns the logged model's id.

        Raises ``ValueError`` when a class contains a newline."""
        from hwexp.tracking.mlmodels import log_keras_model

        model_id = log_keras_model(
            self.client, self.experiment_id, self.run_id, model, classes, name, example
        )
        self.set_tags({**({MODEL_NAME_TAG: name} if name else {}), HAS_MODEL_TAG: "true"})
        return model_id

    def log_training_data(self, splits: PreparedSplits) -> None:
        """Record what the run trained on as MLflow dataset inputs, one per cached source
        (``hwexp.tracking.mlmodels.dataset_inputs``: name, digest = cache fingerprint, source,
        class set); splits that did not come from the cache record nothing."""
        from hwexp.tracking.mlmodels import dataset_inputs

        inputs = dataset_inputs(splits)
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_evaluation(
        self, report: EvaluationReport, pairs: int = 20, misclassified: int = 36
    ) -> None:
        """Per-class/writer/source tables, the ``pairs`` most-confused pairs (CSV, markdown,
        PNG) and a grid of up to ``misclassified`` confident errors, under ``evaluation/``."""
        self.log_text(csv_text(report.per_class()), "evaluation/per_class.csv")
        self.log_text(csv_text(report.per_writer()), "evaluation/per_writer.csv")
        self.log_text(csv_text(report.per_source()), "evaluation/per_source.csv")
        confused = report.confusion_pairs(pairs)
        rows = [
            {
                "true": true,
                "predicted": predicted,
                "count": count,
                "true_codepoint": codepoints(true),
                "predicted_codepoint": codepoints(predicted),
            }
            for true, predicted, count in confused
        ]
        columns = ["true", "predicted", "count", "true_codepoint", "predicted_codepoint"]
        self.log_text(csv_text(rows, columns), "evaluation/confusion_pairs.csv")
        self.log_text(markdown_table(rows, columns), "evaluation/confusion_pairs.md")
        examples = [
            tuple(None if i < 0 else report.images[i] for i in pair)
            for pair in report.confusion_examples(confused)
        ]
        self.log_figure(confusion_figure(confused, examples), "evaluation/confusion_pairs.png")
        grid = misclassified_grid(report, report.misclassified(misclassified))
        self.client.log_image(self.run_id, grid, "evaluation/misclassified.png")

    def log_history(self, history: Mapping[str, Sequence[float]]) -> None:
        """Per-epoch Keras logs as ``training/history.csv`` and ``training/curves.png``, under
        their tracked names (``epoch_metric_name``: ``train/loss``, ``val/accuracy``, ...)."""
        history = {epoch_metric_name(key): values for key, values in history.items()}
        epochs = max((len(v) for v in history.values()), default=0)
        keys = sorted(history)
        rows = [
            {"epoch": e + 1, **{k: history[k][e] for k in keys if e < len(history[k])}}
            for e in range(epochs)
        ]
        self.log_text(csv_text(rows, ["epoch", *keys]), "training/history.csv")
        self.log_figure(curves_figure(history), "training/curves.png")

    def keras_callback(self) -> keras.callbacks.Callback:
        """A Keras callback logging each epoch's logs under their tracked names
        (``epoch_metric_name``: ``train/loss``, ``val/accuracy``, ...), step = completed epochs."""
        import keras

        tracker = self

        class EpochMetrics(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                named = {epoch_metric_name(key): value for key, value in (logs or {}).items()}
                tracker.log_metrics(named, step=epoch + 1)

        return EpochMetrics()


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Id of experiment ``name``: restored if deleted, created if missing (a concurrent
    creation by another process is tolerated)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id
