"""``TopFractionPruner``: successive halving that stays fair in small studies.

Optuna's ``SuccessiveHalvingPruner`` promotes the top ``floor(n / reduction_factor)`` of the
``n`` trials that reached a rung, and the single best while that is 0. In a study of a dozen
trials that means "be the best so far" at every rung for the first ``2 * reduction_factor - 1``
trials, and it compares one epoch's noisy value. On the synthetic katakana benchmark
(``scripts/bench_sweep.py``) it pruned the trial that would have been best, a slow starter with
augmentation, at epoch 2, two points behind the leader.

This pruner keeps the top ``ceil(n / reduction_factor)`` (at least one more than the best once
``n > reduction_factor``), ranks each trial by its best value up to the rung rather than the
value at the rung, and looks only at the trials' own intermediate values (any state), so it
needs no bookkeeping in the storage.
"""

from __future__ import annotations

import math

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

_RANKED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class TopFractionPruner(optuna.pruners.BasePruner):
    """At steps ``min_resource * reduction_factor**k`` (k = 0, 1, ...), prune a trial unless its
    best value so far is among the top ``ceil(n / reduction_factor)`` of the ``n`` trials
    (itself included) that have reported that step; between rungs, never prune. Steps are
    epochs, counted from 1. A NaN value at a rung is pruned.
    """

    def __init__(self, min_resource: int = 1, reduction_factor: int = 4) -> None:
        if min_resource < 1:
            raise ValueError(f"min_resource must be >= 1, got {min_resource}")
        if reduction_factor < 2:
            raise ValueError(f"reduction_factor must be >= 2, got {reduction_factor}")
        self.min_resource = min_resource
        self.reduction_factor = reduction_factor

    def is_rung(self, step: int) -> bool:
        """True when ``step`` is ``min_resource * reduction_factor**k`` for some k >= 0."""
        rung = self.min_resource
        while rung < step:
            rung *= self.reduction_factor
        return rung == step

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or not self.is_rung(step):
            return False
        value = _best_until(trial, step, study.direction)
        if math.isnan(value):
            return True
        values = [value]
        for other in study.get_trials(deepcopy=False, states=_RANKED_STATES):
            if other.number != trial.number and step in other.intermediate_values:
                other_value = _best_until(other, step, study.direction)
                if not math.isnan(other_value):
                    values.append(other_value)
        keep = math.ceil(len(values) / self.reduction_factor)
        if study.direction == StudyDirection.MAXIMIZE:
            return value < sorted(values, reverse=True)[keep - 1]
        return value > sorted(values)[keep - 1]


def _best_until(trial: FrozenTrial, step: int, direction: StudyDirection) -> float:
    """The trial's best reported value at steps <= ``step`` (NaN if all are NaN)."""
    values = [v for s, v in trial.intermediate_values.items() if s <= step and not math.isnan(v)]
    if not values:
        return math.nan
    return max(values) if direction == StudyDirection.MAXIMIZE else min(values)
