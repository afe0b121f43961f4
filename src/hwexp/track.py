"""MLflow tracking: the only hwexp module that imports mlflow.

A ``Tracker`` is one MLflow run, driven through ``MlflowClient`` (no global "active run"
state, so parent/child runs and several trackers at once are explicit and safe).

Default store: ``sqlite:///<abs mlruns_dir>/mlflow.db`` with artifacts under
``<abs mlruns_dir>/artifacts`` (set explicitly when the experiment is created: MLflow >= 3.13
refuses the plain ``./mlruns`` file store, and absolute paths make Hydra's working directory
irrelevant). Any other tracking URI (e.g. ``http://127.0.0.1:5000``) can be passed instead.

What a run holds once ``hwexp.train.train_and_evaluate`` is done with it:

* params: the flattened, resolved config (``trainer.lr``, ``model.widths``, ...);
* tags: ``dataset``, ``source``, ``num_classes``, ``image_size``, ``model``, ``hostname``,
  ``git_commit`` (and ``mlflow.source.git.commit``) when the code is in a git checkout,
  ``hwexp.init_from`` (the source run's id) when ``trainer.init_from`` is set;
* per-epoch metrics under Keras' log names (``loss``, ``accuracy``, ``val_loss``,
  ``learning_rate``, ...; step = completed epochs) and summary metrics (``test/accuracy``, ...);
* artifacts: ``config.yaml``, ``model/model.keras`` + ``model/classes.txt``,
  ``evaluation/*.csv|md|png``, ``training/history.csv`` and ``training/curves.png``.

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

import csv
import functools
import io
import logging
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import PIL.Image
import PIL.ImageDraw
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
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

from hwexp.liveness import Heartbeat, identity_alive, process_identity

if TYPE_CHECKING:
    from matplotlib.font_manager import FontProperties

    from hwexp.train import EvaluationReport

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "hwexp"
HAS_MODEL_TAG = "hwexp.has_model"  # set once a run's model artifact is complete
PROCESS_TAG = "hwexp.process"  # on a training run: JSON host, pid, start of its process
HEARTBEAT_TAG = "hwexp.heartbeat"  # on a training run: unix time of its process's last beat
ERROR_TAG = "hwexp.error"  # why a run FAILED, when hwexp ended it for its process
HEARTBEAT_INTERVAL_S = 30.0
HEARTBEAT_STALE_S = 300.0  # a RUNNING run on another host without a beat this long is dead
_INVALID_KEY_CHARS = re.compile(r"[^\w\-./ ]")  # MLflow also allows ":", but not on Windows
REMOTE_SCHEMES = ("http://", "https://", "databricks")


# --------------------------------------------------------------------------- small helpers


def default_tracking_uri(mlruns_dir: str | Path) -> str:
    """``sqlite:///<absolute mlruns_dir>/mlflow.db`` (creates ``mlruns_dir``)."""
    root = Path(mlruns_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


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


def mlflow_key(key: str) -> str:
    """``key`` made acceptable to MLflow as a metric/param name: characters other than
    letters, digits, ``_ - . /`` and space become ``_``; at most 250 characters."""
    return _INVALID_KEY_CHARS.sub("_", key)[:MAX_ENTITY_KEY_LENGTH]


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


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    buffer = io.StringIO()
    columns = list(columns or (rows[0].keys() if rows else []))
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# --------------------------------------------------------------------------- CJK text


@functools.lru_cache(maxsize=1)
def cjk_font_path() -> str | None:
    """Path of a font that draws kana and kanji (the one hwexp installs), or None."""
    from hwexp.synth.fonts import display_font

    face = display_font()
    return face.path if face else None


def codepoints(chars: str) -> str:
    """``"あ"`` -> ``"U+3042"`` (space-separated for several characters)."""
    return " ".join(f"U+{ord(c):04X}" for c in chars)


def pair_text(true: str, predicted: str) -> tuple[str, FontProperties | None]:
    """How to draw ``true→predicted``: the characters with a CJK font when one is installed,
    else their code points (``U+3046→U+3042``) in the default font. Returns (text, font)."""
    path = cjk_font_path()
    if path is not None:
        from matplotlib.font_manager import FontProperties

        return f"{true}→{predicted}", FontProperties(fname=path)
    return f"{codepoints(true)}→{codepoints(predicted)}", None


# --------------------------------------------------------------------------- figures


def misclassified_grid(
    report: EvaluationReport, indices: np.ndarray, columns: int = 6
) -> PIL.Image.Image:
    """A grid of test images (dark on white), each captioned ``true→predicted`` and the
    confidence. Drawn with PIL: a matplotlib grid of 36 axes took 2.6 s, this 0.04 s."""
    from hwexp.data.show import captioned_grid

    indices = np.asarray(indices, dtype=np.int64)
    if not len(indices):
        image = PIL.Image.new("L", (columns * 72, 40), 255)
        PIL.ImageDraw.Draw(image).text((8, 12), "no misclassified samples", fill=0)
        return image
    captions = [
        f"{report.classes[report.labels[i]]}→{report.classes[report.predicted[i]]}\n"
        f"{report.top_k_probs[i, 0]:.0%}"
        for i in indices
    ]
    return captioned_grid(report.images[indices], captions, columns, cell=72, caption_px=15)


def confusion_figure(pairs: Sequence[tuple[str, str, int]]) -> Figure:
    """Horizontal bars: count of each most-confused (true → predicted) pair, most at the top."""
    figure = Figure(figsize=(6, 0.35 * max(len(pairs), 3) + 1), layout="constrained")
    axis = figure.subplots()
    labels = [pair_text(true, predicted) for true, predicted, _ in pairs]
    positions = np.arange(len(pairs))[::-1]
    axis.barh(positions, [count for _, _, count in pairs], color="tab:red")
    axis.set_yticks(positions, [text for text, _ in labels])
    for tick, (_, font) in zip(axis.get_yticklabels(), labels, strict=True):
        if font is not None:
            tick.set_fontproperties(font)
    axis.set_xlabel("test samples")
    axis.set_title("most confused pairs (true → predicted)")
    return figure


def curves_figure(history: Mapping[str, Sequence[float]]) -> Figure:
    """Loss, accuracy (train/val, top-5) and learning rate against completed epochs."""
    panels = [
        ("loss", ["loss", "val_loss"], False),
        ("accuracy", ["accuracy", "val_accuracy", "top5_accuracy", "val_top5_accuracy"], False),
        ("learning rate", ["learning_rate"], True),
    ]
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    for axis, (title, keys, log_scale) in zip(figure.subplots(1, 3), panels, strict=True):
        for key in keys:
            values = history.get(key)
            if values:
                axis.plot(range(1, len(values) + 1), values, marker=".", label=key)
        if log_scale and any(v > 0 for v in history.get("learning_rate", [])):
            axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if axis.has_data():
            axis.legend(fontsize=8)
    return figure


# --------------------------------------------------------------------------- tracker


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
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

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
        """The resolved config as params (flattened) and as ``config.yaml``."""
        config = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
        self.log_params(flatten_config(config))
        self.log_text(OmegaConf.to_yaml(config, resolve=True), "config.yaml")

    # ----------------------------------------------------------------- files

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` (UTF-8) to the run's artifact path ``artifact_file``."""
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        """Save a matplotlib figure (PNG at 110 dpi) as ``artifact_file``."""
        self.client.log_figure(self.run_id, figure, artifact_file, save_kwargs={"dpi": 110})

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_model(self, model: keras.Model, classes: Sequence[str]) -> None:
        """``model/model.keras`` and ``model/classes.txt`` (one class per line, UTF-8; line i
        is the character of output i)."""
        if any("\n" in c for c in classes):
            raise ValueError("a class name contains a newline; classes.txt would be ambiguous")
        with tempfile.TemporaryDirectory(prefix="hwexp-model-") as tmp:
            folder = Path(tmp) / "model"
            folder.mkdir()
            model.save(folder / "model.keras")
            (folder / "classes.txt").write_text("".join(f"{c}\n" for c in classes), "utf-8")
            self.client.log_artifacts(self.run_id, str(folder), "model")
        self.set_tags({HAS_MODEL_TAG: "true"})

    def log_evaluation(
        self, report: EvaluationReport, pairs: int = 20, misclassified: int = 36
    ) -> None:
        """Per-class/writer/source tables, the ``pairs`` most-confused pairs (CSV, markdown,
        PNG) and a grid of up to ``misclassified`` confident errors, under ``evaluation/``."""
        self.log_text(_csv_text(report.per_class()), "evaluation/per_class.csv")
        self.log_text(_csv_text(report.per_writer()), "evaluation/per_writer.csv")
        self.log_text(_csv_text(report.per_source()), "evaluation/per_source.csv")
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
        self.log_text(_csv_text(rows, columns), "evaluation/confusion_pairs.csv")
        self.log_text(_markdown_table(rows, columns), "evaluation/confusion_pairs.md")
        self.log_figure(confusion_figure(confused), "evaluation/confusion_pairs.png")
        grid = misclassified_grid(report, report.misclassified(misclassified))
        self.client.log_image(self.run_id, grid, "evaluation/misclassified.png")

    def log_history(self, history: Mapping[str, Sequence[float]]) -> None:
        """Per-epoch Keras logs as ``training/history.csv`` and ``training/curves.png``."""
        epochs = max((len(v) for v in history.values()), default=0)
        keys = sorted(history)
        rows = [
            {"epoch": e + 1, **{k: history[k][e] for k in keys if e < len(history[k])}}
            for e in range(epochs)
        ]
        self.log_text(_csv_text(rows, ["epoch", *keys]), "training/history.csv")
        self.log_figure(curves_figure(history), "training/curves.png")

    def keras_callback(self) -> keras.callbacks.Callback:
        """A Keras callback logging each epoch's logs (Keras names, step = completed epochs)."""
        return _EpochMetricsCallback(self)


class _EpochMetricsCallback(keras.callbacks.Callback):
    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.tracker.log_metrics(logs or {}, step=epoch + 1)


def _markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


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


# --------------------------------------------------------------------------- finished runs


class RunNotFound(LookupError):
    """A run reference names no run, or no run with a trained model."""


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


def load_trained_model(client: MlflowClient, run_id: str) -> TrainedModel:
    """Download and load ``model/model.keras``, ``model/classes.txt`` and ``config.yaml``.

    Raises:
        RunNotFound: the run has no model artifact (e.g. it failed before saving one).
    """
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory(prefix="hwexp-load-") as tmp:
        try:
            folder = Path(client.download_artifacts(run_id, "model", tmp))
        except (MlflowException, OSError) as error:
            raise RunNotFound(
                f"run {run_id} has no model artifact (status {run.info.status}); "
                "choose a run that finished training"
            ) from error
        if not (folder / "model.keras").is_file():
            raise RunNotFound(f"run {run_id} has no model/model.keras artifact")
        model = keras.saving.load_model(folder / "model.keras", compile=False)
        lines = (folder / "classes.txt").read_text(encoding="utf-8").split("\n")
        classes = tuple(lines[: model.output_shape[-1]])
        config_path = Path(client.download_artifacts(run_id, "config.yaml", tmp))
        config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
    return TrainedModel(run_id, model, classes, config, dict(run.data.metrics))


# --------------------------------------------------------------------------- exports and registry

EXPORTED_TAG = "hwexp.exported"  # "true" once a verified export is logged to a run
SWEEP_ID_TAG = "hwexp.sweep_id"  # on a sweep's parent run: the absolute hydra.sweep.dir


def log_export(
    client: MlflowClient,
    run_id: str,
    folder: str | Path,
    metrics: Mapping[str, float],
    tags: Mapping[str, str] | None = None,
    artifact_path: str = "export",
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


def register_model(
    client: MlflowClient,
    name: str,
    run_id: str,
    source: str,
    tags: Mapping[str, str] | None = None,
    description: str | None = None,
) -> str:
    """Register ``source`` (an artifact URI of run ``run_id``, e.g. from ``log_export``) as a new
    version of registered model ``name`` (created when missing). Returns the version number.

    Raises:
        MlflowException: the tracking store has no model registry (e.g. a plain file store).
    """
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
            "sweep's parent run must carry it (see hwexp.export, 'After a sweep')"
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

BEST_TRIAL_TAG = "hwexp.best_trial"  # "true" on the child run of a study's best trial
RUN_STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")


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


def child_runs(parent: Tracker) -> list[Any]:
    """The child runs of ``parent`` (MLflow ``Run`` objects, any status)."""
    return parent.client.search_runs(
        [parent.experiment_id],
        f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.run_id}'",
        max_results=10000,
    )
