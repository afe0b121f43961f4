"""Pruning's worth: the same Optuna search on synthetic katakana with and without a pruner.

Runs ``python -m hwexp -m hparams_search=katakana`` in a scratch ``HWEXP_ROOT`` (data
prepared once beforehand, so no sweep pays for it): first with ``hydra/sweeper/pruner=none``,
then with each of ``--pruners`` (default: the config's), each as its own study with the
same sampler seed (so all sample the same parameters for the first ``n_startup_trials``
trials). Reports the wall time of each sweep, the best validation accuracy (the objective) and
the best trial's test accuracy, trial states, and the ratios. Target: pruning at least halves
the wall time while the best accuracy stays within 0.5 points.

    python scripts/bench_sweep.py [--trials 12] [--epochs 8] [--writers 60]
        [--pruners successive_halving,median] [overrides ...]

Overrides apply to every sweep, e.g. ``'model.filters=choice([16,32],[32,64])'`` on a small CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

EXPERIMENT = "hwexp-bench-sweep"


@dataclass
class SweepResult:
    pruner: str
    seconds: float
    cpu_seconds: float
    best_val: float
    best_test: float
    complete: int
    pruned: int
    failed: int
    epochs: int  # epochs trained over all trials


def cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(command: list[str], root: Path, log: Path) -> tuple[float, float]:
    """Run ``command`` with ``HWEXP_ROOT=root``, output to ``log``; returns its wall and CPU
    seconds (CPU time is the fairer measure on a machine shared with other work)."""
    start, cpu_start = time.perf_counter(), cpu_seconds_of_children()
    with log.open("w") as out:
        done = subprocess.run(
            command, env=os.environ | {"HWEXP_ROOT": str(root)}, cwd=root, stdout=out, stderr=out
        )
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}; see {log}")
    return time.perf_counter() - start, cpu_seconds_of_children() - cpu_start


def pruner_overrides(spec: str) -> tuple[str, list[str]]:
    """``NAME[:KEY=VALUE;KEY=VALUE...]`` -> (a study-name-safe label, Hydra overrides), e.g.
    ``successive_halving:min_resource=2;reduction_factor=3``."""
    name, _, settings = spec.partition(":")
    pairs = [item.split("=", 1) for item in settings.split(";") if item]
    overrides = [f"hydra/sweeper/pruner={name}"]
    overrides += [f"hydra.sweeper.pruner.{key}={value}" for key, value in pairs]
    label = "-".join([name, *(f"{key}{value}" for key, value in pairs)])
    return label, overrides


def sweep(root: Path, spec: str, common: list[str]) -> SweepResult:
    import optuna
    from mlflow import MlflowClient

    from hwexp.sweep.study import MLFLOW_RUN_ATTR, TrialCounts

    pruner, overrides = pruner_overrides(spec)
    study_name = f"bench-{pruner}"
    command = [
        sys.executable,
        "-m",
        "hwexp",
        "-m",
        "hparams_search=katakana",
        *overrides,
        f"hydra.sweeper.study_name={study_name}",
        *common,
    ]
    seconds, cpu_seconds = run(command, root, root / f"{study_name}.log")
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{root}/mlruns/optuna.db")
    trials = study.get_trials(deepcopy=False)
    counts = TrialCounts.of(trials)
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    best_run = client.get_run(study.best_trial.user_attrs[MLFLOW_RUN_ATTR])
    return SweepResult(
        pruner=pruner,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        best_val=study.best_value,
        best_test=best_run.data.metrics["test/accuracy"],
        complete=counts.complete,
        pruned=counts.pruned,
        failed=counts.errors + counts.interrupted,
        epochs=sum(len(t.intermediate_values) for t in trials),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8, help="epochs of an unpruned trial")
    parser.add_argument("--writers", type=int, default=60, help="synthetic writers (80%% train)")
    parser.add_argument(
        "--pruners",
        default="successive_halving",
        help="comma-separated: hyperband | median | successive_halving, each optionally with "
        "settings: 'successive_halving:min_resource=2;reduction_factor=3'",
    )
    parser.add_argument("--seed", type=int, default=42, help="the sampler's seed")
    parser.add_argument("--root", type=Path, help="scratch HWEXP_ROOT (default: a temp dir)")
    parser.add_argument(
        "overrides", nargs="*", help="more overrides for both sweeps, e.g. to shrink the space"
    )
    args = parser.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="hwexp-bench-sweep-"))
    root.mkdir(parents=True, exist_ok=True)
    data = ["dataset=synthetic", "dataset.classes=katakana48", f"synthetic.writers={args.writers}"]
    common = [
        *data[1:],
        f"trainer.epochs={args.epochs}",
        f"hydra.sweeper.n_trials={args.trials}",
        f"hydra.sweeper.sampler.seed={args.seed}",
        f"tracking.experiment={EXPERIMENT}",
        *args.overrides,
    ]
    prepare = [sys.executable, "-m", "hwexp.data", "prepare", *data]
    prepare_s, _ = run(prepare, root, root / "prepare.log")
    print(f"root {root}; data prepared in {prepare_s:.0f} s ({args.writers} writers)")

    results = [sweep(root, name, common) for name in ["none", *args.pruners.split(",")]]
    print(
        f"\n{args.trials} trials x up to {args.epochs} epochs, synthetic katakana48, "
        f"{args.writers} writers, {os.cpu_count()} CPUs ({platform.processor() or 'cpu'}), "
        f"load average {os.getloadavg()[0]:.1f}; overrides: {' '.join(args.overrides) or '-'}\n"
    )
    print(
        "| pruner | wall s | wall speed-up | CPU s | CPU speed-up | best val acc | vs none "
        "(points) | its test acc | complete | pruned | failed | epochs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    plain = results[0]
    for r in results:
        print(
            f"| {r.pruner} | {r.seconds:.0f} | {plain.seconds / r.seconds:.2f}x | "
            f"{r.cpu_seconds:.0f} | {plain.cpu_seconds / r.cpu_seconds:.2f}x | "
            f"{r.best_val:.4f} | {100 * (r.best_val - plain.best_val):+.2f} | {r.best_test:.4f} | "
            f"{r.complete} | {r.pruned} | {r.failed} | {r.epochs} |"
        )
    print("\ntargets: speed-up >= 2x, best val accuracy within 0.5 points of no pruning")


if __name__ == "__main__":
    main()
