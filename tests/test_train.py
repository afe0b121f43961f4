"""hwexp.pipeline and hwexp.train: batches, compile options, callbacks, evaluation."""

from __future__ import annotations  # noqa: I001 (_train_helpers must precede keras: env vars)

from _train_helpers import CLASSES, glyph_split, glyph_splits, tiny_config

from pathlib import Path

import keras
import numpy as np
import pytest
from sklearn.metrics import f1_score

from hwexp.data.dataset import SplitArrays
from hwexp.pipeline import (
    evaluation_batches,
    permuted_positions,
    sampling_weights,
    training_batches,
)
from hwexp.train import (
    EvaluationReport,
    SparseSmoothedCrossentropy,
    chosen_dtype_policy,
    fit,
    learning_rate,
    make_callbacks,
    make_optimizer,
    cpu_has_bfloat16,
    mixed_precision_supported,
    train_and_evaluate,
)

# TensorFlow's EagerTensor.__array__ predates numpy 2's copy keyword; Keras triggers it.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# --------------------------------------------------------------------------- pipeline


def numbered_split(n: int, size: int = 4, sources: tuple[str, ...] = ("a",)) -> SplitArrays:
    """Image i is filled with i % 256 and labelled i, so a batch shows which rows it holds."""
    return SplitArrays(
        images=np.repeat((np.arange(n) % 256).astype(np.uint8), size * size).reshape(n, size, size),
        labels=np.arange(n, dtype=np.int32),
        writers=np.array([f"w{i % 3}" for i in range(n)]),
        sources=np.array([sources[i % len(sources)] for i in range(n)]),
    )


def epoch_labels(dataset, steps: int) -> list[int]:
    return [int(v) for _, labels in dataset.take(steps).as_numpy_iterator() for v in labels]


def test_training_batches_reshuffle_each_epoch_from_a_seed_and_read_a_memmap(tmp_path) -> None:
    split = numbered_split(100)
    path = tmp_path / "images.u8"
    split.images.tofile(path)
    split.images = np.memmap(path, np.uint8, "r", shape=split.images.shape)
    batches = training_batches(split, batch_size=10, seed=7)
    assert (batches.steps_per_epoch, batches.infinite) == (10, False)

    first, second = epoch_labels(batches.dataset, 10), epoch_labels(batches.dataset, 10)
    assert sorted(first) == list(range(100)) == sorted(second)  # each epoch: every sample once
    assert first != second  # reshuffled
    again = training_batches(split, batch_size=10, seed=7)
    assert epoch_labels(again.dataset, 10) == first  # same seed, same order

    images, labels = next(batches.dataset.as_numpy_iterator())
    assert images.dtype == np.uint8 and images.shape == (10, 4, 4, 1)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels % 256)  # rows match labels


def test_training_drops_the_last_partial_batch_but_evaluation_keeps_order() -> None:
    split = numbered_split(25)
    train = training_batches(split, batch_size=10, seed=0)
    assert train.steps_per_epoch == 2
    assert int(train.dataset.cardinality()) == 2  # known: Keras warns of a dataset "run out"
    assert [len(labels) for _, labels in train.dataset.as_numpy_iterator()] == [10, 10]
    evaluation = evaluation_batches(split, batch_size=10)
    assert evaluation.steps_per_epoch == 3
    assert epoch_labels(evaluation.dataset, 3) == list(range(25))


def test_shuffling_holds_no_buffer_the_size_of_the_split() -> None:
    """An epoch's order is computed index by index: the first batch of a million-sample split
    costs no more memory than a small split's (a shuffle buffer of every index took ~160 MB)."""

    def first_batch_growth(n: int) -> int:
        split = SplitArrays(
            images=np.broadcast_to(np.zeros((1, 4, 4), np.uint8), (n, 4, 4)),  # no memory
            labels=np.zeros(n, np.int32),
            writers=np.full(n, "w"),
            sources=np.full(n, "s"),
        )
        status = Path("/proc/self/status")
        before = int(status.read_text().split("RssAnon:")[1].split()[0]) * 1024
        next(iter(training_batches(split, batch_size=32, seed=0).dataset))
        return int(status.read_text().split("RssAnon:")[1].split()[0]) * 1024 - before

    first_batch_growth(1000)  # TensorFlow's own first-use allocations
    assert first_batch_growth(1_000_000) < 20e6


def test_batches_for_several_replicas_split_into_equal_non_empty_parts() -> None:
    """A mirrored run's global batches: a training split smaller than one batch is cut to a
    multiple of the replicas, and evaluation leaves out the last len % replicas samples."""
    split = numbered_split(45)
    train = training_batches(split, batch_size=64, seed=0, replicas=2)
    assert (train.batch_size, train.steps_per_epoch) == (44, 1)
    assert [len(labels) for _, labels in train.dataset.as_numpy_iterator()] == [44]
    assert training_batches(split, batch_size=64, seed=0).batch_size == 45  # one device: all
    evaluation = evaluation_batches(split, batch_size=16, replicas=2)
    assert evaluation.steps_per_epoch == 3
    assert epoch_labels(evaluation.dataset, 3) == list(range(44))
    assert epoch_labels(evaluation_batches(split, batch_size=16).dataset, 3) == list(range(45))
    with pytest.raises(ValueError, match="fewer than 3 replicas"):
        training_batches(numbered_split(2), batch_size=64, seed=0, replicas=3)


def test_the_cpu_cannot_be_split_once_tensorflow_runs() -> None:
    import tensorflow as tf

    from hwexp.errors import ConfigError
    from hwexp.train import split_cpu

    tf.constant(1.0) + 1.0  # TensorFlow's devices are set up now
    with pytest.raises(ConfigError, match=r"^trainer\.cpu_replicas=3: .*fresh process"):
        split_cpu(3)


def test_permuted_positions_cover_every_position_once_a_pass_in_a_new_order() -> None:
    forever = permuted_positions(10, seed=3, chunk=4, passes=None, drop_remainder=False)
    chunks = [c.tolist() for c in forever.take(9).as_numpy_iterator()]
    assert [len(c) for c in chunks] == [4, 4, 2] * 3
    passes = [sum(chunks[i : i + 3], []) for i in (0, 3, 6)]
    assert all(sorted(order) == list(range(10)) for order in passes)
    assert len({tuple(order) for order in passes}) == 3
    one_pass = permuted_positions(10, seed=3, chunk=4)  # the last partial chunk dropped
    first = [c.tolist() for c in one_pass.as_numpy_iterator()]
    assert [len(c) for c in first] == [4, 4] and len(set(sum(first, []))) == 8
    assert int(one_pass.cardinality()) == 2


def test_weighted_sampling_draws_sources_in_proportion() -> None:
    split = numbered_split(200, sources=("etl8g", "synthetic"))
    assert sampling_weights(split, {"etl8g": 3.0, "synthetic": 1.0, "absent": 5.0}) == {
        "etl8g": 0.75,
        "synthetic": 0.25,
    }
    batches = training_batches(split, 50, seed=1, source_weights={"etl8g": 3.0, "synthetic": 1.0})
    assert batches.infinite and batches.steps_per_epoch == 4
    drawn = np.array(epoch_labels(batches.dataset, 80))  # 4000 draws
    share_etl8g = np.mean(split.sources[drawn] == "etl8g")
    assert 0.72 < share_etl8g < 0.78
    with pytest.raises(ValueError, match="positive weight"):
        sampling_weights(split, {"etl8g": 0.0})


# --------------------------------------------------------------------------- compile parts


def test_smoothed_loss_equals_categorical_crossentropy_with_label_smoothing() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=6).astype(np.float32)
    labels = rng.integers(0, 5, 6)
    reference = keras.losses.CategoricalCrossentropy(label_smoothing=0.2)
    expected = float(reference(np.eye(5, dtype=np.float32)[labels], probs))
    assert float(SparseSmoothedCrossentropy(0.2)(labels, probs)) == pytest.approx(expected, 1e-5)


def test_learning_rate_schedules() -> None:
    base = {"lr": 0.01, "epochs": 10, "warmup_epochs": 0}
    assert learning_rate({**base, "lr_schedule": "constant"}, 100) == 0.01
    cosine = learning_rate({**base, "lr_schedule": "cosine"}, 100)
    assert float(cosine(0)) == pytest.approx(0.01)
    assert float(cosine(500)) == pytest.approx(0.005, rel=1e-3)
    assert float(cosine(1000)) == pytest.approx(0.0, abs=1e-8)
    onecycle = learning_rate({**base, "lr_schedule": "onecycle"}, 100)
    assert float(onecycle(0)) == pytest.approx(0.01 / 25)
    assert float(onecycle(300)) == pytest.approx(0.01)  # peak after 30 % of the steps
    assert float(onecycle(1000)) == pytest.approx(0.01 * 1e-4, rel=1e-2)
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate({**base, "lr_schedule": "step"}, 100)


def test_optimizers_from_config() -> None:
    base = {"lr": 0.01, "epochs": 1, "lr_schedule": "constant", "momentum": 0.9}
    adamw = make_optimizer({**base, "optimizer": "adamw", "weight_decay": 1e-4}, 10)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == 1e-4
    sgd = make_optimizer({**base, "optimizer": "sgd", "weight_decay": 0.0}, 10)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.nesterov and sgd.weight_decay is None
    adam = make_optimizer({**base, "optimizer": "adam", "weight_decay": 0.0}, 10)
    assert float(adam.learning_rate) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer({**base, "optimizer": "lion", "weight_decay": 0.0}, 10)


def test_mixed_precision_only_where_supported() -> None:
    assert chosen_dtype_policy({"mixed_precision": False}) == "float32"
    if mixed_precision_supported():
        expected = "mixed_float16"
    elif cpu_has_bfloat16():
        expected = "mixed_bfloat16"
    else:
        expected = "float32"
    assert chosen_dtype_policy({"mixed_precision": True}) == expected


def test_native_bfloat16_is_read_from_the_cpu_flags() -> None:
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    sapphire = "processor\t: 0\nflags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_tile amx_bf16\n"
    cooper = "processor\t: 0\nflags\t\t: avx512f avx512_bf16\n"
    assert not cpu_has_bfloat16(avx2)
    assert cpu_has_bfloat16(sapphire) and cpu_has_bfloat16(cooper)
    assert not cpu_has_bfloat16("")


# --------------------------------------------------------------------------- fit


def no_callbacks(cfg) -> None:
    for name in ("early_stopping", "reduce_lr", "checkpoint"):
        cfg.callbacks[name].enabled = False


def test_early_stopping_fires_on_a_plateau() -> None:
    cfg = tiny_config("article", **{"trainer.lr": 0.0, "trainer.epochs": 10})
    no_callbacks(cfg)
    cfg.callbacks.early_stopping.update(enabled=True, patience=1, monitor="val_loss")
    result = fit(glyph_splits(n_train=64, n_eval=32), cfg)
    # lr = 0: val_loss never improves after epoch 1, so training stops after epoch 1 + patience.
    assert result.epochs_run == 2
    assert result.stopped_early


def test_reduce_lr_is_used_with_a_constant_schedule_unless_asked_for(caplog) -> None:
    cfg = tiny_config("article").callbacks
    assert cfg.reduce_lr.enabled == "auto"  # the default

    def reduces(schedule: str) -> bool:
        chosen = make_callbacks(cfg, schedule, verbose=0)
        return any(isinstance(c, keras.callbacks.ReduceLROnPlateau) for c in chosen)

    assert reduces("constant") and not reduces("onecycle") and not reduces("cosine")
    assert "reduce_lr ignored" not in caplog.text  # auto: nothing to warn of
    cfg.reduce_lr.enabled = True
    assert not reduces("onecycle")
    assert "callbacks.reduce_lr ignored: it cannot change a onecycle lr schedule" in caplog.text
    cfg.reduce_lr.enabled = False
    assert not reduces("constant")


def test_reduce_lr_fires_on_a_plateau() -> None:
    cfg = tiny_config(
        "article", **{"trainer.lr": 1e-9, "trainer.epochs": 3, "trainer.lr_schedule": "constant"}
    )
    no_callbacks(cfg)
    cfg.callbacks.reduce_lr.update(enabled=True, patience=1, factor=0.5, min_lr=0.0)
    result = fit(glyph_splits(n_train=64, n_eval=32), cfg)
    # epoch 1 sets the best val_loss; epochs 2 and 3 do not improve by min_delta -> halve twice
    np.testing.assert_allclose(result.history["learning_rate"], [1e-9, 5e-10, 2.5e-10], rtol=1e-5)
    assert not result.stopped_early


def test_checkpoint_writes_the_best_model(tmp_path) -> None:
    cfg = tiny_config("article", **{"trainer.epochs": 1})
    no_callbacks(cfg)
    cfg.callbacks.checkpoint.update(enabled=True, path=str(tmp_path / "best.keras"))
    fit(glyph_splits(n_train=64, n_eval=32), cfg)
    assert (tmp_path / "best.keras").stat().st_size > 0


def test_epoch_hook_sees_every_epoch_and_can_stop_training() -> None:
    class Pruned(Exception):
        pass

    seen: list[tuple[int, dict]] = []

    def hook(epoch: int, logs: dict) -> None:
        seen.append((epoch, logs))
        if epoch == 2:
            raise Pruned

    cfg = tiny_config("article", **{"trainer.epochs": 5})
    with pytest.raises(Pruned):
        train_and_evaluate(glyph_splits(n_train=64, n_eval=32), cfg, epoch_hook=hook)
    assert [epoch for epoch, _ in seen] == [1, 2]
    assert {"val_loss", "val_accuracy", "learning_rate", "samples_per_second"} <= set(seen[0][1])


@pytest.mark.parametrize("model", ["article", "vgg_bn", "resnet_small"])
def test_train_and_evaluate_learns_glyphs_and_reports_metrics(model: str) -> None:
    overrides = {"trainer.epochs": 6, "trainer.lr": 3e-3, "trainer.label_smoothing": 0.05}
    cfg = tiny_config(model, augment="off", **overrides)
    cfg.callbacks.early_stopping.enabled = False
    splits = glyph_splits(
        sources=("etl8g", "synthetic"), source_weights={"etl8g": 1, "synthetic": 1}
    )
    metrics = train_and_evaluate(splits, cfg)
    assert metrics["test/accuracy"] >= 0.85, metrics  # chance: 0.25
    assert metrics["test/top5_accuracy"] == 1.0  # 4 classes: top-k is everything
    assert metrics["test/macro_f1"] >= 0.8
    assert metrics["val/best_accuracy"] >= 0.85
    assert metrics["train/epochs"] == 6
    assert metrics["train/steady_samples_per_second"] > 0
    assert {"test/source/etl8g/accuracy", "test/source/synthetic/accuracy"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------- evaluation


def hand_made_report() -> EvaluationReport:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 3])
    predicted = np.array([0, 0, 1, 1, 0, 2, 1, 3])
    confidence = np.array([0.9, 0.8, 0.7, 0.9, 0.95, 0.6, 0.5, 0.99], np.float32)
    others = np.array([[c for c in range(4) if c != p][:2] for p in predicted])
    return EvaluationReport(
        classes=CLASSES,
        labels=labels,
        top_k=np.column_stack([predicted, others]),
        top_k_probs=np.column_stack([confidence, np.full((8, 2), 0.01, np.float32)]),
        true_probs=np.where(labels == predicted, confidence, 0.01).astype(np.float32),
        writers=np.array(["w1", "w1", "w2", "w2", "w2", "w3", "w3", "w3"]),
        sources=np.array(["etl8g"] * 5 + ["synthetic"] * 3),
        images=np.zeros((8, 4, 4), np.uint8),
    )


def test_evaluation_report_metrics_by_hand() -> None:
    report = hand_made_report()
    metrics = report.metrics("test")
    assert metrics["test/accuracy"] == pytest.approx(5 / 8)
    assert metrics["test/macro_f1"] == pytest.approx(
        f1_score(report.labels, report.predicted, average="macro")
    )
    assert metrics["test/class_accuracy_min"] == pytest.approx(0.5)
    assert metrics["test/source/etl8g/accuracy"] == pytest.approx(3 / 5)
    assert metrics["test/source/synthetic/accuracy"] == pytest.approx(2 / 3)
    assert metrics["test/writer_accuracy_min"] == pytest.approx(1 / 3)  # w2: 1 of 3
    assert metrics["test/top5_accuracy"] == pytest.approx(1.0)  # true class always in top 3
    assert [row["writer"] for row in report.per_writer()] == ["w2", "w3", "w1"]

    pairs = report.confusion_pairs()
    assert sorted(pairs) == [("あ", "い", 1), ("い", "あ", 1), ("う", "い", 1)]
    # most confident mistakes first: い→あ (0.95), あ→い (0.7), う→い (0.5)
    assert report.misclassified(2).tolist() == [4, 2]


def test_evaluate_keeps_top_k_in_split_order() -> None:
    from hwexp.train import evaluate

    split = glyph_split(40, 16, np.random.default_rng(0))
    model = keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    report = evaluate(model, split, CLASSES, batch_size=16)
    probs = np.asarray(model.predict(split.images[..., None], verbose=0))
    np.testing.assert_array_equal(report.predicted, probs.argmax(axis=1))
    # batch sizes differ (16 vs predict's 32), so oneDNN kernels may round differently
    np.testing.assert_allclose(
        report.true_probs, probs[np.arange(40), split.labels], rtol=1e-5, atol=1e-7
    )
    assert report.top_k.shape == (40, 4)
    assert (np.diff(report.top_k_probs, axis=1) <= 0).all()  # best first


def test_no_epoch_trained_fails_the_run_before_anything_counts_as_a_result(tmp_path) -> None:
    from mlflow import MlflowClient

    from hwexp.contract import HAS_MODEL_TAG, default_tracking_uri
    from hwexp.errors import ConfigError
    from hwexp.tracking.writer import Tracker

    cfg = tiny_config("article", mlruns_dir=tmp_path / "mlruns", **{"trainer.epochs": 0})
    tracker = Tracker.from_config(cfg.tracking)
    with pytest.raises(ConfigError, match="no epoch was trained"), tracker:
        train_and_evaluate(glyph_splits(), cfg, tracker)
    run = MlflowClient(default_tracking_uri(tmp_path / "mlruns")).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert HAS_MODEL_TAG not in run.data.tags and "test/accuracy" not in run.data.metrics
