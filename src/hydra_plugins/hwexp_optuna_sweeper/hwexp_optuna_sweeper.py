"""The Hydra ``Sweeper`` plugin class, ``hydra/sweeper=hwexp_optuna``.

Hydra imports this module while scanning for plugins in every Hydra application: it stays
light, and the work (Optuna, hwexp) is imported when a sweeper is created.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class HwexpOptunaSweeper(Sweeper):
    """Optuna on current versions with pruning, resume, shared studies and an MLflow view.

    Keyword arguments are the fields of ``config.HwexpOptunaSweeperConf``.
    """

    def __init__(self, **settings: Any) -> None:
        from ._impl import OptunaSweep, SweepSettings

        self._sweep = OptunaSweep(SweepSettings(**settings))

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self._sweep.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: Sequence[str]) -> float | None:
        """Run the study to ``n_trials`` done trials; returns its best value."""
        return self._sweep.sweep(arguments)
