"""hwexp.tracking against a real sqlite MLflow store in tmp_path."""

from __future__ import annotations  # noqa: I001 (_train_helpers must precede keras: env vars)

from _train_helpers import CLASSES, glyph_splits, tiny_config

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from hwexp import contract, errors
from hwexp.liveness import identity_alive, process_identity
from hwexp.contract import default_tracking_uri
from hwexp.tracking import reports, writer
from hwexp.tracking import runs as run_lookup
from hwexp.tracking.reports import pair_text
from hwexp.tracking.writer import HEARTBEAT_TAG, PROCESS_TAG, Tracker, flatten_config
from hwexp.train import train_and_evaluate

# TensorFlow's EagerTensor.__array__ predates numpy 2's copy keyword; Keras triggers it.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    files = set()
    for entry in client.list_artifacts(run_id, path):
        files |= artifact_files(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return files


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> tuple[MlflowClient, str, dict[str, float], Path]:
    """One real training run (2 epochs) tracked into a fresh sqlite store."""
    mlruns = tmp_path_factory.mktemp("tracking") / "mlruns"
    cfg = tiny_config("article", augment="on", mlruns_dir=mlruns)
    cfg.tracking.experiment = "test-experiment"
    splits = glyph_splits(
        sources=("etl8g", "synthetic"), source_weights={"etl8g": 2, "synthetic": 1}
    )
    with Tracker.from_config(cfg.tracking, run_name="tiny") as tracker:
        metrics = train_and_evaluate(splits, cfg, tracker)
    return MlflowClient(default_tracking_uri(mlruns)), tracker.run_id, metrics, mlruns


def test_default_store_is_sqlite_with_artifacts_under_mlruns(tracked_run) -> None:
    client, run_id, _, mlruns = tracked_run
    assert (mlruns / "mlflow.db").is_file()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny"
    assert run.info.artifact_uri.startswith((mlruns / "artifacts").resolve().as_uri())
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "test-experiment"


def test_params_and_tags(tracked_run) -> None:
    client, run_id, _, _ = tracked_run
    data = client.get_run(run_id).data
    assert data.params["trainer.lr"] == "0.003"  # the default one-cycle peak
    assert data.params["model.name"] == "article"
    assert data.params["model.filters"] == "[8, 16]"
    assert data.params["augment.enabled"] == "True"
    assert data.params["trainer.seed"] == "0"  # ${seed} resolved
    assert data.tags["dataset"] == "glyphs"
    assert data.tags["source"] == "etl8g,synthetic"
    assert data.tags["num_classes"] == str(len(CLASSES))
    assert data.tags["model"] == "article"
    assert data.tags["hostname"]
    assert data.tags["dtype_policy"] == "float32"


def test_per_epoch_and_test_metrics(tracked_run) -> None:
    client, run_id, metrics, _ = tracked_run
    per_epoch = ("train/loss", "train/accuracy", "val/loss", "val/accuracy")
    for key in (*per_epoch, "train/learning_rate", "train/samples_per_second"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key
    logged = client.get_run(run_id).data.metrics
    assert not {"loss", "val_accuracy", "learning_rate"} & set(logged)  # one naming scheme
    best = max(m.value for m in client.get_metric_history(run_id, "val/accuracy"))
    assert logged["val/best_accuracy"] == pytest.approx(best)
    for key in ("test/accuracy", "test/top5_accuracy", "test/macro_f1", "val/best_accuracy"):
        assert logged[key] == pytest.approx(metrics[key]), key
    assert "test/source/synthetic/accuracy" in logged


def test_artifacts(tracked_run, tmp_path) -> None:
    client, run_id, metrics, _ = tracked_run
    assert artifact_files(client, run_id) >= {
        "config.yaml",
        "evaluation/per_class.csv",
        "evaluation/per_writer.csv",
        "evaluation/per_source.csv",
        "evaluation/confusion_pairs.csv",
        "evaluation/confusion_pairs.md",
        "evaluation/confusion_pairs.png",
        "evaluation/misclassified.png",
        "training/history.csv",
        "training/curves.png",
    }
    local = Path(client.download_artifacts(run_id, "", str(tmp_path)))
    assert "lr: 0.003" in (local / "config.yaml").read_text("utf-8")
    assert (local / "evaluation/misclassified.png").read_bytes()[:4] == b"\x89PNG"
    per_class = (local / "evaluation/per_class.csv").read_text("utf-8").splitlines()
    assert per_class[0].startswith("char,codepoint,support") and len(per_class) == 1 + len(CLASSES)


def test_model_is_an_mlflow_model_with_keras_inside(tracked_run, tmp_path) -> None:
    client, run_id, metrics, _ = tracked_run
    folder = run_lookup.download_trained_model(client, client.get_run(run_id), tmp_path)
    assert {"MLmodel", "artifacts", "input_example.json", "requirements.txt"} <= {
        p.name for p in folder.iterdir()
    }
    model_file, classes_file = contract.trained_model_files(folder)
    assert model_file == folder / "artifacts" / "model.keras"
    assert contract.read_classes(classes_file) == CLASSES
    # The logged model is the inference model: standard layers only, loads without hwexp.
    model = keras.saving.load_model(model_file)
    assert not any(type(layer).__name__.startswith("Random") for layer in model.layers)
    assert model.output_shape == (None, len(CLASSES))

    (logged,) = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    assert logged.name == "model" and logged.source_run_id == run_id
    assert logged.status.to_int() == LoggedModelStatus.READY.to_int()
    assert (
        logged.tags[contract.MODEL_NAME_TAG]
        == client.get_run(run_id).data.tags[contract.MODEL_NAME_TAG]
    )
    # the run's test metrics are the model's too, without a second point in the run's history
    linked = {m.key: m.value for m in logged.metrics}
    assert linked["test/accuracy"] == pytest.approx(metrics["test/accuracy"])
    assert len(client.get_metric_history(run_id, "test/accuracy")) == 1


def test_runs_logged_before_mlflow_models_still_load(tracked_run, tmp_path) -> None:
    client, run_id, _, mlruns = tracked_run
    source = run_lookup.load_trained_model(client, run_id)
    old = tmp_path / contract.MODEL_DIR  # what hwexp logged before: model.keras, classes.txt
    old.mkdir()
    source.model.save(old / contract.MODEL_FILE)
    contract.write_classes(old / contract.CLASSES_FILE, source.classes)
    with Tracker.start("test-experiment", mlruns_dir=mlruns, run_name="old layout") as tracker:
        tracker.log_text("seed: 0\n", contract.CONFIG_FILE)
        tracker.client.log_artifacts(tracker.run_id, str(old), contract.MODEL_DIR)
        tracker.set_tags({contract.HAS_MODEL_TAG: "true"})
    loaded = run_lookup.load_trained_model(client, tracker.run_id)
    assert loaded.classes == source.classes and loaded.config == {"seed": 0}
    images = np.asarray(glyph_splits().test.images[:8])[..., None]
    np.testing.assert_allclose(
        loaded.model.predict_on_batch(images), source.model.predict_on_batch(images), atol=1e-6
    )


def test_pyfunc_predicts_characters_with_the_runs_test_accuracy(tracked_run, monkeypatch) -> None:
    client, run_id, metrics, _ = tracked_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)  # as a user would
    uri = f"runs:/{run_id}/{contract.MODEL_DIR}"
    info = mlflow.models.get_model_info(uri)
    spec = info.signature.inputs.inputs[0]
    assert spec.type == np.dtype(np.uint8) and spec.shape == (-1, 16, 16)
    assert info.signature.outputs.input_names()[:2] == ["character", "probability"]
    assert info.metadata["classes"] == list(CLASSES) and info.run_id == run_id
    model = mlflow.pyfunc.load_model(uri)
    test = glyph_splits(sources=("etl8g", "synthetic")).test  # the fixture's data (seed 0)
    images = np.asarray(test.images)
    predicted = model.predict(images)
    truth = np.array(CLASSES)[test.labels]
    assert np.mean(predicted["character"].to_numpy() == truth) == pytest.approx(
        metrics["test/accuracy"]
    )
    row = predicted.iloc[0]
    assert row["top_characters"][0] == row["character"] and len(row["top_characters"]) == 4
    assert row["probabilities"][CLASSES.index(row["character"])] == pytest.approx(
        row["probability"]
    )
    top2 = model.predict(images[:3], params={"top_k": 2})
    assert [len(c) for c in top2["top_characters"]] == [2, 2, 2]
    with pytest.raises(Exception, match="uint8"):
        model.predict(images.astype(np.float32))


def test_nested_runs_and_failed_status(tmp_path) -> None:
    mlruns = tmp_path / "mlruns"
    with Tracker.start("nested", mlruns_dir=mlruns, run_name="sweep") as parent:
        with parent.child("trial-0") as child:
            child.log_metrics({"score": 0.5}, step=3)
        with pytest.raises(RuntimeError), parent.child("trial-1") as failing:
            raise RuntimeError("boom")
    client = MlflowClient(default_tracking_uri(mlruns))
    assert client.get_run(child.run_id).data.tags[MLFLOW_PARENT_RUN_ID] == parent.run_id
    assert client.get_run(child.run_id).info.status == "FINISHED"
    assert client.get_run(failing.run_id).info.status == "FAILED"
    assert client.get_run(parent.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(child.run_id, "score")] == [3]
    assert writer.mlflow_key("test/source/folder:my data/accuracy") == (
        "test/source/folder_my data/accuracy"
    )


def test_many_and_long_params_are_batched_and_truncated(tmp_path) -> None:
    config = {"group": {f"key{i:03d}": i for i in range(250)}, "long": "x" * 7000}
    flat = flatten_config(config)
    assert len(flat["long"]) == 6000 and flat["group.key007"] == "7"
    with Tracker.start("params", mlruns_dir=tmp_path / "mlruns") as tracker:
        tracker.log_config(config)
    params = MlflowClient(default_tracking_uri(tmp_path / "mlruns")).get_run(tracker.run_id)
    assert len(params.data.params) == 251
    assert len(params.data.params["long"]) == 6000


def test_class_text_falls_back_to_code_points_without_a_cjk_font(monkeypatch) -> None:
    monkeypatch.setattr(reports, "cjk_font_path", lambda: None)
    assert pair_text("あ", "お") == ("U+3042→U+304A", None)
    monkeypatch.setattr(reports, "cjk_font_path", lambda: "/fonts/NotoSansCJK.ttc")
    text, font = pair_text("あ", "お")
    assert text == "あ→お" and font.get_file() == "/fonts/NotoSansCJK.ttc"


def test_pictures_label_characters_with_the_installed_japanese_font() -> None:
    path = reports.cjk_font_path()
    # hwexp depends on font packages; matplotlib's bundled "LastResortHE" would map every kana
    # to one placeholder glyph.
    assert path is not None and "LastResort" not in Path(path).name
    from matplotlib import ft2font

    charmap = ft2font.FT2Font(path).get_charmap()
    assert charmap[ord("あ")] != charmap[ord("い")] != charmap[ord("漢")]


def test_figures_render_without_errors() -> None:
    history = {
        "train/loss": [1.0, 0.5],
        "val/loss": [1.1, 0.7],
        "train/learning_rate": [1e-3, 5e-4],
    }
    figure = reports.curves_figure(history)
    assert len(figure.axes) == 3 and figure.axes[2].get_yscale() == "log"
    assert len(reports.confusion_figure([("あ", "お", 3), ("い", "り", 1)]).axes[0].patches) == 2
    empty = reports.confusion_figure([])
    assert list(empty.axes[0].patches) == []


def test_confusion_figure_counts_on_integer_ticks_beside_example_images() -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.offsetbox import AnnotationBbox

    def bar(column: int) -> np.ndarray:
        image = np.zeros((48, 48), np.uint8)
        image[8:40, column : column + 6] = 255
        return image

    misread_a, right_o, misread_i = bar(10), bar(20), bar(30)
    figure = reports.confusion_figure(
        [("あ", "お", 3), ("い", "り", 1)], [(misread_a, right_o), (misread_i, None)]
    )
    FigureCanvasAgg(figure).draw()
    axis = figure.axes[0]
    ticks = [t for t in axis.get_xticks() if axis.get_xlim()[0] <= t <= axis.get_xlim()[1]]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)  # counts: no 0.5
    tiles = [a for a in axis.artists if isinstance(a, AnnotationBbox)]
    shown = [(box.xy[1], box.offsetbox.get_data()) for box in tiles]
    assert len(shown) == 3  # い→り has no correctly read り
    expected = [(1, misread_a), (1, right_o), (0, misread_i)]  # the top bar is the first pair
    for (y, data), (row, image) in zip(shown, expected, strict=True):
        assert y == row
        np.testing.assert_array_equal(data, 255 - image)  # dark on white


def test_confusion_examples_pick_the_most_confident_error_and_a_right_sample() -> None:
    import numpy as np

    from hwexp.train import EvaluationReport

    report = EvaluationReport(
        classes=("あ", "お"),
        labels=np.array([0, 0, 0, 1, 1]),
        top_k=np.array([[1, 0], [1, 0], [0, 1], [1, 0], [1, 0]]),
        top_k_probs=np.array([[0.6, 0.4], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.95, 0.05]]),
        true_probs=np.zeros(5, np.float32),
        writers=np.array(["w"] * 5),
        sources=np.array(["s"] * 5),
        images=np.zeros((5, 8, 8), np.uint8),
    )
    assert report.confusion_pairs() == [("あ", "お", 2)]
    assert report.confusion_examples([("あ", "お", 2), ("お", "あ", 0)]) == [(1, 4), (-1, 2)]


def test_misclassified_grid_shows_each_error_with_its_caption() -> None:
    import numpy as np

    from hwexp.train import EvaluationReport

    images = np.zeros((3, 48, 48), np.uint8)
    images[:, 10:38, 20:28] = 255  # a bright bar: drawn dark on white
    report = EvaluationReport(
        classes=("あ", "い", "う"),
        labels=np.array([0, 1, 2]),
        top_k=np.array([[1, 0, 2], [0, 1, 2], [2, 0, 1]]),
        top_k_probs=np.full((3, 3), 0.5, np.float32),
        true_probs=np.full(3, 0.5, np.float32),
        writers=np.array(["w"] * 3),
        sources=np.array(["s"] * 3),
        images=images,
    )
    wrong = report.misclassified()
    assert list(wrong) == [0, 1]
    grid = np.asarray(reports.misclassified_grid(report, wrong, columns=6))
    assert grid.shape[1] == 6 * 72
    tile_1, tile_2, tile_3 = (grid[:72, k * 72 : (k + 1) * 72] for k in range(3))
    assert tile_1.min() == 0 and tile_2.min() == 0  # the bars, dark
    assert tile_3.min() == 255  # no third error: blank
    captions = grid[72:, :144]
    assert (captions < 128).mean() > 0.02  # text under the tiles
    empty = np.asarray(reports.misclassified_grid(report, np.array([], np.int64)))
    assert empty.min() < 64 and empty.max() == 255  # the "no misclassified samples" note


# --------------------------------------------------------------------------- run states


def sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"])


def test_process_identity_tells_live_dead_zombie_and_reused_pids_apart() -> None:
    assert identity_alive(process_identity()) is True
    child = sleeper()
    identity = process_identity(child.pid)
    assert identity_alive(identity) is True
    child.kill()
    deadline = time.monotonic() + 10
    while identity_alive(identity) and time.monotonic() < deadline:  # a zombie until reaped
        time.sleep(0.05)
    assert identity_alive(identity) is False
    assert child.wait(10) == -signal.SIGKILL and not Path(f"/proc/{child.pid}").exists()
    assert identity_alive(identity) is False
    reused = json.loads(process_identity())
    reused["start"] = "another-boot:1"  # this pid, but not the process recorded
    assert identity_alive(json.dumps(reused)) is False
    elsewhere = {**json.loads(process_identity()), "host": "another-host"}
    assert identity_alive(json.dumps(elsewhere)) is None
    assert identity_alive("not json") is None


def test_runs_whose_process_is_gone_are_failed_and_live_ones_kept(tmp_path) -> None:
    mlruns = tmp_path / "mlruns"
    client = MlflowClient(default_tracking_uri(mlruns))
    child = sleeper()
    dead_here = process_identity(child.pid)
    child.kill()
    assert child.wait(10) == -signal.SIGKILL and not Path(f"/proc/{child.pid}").exists()
    remote = json.dumps({"host": "another-host", "pid": 1, "start": "b:1"})
    now = time.time()
    beats = {
        "dead here": {PROCESS_TAG: dead_here, HEARTBEAT_TAG: f"{now:.0f}"},
        "silent elsewhere": {PROCESS_TAG: remote, HEARTBEAT_TAG: f"{now - 1000:.0f}"},
        "beating elsewhere": {PROCESS_TAG: remote, HEARTBEAT_TAG: f"{now - 10:.0f}"},
        "no heartbeat": {},
    }
    runs = {}
    for name, tags in beats.items():
        runs[name] = Tracker.start("states", mlruns_dir=mlruns, run_name=name, tags=tags)
    with Tracker.start("states", mlruns_dir=mlruns, run_name="alive") as alive, alive.heartbeat():
        tags = client.get_run(alive.run_id).data.tags
        assert identity_alive(tags[PROCESS_TAG]) and float(tags[HEARTBEAT_TAG]) >= now - 1
        failed = run_lookup.fail_orphaned_runs(client, [alive.experiment_id])
        assert sorted(failed) == sorted([runs["dead here"].run_id, runs["silent elsewhere"].run_id])
        assert client.get_run(alive.run_id).info.status == "RUNNING"
    status = {name: client.get_run(t.run_id).info.status for name, t in runs.items()}
    assert status == {
        "dead here": "FAILED",
        "silent elsewhere": "FAILED",
        "beating elsewhere": "RUNNING",
        "no heartbeat": "RUNNING",
    }
    error = client.get_run(runs["silent elsewhere"].run_id).data.tags[contract.ERROR_TAG]
    assert re.search(r"sent no heartbeat for 10\d\d s", error), error
    assert client.get_run(alive.run_id).info.status == "FINISHED"


def test_find_run_never_names_a_run_that_is_not_finished(tmp_path) -> None:
    mlruns = tmp_path / "mlruns"
    client = MlflowClient(default_tracking_uri(mlruns))
    running = Tracker.start("select", mlruns_dir=mlruns)
    running.set_tags({contract.HAS_MODEL_TAG: "true"})
    running.log_metrics({"test/accuracy": 0.9})
    with pytest.raises(errors.RunNotFound, match="is RUNNING .it is still training"):
        run_lookup.find_run(client, running.run_id)
    with pytest.raises(errors.RunNotFound, match="no finished run with a model"):
        run_lookup.find_run(client, "best", "select")
    running.end("KILLED")
    with pytest.raises(errors.RunNotFound, match="is KILLED"):
        run_lookup.find_run(client, running.run_id, option="trainer.init_from")
