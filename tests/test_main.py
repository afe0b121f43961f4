"""The main command end to end: a debug run's MLflow record, and `mlflow ui` showing it."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow import MlflowClient

from data_config import run_module


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
    for key in ("test/accuracy", "test/top5_accuracy", "test/macro_f1", "val/accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
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
