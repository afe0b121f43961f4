"""Structured configs of the sweeper: ``hydra/sweeper: hwexp_optuna`` and its option groups
``hydra/sweeper/sampler`` (tpe, random) and ``hydra/sweeper/pruner`` (median,
successive_halving, top_fraction, hyperband, none).

Hydra imports this module while scanning for plugins in every Hydra application, so it stays
free of Optuna and hwexp imports. (No ``from __future__ import annotations``: Hydra's scan
executes the module outside ``sys.modules``, where dataclasses cannot resolve string
annotations.)
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

PROVIDER = "hwexp_optuna_sweeper"


# --------------------------------------------------------------------------- samplers


@dataclass
class TPESamplerConf:
    """``optuna.samplers.TPESampler``; ``constant_liar`` keeps parallel workers apart."""

    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    n_startup_trials: int = 10
    multivariate: bool = False
    group: bool = False
    constant_liar: bool = True


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


# --------------------------------------------------------------------------- pruners


@dataclass
class MedianPrunerConf:
    """Prune a trial whose value at an epoch is worse than the median of earlier trials there."""

    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # no pruning before this many trials finished
    n_warmup_steps: int = 0  # no pruning in a trial's first epochs
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class SuccessiveHalvingPrunerConf:
    """Asynchronous successive halving: keep the top 1/reduction_factor at each rung."""

    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"  # epochs of the first rung ("auto": estimated)
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class TopFractionPrunerConf:
    """``hwexp.sweep.pruners.TopFractionPruner``: successive halving for small studies; at epochs
    min_resource * reduction_factor**k keep the top ceil(n / reduction_factor) trials by their
    best value so far."""

    _target_: str = "hwexp.sweep.pruners.TopFractionPruner"
    min_resource: int = 1
    reduction_factor: int = 4


@dataclass
class HyperbandPrunerConf:
    """Hyperband: several successive-halving brackets (trials are assigned by number)."""

    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "${oc.select:trainer.epochs,auto}"  # epochs of a full trial
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class NopPrunerConf:
    """No pruning: every trial runs all its epochs."""

    _target_: str = "optuna.pruners.NopPruner"


# --------------------------------------------------------------------------- the sweeper


@dataclass
class HwexpOptunaSweeperConf:
    """``hydra.sweeper`` of ``hydra/sweeper=hwexp_optuna`` (see the package docstring)."""

    _target_: str = "hydra_plugins.hwexp_optuna_sweeper.hwexp_optuna_sweeper.HwexpOptunaSweeper"
    _recursive_: bool = False  # sampler and pruner arrive as configs (logged, sent to jobs)
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])

    sampler: Any = MISSING
    pruner: Any = MISSING
    direction: str = "maximize"  # of the task's return value (optimized_metric)
    # Optuna storage URL. SQLite by default (relative paths are made absolute); use PostgreSQL
    # (postgresql://user@host:5432/db) for workers on several machines.
    storage: str = "sqlite:///${paths.mlruns_dir}/optuna.db"
    study_name: str = "hwexp"
    n_trials: int = 20  # COMPLETE + PRUNED trials the study holds when the sweep stops
    n_jobs: int = 1  # trials at once in this process (needs a parallel launcher, e.g. joblib)
    # errors tolerated, as a fraction of n_trials: at most floor(rate * n_trials) FAIL trials
    # with an error (interrupted and surplus trials excluded); one more stops the sweep
    max_failure_rate: float = 0.2
    monitor: str = "val_accuracy"  # Keras log key reported each epoch (its direction: above)
    heartbeat_interval: int = 30  # seconds between heartbeats of a RUNNING trial
    grace_period: int = 120  # a trial silent this long is interrupted (FAIL on the next check)
    retry_interrupted: bool = True  # enqueue an interrupted trial's parameters once more
    poll_interval: float = 5.0  # seconds between checks while other workers finish the study
    # search space and fixed overrides: key -> interval(...) | int(interval(...)) |
    # tag(log, interval(...)) | choice(...) | range(...) | a plain value
    params: dict[str, Any] | None = None


def register() -> None:
    """Store the sweeper and its sampler/pruner options in Hydra's ConfigStore."""
    store = ConfigStore.instance()
    store.store(
        group="hydra/sweeper", name="hwexp_optuna", node=HwexpOptunaSweeperConf, provider=PROVIDER
    )
    for name, node in {"tpe": TPESamplerConf, "random": RandomSamplerConf}.items():
        store.store(group="hydra/sweeper/sampler", name=name, node=node, provider=PROVIDER)
    pruners = {
        "median": MedianPrunerConf,
        "successive_halving": SuccessiveHalvingPrunerConf,
        "top_fraction": TopFractionPrunerConf,
        "hyperband": HyperbandPrunerConf,
        "none": NopPrunerConf,
    }
    for name, node in pruners.items():
        store.store(group="hydra/sweeper/pruner", name=name, node=node, provider=PROVIDER)


register()
