import numpy as np
import pytest
from mlflow import MlflowClient

from data_config import data_config
from hwexp.__main__ import run_training
from hwexp.contract import WRITER_OVERLAP_TAG
from hwexp.data.dataset import SplitArrays, load_splits
from hwexp.errors import RunNotFound
from hwexp.evaluate import (
    EVALUATED_RUN_TAG,
    choose_part,
    evaluate_run,
    is_training_data,
    shared_sources,
    writer_overlap,
)
from hwexp.tracking.runs import client_for, find_run, load_trained_model
from hwexp.tracking.writer import Tracker

# The run evaluated below: 5 classes, 12 synthetic writers, seed 1 (evaluate's default is 42).
TRAINED_WITH = ("debug=default", "seed=1", "trainer.verbose=0")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cfg = data_config(root, *TRAINED_WITH, config_name="config")
    metrics = run_training(cfg)
    return root, cfg, metrics


def evaluate_config(root, *overrides):
    return data_config(
        root, "run=best", "select.experiment=hwexp-debug", *overrides, config_name="evaluate"
    )


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_evaluate_best_run_on_other_classes_maps_by_character(trained, capsys):
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
    # writers 5000.. were never the run's: checked, none shared, no warning
    assert result.overlap.writers == 0 and result.overlap.evaluated_writers == 4
    assert run.data.tags[WRITER_OVERLAP_TAG] == "0"
    assert warning_lines(capsys.readouterr().err) == []


@pytest.mark.parametrize("part", ["auto", "test", "val"])
def test_own_split_is_rebuilt_from_the_runs_config_not_the_command_line(trained, part, capsys):
    root, train_cfg, train_metrics = trained
    # The command line's seed, writers and class set all differ from the run's.
    cfg = evaluate_config(
        root, f"part={part}", "seed=7", "synthetic.writers=16", "tracking.enabled=false"
    )
    assert is_training_data(cfg.dataset, {"dataset": dict(train_cfg.dataset)})
    assert choose_part("auto", True) == "test" and choose_part("auto", False) == "all"
    result = evaluate_run(cfg)
    expected = getattr(load_splits(train_cfg, progress=False), "val" if part == "val" else "test")
    assert result.part == ("test" if part == "auto" else part)
    assert result.run_id is None
    assert result.metrics["eval/samples"] == len(expected)
    assert sorted(result.report.writers) == sorted(expected.writers)
    if part != "val":
        assert result.metrics["eval/samples"] == train_metrics["test/samples"]
        np.testing.assert_allclose(result.metrics["eval/accuracy"], train_metrics["test/accuracy"])
    assert result.overlap.writers == 0  # a writer-disjoint split
    err = capsys.readouterr().err
    assert warning_lines(err) == []
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1
    assert "seed=1 (here 7)" in notes[0]
    assert "synthetic.writers=12 (here 16)" in notes[0]
    assert "dataset.limit_classes=5 (here unset)" in notes[0]


@pytest.mark.parametrize("part", ["all", "train"])
def test_evaluating_training_writers_warns_and_tags_the_run(trained, part, capsys):
    root, train_cfg, _ = trained
    cfg = evaluate_config(root, f"part={part}", "+dataset.limit_classes=5", "synthetic.writers=12")
    result = evaluate_run(cfg)
    train = load_splits(train_cfg, progress=False).train
    n_writers = len(np.unique(train.writers))
    evaluated_writers = 12 if part == "all" else n_writers
    assert result.overlap.writers == n_writers
    assert result.overlap.evaluated_writers == evaluated_writers
    assert result.overlap.samples == result.overlap.trained_samples == len(train)
    (line,) = warning_lines(capsys.readouterr().err)
    assert line.startswith(
        f"warning: {n_writers} of the {evaluated_writers} evaluated writers "
        f"({len(train)} of the {int(result.metrics['eval/samples'])} samples) wrote samples of "
        f"run {result.source_run_id}'s training split"
    )
    tags = client_for(cfg.tracking).get_run(result.run_id).data.tags
    assert tags[WRITER_OVERLAP_TAG] == str(n_writers) and tags["part"] == part


def _split(sources, writers, labels) -> SplitArrays:
    return SplitArrays(None, np.array(labels, np.int32), np.array(writers), np.array(sources))


def test_writer_overlap_counts_writers_per_source_and_trained_pairs():
    classes = ("あ", "い")
    training = _split(["etl8g", "etl8g", "folder"], ["etl8g:1", "etl8g:1", "w7"], [0, 1, 0])
    evaluated = _split(
        ["etl8g", "etl8g", "etl9g", "folder", "folder"],
        ["etl8g:1", "etl8g:2", "etl8g:1", "w7", "w8"],
        [0, 0, 0, 1, 0],
    )
    overlap = writer_overlap(evaluated, classes, training, classes)
    # etl8g:1 and folder w7 are training writers; the same id under etl9g is another writer
    assert (overlap.writers, overlap.evaluated_writers) == (2, 5)
    assert (overlap.samples, overlap.evaluated_samples) == (2, 5)
    assert overlap.trained_samples == 1  # etl8g:1's あ; w7 trained on あ, evaluated on い
    # characters are compared, whatever their index in each class set: read with the classes
    # swapped, etl8g:1 was evaluated on い and w7 on あ, both of which they were trained on
    assert writer_overlap(evaluated, ("い", "あ"), training, classes).trained_samples == 2
    assert "split=random" in overlap.message("r1", "random")
    assert "split=" not in overlap.message("r1", "writer")


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


def test_which_data_is_the_runs_and_which_writers_can_be_its(tmp_path):
    run = {"dataset": {"source": ["etl8g", "synthetic"], "classes": "hiragana75"}}
    etl8g = {"source": "etl8g", "classes": "hiragana75"}
    assert is_training_data(etl8g, run)  # one source of a mixture: its part of the split
    assert not is_training_data(etl8g | {"classes": "kanji881"}, run)
    assert not is_training_data({"source": "etl9g", "classes": "hiragana75"}, run)
    assert shared_sources(etl8g | {"classes": "kanji881"}, run["dataset"]) == ["etl8g"]

    folder = {"source": "folder", "classes": "auto", "path": str(tmp_path / "a")}
    elsewhere = folder | {"path": str(tmp_path / "b")}
    assert is_training_data(folder | {"path": f"{tmp_path}/x/../a"}, {"dataset": folder})
    assert not is_training_data(elsewhere, {"dataset": folder})
    # ids of images in another folder (their paths there) name other writers; names given
    # with writer_from_name in both may be the same people
    assert shared_sources(elsewhere, folder) == []
    named = {"writer_from_name": True}
    assert shared_sources(elsewhere | named, folder | named) == ["folder"]
    assert shared_sources(folder, folder) == ["folder"]
