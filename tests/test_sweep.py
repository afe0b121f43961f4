"""Optuna sweeps end to end: ``python -m hwexp -m hparams_search=debug`` in subprocesses (basic
and joblib launchers, SQLite and a private PostgreSQL server), and pruning at unit level."""

from __future__ import annotations

import glob
import math
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from data_config import TYPO_ERROR, error_lines, run_module
from hwexp.sweep.storage import open_storage, quiet_optuna
from hwexp.sweep.study import ERROR_ATTR, MLFLOW_RUN_ATTR, SURPLUS_ATTR, WORKER_ATTR, TrialCounts
from hwexp.sweep.trial import NonFiniteLossError, PruningHook, SweepTrial
from hydra_plugins.hwexp_optuna_sweeper._impl import OptunaSweep, SweepSettings, outcome_of
from hydra_plugins.hwexp_optuna_sweeper._search_space import parse_search_space

EXPERIMENT = "hwexp-debug-sweep"  # conf/hparams_search/debug.yaml
SWEEP_TIMEOUT_S = 400


# --------------------------------------------------------------------------- helpers


SWEEP_ARGS = ("-m", "hparams_search=debug")


def run_sweep(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_module(root, "hwexp", *SWEEP_ARGS, *overrides, timeout=SWEEP_TIMEOUT_S)


def start_sweep(root: Path, *overrides: str) -> subprocess.Popen:
    """A sweep in its own process group (so that a test can kill it with its jobs)."""
    env = os.environ | {"HWEXP_ROOT": str(root)}
    return subprocess.Popen(
        [sys.executable, "-m", "hwexp", *SWEEP_ARGS, *overrides],
        env=env,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def load_study(storage: str, name: str = "debug") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def sqlite_storage(root: Path) -> str:
    return f"sqlite:///{root / 'mlruns' / 'optuna.db'}"


def mlflow_runs(root: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def parent_and_children(root: Path) -> tuple[object, list, MlflowClient]:
    client, runs = mlflow_runs(root)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1  # nothing outside the study's tree
    return parent, children, client


def states(study: optuna.Study) -> dict[int, TrialState]:
    return {t.number: t.state for t in study.get_trials(deepcopy=False)}


def wait_for_running_trial(storage: str, process: subprocess.Popen, timeout_s: float = 180):
    """The number of the first RUNNING trial of the study whose job has started (it has its
    MLflow run, so all its parameters are suggested), polling the storage. A trial is RUNNING
    from the moment it is asked for, before its parameters are stored."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            running = load_study(storage).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study does not exist yet
            running = []
        started = [t for t in running if MLFLOW_RUN_ATTR in t.user_attrs]
        if started:
            return started[0].number
        time.sleep(0.3)
    raise AssertionError("no trial started in time")


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


# --------------------------------------------------------------------------- basic launcher


def test_sweep_records_every_trial_resumes_and_recovers_an_interrupted_one(tmp_path) -> None:
    storage = sqlite_storage(tmp_path)
    export = ["export.after_sweep=true", 'export.overrides=["formats=[onnx]","register=false"]']
    assert_ok(run_sweep(tmp_path, *export))  # n_trials=4, then the best trial is exported

    study = load_study(storage)
    assert states(study) == dict.fromkeys(range(4), TrialState.COMPLETE)
    parent, children, client = parent_and_children(tmp_path)
    sweep_dir = tmp_path / "multirun" / "optuna" / "debug"
    assert parent.data.tags["hwexp.sweep_id"] == str(sweep_dir)
    assert parent.data.params["space.trainer.lr"] == "tag(log, interval(1e-3, 1e-2))"
    assert parent.data.params["sampler"] == "TPESampler"
    assert parent.data.metrics["best/value"] == pytest.approx(study.best_value)
    assert parent.data.metrics["trials/complete"] == 4
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {"study/optimization_history.png", "study/param_importances.png"} <= artifacts
    run_of = {t.number: t.user_attrs[MLFLOW_RUN_ATTR] for t in study.trials}
    assert sorted(r.info.run_id for r in children) == sorted(run_of.values())
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["hwexp.trial_state"] == "COMPLETE"
        assert "val/best_accuracy" in child.data.metrics
        number = child.data.tags["hwexp.trial_number"]
        assert child.info.run_name == f"hiragana75-first5 article s42 trial {number}"
    best = [r.info.run_id for r in children if r.data.tags.get("hwexp.best_trial") == "true"]
    assert best == [run_of[study.best_trial.number]]
    exported = tmp_path / "outputs" / "exports" / best[0]
    files = {p.name for p in exported.iterdir()}
    name = client.get_run(best[0]).data.tags["hwexp.model_name"]  # what the model reads
    assert name == "hiragana75-first5-synthetic"
    assert {"classes.txt", "export.json", "MODEL_CARD.md", "MLmodel", f"{name}.onnx"} <= files
    assert "export/onnx/agreement" in client.get_run(best[0]).data.metrics
    assert sorted(p.name for p in sweep_dir.glob("trial_*")) == [f"trial_{i}" for i in range(4)]

    # A worker killed mid-trial leaves a RUNNING trial without heartbeats behind.
    worker = start_sweep(tmp_path, "hydra.sweeper.n_trials=6")
    killed = wait_for_running_trial(storage, worker)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)
    assert states(load_study(storage))[killed] == TrialState.RUNNING
    time.sleep(4)  # debug.yaml: grace_period 4 s

    assert_ok(run_sweep(tmp_path, "hydra.sweeper.n_trials=6"))  # the same command again
    study = load_study(storage)
    trials = study.get_trials(deepcopy=False)
    assert TrialCounts.of(trials) == TrialCounts(complete=6, interrupted=1)
    assert len(trials) == 7  # only what was missing was added
    assert trials[killed].state == TrialState.FAIL and ERROR_ATTR not in trials[killed].user_attrs
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[killed].params
    parent_again, children, _ = parent_and_children(tmp_path)  # still one parent run
    assert parent_again.info.run_id == parent.info.run_id
    assert parent_again.info.status == "FINISHED"
    assert sum(r.data.tags.get("hwexp.trial_state") == "COMPLETE" for r in children) == 6
    assert all(r.info.status != "RUNNING" for r in children)


# --------------------------------------------------------------------------- joblib launcher


def test_parallel_trials_with_joblib_record_a_failing_trial_and_go_on(tmp_path) -> None:
    # TPE seed 10 samples trainer.optimizer adam, bogus, adam, adam: trial 1 fails.
    overrides = [
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.seed=10",
        "hydra.sweeper.max_failure_rate=0.5",
        "trainer.optimizer=choice(adam,bogus)",
    ]
    assert_ok(run_sweep(tmp_path, *overrides))
    storage = sqlite_storage(tmp_path)
    trials = load_study(storage).get_trials(deepcopy=False)
    assert TrialCounts.of(trials) == TrialCounts(complete=3, errors=1)
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.params["trainer.optimizer"] == "bogus"
    refused = "InvalidOptions: trainer.optimizer=bogus: one of adam | adamw | sgd"
    assert failed.user_attrs[ERROR_ATTR] == refused  # checked before any work: no MLflow run
    assert MLFLOW_RUN_ATTR not in failed.user_attrs
    for trial in trials:
        if trial.state == TrialState.COMPLETE:  # reported from the joblib worker processes
            assert sorted(trial.intermediate_values) == [1, 2]
            assert trial.value == pytest.approx(max(trial.intermediate_values.values()))
    _, children, _ = parent_and_children(tmp_path)
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)

    # One more trial, now with no failure allowed: the sweep stops at once, with the last error.
    no_failures = ["hydra.sweeper.n_trials=4", "hydra.sweeper.max_failure_rate=0"]
    aborted = run_sweep(tmp_path, *overrides, *no_failures)
    assert aborted.returncode != 0
    assert refused in aborted.stderr
    assert len(load_study(storage).trials) == len(trials)


def test_a_bad_shared_option_ends_the_sweep_before_its_study_exists(tmp_path) -> None:
    result = run_sweep(tmp_path, "trainer.batch_size=0", "+dataset.limt_classes=5")
    assert error_lines(result) == [TYPO_ERROR, "error: trainer.batch_size=0: an integer >= 1"]
    assert not (tmp_path / "mlruns" / "optuna.db").exists()  # no study
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # no parent run


# --------------------------------------------------------------------------- PostgreSQL


def _postgres_program(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return versions[-1] if versions else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A private PostgreSQL server on 127.0.0.1 (trust auth, user hwexp), for this module only.

    As root it runs as the ``postgres`` user (the server refuses root). Skips, saying why, only
    where no server can be started."""
    initdb, pg_ctl = _postgres_program("initdb"), _postgres_program("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server programs not found (apt-get install postgresql)")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="hwexp-pg-"))
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    commands = [
        [initdb, "-D", str(data), "-A", "trust", "-U", "hwexp", "-N"],
        [pg_ctl, "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o", options, "start"],
    ]
    for command in commands:
        done = subprocess.run(as_user + command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = folder / "server.log"
            details = log.read_text() if log.exists() else done.stderr
            shutil.rmtree(folder, ignore_errors=True)
            pytest.skip(f"PostgreSQL could not be started: {details[-500:]}")
    try:
        yield f"postgresql://hwexp@127.0.0.1:{port}/postgres"
    finally:
        stop = [pg_ctl, "-D", str(data), "-m", "immediate", "stop"]
        subprocess.run(as_user + stop, capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(tmp_path, postgres_url) -> None:
    overrides = [f"hydra.sweeper.storage={postgres_url}", "hydra.sweeper.n_trials=4"]
    workers = [
        start_sweep(tmp_path, *overrides, f"hydra.sweeper.sampler.seed={seed}") for seed in (1, 2)
    ]
    outputs = [worker.communicate(timeout=SWEEP_TIMEOUT_S)[0] for worker in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-5000:]

    trials = load_study(postgres_url).get_trials(deepcopy=False)
    counts = TrialCounts.of(trials)
    assert counts.done == 4 and counts.complete == 4
    assert counts.errors == counts.interrupted == counts.running == 0
    assert counts.surplus == len(trials) - 4  # a lost race is told FAIL and never run
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))  # unique, no gaps
    ran = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len({t.user_attrs[WORKER_ATTR] for t in ran}) == 2  # both workers did trials
    _, children, _ = parent_and_children(tmp_path)  # one parent run for both workers
    assert sorted(r.info.run_id for r in children) == sorted(
        t.user_attrs[MLFLOW_RUN_ATTR] for t in ran
    )


# --------------------------------------------------------------------------- unit level


@pytest.fixture()
def study_with_history(tmp_path) -> tuple[str, optuna.Study]:
    """An SQLite study with two finished trials whose curves reach 0.6, 0.8, 0.9."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="prune", storage=storage, direction="maximize")
    for lr in (0.001, 0.002):
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": lr},
                distributions={"lr": FloatDistribution(1e-4, 1e-2)},
                value=0.9,
                intermediate_values={1: 0.6, 2: 0.8, 3: 0.9},
            )
        )
    return storage, study


def reopened(storage: str, study: optuna.Study, pruner: str, **kwargs) -> PruningHook:
    """A hook on a new RUNNING trial, re-opened from storage as a job does."""
    trial = study.ask({"lr": FloatDistribution(1e-4, 1e-2)})
    ref = SweepTrial(
        storage=storage,
        study_name="prune",
        number=trial.number,
        pruner={"_target_": f"optuna.pruners.{pruner}", **kwargs},
    )
    return PruningHook(ref.open()[1])


def test_pruning_stops_a_poor_curve_and_the_trial_is_recorded_pruned(study_with_history) -> None:
    storage, study = study_with_history
    hook = reopened(storage, study, "MedianPruner", n_startup_trials=2)
    hook(1, {"loss": 1.2, "val_accuracy": 0.7})  # above the median (0.6): goes on
    with pytest.raises(optuna.TrialPruned) as pruned:
        hook(2, {"loss": 1.1, "val_accuracy": 0.3})  # far below 0.8
    assert hook.history["val_accuracy"] == [0.7, 0.3]
    outcome = outcome_of(pruned.value)
    frozen = study.tell(hook.trial.number, outcome.value, state=outcome.state)
    assert frozen.state == TrialState.PRUNED
    assert frozen.intermediate_values == {1: 0.7, 2: 0.3}
    assert frozen.value == pytest.approx(0.3)  # the last reported value

    patient = reopened(storage, study, "NopPruner")
    patient(1, {"loss": 1.2, "val_accuracy": 0.1})
    patient(2, {"loss": 1.1, "val_accuracy": 0.1})  # no pruner: never pruned

    diverged = reopened(storage, study, "NopPruner")
    with pytest.raises(NonFiniteLossError):
        diverged(1, {"loss": math.nan, "val_accuracy": 0.1})


def race_settings(storage: str, **changes) -> SweepSettings:
    settings = {
        "sampler": {"_target_": "optuna.samplers.RandomSampler"},
        "pruner": {"_target_": "optuna.pruners.NopPruner"},
        "direction": "minimize",
        "storage": storage,
        "study_name": "race",
        "n_trials": 2,
        "n_jobs": 1,
        "max_failure_rate": 0.0,
        "monitor": "val_accuracy",
        "heartbeat_interval": 30,
        "grace_period": 60,
        "retry_interrupted": False,
        "poll_interval": 0.1,
        "params": None,
    }
    return SweepSettings(**(settings | changes))


def test_a_worker_that_loses_the_race_for_the_last_trial_does_not_run_it(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    settings = race_settings(storage)
    study = optuna.create_study(study_name="race", storage=open_storage(storage))
    first, second, third = study.ask(), study.ask(), study.ask()  # three workers asked at once
    sweep = OptunaSweep(settings)
    assert not sweep._is_surplus(study, first)
    assert not sweep._is_surplus(study, second)
    assert sweep._is_surplus(study, third)
    frozen = study.trials[third.number]
    assert frozen.state == TrialState.FAIL and frozen.user_attrs[SURPLUS_ATTR] is True
    study.tell(first, state=TrialState.FAIL)  # one of the two fails: a later ask may run again
    fourth = study.ask()
    assert not sweep._is_surplus(study, fourth)


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    settings = race_settings(storage, n_trials=1, heartbeat_interval=1, grace_period=1)
    sweep = OptunaSweep(settings)
    sweep._storage = open_storage(storage, 1, 1, retry_interrupted=True)
    sweep._space = parse_search_space({"lr": "interval(0.001, 0.01)"})
    study = optuna.create_study(study_name="race", storage=sweep._storage)
    with quiet_optuna():  # its worker died before any heartbeat: Optuna never calls it stale
        orphan = study.ask()
    give_up = threading.Timer(30, sweep._stop.set)  # _next_trial returns None then
    give_up.start()
    try:
        trial = sweep._next_trial(study)
    finally:
        give_up.cancel()
    assert study.trials[orphan.number].state == TrialState.FAIL
    assert trial is not None  # the orphan's parameters, once more
    assert study.trials[trial.number].system_attrs["failed_trial"] == orphan.number


def test_only_a_lost_race_to_create_the_tables_is_retried() -> None:
    import sqlite3

    import psycopg.errors
    import sqlalchemy.exc

    from hwexp.sweep.storage import _lost_table_race

    def wrapped(kind, orig):
        return kind("CREATE TABLE studies ...", {}, orig)

    # PostgreSQL: 'relation "studies" already exists' when two workers create tables at once
    assert _lost_table_race(
        wrapped(sqlalchemy.exc.ProgrammingError, psycopg.errors.DuplicateTable())
    )
    assert _lost_table_race(
        wrapped(sqlalchemy.exc.IntegrityError, psycopg.errors.UniqueViolation())
    )
    assert not _lost_table_race(
        wrapped(sqlalchemy.exc.ProgrammingError, psycopg.errors.InsufficientPrivilege())
    )
    assert _lost_table_race(wrapped(sqlalchemy.exc.IntegrityError, sqlite3.IntegrityError()))
