"""A study's bookkeeping: trial user attrs, heartbeats, how trials count (``TrialCounts``),
and its MLflow parent run (``StudyRun``)."""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from hwexp import liveness
from hwexp.contract import ERROR_TAG
from hwexp.sweep.storage import quiet_optuna

if TYPE_CHECKING:
    from hwexp.tracking.writer import Tracker

log = logging.getLogger(__name__)

ERROR_ATTR = "error"  # trial user attr: "<ExceptionType>: message" of a failed trial
SURPLUS_ATTR = "surplus"  # trial user attr: asked beyond n_trials by a racing worker, never run
MLFLOW_RUN_ATTR = "mlflow_run_id"  # trial user attr: the trial's child run
WORKER_ATTR = "worker"  # trial user attr: "<host>:<pid>" of the sweeper that asked it
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the study's parent run
STUDY_NAME_TAG = "hwexp.study_name"  # on a study's parent run and its trials' runs
MAX_ERROR_CHARS = 2000


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
        from hwexp.contract import SWEEP_ID_TAG
        from hwexp.tracking.runs import open_run, set_run_status
        from hwexp.tracking.writer import Tracker

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
            STUDY_NAME_TAG: study.study_name,
            "hwexp.run_kind": "study",
        }
        tracker = Tracker.from_config(tracking_cfg, run_name=f"study-{study.study_name}", tags=tags)
        assert tracker is not None
        tracker.log_params(params)
        study.set_user_attr(PARENT_RUN_ATTR, tracker.run_id)
        return cls(tracker)

    def _child(self, run_id: str) -> Tracker:
        from hwexp.tracking.writer import Tracker

        return Tracker(self.tracker.client, run_id, self.tracker.experiment_id)

    def finish_trial(self, trial: FrozenTrial) -> None:
        """Tag the trial's child run with its final state (``hwexp.trial_state``), value and
        error, and end it if its process could not (e.g. was killed)."""
        from hwexp.tracking.runs import run_status, set_run_status

        run_id = trial.user_attrs.get(MLFLOW_RUN_ATTR)
        if run_id is None:
            return
        child = self._child(run_id)
        tags = {"hwexp.trial_state": trial.state.name}
        if trial.value is not None:
            tags["hwexp.trial_value"] = repr(trial.value)
        if ERROR_ATTR in trial.user_attrs:
            tags[ERROR_TAG] = trial.user_attrs[ERROR_ATTR]
        child.set_tags(tags)
        if run_status(child) == "RUNNING":
            ends = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}
            set_run_status(child, ends.get(trial.state, "FAILED"))

    def summarize(self, study: optuna.Study, status: str | None = None) -> None:
        """Log the study as it stands (see the class doc), close the child runs of trials that
        were failed as interrupted, and set the run's ``status`` if given."""
        from hwexp.tracking.runs import mark_best_child, set_run_status

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
