"""Replay a finished study without pruning under other pruners, over many trial orders.

One 12-trial sweep says little about a pruner: whether it kills the trial that would have been
best depends on which trials came first. This replays the per-epoch curves of a study whose
trials all ran in full (``scripts/bench_sweep.py`` leaves one, ``bench-none``) through each
pruner, in the study's own order and in ``--orders`` random orders, with Optuna's own
``report``/``should_prune`` logic, one trial at a time as the basic launcher runs them.

Cost model: a trial of ``k`` epochs costs ``overhead + k * e``, where ``e`` is its measured
seconds per epoch, ``(duration - overhead) / epochs``; ``--fixed`` seconds per sweep are added
to both sides. Reports per pruner: speed-up in the study's order, and over the random orders its
mean and range, how often the best value stays within ``--tolerance`` points of no pruning,
and the mean and worst gap.

    python scripts/replay_pruners.py --storage sqlite:///ROOT/mlruns/optuna.db --study bench-none
        [--pruners 'successive_halving,top_fraction:reduction_factor=4'] [--orders 200]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_sweep, beside this script


@dataclass(frozen=True)
class Curve:
    values: list[float]  # the monitored value after epochs 1, 2, ...
    seconds: float  # the trial's duration


@dataclass(frozen=True)
class Replay:
    seconds: float
    epochs: int
    best: float


def load_curves(storage: str, study_name: str) -> tuple[list[Curve], str]:
    """The COMPLETE trials' curves in trial order, and the study's direction."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    curves = [
        Curve(
            [t.intermediate_values[s] for s in sorted(t.intermediate_values)],
            t.duration.total_seconds(),
        )
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.intermediate_values and t.duration is not None
    ]
    if not curves:
        raise SystemExit(f"study {study_name!r} has no complete trial with a curve")
    return curves, study.direction.name.lower()


def make_pruner(spec: str, max_epochs: int) -> Callable[[], optuna.pruners.BasePruner]:
    """A factory of the pruner that ``bench_sweep.py`` would sweep with for ``spec``
    (``NAME[:KEY=VALUE;...]``), composed from the same config group, ``hydra/sweeper/pruner``,
    with ``trainer.epochs`` = ``max_epochs`` (hyperband's ``max_resource``)."""
    from hydra import compose, initialize_config_dir

    from bench_sweep import pruner_overrides
    from hwexp import CONF_DIR

    _, overrides = pruner_overrides(spec)
    overrides = ["hparams_search=katakana", *overrides, f"trainer.epochs={max_epochs}"]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides, return_hydra_config=True)
    pruner_cfg = cfg.hydra.sweeper.pruner
    return lambda: instantiate(pruner_cfg)


def replay(
    curves: list[Curve], pruner: optuna.pruners.BasePruner, direction: str, overhead: float
) -> Replay:
    """Run ``curves`` in the given order through ``pruner``; see the module doc."""
    study = optuna.create_study(direction=direction, pruner=pruner)
    seconds, epochs = 0.0, 0
    for curve in curves:
        per_epoch = max(curve.seconds - overhead, 0.0) / len(curve.values)
        trial = study.ask()
        for step, value in enumerate(curve.values, start=1):
            trial.report(value, step)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            best = max(curve.values) if direction == "maximize" else min(curve.values)
            study.tell(trial, best)
        seconds += overhead + step * per_epoch
        epochs += step
    return Replay(seconds, epochs, study.best_value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study", default="bench-none")
    parser.add_argument("--pruners", default="successive_halving,top_fraction")
    parser.add_argument("--orders", type=int, default=200, help="random trial orders")
    parser.add_argument("--overhead", type=float, default=6.0, help="seconds per trial")
    parser.add_argument("--fixed", type=float, default=28.0, help="seconds per sweep")
    parser.add_argument("--tolerance", type=float, default=0.5, help="points of the metric")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    curves, direction = load_curves(args.storage, args.study)
    sign = 1.0 if direction == "maximize" else -1.0
    rng = random.Random(args.seed)
    orders = [rng.sample(curves, len(curves)) for _ in range(args.orders)]
    max_epochs = max(len(c.values) for c in curves)
    print(
        f"study {args.study}: {len(curves)} trials, up to {max_epochs} epochs, {direction}; "
        f"{args.orders} random orders; overhead {args.overhead:g} s/trial, "
        f"{args.fixed:g} s/sweep\n"
    )
    print(
        "| pruner | own order: speed-up | own order: best vs none (points) | mean speed-up "
        "| range | best within tolerance | mean gap (points) | worst gap |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.pruners.split(","):
        factory = make_pruner(spec, max_epochs)

        def measured(order: list[Curve], factory=factory) -> tuple[float, float]:
            full = sum(c.seconds for c in order) + args.fixed
            best = max(sign * v for c in order for v in c.values)
            result = replay(order, factory(), direction, args.overhead)
            return full / (result.seconds + args.fixed), 100 * (best - sign * result.best)

        own_speedup, own_gap = measured(curves)
        speedups, gaps = zip(*(measured(order) for order in orders), strict=True)
        kept = sum(gap <= args.tolerance + 1e-9 for gap in gaps) / len(gaps)
        print(
            f"| {spec} | {own_speedup:.2f}x | {-own_gap:+.2f} | "
            f"{statistics.mean(speedups):.2f}x | {min(speedups):.2f}-{max(speedups):.2f}x | "
            f"{kept:.0%} | {statistics.mean(gaps):.2f} | {max(gaps):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
