"""The trial side: a job that is one trial of a study (``sweep_trial`` block, ``SweepTrial``)
re-opens it, reports each epoch (``PruningHook``), stops when pruned, logs a child run."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from hwexp.sweep.overrides import override_value
from hwexp.sweep.storage import open_storage
from hwexp.sweep.study import (
    ERROR_ATTR,
    MLFLOW_RUN_ATTR,
    STUDY_NAME_TAG,
    Heartbeat,
    error_text,
    trial_id,
)

if TYPE_CHECKING:
    from hwexp.data.dataset import PreparedSplits
    from hwexp.tracking.writer import Tracker

log = logging.getLogger(__name__)

TRIAL_BLOCK = "sweep_trial"  # the config key of a job's SweepTrial


class NonFiniteLossError(RuntimeError):
    """Training diverged: the epoch's loss is NaN or infinite."""


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

    from hwexp.tracking.writer import run_name

    keras.backend.clear_session()  # trials may share a process (basic launcher, joblib worker)
    ref = SweepTrial.from_config(cfg[TRIAL_BLOCK])
    storage, trial = ref.open()
    with Heartbeat(storage, trial_id(trial)):
        try:
            name = run_name(splits.class_set, cfg.model.name, cfg.trainer.seed, ref.number)
            tracker = _trial_run(ref, trial, cfg.tracking, name)
            hook = PruningHook(trial, ref.monitor)
            with contextlib.ExitStack() as stack:
                if tracker is not None:  # the run's own heartbeat: see hwexp.tracking.writer
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
    ref: SweepTrial, trial: optuna.Trial, tracking_cfg: Mapping[str, Any], name: str
) -> Tracker | None:
    """The trial's child run ``name`` under the study's parent run, or None without
    tracking."""
    if ref.parent_run_id is None or not tracking_cfg.get("enabled", True):
        return None
    from hwexp.tracking.runs import open_run

    tags = {
        STUDY_NAME_TAG: ref.study_name,
        "hwexp.trial_number": str(ref.number),
        "hwexp.trial_params": json.dumps(trial.params, sort_keys=True),
    }
    parent = open_run(tracking_cfg, ref.parent_run_id)
    tracker = parent.child(run_name=name, tags=tags)
    trial.set_user_attr(MLFLOW_RUN_ATTR, tracker.run_id)
    return tracker
