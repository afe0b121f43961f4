"""The main command end to end: a debug run's MLflow record, and `mlflow ui` showing it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow import MlflowClient

from data_config import TYPO_ERROR, error_lines, run_module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("main")
    result = run_module(root, "hwexp", "debug=default", "trainer.verbose=0")
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    return root, uri, result.stdout


def test_debug_run_records_params_metrics_tags_and_artifacts(debug_run):
    root, uri, stdout = debug_run
    assert f"mlflow ui --backend-store-uri {uri}" in stdout
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("hwexp-debug")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_id in stdout
    params = run.data.params
    assert params["model.name"] == "vgg_bn" and params["dataset.source"] == "synthetic"
    assert params["preprocess.size"] == "48" and params["trainer.epochs"] == "2"
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
        "model/model.keras",
        "model/classes.txt",
        "evaluation/per_class.csv",
        "evaluation/confusion_pairs.png",
        "evaluation/misclassified.png",
        "training/curves.png",
    ):
        assert expected in artifacts, expected
    assert str(root / "mlruns" / "artifacts") in run.info.artifact_uri


def test_mlflow_ui_on_the_store_lists_the_run(debug_run):
    root, uri, _ = debug_run
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        body = None
        deadline = time.time() + 90
        while time.time() < deadline and body is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search",
                    data=json.dumps({"max_results": 10}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                body = json.load(urllib.request.urlopen(request, timeout=5))
            except OSError:
                time.sleep(1)
        assert body is not None, "mlflow ui did not answer"
        names = {e["name"] for e in body["experiments"]}
        assert "hwexp-debug" in names
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
        assert b"MLflow" in page
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_bad_option_is_one_error_line_and_exit_1_with_no_run(tmp_path):
    result = run_module(tmp_path, "hwexp", "trainer.epochs=0", "+dataset.limt_classes=5")
    assert error_lines(result) == [TYPO_ERROR, "error: trainer.epochs=0: an integer >= 1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]  # no data, no mlruns


def test_a_training_killed_with_sigkill_is_failed_by_the_next_lookup_and_never_selected(tmp_path):
    from hwexp.contract import ERROR_TAG, HAS_MODEL_TAG
    from hwexp.errors import RunNotFound
    from hwexp.tracking.runs import find_run
    from hwexp.tracking.writer import PROCESS_TAG, Tracker

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hwexp",
            "debug=default",
            "trainer.epochs=1000",
            "trainer.verbose=0",
            "callbacks.early_stopping.enabled=false",
        ],
        env=os.environ | {"HWEXP_ROOT": str(tmp_path)},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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
