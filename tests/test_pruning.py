"""TopFractionPruner: rungs, the ceil(n / reduction_factor) rule, best-so-far ranking,
direction, NaN, and its place among the sweeper's pruner options."""

from __future__ import annotations

import math

import optuna
import pytest
from hydra.utils import instantiate
from optuna.trial import TrialState, create_trial

from hwexp.sweep.pruners import TopFractionPruner


def study_with(curves: list[dict[int, float]], pruner, direction="maximize") -> optuna.Study:
    """An in-memory study holding one COMPLETE trial per curve (steps -> values)."""
    study = optuna.create_study(direction=direction, pruner=pruner)
    for curve in curves:
        best = max(curve.values()) if direction == "maximize" else min(curve.values())
        study.add_trial(create_trial(value=best, intermediate_values=curve))
    return study


def pruned_after(study: optuna.Study, curve: dict[int, float]) -> int | None:
    """Report ``curve`` step by step in a new trial; the step it is pruned at, or None."""
    trial = study.ask()
    for step in sorted(curve):
        trial.report(curve[step], step)
        if trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return step
    study.tell(trial, max(curve.values()))
    return None


def test_rungs_are_min_resource_times_powers_of_the_reduction_factor() -> None:
    assert [s for s in range(1, 40) if TopFractionPruner(1, 4).is_rung(s)] == [1, 4, 16]
    assert [s for s in range(1, 40) if TopFractionPruner(2, 3).is_rung(s)] == [2, 6, 18]
    with pytest.raises(ValueError, match="reduction_factor"):
        TopFractionPruner(1, 1)
    with pytest.raises(ValueError, match="min_resource"):
        TopFractionPruner(0, 3)


def test_the_first_trial_is_never_pruned() -> None:
    study = study_with([], TopFractionPruner(1, 2))
    assert pruned_after(study, {1: 0.01, 2: 0.02, 3: 0.03}) is None


def test_keeps_the_top_ceil_fraction_even_in_a_small_study() -> None:
    # 3 trials at step 1 with reduction factor 2: ceil(3 / 2) = 2 are kept, so the second best
    # goes on (Optuna's successive halving keeps floor(3 / 2) = 1: only the leader).
    curves = [{1: 0.9, 2: 0.95}, {1: 0.5, 2: 0.6}]
    assert pruned_after(study_with(curves, TopFractionPruner(1, 2)), {1: 0.6, 2: 0.7}) is None
    assert pruned_after(study_with(curves, TopFractionPruner(1, 2)), {1: 0.4, 2: 0.99}) == 1
    # reduction factor 4: ceil(3 / 4) = 1, only a new leader goes on
    assert pruned_after(study_with(curves, TopFractionPruner(1, 4)), {1: 0.6, 2: 0.7}) == 1


def test_ranks_by_the_best_value_so_far_and_prunes_only_at_rungs() -> None:
    leader = {1: 0.5, 2: 0.8, 3: 0.85, 4: 0.9}
    pruner = TopFractionPruner(1, 2)  # rungs 1, 2, 4; keeps ceil(2 / 2) = 1 of 2
    # 0.95 at step 3 counts at rung 4, where this trial dipped to 0.7
    dipping = {1: 0.6, 2: 0.85, 3: 0.95, 4: 0.7}
    assert pruned_after(study_with([leader], pruner), dipping) is None
    # far behind at step 3, which is no rung: pruned only at rung 4
    assert pruned_after(study_with([leader], pruner), {1: 0.6, 2: 0.85, 3: 0.1, 4: 0.2}) == 4


def test_minimising_keeps_the_lowest_values() -> None:
    curves = [{1: 1.0}, {1: 2.0}, {1: 3.0}]
    pruner = TopFractionPruner(1, 2)  # 4 trials: keep ceil(4 / 2) = 2 lowest
    assert pruned_after(study_with(curves, pruner, "minimize"), {1: 1.5}) is None
    assert pruned_after(study_with(curves, pruner, "minimize"), {1: 2.5}) == 1


def test_a_nan_value_at_a_rung_is_pruned_and_nan_curves_do_not_count() -> None:
    pruner = TopFractionPruner(1, 2)
    assert pruned_after(study_with([{1: 0.5}], pruner), {1: math.nan}) == 1
    # the NaN trial above is not ranked: a later 0.1 competes with 0.5 alone and loses
    study = study_with([{1: 0.5}], pruner)
    pruned_after(study, {1: math.nan})
    assert pruned_after(study, {1: 0.1}) == 1


def test_the_sweeper_offers_it_as_top_fraction() -> None:
    from hydra import compose, initialize_config_dir

    from hwexp import CONF_DIR

    overrides = ["hparams_search=katakana", "hydra/sweeper/pruner=top_fraction"]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides, return_hydra_config=True)
    pruner = instantiate(cfg.hydra.sweeper.pruner)
    assert isinstance(pruner, TopFractionPruner)
    assert (pruner.min_resource, pruner.reduction_factor) == (1, 4)


def test_replay_script_measures_pruners_on_a_finished_study(tmp_path, capsys, monkeypatch) -> None:
    import datetime

    from scripts_loader import load_script

    module = load_script("replay_pruners", monkeypatch)

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="bench-none", storage=storage, direction="maximize")
    start = datetime.datetime(2026, 1, 1)
    # a good trial first, then poor ones: pruning saves their epochs and keeps the best
    for final in (0.9, 0.3, 0.2, 0.25, 0.1):
        curve = {step: final * step / 8 for step in range(1, 9)}
        study.add_trial(
            optuna.trial.FrozenTrial(
                number=0,
                state=TrialState.COMPLETE,
                value=final,
                datetime_start=start,
                datetime_complete=start + datetime.timedelta(seconds=46),  # 6 + 8 x 5 s
                params={},
                distributions={},
                user_attrs={},
                system_attrs={},
                intermediate_values=curve,
                trial_id=0,
            )
        )
    capsys.readouterr()
    argv = ["--storage", storage, "--orders", "5", "--pruners", "none,top_fraction"]
    assert module.main(argv) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert "| 1.00x | -0.00 | 1.00x |" in rows["none"]
    own_speedup = float(rows["top_fraction"].split(" | ")[1].rstrip("x"))
    # own order: 5 x 46 s + 28 s in full; pruned: one full trial, four stopped at epoch 1
    assert own_speedup == pytest.approx((5 * 46 + 28) / (46 + 4 * 11 + 28), abs=0.005)
    assert "| -0.00 |" in rows["top_fraction"]
