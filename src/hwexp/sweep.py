"""Optuna trials as hwexp runs: the task side of ``hydra/sweeper=hwexp_optuna`` and what the
sweeper (``hydra_plugins.hwexp_optuna_sweeper``) shares with it.

The sweeper asks the study (in its storage) for a trial and launches one ordinary hwexp job for
it, whose overrides are the trial's parameters plus a ``sweep_trial`` block (``SweepTrial``):
where the study lives and which trial this is. The job (``run_trial``), in whatever process or
machine the launcher chose, re-opens that trial from storage, reports the monitored validation
metric after every epoch through ``train_and_evaluate``'s ``epoch_hook`` (``PruningHook``), stops
when the study's pruner says so (``optuna.TrialPruned``), and logs itself as a child MLflow run
of the study's parent run (``StudyRun``). Only the sweeper tells the study how a trial ended.

Trial states and how they count (``TrialCounts``):

* COMPLETE and PRUNED are *done*: a sweep stops once ``n_trials`` are done in the study.
* FAIL is not done: the trial is replaced. Its kind (``failure_kind``) is ``error`` (an
  exception or a non-finite loss/objective; user attr ``error`` holds the message; these count
  against ``max_failure_rate``), ``interrupted`` (its process died; found by heartbeats and
  failed by the next worker, never counted as an error) or ``surplus`` (asked by a worker that
  lost the race for the last trial; never run, never counted).

hwexp's trainer stays free of Optuna; mlflow is only used through ``hwexp.track``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy.engine
import sqlalchemy.exc
from omegaconf import DictConfig, OmegaConf
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from hwexp import liveness

if TYPE_CHECKING:
    from hwexp.data.dataset import PreparedSplits
    from hwexp.track import Tracker

log = logging.getLogger(__name__)

TRIAL_BLOCK = "sweep_trial"  # the config key of a job's SweepTrial
ERROR_ATTR = "error"  # trial user attr: "<ExceptionType>: message" of a failed trial
SURPLUS_ATTR = "surplus"  # trial user attr: asked beyond n_trials by a racing worker, never run
MLFLOW_RUN_ATTR = "mlflow_run_id"  # trial user attr: the trial's child run
WORKER_ATTR = "worker"  # trial user attr: "<host>:<pid>" of the sweeper that asked it
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the study's parent run
MAX_ERROR_CHARS = 2000
SQLITE_PREFIX = "sqlite:///"
POSTGRESQL_PREFIX = "postgresql://"
SQLITE_BUSY_TIMEOUT_S = 60
STORAGE_ATTEMPTS = 5  # to open a storage whose tables another worker is creating


class NonFiniteLossError(RuntimeError):
    """Training diverged: the epoch's loss is NaN or infinite."""


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Silence Optuna's experimental-feature warnings (heartbeats, matplotlib plots) and its
    warning that heartbeats are meant for ``Study.optimize`` (here ask/tell sends them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        yield


# --------------------------------------------------------------------------- storage


def normalized_storage_url(url: str) -> str:
    """``url`` with a relative SQLite path made absolute (against the current directory) and
    the database's folder created; ``postgresql://`` gets the psycopg (3) driver that hwexp
    installs (SQLAlchemy 2.0 would pick psycopg2); other URLs unchanged."""
    if url.startswith(POSTGRESQL_PREFIX):
        return "postgresql+psycopg://" + url[len(POSTGRESQL_PREFIX) :]
    if not url.startswith(SQLITE_PREFIX):
        return url
    path, sep, query = url[len(SQLITE_PREFIX) :].partition("?")
    if path in ("", ":memory:"):
        raise ValueError(f"storage {url!r}: an Optuna sweep needs a database file or a server")
    resolved = Path(path).expanduser().resolve()
    resolved.parent.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE_PREFIX}{resolved}{sep}{query}"


def masked_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and MLflow)."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: show its scheme only
        return url.split("://", 1)[0] + "://***"


def open_storage(
    url: str,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    retry_interrupted: bool = False,
) -> RDBStorage:
    """An Optuna ``RDBStorage`` at ``url`` (SQLite waits up to a minute for a lock).

    With ``heartbeat_interval`` (seconds), RUNNING trials whose heartbeat is older than
    ``grace_period`` (default twice the interval) are stale and failed by ``fail_stale_trials``;
    ``retry_interrupted`` then enqueues each failed one again with the same parameters.
    """
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    callback = None
    if retry_interrupted and heartbeat_interval:
        with quiet_optuna():
            callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with quiet_optuna():
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval or None,
                    grace_period=grace_period or None,
                    heartbeat_stale_trial_callback=callback,
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
            # workers starting at once on a new database race to create its tables: theirs
            # stand, and the next attempt finds them
            if not _lost_table_race(error) or attempt == STORAGE_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


_DUPLICATE_SQLSTATES = {"42P07", "42710", "23505"}  # duplicate table, object, unique key


def _lost_table_race(error: sqlalchemy.exc.DBAPIError) -> bool:
    """True when ``error`` says that another process created the same table first: SQLite's
    IntegrityError, or PostgreSQL's duplicate table/object/key (``relation "studies" already
    exists``, which a concurrent ``CREATE TABLE`` raises)."""
    sqlstate = getattr(error.orig, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in _DUPLICATE_SQLSTATES
    return isinstance(error, sqlalchemy.exc.IntegrityError)


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark the RUNNING trials whose process stopped sending heartbeats as FAIL."""
    with quiet_optuna():
        optuna.storages.fail_stale_trials(study)


def trial_id(trial: FrozenTrial | optuna.Trial) -> int:
    """The storage id of a trial (Optuna keeps it private; heartbeats and re-opening need it)."""
    return trial._trial_id


class Heartbeat(liveness.Heartbeat):
    """While the ``with`` block runs, record the heartbeat of trial ``trial_id`` in ``storage``
    every heartbeat interval (from a daemon thread), so that other workers can tell a live
    trial from one whose process died. Does nothing when the storage has no interval."""

    def __init__(self, storage: RDBStorage, trial_id: int) -> None:
        super().__init__(
            functools.partial(storage.record_heartbeat, trial_id),
            storage.get_heartbeat_interval(),
            name=f"heartbeat of trial id {trial_id}",
        )


# --------------------------------------------------------------------------- states


def failure_kind(trial: FrozenTrial) -> str | None:
    """``error`` | ``interrupted`` | ``surplus`` for a FAIL trial (see the module doc), or
    None for a trial in another state."""
    if trial.state != TrialState.FAIL:
        return None
    if SURPLUS_ATTR in trial.user_attrs:
        return "surplus"
    return "error" if ERROR_ATTR in trial.user_attrs else "interrupted"


@dataclass(frozen=True)
class TrialCounts:
    """How many trials of a study are in each state (FAIL split by ``failure_kind``)."""

    complete: int = 0
    pruned: int = 0
    running: int = 0
    waiting: int = 0
    errors: int = 0
    interrupted: int = 0
    surplus: int = 0

    @property
    def done(self) -> int:
        """COMPLETE + PRUNED: the trials that count towards ``n_trials``."""
        return self.complete + self.pruned

    @classmethod
    def of(cls, trials: Sequence[FrozenTrial]) -> TrialCounts:
        counts = dict.fromkeys(asdict(cls()), 0)
        by_state = {
            TrialState.COMPLETE: "complete",
            TrialState.PRUNED: "pruned",
            TrialState.RUNNING: "running",
            TrialState.WAITING: "waiting",
        }
        kinds = {"error": "errors", "interrupted": "interrupted", "surplus": "surplus"}
        for trial in trials:
            kind = failure_kind(trial)
            counts[kinds[kind] if kind else by_state[trial.state]] += 1
        return cls(**counts)


def error_text(error: BaseException) -> str:
    """``"<ExceptionType>: message"``, at most 2000 characters."""
    return f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS]


# --------------------------------------------------------------------------- overrides

_PLAIN_STRING = re.compile(r"[A-Za-z_][\w\-./]*")
_RESERVED = {"true", "false", "null", "nan", "inf", "none"}
_BACKSLASHES_BEFORE_QUOTE = re.compile(r"(\\+)(?='|$)")


def override_value(value: Any) -> str:
    """``value`` (None, bool, int, float, str, or lists/mappings of them) written as the value
    of a Hydra command-line override that parses back to the same value. Strings are quoted
    unless plain, and ``${`` is escaped (no interpolation)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        if _PLAIN_STRING.fullmatch(value) and value.lower() not in _RESERVED:
            return value
        # Hydra's quoted strings: backslashes are literal except before a quote or at the end
        escaped = _BACKSLASHES_BEFORE_QUOTE.sub(lambda m: m.group(1) * 2, value)
        escaped = escaped.replace("'", "\\'").replace("${", "\\${")
        return f"'{escaped}'"
    if isinstance(value, Mapping):
        items = ",".join(f"{key}:{override_value(item)}" for key, item in value.items())
        return "{" + items + "}"
    if isinstance(value, Sequence):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as an override value")


# --------------------------------------------------------------------------- the trial block


@dataclass(frozen=True)
class SweepTrial:
    """What a job needs to take part in a study: the ``sweep_trial`` config block.

    ``storage``: absolute Optuna storage URL; ``number``: the trial's number in the study;
    ``monitor``: the Keras log key reported each epoch (e.g. ``val_accuracy``); ``pruner``: the
    pruner's config (``_target_`` + arguments); ``parent_run_id``: the study's MLflow run.
    """

    storage: str
    study_name: str
    number: int
    monitor: str = "val_accuracy"
    pruner: dict[str, Any] = field(default_factory=lambda: {"_target_": "optuna.pruners.NopPruner"})
    heartbeat_interval: int | None = None
    parent_run_id: str | None = None

    @classmethod
    def from_config(cls, block: Mapping[str, Any] | DictConfig) -> SweepTrial:
        if isinstance(block, DictConfig):
            block = OmegaConf.to_container(block, resolve=True)
        return cls(**dict(block))

    def override(self) -> str:
        """The ``++sweep_trial={...}`` override that passes this block to a job."""
        return f"++{TRIAL_BLOCK}={override_value(asdict(self))}"

    def make_pruner(self) -> optuna.pruners.BasePruner:
        from hydra.utils import instantiate

        return instantiate(OmegaConf.create(self.pruner))

    def open(self) -> tuple[RDBStorage, optuna.Trial]:
        """Re-open the RUNNING trial from storage, with the study's pruner, so that a job in any
        process can report to it and ask ``should_prune``.

        Raises:
            LookupError: no such trial; RuntimeError: the trial is not RUNNING any more.
        """
        storage = open_storage(self.storage, self.heartbeat_interval)
        study = optuna.load_study(
            study_name=self.study_name,
            storage=storage,
            sampler=optuna.samplers.RandomSampler(),  # never samples: the sweeper did
            pruner=self.make_pruner(),
        )
        found = [t for t in study.get_trials(deepcopy=False) if t.number == self.number]
        if not found:
            raise LookupError(f"study {self.study_name!r} has no trial {self.number}")
        if found[0].state != TrialState.RUNNING:
            raise RuntimeError(
                f"trial {self.number} of study {self.study_name!r} is {found[0].state.name}, "
                "not RUNNING (failed as stale by another worker?)"
            )
        return storage, optuna.Trial(study, trial_id(found[0]))


class PruningHook:
    """``epoch_hook`` of a trial: records the epoch's logs, fails the trial on a non-finite
    loss (``NonFiniteLossError``), reports ``logs[monitor]`` at step = epoch and raises
    ``optuna.TrialPruned`` when the study's pruner says so."""

    def __init__(self, trial: optuna.Trial, monitor: str = "val_accuracy") -> None:
        self.trial = trial
        self.monitor = monitor
        self.history: dict[str, list[float]] = {}

    def __call__(self, epoch: int, logs: Mapping[str, float]) -> None:
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        loss = float(logs.get("loss", 0.0))
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss} at epoch {epoch}")
        if self.monitor not in logs:
            raise KeyError(f"monitor {self.monitor!r} is not among the epoch logs {sorted(logs)}")
        value = float(logs[self.monitor])
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.monitor} {value:.4f})")


def run_trial(splits: PreparedSplits, cfg: DictConfig) -> dict[str, float]:
    """Train trial ``cfg.sweep_trial`` of a study on ``splits`` and return its metrics.

    Logs a child run of the study's parent run (when tracking is enabled) and stores its id in
    the trial (user attr ``mlflow_run_id``); sends the trial's heartbeat (to the study) and the
    run's (``Tracker.heartbeat``) while training.
    Raises ``optuna.TrialPruned`` when pruned (the child run, with its curves so far, ends
    KILLED) and re-raises any other error after recording it in the trial (user attr ``error``),
    since the exception itself may not survive the trip back to the sweeper.
    """
    import keras

    keras.backend.clear_session()  # trials may share a process (basic launcher, joblib worker)
    ref = SweepTrial.from_config(cfg[TRIAL_BLOCK])
    storage, trial = ref.open()
    with Heartbeat(storage, trial_id(trial)):
        try:
            tracker = _trial_run(ref, trial, cfg.tracking)
            hook = PruningHook(trial, ref.monitor)
            with contextlib.ExitStack() as stack:
                if tracker is not None:  # the run's own heartbeat: see hwexp.track
                    stack.enter_context(tracker)
                    stack.enter_context(tracker.heartbeat())
                return _train(splits, cfg, tracker, hook)
        except optuna.TrialPruned:
            raise
        except Exception as error:
            log.exception("trial %d failed", ref.number)  # the traceback, in the job's log
            with contextlib.suppress(Exception):  # the trial may be finished already
                trial.set_user_attr(ERROR_ATTR, error_text(error))
            raise


def _train(
    splits: PreparedSplits,
    cfg: DictConfig,
    tracker: Tracker | None,
    hook: PruningHook,
) -> dict[str, float]:
    """``train_and_evaluate`` with ``hook``; when pruned, the run gets the curves so far
    (``training/history.csv``, ``training/curves.png``) and ends KILLED."""
    from hwexp.train import train_and_evaluate

    try:
        return train_and_evaluate(splits, cfg, tracker, hook)
    except optuna.TrialPruned:
        if tracker is not None:
            tracker.log_history(hook.history)
            tracker.end("KILLED")
        raise


def _trial_run(
    ref: SweepTrial, trial: optuna.Trial, tracking_cfg: Mapping[str, Any]
) -> Tracker | None:
    """The trial's child run under the study's parent run, or None without tracking."""
    if ref.parent_run_id is None or not tracking_cfg.get("enabled", True):
        return None
    from hwexp.track import open_run

    tags = {
        "hwexp.study_name": ref.study_name,
        "hwexp.trial_number": str(ref.number),
        "hwexp.trial_params": json.dumps(trial.params, sort_keys=True),
    }
    parent = open_run(tracking_cfg, ref.parent_run_id)
    tracker = parent.child(run_name=f"{ref.study_name}-trial-{ref.number}", tags=tags)
    trial.set_user_attr(MLFLOW_RUN_ATTR, tracker.run_id)
    return tracker


# --------------------------------------------------------------------------- the parent run


class StudyRun:
    """The MLflow parent run of a study: one per study, shared by all its workers and resumes
    (its id is the study's user attr ``mlflow_parent_run_id``).

    It holds the study's settings as params (sampler, pruner, search space, storage, ...), the
    tag ``hwexp.sweep_id`` (the absolute ``hydra.sweep.dir`` of the worker that started last),
    and after ``summarize``: ``best/value`` and trial counts as metrics, ``best.*`` tags,
    ``study/trials.csv``, ``study/best.json`` and the optimisation-history, intermediate-values
    and parameter-importance plots. Its children are the trials' runs; the best one is tagged
    ``hwexp.best_trial=true``.
    """

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    @classmethod
    def open(
        cls,
        study: optuna.Study,
        tracking_cfg: Mapping[str, Any],
        *,
        created: bool,
        sweep_id: str,
        params: Mapping[str, Any],
        wait_s: float = 30.0,
        poll_s: float = 1.0,
    ) -> StudyRun | None:
        """The study's parent run: reopened (status RUNNING) if the study has one, else created
        by the worker that ``created`` the study (others wait up to ``wait_s`` for it, then
        create it themselves), with ``params`` logged. None when tracking is disabled."""
        from hwexp.track import SWEEP_ID_TAG, Tracker, open_run, set_run_status

        if not tracking_cfg.get("enabled", True):
            return None
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        deadline = time.monotonic() + (0.0 if created else wait_s)
        while run_id is None and time.monotonic() < deadline:
            time.sleep(poll_s)
            run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id is not None:  # the latest worker's sweep dir finds it (hwexp.export)
            tracker = open_run(tracking_cfg, run_id)
            set_run_status(tracker, "RUNNING")
            tracker.set_tags({SWEEP_ID_TAG: sweep_id})
            return cls(tracker)
        tags = {
            SWEEP_ID_TAG: sweep_id,
            "hwexp.study_name": study.study_name,
            "hwexp.run_kind": "study",
        }
        tracker = Tracker.from_config(tracking_cfg, run_name=f"study-{study.study_name}", tags=tags)
        assert tracker is not None
        tracker.log_params(params)
        study.set_user_attr(PARENT_RUN_ATTR, tracker.run_id)
        return cls(tracker)

    def _child(self, run_id: str) -> Tracker:
        from hwexp.track import Tracker

        return Tracker(self.tracker.client, run_id, self.tracker.experiment_id)

    def finish_trial(self, trial: FrozenTrial) -> None:
        """Tag the trial's child run with its final state (``hwexp.trial_state``), value and
        error, and end it if its process could not (e.g. was killed)."""
        from hwexp.track import run_status, set_run_status

        run_id = trial.user_attrs.get(MLFLOW_RUN_ATTR)
        if run_id is None:
            return
        child = self._child(run_id)
        tags = {"hwexp.trial_state": trial.state.name}
        if trial.value is not None:
            tags["hwexp.trial_value"] = repr(trial.value)
        if ERROR_ATTR in trial.user_attrs:
            tags["hwexp.error"] = trial.user_attrs[ERROR_ATTR]
        child.set_tags(tags)
        if run_status(child) == "RUNNING":
            ends = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}
            set_run_status(child, ends.get(trial.state, "FAILED"))

    def summarize(self, study: optuna.Study, status: str | None = None) -> None:
        """Log the study as it stands (see the class doc), close the child runs of trials that
        were failed as interrupted, and set the run's ``status`` if given."""
        from hwexp.track import mark_best_child, set_run_status

        trials = study.get_trials(deepcopy=False)
        counts = TrialCounts.of(trials)
        metrics = {f"trials/{key}": float(value) for key, value in asdict(counts).items()}
        for trial in trials:
            if failure_kind(trial) == "interrupted":
                self.finish_trial(trial)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if complete:
            best = study.best_trial
            metrics["best/value"] = float(best.value)
            best_tags = {f"best.{name}": value for name, value in best.params.items()}
            best_tags |= {
                "best.trial_number": best.number,
                "best.params": json.dumps(best.params, sort_keys=True),
                "best.mlflow_run_id": best.user_attrs.get(MLFLOW_RUN_ATTR, ""),
            }
            self.tracker.set_tags(best_tags)
            best_info = {"number": best.number, "value": best.value, "params": best.params}
            self.tracker.log_text(json.dumps(best_info, indent=2), "study/best.json")
            mark_best_child(self.tracker, best.user_attrs.get(MLFLOW_RUN_ATTR))
        self.tracker.log_metrics(metrics, step=counts.done)
        self.tracker.log_text(trials_csv(trials), "study/trials.csv")
        self._log_plots(study, len(complete))
        if status is not None:
            set_run_status(self.tracker, status)

    def _log_plots(self, study: optuna.Study, n_complete: int) -> None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as plots

        wanted = {"study/optimization_history.png": plots.plot_optimization_history}
        if n_complete >= 2:
            wanted["study/param_importances.png"] = plots.plot_param_importances
        if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            wanted["study/intermediate_values.png"] = plots.plot_intermediate_values
        for name, plot in wanted.items():
            try:
                with quiet_optuna():
                    axes = plot(study)
                figure = axes.figure
                figure.tight_layout()
                self.tracker.log_figure(figure, name)
                plt.close(figure)
            except Exception as error:  # a plot is never worth failing a sweep
                log.warning("%s not drawn: %s", name, error)


def trials_csv(trials: Sequence[FrozenTrial]) -> str:
    """One row per trial: number, state, value, seconds, each parameter, error, MLflow run."""
    names = sorted({name for t in trials for name in t.params})
    columns = ["number", "state", "value", "seconds", *names, "error", MLFLOW_RUN_ATTR]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for t in trials:
        seconds = t.duration.total_seconds() if t.duration is not None else ""
        writer.writerow(
            {
                "number": t.number,
                "state": t.state.name,
                "value": "" if t.value is None else t.value,
                "seconds": seconds,
                **t.params,
                "error": t.user_attrs.get(ERROR_ATTR, failure_kind(t) or ""),
                MLFLOW_RUN_ATTR: t.user_attrs.get(MLFLOW_RUN_ATTR, ""),
            }
        )
    return out.getvalue()
