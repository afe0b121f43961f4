"""The sweep loop: ask the study for a trial, launch one job for it, tell the study how it
ended; repeat until the study holds ``n_trials`` done (COMPLETE + PRUNED) trials.

Several loops share a study safely, whether threads of one sweeper (``n_jobs``), sweepers on
one machine or on many (same ``storage`` and ``study_name``):

* before each ask, a worker counts the study's trials (storage-side, after failing stale ones):
  it stops when ``n_trials`` are done, waits while done + running trials already reach
  ``n_trials`` (one of them may still fail and need replacing), and asks otherwise;
* after the ask, it checks the race: if ``n_trials`` trials with smaller numbers are already
  done or running, its trial is surplus and told FAIL (user attr ``surplus``) without running;
* the options every trial shares are checked (``hwexp.config_check``) before the study is
  opened: a bad one ends the sweep at once with an ``error:`` line;
* every RUNNING trial sends heartbeats (from the sweeper and from the job), so a trial whose
  process died becomes FAIL at the next check of any worker and, with ``retry_interrupted``,
  its parameters are enqueued once more (a RUNNING trial with no heartbeat at all, its worker
  killed right after asking, gets one from the first worker that sees it, and goes stale too).

Trial numbers are unique by construction of the storage. The job's return value is the
objective; ``optuna.TrialPruned`` from the job means PRUNED; any other error, or a non-finite
objective, means FAIL with the error in the trial's user attr ``error``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from hwexp.sweep.storage import (
    fail_stale_trials,
    masked_url,
    normalized_storage_url,
    open_storage,
    quiet_optuna,
)
from hwexp.sweep.study import (
    ERROR_ATTR,
    SURPLUS_ATTR,
    WORKER_ATTR,
    Heartbeat,
    StudyRun,
    TrialCounts,
    error_text,
    trial_id,
)
from hwexp.sweep.trial import SweepTrial

from ._search_space import SearchSpace, parse_search_space

log = logging.getLogger(__name__)

DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
DIRECTIONS = ("maximize", "minimize")


class SweepAborted(RuntimeError):
    """More trials failed with an error than ``max_failure_rate`` allows."""


@dataclass
class SweepSettings:
    """``hydra.sweeper`` as plain values (see ``config.HwexpOptunaSweeperConf``)."""

    sampler: dict[str, Any]
    pruner: dict[str, Any]
    direction: str
    storage: str
    study_name: str
    n_trials: int
    n_jobs: int
    max_failure_rate: float
    monitor: str
    heartbeat_interval: int
    grace_period: int
    retry_interrupted: bool
    poll_interval: float
    params: dict[str, Any] | None

    def __post_init__(self) -> None:
        for name in ("sampler", "pruner", "params"):
            value = getattr(self, name)
            if isinstance(value, DictConfig):
                setattr(self, name, OmegaConf.to_container(value, resolve=True))
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction {self.direction!r}: maximize | minimize")
        if not self.storage:
            raise ValueError("hydra.sweeper.storage is required (an SQLite file or a server)")
        if self.n_trials < 1 or self.n_jobs < 1 or self.heartbeat_interval < 1:
            raise ValueError("n_trials, n_jobs and heartbeat_interval must be at least 1")
        if self.max_failure_rate < 0:
            raise ValueError(f"max_failure_rate must be >= 0, got {self.max_failure_rate}")
        self.storage = normalized_storage_url(self.storage)

    @property
    def failure_budget(self) -> int:
        """Trials that may fail with an error before the sweep stops."""
        return math.floor(self.max_failure_rate * self.n_trials + 1e-9)

    def mlflow_params(self, space: SearchSpace) -> dict[str, Any]:
        """The study's settings and search space, as the parent run's params."""
        params: dict[str, Any] = {
            "study_name": self.study_name,
            "storage": masked_url(self.storage),
            "direction": self.direction,
            "n_trials": self.n_trials,
            "max_failure_rate": self.max_failure_rate,
            "monitor": self.monitor,
            "heartbeat_interval": self.heartbeat_interval,
            "grace_period": self.grace_period,
            "retry_interrupted": self.retry_interrupted,
            "fixed_overrides": " ".join(space.fixed),
        }
        for kind in ("sampler", "pruner"):
            cfg = dict(getattr(self, kind))
            params[kind] = str(cfg.pop("_target_")).rsplit(".", 1)[-1]
            params |= {f"{kind}.{key}": value for key, value in cfg.items()}
        return params | {f"space.{name}": text for name, text in space.describe().items()}


@dataclass(frozen=True)
class Outcome:
    """How a trial ended, as the study is told."""

    state: TrialState
    value: float | None = None
    error: str | None = None


def outcome_of(result: JobReturn | BaseException) -> Outcome:
    """The outcome of a launched job (or of the exception its launch raised): COMPLETE with a
    finite float return value, PRUNED for ``optuna.TrialPruned``, FAIL otherwise."""
    if isinstance(result, JobReturn) and result.status == JobStatus.COMPLETED:
        try:
            value = float(result.return_value)
        except (TypeError, ValueError):
            return Outcome(TrialState.FAIL, error=f"objective {result.return_value!r} is no number")
        if not math.isfinite(value):
            return Outcome(TrialState.FAIL, error=f"objective is {value}")
        return Outcome(TrialState.COMPLETE, value)
    error = result if isinstance(result, BaseException) else result._return_value
    if isinstance(error, optuna.TrialPruned):
        return Outcome(TrialState.PRUNED)
    if not isinstance(error, BaseException):
        error = RuntimeError(f"job ended {getattr(result, 'status', '?')} without an exception")
    return Outcome(TrialState.FAIL, error=error_text(error))


class OptunaSweep:
    """The sweeper's work (``HwexpOptunaSweeper`` delegates to it); see the module docstring."""

    def __init__(self, settings: SweepSettings) -> None:
        self.settings = settings
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._lock = threading.Lock()  # one ask at a time in this process
        self._stop = threading.Event()
        self._space: SearchSpace | None = None
        self._storage: optuna.storages.RDBStorage | None = None
        self._study_run: StudyRun | None = None
        self._seen_running: set[int] = set()  # RUNNING trial ids given a heartbeat once

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ----------------------------------------------------------------- the sweep

    def sweep(self, arguments: Sequence[str]) -> float | None:
        """Run trials until the study is done; returns the study's best value (None if no
        trial completed).

        Raises:
            SweepAborted: too many trials failed with an error.
        """
        assert self.config is not None and self.hydra_context is not None
        settings = self.settings
        self._space = parse_search_space(
            settings.params, arguments, self.hydra_context.config_loader
        )
        self._check_options()
        study, created = self._open_study()
        fail_stale_trials(study)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).expanduser().resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self._study_run = StudyRun.open(
            study,
            self.config.tracking,
            created=created,
            sweep_id=str(sweep_dir),
            params=settings.mlflow_params(self._space),
        )
        self._write_study_file(sweep_dir / "study.yaml")
        counts = TrialCounts.of(study.get_trials(deepcopy=False))
        log.info(
            "study %r in %s: %d of %d trials done (%d pruned), %d running, %d failed; searching %s",
            settings.study_name,
            masked_url(settings.storage),
            counts.done,
            settings.n_trials,
            counts.pruned,
            counts.running,
            counts.errors + counts.interrupted,
            ", ".join(self._space.describe()) or "nothing",
        )
        status: str | None = None
        try:
            self._run_workers(study)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except Exception:  # SweepAborted, or a launcher/storage error
            status = "FAILED"
            raise
        finally:
            if self._study_run is not None:
                self._study_run.summarize(study, status)
        if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            return None
        log.info(
            "best trial %d: %s %s", study.best_trial.number, study.best_value, study.best_params
        )
        return float(study.best_value)

    def _check_options(self) -> None:
        """Refuse bad options that every trial shares (the config with the fixed overrides)
        before the study or its MLflow run is touched: ``error:`` lines on stderr and exit
        status 1, as ``python -m hwexp`` does. Searched values are checked by each trial."""
        from hwexp.config_check import InvalidOptions, check_config

        assert self.hydra_context is not None and self._space is not None
        composed = self.hydra_context.config_loader.load_sweep_config(
            self.config, list(self._space.fixed)
        )
        try:
            check_config(composed)
        except InvalidOptions as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1) from None

    def _open_study(self) -> tuple[optuna.Study, bool]:
        """Create the study, or load it if it exists; True when this worker created it.

        A seeded sampler gets ``seed + trials already in the study``, so that a resumed sweep
        does not sample its first trials' parameters again.
        """
        settings = self.settings
        self._storage = open_storage(
            settings.storage,
            settings.heartbeat_interval,
            settings.grace_period,
            settings.retry_interrupted,
        )
        pruner = instantiate(OmegaConf.create(settings.pruner))
        common = {"study_name": settings.study_name, "storage": self._storage, "pruner": pruner}
        created = True
        try:
            study = optuna.create_study(**common, direction=settings.direction)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(**common)
            created = False
        if study.direction.name.lower() != settings.direction:
            raise ValueError(
                f"study {settings.study_name!r} exists with direction "
                f"{study.direction.name.lower()}, not {settings.direction}: choose another "
                "hydra.sweeper.study_name"
            )
        sampler_cfg = dict(settings.sampler)
        if sampler_cfg.get("seed") is not None:
            sampler_cfg["seed"] = int(sampler_cfg["seed"]) + len(study.get_trials(deepcopy=False))
        study.sampler = instantiate(OmegaConf.create(sampler_cfg))
        return study, created

    def _write_study_file(self, path: Path) -> None:
        """``study.yaml`` in the sweep folder: where the study and its parent run are."""
        info = {
            "study_name": self.settings.study_name,
            "storage": masked_url(self.settings.storage),
            "n_trials": self.settings.n_trials,
            "mlflow_parent_run_id": self._study_run.run_id if self._study_run else None,
        }
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(info)), encoding="utf-8")

    def _run_workers(self, study: optuna.Study) -> None:
        """``n_jobs`` loops in threads (one with the in-process basic launcher)."""
        n_jobs = self.settings.n_jobs
        if n_jobs > 1 and type(self.launcher).__name__ == "BasicLauncher":
            log.warning(
                "hydra.sweeper.n_jobs=%d ignored: the basic launcher runs one job at a time "
                "in this process; use hydra/launcher=joblib for parallel trials",
                n_jobs,
            )
            n_jobs = 1
        if n_jobs == 1:
            self._work(study)
            return
        with ThreadPoolExecutor(n_jobs, thread_name_prefix="trial") as pool:
            futures = [pool.submit(self._work, study) for _ in range(n_jobs)]
            try:
                wait(futures)  # a loop that fails stops the others (self._stop)
            except KeyboardInterrupt:  # ask no more; running jobs finish
                self._stop.set()
                raise
        for future in futures:
            future.result()

    # ----------------------------------------------------------------- one loop

    def _work(self, study: optuna.Study) -> None:
        """Ask, run and tell trials until the study is done (or another loop failed)."""
        try:
            while not self._stop.is_set():
                trial = self._next_trial(study)
                if trial is None:
                    return
                self._run_trial(study, trial)
        except BaseException:
            self._stop.set()
            raise

    def _next_trial(self, study: optuna.Study) -> optuna.Trial | None:
        """A new RUNNING trial with its parameters sampled, or None once the study is done
        (waits while other workers' running trials may still complete it)."""
        settings = self.settings
        assert self._space is not None and self._storage is not None
        while not self._stop.is_set():
            with self._lock:
                fail_stale_trials(study)
                trials = study.get_trials(deepcopy=False)
                self._adopt_silent_trials(trials)
                counts = TrialCounts.of(trials)
                if counts.done >= settings.n_trials:
                    return None
                if counts.errors > settings.failure_budget:
                    raise SweepAborted(self._abort_message(trials, counts))
                if counts.done + counts.running < settings.n_trials:
                    with quiet_optuna():
                        trial = study.ask(self._space.distributions)
                    self._storage.record_heartbeat(trial_id(trial))  # alive from the start
                    self._seen_running.add(trial_id(trial))
                    trial.set_user_attr(WORKER_ATTR, self.worker)
                    if not self._is_surplus(study, trial):
                        return trial
            time.sleep(settings.poll_interval)
        return None

    def _adopt_silent_trials(self, trials: Sequence[optuna.trial.FrozenTrial]) -> None:
        """Record one heartbeat for each RUNNING trial this worker sees for the first time.

        Optuna never fails a RUNNING trial that has no heartbeat at all, as one whose worker
        died between asking and its first heartbeat would stay; with this beat it goes stale
        after ``grace_period`` like any other. For a live trial the beat changes nothing.
        """
        assert self._storage is not None
        for trial in trials:
            if trial.state == TrialState.RUNNING and trial_id(trial) not in self._seen_running:
                self._storage.record_heartbeat(trial_id(trial))
                self._seen_running.add(trial_id(trial))

    def _is_surplus(self, study: optuna.Study, trial: optuna.Trial) -> bool:
        """True (and the trial told FAIL, user attr ``surplus``) when ``n_trials`` trials with
        smaller numbers are already done or running: another worker won the race."""
        ahead = study.get_trials(deepcopy=False, states=LIVE_STATES)
        rank = sum(1 for t in ahead if t.number < trial.number)
        if rank < self.settings.n_trials:
            return False
        trial.set_user_attr(SURPLUS_ATTR, True)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        log.info("trial %d not run: other workers reached n_trials first", trial.number)
        return True

    def _abort_message(
        self, trials: Sequence[optuna.trial.FrozenTrial], counts: TrialCounts
    ) -> str:
        failed = [t for t in trials if ERROR_ATTR in t.user_attrs and t.state == TrialState.FAIL]
        last = max(failed, key=lambda t: t.number)
        return (
            f"{counts.errors} trials of study {self.settings.study_name!r} failed, more than "
            f"max_failure_rate x n_trials = {self.settings.failure_budget}; last, trial "
            f"{last.number}: {last.user_attrs[ERROR_ATTR]}"
        )

    def _run_trial(self, study: optuna.Study, trial: optuna.Trial) -> None:
        """Launch the job of ``trial`` (heartbeats meanwhile) and tell the study its outcome."""
        assert self._space is not None and self._storage is not None
        settings = self.settings
        ref = SweepTrial(
            storage=settings.storage,
            study_name=settings.study_name,
            number=trial.number,
            monitor=settings.monitor,
            pruner=settings.pruner,
            heartbeat_interval=settings.heartbeat_interval,
            parent_run_id=self._study_run.run_id if self._study_run else None,
        )
        overrides = [*self._space.overrides(trial.params), ref.override()]
        log.info("trial %d: %s", trial.number, " ".join(self._space.overrides(trial.params)))
        result: JobReturn | BaseException
        with Heartbeat(self._storage, trial_id(trial)):
            try:
                result = self.launcher.launch([overrides], initial_job_idx=trial.number)[0]
            except KeyboardInterrupt:
                self._interrupt(study, trial)
                raise
            except Exception as error:  # the launcher lost the job (e.g. a killed worker)
                result = error
        outcome = outcome_of(result)
        if outcome.error is not None and ERROR_ATTR not in trial.user_attrs:
            trial.set_user_attr(ERROR_ATTR, outcome.error)
        frozen = study.tell(trial, outcome.value, state=outcome.state, skip_if_finished=True)
        log.info(
            "trial %d %s%s",
            frozen.number,
            frozen.state.name,
            f" {frozen.value:.4f}" if frozen.value is not None else f": {outcome.error}",
        )
        if self._study_run is not None:
            self._study_run.finish_trial(frozen)

    def _interrupt(self, study: optuna.Study, trial: optuna.Trial) -> None:
        """Ctrl-C: fail the trial now (as interrupted, not as an error) and enqueue it again
        like a stale one, instead of leaving it RUNNING until its heartbeat goes stale."""
        frozen = study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        assert self._storage is not None
        retry = self._storage.get_heartbeat_stale_trial_callback()
        if retry is not None:
            retry(study, frozen)
