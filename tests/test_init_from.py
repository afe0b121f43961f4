"""trainer.init_from: pretrain on synthetic writers 0.., then start a run on other writers and
another class set from its weights (real sqlite MLflow store in tmp_path)."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest

from data_config import data_config
from hwexp.__main__ import run_training
from hwexp.data.dataset import load_splits
from hwexp.errors import ConfigError
from hwexp.model import classifier_layer, strip_augmentation
from hwexp.tracking.runs import client_for, find_run, load_trained_model
from hwexp.tracking.writer import Tracker
from hwexp.train import INIT_FROM_TAG, evaluate, initial_model, load_init_source

# TensorFlow's EagerTensor.__array__ predates numpy 2's copy keyword; Keras triggers it.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PRETRAIN_CHARS, FINETUNE_CHARS = "あいうえお", "かあいうえ"  # お dropped, か new, order changed
SMALL = (  # a small vgg_bn on 32 x 32 images: ~20 s to pretrain on 2 CPU cores
    "debug=default",
    "trainer.verbose=0",
    "preprocess.size=32",
    "model.widths=[16,32,64,128]",
    "model.dense_units=64",
)


def config(root, chars: str, first_writer: int, *overrides: str):
    return data_config(
        root,
        *SMALL,
        f"dataset.classes='chars:{chars}'",
        f"synthetic.first_writer={first_writer}",
        *overrides,
        config_name="config",
    )


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A run trained on synthetic writers 0..99 (experiment hwexp-debug); its root and id."""
    root = tmp_path_factory.mktemp("init_from")
    cfg = config(
        root, PRETRAIN_CHARS, 0, "synthetic.writers=100", "trainer.epochs=10", "trainer.lr=3e-3"
    )
    run_training(cfg)
    return root, find_run(client_for(cfg.tracking), "best", cfg.tracking.experiment)


def finetune_config(root, *overrides: str):
    """Writers 5000..5059, a class set sharing four characters with the pretrained run."""
    return config(root, FINETUNE_CHARS, 5000, "synthetic.writers=60", *overrides)


def test_initial_model_copies_the_source_weights_by_character(pretrained) -> None:
    root, run_id = pretrained
    cfg = finetune_config(root, f"trainer.init_from={run_id}")
    init = load_init_source(cfg)
    assert init.run_id == run_id and init.classes == tuple(PRETRAIN_CHARS)
    splits = load_splits(cfg)
    assert splits.classes == tuple(FINETUNE_CHARS)
    keras.utils.set_random_seed(0)
    fresh = initial_model(splits, cfg)
    keras.utils.set_random_seed(0)
    model = initial_model(splits, cfg, init)

    kernel, bias = classifier_layer(model).get_weights()
    source_kernel, source_bias = classifier_layer(init.model).get_weights()
    fresh_kernel, fresh_bias = classifier_layer(fresh).get_weights()
    for i, char in enumerate(FINETUNE_CHARS):
        if char in PRETRAIN_CHARS:  # shared: the source's column and bias of that character
            j = PRETRAIN_CHARS.index(char)
            np.testing.assert_array_equal(kernel[:, i], source_kernel[:, j])
            assert bias[i] == source_bias[j]
        else:  # new: its fresh initialisation, unlike every source column
            np.testing.assert_array_equal(kernel[:, i], fresh_kernel[:, i])
            assert bias[i] == fresh_bias[i]
            assert not any(np.allclose(kernel[:, i], column) for column in source_kernel.T)
    for layer in init.model.layers:  # every other layer: the source's weights
        if layer.weights and layer.name != "logits":
            for value, expected in zip(
                model.get_layer(layer.name).get_weights(), layer.get_weights(), strict=True
            ):
                np.testing.assert_array_equal(value, expected)

    # Before any training on writers 5000.., the model already reads them (chance: 1/5).
    report = evaluate(strip_augmentation(model), splits.test, splits.classes)
    shared = np.isin(report.labels, [FINETUNE_CHARS.index(c) for c in PRETRAIN_CHARS[:4]])
    assert report.correct[shared].mean() >= 0.8, report.metrics()
    assert report.correct.mean() >= 0.6, report.metrics()
    assert evaluate(strip_augmentation(fresh), splits.test, splits.classes).correct.mean() < 0.5


def test_fine_tuned_run_records_the_resolved_source_run(pretrained) -> None:
    root, run_id = pretrained
    # lr 1e-9 for one epoch (lr must be > 0): the run's model is its initial model to within
    # Adam's step of about lr per weight (batch-norm statistics aside).
    cfg = finetune_config(root, "trainer.init_from=best", "trainer.epochs=1", "trainer.lr=1e-9")
    metrics = run_training(cfg)
    assert metrics["test/accuracy"] >= 0.6  # chance: 0.2
    client = client_for(cfg.tracking)
    (run,) = [
        r
        for r in client.search_runs([client.get_run(run_id).info.experiment_id])
        if r.info.run_id != run_id
    ]
    assert run.info.status == "FINISHED"
    assert run.data.tags[INIT_FROM_TAG] == run_id  # "best", resolved
    assert run.data.params["trainer.init_from"] == "best"
    assert run.data.params["trainer.init_from_run"] == run_id
    assert run.data.params["trainer.init_from_matched_classes"] == "4"
    assert run.data.params["trainer.init_from_new_classes"] == "1"
    assert "mlflow.parentRunId" not in run.data.tags  # reserved for a sweep's trials

    source, tuned = (load_trained_model(client, r) for r in (run_id, run.info.run_id))
    for char in PRETRAIN_CHARS[:4]:
        np.testing.assert_allclose(
            classifier_layer(tuned.model).get_weights()[0][:, tuned.classes.index(char)],
            classifier_layer(source.model).get_weights()[0][:, source.classes.index(char)],
            atol=1e-6,
        )


def test_a_model_of_another_shape_is_a_clear_error(pretrained) -> None:
    root, run_id = pretrained
    cfg = finetune_config(root, f"trainer.init_from={run_id}", "model.widths=[16,32,64,96]")
    init = load_init_source(cfg)
    splits = load_splits(cfg)
    with pytest.raises(ConfigError, match=rf"trainer.init_from: .*run {run_id}.*'b4_1_conv'"):
        initial_model(splits, cfg, init)
    cfg = finetune_config(root, f"trainer.init_from={run_id}")
    bigger = dataclasses.replace(splits, image_size=48)  # the flatten head sees 3 x 3, not 2 x 2
    with pytest.raises(ConfigError, match=r"layer 'dense' has weights of shapes"):
        initial_model(bigger, cfg, init)


def test_bad_init_from_fails_before_a_run_is_started(pretrained) -> None:
    root, _ = pretrained
    unknown = "0123456789abcdef0123456789abcdef"
    cfg = finetune_config(root, f"trainer.init_from={unknown}", "tracking.experiment=bad")
    message = rf"trainer.init_from={unknown}: run .* does not exist.* use trainer.init_from=best"
    with pytest.raises(ConfigError, match=message):
        run_training(cfg)
    client = client_for(cfg.tracking)
    assert client.get_experiment_by_name("bad") is None  # no run was started

    with Tracker.from_config(cfg.tracking, run_name="no model") as empty:
        pass
    cfg.trainer.init_from = empty.run_id
    with pytest.raises(ConfigError, match=f"trainer.init_from={empty.run_id}: .*has no model"):
        run_training(cfg)
    cfg.trainer.init_from = "best"
    with pytest.raises(ConfigError, match="trainer.init_from=best: no finished run with a model"):
        run_training(cfg)
    experiment = client.get_experiment_by_name("bad").experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [empty.run_id]
