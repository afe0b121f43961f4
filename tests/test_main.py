"""The main command end to end: a debug run's MLflow record, its output, `mlflow ui` showing
it (in headless Chromium), and Ctrl+C."""

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from data_config import TYPO_ERROR, error_lines, run_module
from test_serve_e2e import CHROMIUM, CHROMIUM_ARGS, save_artifact


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("main")
    result = run_module(root, "hwexp", "debug=default", "trainer.verbose=0")
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    return root, uri, result


def test_debug_run_records_params_metrics_tags_and_artifacts(debug_run):
    root, uri, result = debug_run
    stdout = result.stdout
    assert f"mlflow ui --backend-store-uri {uri}" in stdout
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("hwexp-debug")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_id in stdout
    assert run.info.run_name == "hiragana75-first5 vgg_bn s42"  # class set, model, seed
    params = run.data.params
    assert params["model.name"] == "vgg_bn" and params["dataset.source"] == "synthetic"
    assert params["preprocess.size"] == "48" and params["trainer.epochs"] == "2"
    assert not [key for key in params if key.startswith(("paths.", "export."))]  # not what ran
    metrics = run.data.metrics
    for key in ("test/accuracy", "test/top5_accuracy", "test/macro_f1", "val/best_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    history = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert [m.step for m in history] == [1, 2]
    tags = run.data.tags
    assert tags["dataset"] == "synthetic" and tags["num_classes"] == "5"
    assert tags["hwexp.has_model"] == "true" and tags["hostname"] == socket.gethostname()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__)
    ).stdout.strip()
    assert tags["git_commit"] == head  # the commit of the hwexp code, whatever the cwd

    def files(path=None):
        out = []
        for item in client.list_artifacts(run.info.run_id, path):
            out += files(item.path) if item.is_dir else [item.path]
        return out

    artifacts = set(files())
    for expected in (
        "config.yaml",
        "evaluation/per_class.csv",
        "evaluation/confusion_pairs.png",
        "evaluation/misclassified.png",
        "training/curves.png",
    ):
        assert expected in artifacts, expected
    assert str(root / "mlruns" / "artifacts") in run.info.artifact_uri
    # the model is the run's MLflow model "model", its files under mlruns/artifacts too
    (output,) = client.get_run(run.info.run_id).outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.name == "model" and logged.source_run_id == run.info.run_id
    assert str(root / "mlruns" / "artifacts") in logged.artifact_location
    listed = {
        a.path
        for folder in (None, "artifacts")
        for a in client.list_logged_model_artifacts(logged.model_id, folder)
    }
    assert {"MLmodel", "artifacts/model.keras", "artifacts/classes.txt"} <= listed
    assert tags["hwexp.model_name"] == "hiragana75-first5-synthetic"


# Start-up and library chatter no command may print (issue 16, item 6).
NOISE = (
    "cuInit",
    "absl",
    "oneDNN custom operations",
    "Could not find cuda drivers",
    "Downloading artifacts",
    "Creating initial MLflow database tables",
    "Traceback",
)


def test_debug_run_prints_no_start_up_noise_and_ends_with_where_its_results_are(debug_run):
    root, uri, result = debug_run
    output = result.stdout + result.stderr
    assert not [noise for noise in NOISE if noise in output], output[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == f"see it with  mlflow ui --backend-store-uri {uri}"
    runs_table = r"then open +http://127\.0\.0\.1:5000/#/experiments/\d+/runs\?.+"
    assert re.fullmatch(runs_table, lines[-1])
    labels = "model|curves|confusion pairs|misclassified"
    located = dict(re.findall(rf"^  ({labels}) +(/\S+)$", result.stdout, re.M))
    assert sorted(located) == ["confusion pairs", "curves", "misclassified", "model"]
    assert located["model"].endswith("/model.keras")
    for path in located.values():
        assert Path(path).is_file() and Path(path).is_relative_to(root / "mlruns"), path


def test_a_mirrored_run_trains_on_two_cpu_replicas_with_the_same_metrics(debug_run, tmp_path):
    """trainer.strategy=mirrored over the CPU split in two: 2 replicas in sync, a global batch
    of 2 x batch_size, and the single-device run's epochs and metrics, all sane."""
    result = run_module(
        tmp_path,
        "hwexp",
        "debug=default",
        "trainer.verbose=0",
        "trainer.strategy=mirrored",
        "trainer.cpu_replicas=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("hwexp-debug").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["hwexp.has_model"] == "true"
    params = run.data.params
    assert params["trainer.strategy"] == "mirrored" and params["trainer.replicas"] == "2"
    assert params["trainer.global_batch_size"] == str(2 * int(params["trainer.batch_size"]))
    _, single_uri, _ = debug_run
    single_client = MlflowClient(single_uri)
    (single,) = single_client.search_runs(
        [single_client.get_experiment_by_name("hwexp-debug").experiment_id]
    )
    assert single.data.params["trainer.replicas"] == "1"
    assert set(run.data.metrics) == set(single.data.metrics)
    metrics = run.data.metrics
    assert metrics["train/epochs"] == single.data.metrics["train/epochs"] == 2
    for key in ("test/accuracy", "test/top5_accuracy", "val/best_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    for key in ("train/loss", "val/loss", "train/accuracy"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
        assert all(math.isfinite(m.value) for m in history), key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install chromium)")
def test_the_printed_mlflow_link_opens_the_runs_table_with_the_run_named(debug_run, tmp_path):
    """The command the run printed, `mlflow ui` on its store (one worker, a free port), and the
    link it printed opened in headless Chromium: the runs table (not MLflow 3's GenAI
    overview) shows the run by its name. Screenshot: ``tmp_path/mlflow-runs.png``."""
    from playwright.sync_api import sync_playwright

    root, uri, result = debug_run
    link = result.stdout.strip().splitlines()[-1].split()[-1]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "mlflow ui ended"
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow ui did not answer"
                time.sleep(1)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(link.replace("http://127.0.0.1:5000", base))
                name = page.get_by_text("hiragana75-first5 vgg_bn s42", exact=True)
                name.first.wait_for(timeout=90_000)
                save_artifact(page, tmp_path, "mlflow-runs.png")
                assert page.get_by_role("heading", name="Runs").is_visible()
                assert "workflowType=machine_learning" in page.url
                assert page.get_by_role("heading", name="Overview").count() == 0  # GenAI's
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert (tmp_path / "mlflow-runs.png").stat().st_size > 10_000


def test_a_bad_option_is_one_error_line_and_exit_1_with_no_run(tmp_path):
    result = run_module(tmp_path, "hwexp", "trainer.epochs=0", "+dataset.limt_classes=5")
    assert error_lines(result) == [TYPO_ERROR, "error: trainer.epochs=0: an integer >= 1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]  # no data, no mlruns


def endless_training(root: Path, output: int) -> subprocess.Popen:
    """A debug training that does not end by itself in ``root``, Ctrl+C acting on it as in a
    terminal; its stdout and stderr go to ``output`` (``subprocess.PIPE``: text)."""
    # Tests started in the background (`pytest &` in a script: SIGINT ignored, as shells do)
    # would pass the ignored SIGINT on, and the training could not be interrupted.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "hwexp", "debug=default", "trainer.epochs=1000000"]
            + ["trainer.verbose=0", "callbacks.early_stopping.enabled=false"],
            env=os.environ | {"HWEXP_ROOT": str(root)},
            cwd=root,
            stdout=output,
            stderr=output,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_training_killed_with_sigkill_is_failed_by_the_next_lookup_and_never_selected(tmp_path):
    from hwexp.contract import ERROR_TAG, HAS_MODEL_TAG
    from hwexp.errors import RunNotFound
    from hwexp.tracking.runs import find_run
    from hwexp.tracking.writer import PROCESS_TAG, Tracker

    process = endless_training(tmp_path, subprocess.DEVNULL)
    try:
        client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
        killed = None
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline:
            assert process.poll() is None, "the training ended by itself"
            time.sleep(1)
            experiment = client.get_experiment_by_name("hwexp-debug")
            if experiment is None:
                continue
            runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
            killed = next((r.info.run_id for r in runs if PROCESS_TAG in r.data.tags), None)
        assert killed is not None, "no training run with a heartbeat appeared"
        # The worst moment to die: model and metrics logged, the run not yet ended.
        client.log_metric(killed, "test/accuracy", 0.99)
        client.set_tag(killed, HAS_MODEL_TAG, "true")
        with Tracker.start("hwexp-debug", mlruns_dir=tmp_path / "mlruns") as finished:
            finished.log_metrics({"test/accuracy": 0.5})
            finished.set_tags({HAS_MODEL_TAG: "true"})
        assert find_run(client, "best", "hwexp-debug") == finished.run_id  # RUNNING: not chosen
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
        assert not os.path.exists(f"/proc/{process.pid}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert client.get_run(killed).info.status == "RUNNING"  # nothing has looked yet
    assert find_run(client, "best", "hwexp-debug") == finished.run_id
    run = client.get_run(killed)
    assert run.info.status == "FAILED" and "is gone" in run.data.tags[ERROR_TAG]
    with pytest.raises(RunNotFound, match=f"run {killed} is FAILED"):
        find_run(client, killed)


def test_ctrl_c_during_training_is_one_line_exit_130_and_a_killed_run(tmp_path):
    """SIGINT (Ctrl+C) once the first epoch is logged: one line on stderr naming the run, no
    traceback, exit status 130, the MLflow run KILLED."""
    process = endless_training(tmp_path, subprocess.PIPE)
    try:
        client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
        run_id, deadline = None, time.monotonic() + 300
        while run_id is None and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.5)
            experiment = client.get_experiment_by_name("hwexp-debug")
            for run in client.search_runs([experiment.experiment_id]) if experiment else []:
                if client.get_metric_history(run.info.run_id, "val/accuracy"):
                    run_id = run.info.run_id  # an epoch is done: training is under way
        assert run_id is not None, "no epoch was logged in time"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.strip().splitlines()[-1] == f"interrupted: MLflow run {run_id} marked KILLED"
    assert sum("interrupt" in line for line in stderr.splitlines()) == 1
    assert client.get_run(run_id).info.status == "KILLED"
