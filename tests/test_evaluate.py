import numpy as np
import pytest
from mlflow import MlflowClient

from data_config import data_config
from hwexp.__main__ import run_training
from hwexp.errors import RunNotFound
from hwexp.evaluate import EVALUATED_RUN_TAG, choose_part, evaluate_run
from hwexp.tracking.runs import client_for, find_run, load_trained_model
from hwexp.tracking.writer import Tracker


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cfg = data_config(root, "debug=default", "trainer.verbose=0", config_name="config")
    metrics = run_training(cfg)
    return root, cfg, metrics


def test_evaluate_best_run_on_other_classes_maps_by_character(trained):
    root, train_cfg, train_metrics = trained
    cfg = data_config(
        root,
        "run=best",
        "select.experiment=hwexp-debug",
        "dataset.classes='chars:かあいう'",
        "synthetic.writers=4",
        "synthetic.first_writer=5000",
        config_name="evaluate",
    )
    result = evaluate_run(cfg)
    assert result.part == "all"  # another class set: every sample
    assert result.unknown_characters == {"か": 4}
    assert result.metrics["eval/samples"] == 12  # あいう x 4 writers
    assert 0.0 <= result.metrics["eval/accuracy"] <= 1.0
    client = client_for(cfg.tracking)
    run = client.get_run(result.run_id)
    assert run.data.tags[EVALUATED_RUN_TAG] == result.source_run_id
    assert run.data.metrics["eval/unknown_samples"] == 4
    names = {a.path for a in client.list_artifacts(result.run_id, "evaluation")}
    assert "evaluation/per_class.csv" in names


def test_evaluate_on_training_dataset_uses_test_split_and_matches(trained):
    root, train_cfg, train_metrics = trained
    cfg = data_config(
        root,
        "run=best",
        "select.experiment=hwexp-debug",
        "+dataset.limit_classes=5",
        "synthetic.writers=12",
        "tracking.enabled=false",
        config_name="evaluate",
    )
    assert choose_part("auto", cfg, {"dataset": dict(cfg.dataset)}) == "test"
    result = evaluate_run(cfg)
    assert result.part == "test"
    assert result.run_id is None
    np.testing.assert_allclose(result.metrics["eval/accuracy"], train_metrics["test/accuracy"])


def test_unknown_run_and_run_without_model_are_clear_errors(trained):
    root, train_cfg, _ = trained
    client = client_for(train_cfg.tracking)
    with pytest.raises(RunNotFound, match="does not exist"):
        find_run(client, "0123456789abcdef0123456789abcdef")
    with Tracker.from_config(train_cfg.tracking, run_name="no model") as empty:
        pass
    with pytest.raises(RunNotFound, match="has no model"):
        load_trained_model(client, empty.run_id)
    assert isinstance(client, MlflowClient)
