"""``hwexp.Recognizer`` and ``hwexp predict`` on the model ``test_serve_api`` trains and exports
once per session: the same answers as the Keras model, no TensorFlow in the process, every kind
of input, and clear errors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image, ImageOps

from data_config import data_config, error_lines, run_module
from hwexp import Prediction, Recognizer, Strokes
from hwexp.errors import InputError, ModelLoadError
from test_serve_api import CANVAS, ExportedModel, drawn_picture, exported_model, glyph_strokes

CHARS = "あいうえお"  # the debug model's classes
HEAVY = "sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    return exported_model(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(exported: ExportedModel) -> Any:
    """The exported run's Keras model (``TrainedModel``)."""
    from hwexp.tracking.runs import client_for, load_trained_model

    client = client_for({"uri": exported.tracking_uri})
    return load_trained_model(client, exported.run_id)


@pytest.fixture(scope="module")
def test_images(exported: ExportedModel, trained: Any) -> np.ndarray:
    """The run's test split, ``(n, 48, 48)`` uint8 model inputs."""
    from hwexp.data.dataset import load_splits, run_data_config

    cfg = data_config(exported.root, config_name="export")
    return np.asarray(load_splits(run_data_config(cfg, trained.config), progress=False).test.images)


@pytest.fixture(scope="module")
def recognizer(exported: ExportedModel) -> Recognizer:
    return Recognizer.from_files(exported.onnx.parent)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One PNG per class: the KanjiVG strokes drawn dark on light paper, 300 px."""
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for char in CHARS:
        path = folder / f"{char}.png"
        drawn_picture(char, 300, ink=0, paper=255).save(path)
        paths.append(path)
    return paths


def keras_top(trained: Any, images: np.ndarray) -> list[str]:
    from hwexp.export.run import inference_model

    probabilities = inference_model(trained.model).predict(images[..., None], verbose=0)
    return [trained.classes[i] for i in probabilities.argmax(axis=1)]


def test_recognizer_answers_as_the_keras_model_without_importing_tensorflow(
    exported, trained, test_images, pictures, tmp_path
):
    name, version = exported.registered.split("/")
    np.save(tmp_path / "test.npy", test_images)
    code = f"""
import json, sys
import numpy as np
from hwexp import Recognizer
models = [
    Recognizer.from_files({str(exported.onnx.parent)!r}),
    Recognizer.from_registry({name!r}, tracking_uri={exported.tracking_uri!r}),
    Recognizer.from_run({exported.run_id!r}, tracking_uri={exported.tracking_uri!r}),
]
prepared = np.load({str(tmp_path / "test.npy")!r})
files = {[str(p) for p in pictures]!r}
out = {{"models": [], "heavy": None}}
for model in models:
    tops = [p.top for p in model.predict(prepared, preprocessed=True)]
    read = model.predict(files)
    out["models"].append({{
        "info": model.describe(),
        "prepared_top": tops,
        "file_top": [p.top for p in read],
        "file_inputs": [p.model_input.tolist() for p in read],
    }})
out["heavy"] = {HEAVY}
print(json.dumps(out))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["heavy"] == []  # ONNX Runtime only: not even the exported run needs Keras
    expected = keras_top(trained, test_images)
    assert len(expected) >= 20
    for model in out["models"]:
        # The export check passed at >= 99.9 % top-1 agreement on these < 1000 images: all.
        assert model["prepared_top"] == expected
        assert model["file_top"] == list(CHARS)
        inputs = np.array(model["file_inputs"], np.uint8)
        assert keras_top(trained, inputs) == model["file_top"]  # what the model was given
        assert model["info"]["run_id"] == exported.run_id
    origins = [m["info"]["source"] for m in out["models"]]
    assert origins[1:] == [f"models:/{name}/{version}", f"runs:/{exported.run_id}/export"]
    assert out["models"][1]["info"]["version"] == version


def test_every_kind_of_input_gives_the_same_reading(recognizer, pictures):
    path = pictures[0]
    grey = np.asarray(Image.open(path))
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    strokes = glyph_strokes("あ", CANVAS)
    same_picture = [
        str(path),
        path,
        path.read_bytes(),
        Image.open(path),
        grey,
        255 - grey,  # light ink on dark
        grey.astype(np.float32) / 255.0,
        grey[..., None],
        rgba,
    ]
    predictions = recognizer.predict(same_picture)
    assert [p.top for p in predictions] == ["あ"] * len(same_picture)
    for prediction in predictions[1:]:
        np.testing.assert_array_equal(prediction.model_input, predictions[0].model_input)
    drawings = [
        Strokes(strokes, CANVAS, CANVAS),
        {"strokes": strokes, "width": CANVAS, "height": CANVAS},
    ]
    drawn = recognizer.predict(drawings)
    assert [p.top for p in drawn] == ["あ", "あ"]
    np.testing.assert_array_equal(drawn[0].model_input, drawn[1].model_input)


def test_a_prediction_lists_k_characters_most_probable_first(recognizer, pictures):
    one = recognizer.predict(pictures[1], k=3)
    assert isinstance(one, Prediction) and one.top == "い"
    assert len(one.characters) == len(one.probabilities) == 3
    assert list(one.probabilities) == sorted(one.probabilities, reverse=True)
    assert one.candidates == list(zip(one.characters, one.probabilities, strict=True))
    assert one.model_input.shape == (48, 48) and one.model_input.dtype == np.uint8
    everything = recognizer.predict(pictures[1], k=50)
    assert sorted(everything.characters) == sorted(CHARS)  # no more than the model knows
    assert sum(everything.probabilities) == pytest.approx(1.0, abs=1e-4)
    assert everything.as_json()["candidates"][0] == {
        "char": "い",
        "probability": round(everything.probabilities[0], 6),
    }
    with pytest.raises(ValueError, match="k=0"):
        recognizer.predict(pictures[1], k=0)


def test_a_batch_is_read_as_its_inputs_one_by_one(recognizer, pictures):
    """Lone images: in a batch of more than ``reference_min_images`` pictures, each picture's
    size is still judged against its own side, not against the batch's median."""
    batch = [pictures[i % len(pictures)] for i in range(15)]
    small = ImageOps.expand(Image.open(pictures[0]).resize((100, 100)), 100, fill=255)
    small_path = pictures[0].parent / "small.png"
    small.save(small_path)
    batch.append(small_path)
    together = recognizer.predict(batch)
    assert recognizer.options.reference_min_images < len(batch)
    for path, prediction in zip(batch, together, strict=True):
        alone = recognizer.predict(path)
        np.testing.assert_array_equal(prediction.model_input, alone.model_input)
        assert prediction.probabilities == pytest.approx(alone.probabilities, abs=1e-6)


def test_unreadable_inputs_are_named(recognizer, pictures, tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image")
    Image.new("L", (64, 64), 255).save(tmp_path / "blank.png")
    cases = [
        (tmp_path / "missing.png", f"{tmp_path / 'missing.png'}: no such file"),
        (tmp_path / "junk.png", f"{tmp_path / 'junk.png'} is not a PNG, JPEG"),
        (tmp_path / "blank.png", f"{tmp_path / 'blank.png'}: empty drawing"),
        (tmp_path, "is a folder, not an image file"),
        (np.zeros((2, 3, 4, 5, 6), np.uint8), "an image array must be"),
        (Image.new("L", (64, 64), 200), "empty drawing: the image has no ink"),
        (np.eye(5, dtype=np.uint8) * 255, "the image is 5x5 pixels: too small"),
        (np.full((20, 20), np.nan), "NaN or infinite"),
        (3.5, "cannot read a float"),
    ]
    for item, message in cases:
        with pytest.raises(InputError) as raised:
            recognizer.predict(item)
        assert message in str(raised.value), (item, str(raised.value))
    with pytest.raises(InputError, match="^input 1: empty drawing") as raised:
        recognizer.predict([pictures[0], np.full((40, 40), 7, np.uint8)])
    assert raised.value.status == 422
    with pytest.raises(InputError, match="input 0: a preprocessed input is a \\(48, 48\\) uint8"):
        recognizer.predict([np.zeros((28, 28), np.uint8)], preprocessed=True)


def test_registry_versions_and_unknown_names(exported):
    name, version = exported.registered.split("/")
    uri = exported.tracking_uri
    latest = Recognizer.from_registry(name, tracking_uri=uri)
    assert latest.info.version == version and latest.name == name
    for ref, pinned in ((name, int(version)), (name, "latest"), (f"{name}/{version}", None)):
        assert Recognizer.from_registry(ref, pinned, tracking_uri=uri).info.version == version
    with pytest.raises(ModelLoadError, match=f"no registered model 'kanji'.*; registered: {name}$"):
        Recognizer.from_registry("kanji", tracking_uri=uri)
    with pytest.raises(ModelLoadError, match=f"has no version 99; its versions: {version}$"):
        Recognizer.from_registry(name, 99, tracking_uri=uri)
    with pytest.raises(ModelLoadError, match="has no alias 'prod'; its aliases: none"):
        Recognizer.from_registry(f"{name}@prod", tracking_uri=uri)


def test_a_run_without_onnx_export_is_exported_once_and_logged(
    exported, trained, test_images, monkeypatch, caplog
):
    from hwexp.tracking.writer import Tracker

    tracking = {
        "uri": exported.tracking_uri,
        "mlruns_dir": str(exported.root / "mlruns"),
        "experiment": "hwexp-copies",  # not where run=best looks in the other tests
    }
    with Tracker.from_config(tracking, run_name="no-export") as tracker:
        tracker.log_config(OmegaConf.create(trained.config))
        tracker.log_model(trained.model, trained.classes)
    run_id = tracker.run_id
    uri = exported.tracking_uri
    with pytest.raises(ModelLoadError, match=f"export it with `hwexp export run={run_id} formats"):
        Recognizer.from_run(run_id, tracking_uri=uri, export=False)

    monkeypatch.setenv("HWEXP_ROOT", str(exported.root))  # the run's data cache and outputs
    caplog.set_level(logging.WARNING, logger="hwexp.recognition.loading")
    first = Recognizer.from_run(run_id, tracking_uri=uri)
    assert "has no ONNX export: exporting it now" in caplog.text
    assert first.info.run_id == run_id and first.info.origin == f"runs:/{run_id}/export"
    tops = [p.top for p in first.predict(test_images, preprocessed=True)]
    assert tops == keras_top(trained, test_images)
    caplog.clear()
    again = Recognizer.from_run(run_id, tracking_uri=uri)  # now logged to the run
    assert "exporting" not in caplog.text and again.classes == first.classes
    assert not (exported.root / "outputs" / "exports" / run_id).exists()  # nothing replaced


# --------------------------------------------------------------------------- hwexp predict


def predict_command(exported: ExportedModel, *args: str) -> subprocess.CompletedProcess:
    """``hwexp predict ARGS`` run in the exported model's project (``HWEXP_ROOT``)."""
    return run_module(exported.root, "hwexp.cli", "predict", *args, timeout=300)


def test_predict_prints_the_top_5_of_each_file(exported, pictures):
    done = predict_command(
        exported, *map(str, pictures), "run=best", "select.experiment=hwexp-debug"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(pictures)
    for line, path, char in zip(lines, pictures, CHARS, strict=True):
        name, *guesses = line.split()
        assert name == str(path)
        characters, probabilities = guesses[::2], [float(p) for p in guesses[1::2]]
        assert characters[0] == char and sorted(characters) == sorted(CHARS)
        assert probabilities == sorted(probabilities, reverse=True)
    assert f"run {exported.run_id}" in done.stderr and "5 classes" in done.stderr


def test_predict_json_gives_k_candidates_per_file_and_names_failures(exported, pictures):
    name, version = exported.registered.split("/")
    files = [*map(str, pictures[:2]), str(exported.root / "missing.png")]
    done = predict_command(exported, *files, f"registry={name}", "--json", "-k", "3")
    assert done.returncode == 1  # one file is missing; the others are read
    answer = json.loads(done.stdout)
    assert set(answer) == {"model", "k", "predictions"} and answer["k"] == 3
    assert answer["model"]["version"] == version and answer["model"]["classes"] == 5
    read, missing = answer["predictions"][:2], answer["predictions"][2]
    for entry, path, char in zip(read, files[:2], CHARS[:2], strict=True):
        assert set(entry) == {"input", "top", "candidates"} and entry["input"] == path
        assert entry["top"] == char and len(entry["candidates"]) == 3
        probabilities = [c["probability"] for c in entry["candidates"]]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1
        assert entry["candidates"][0]["char"] == char
    assert missing == {"input": files[2], "error": f"{files[2]}: no such file"}
    assert done.stderr.splitlines()[-1] == f"error: {files[2]}: no such file"


def test_predict_reads_a_drawing_from_json_and_never_imports_tensorflow(exported, tmp_path):
    drawing = tmp_path / "drawing.json"
    strokes = glyph_strokes("う", CANVAS)
    drawing.write_text(json.dumps({"strokes": strokes, "width": CANVAS, "height": CANVAS}))
    code = (
        "import sys\n"
        "from hwexp.predict import main\n"
        f"status = main([{str(drawing)!r}, 'model_dir={exported.onnx.parent}', '-k', '1'])\n"
        f"print('status', status, 'heavy', {HEAVY})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    line, status = done.stdout.splitlines()
    assert line.split()[:2] == [str(drawing), "う"] and len(line.split()) == 3
    assert status == "status 0 heavy []"


def test_predict_errors_name_the_model_option_or_file(exported, pictures, tmp_path):
    name = exported.registered.split("/")[0]
    picture = str(pictures[0])
    cases = [
        (
            (picture, "registry=kanji"),
            f"no registered model 'kanji' in {exported.tracking_uri}; registered: {name}",
        ),
        ((picture, "rnu=best"), "rnu=best: unknown option (did you mean run?)"),
        ((picture, "run=best", f"registry={name}"), "give one model: run or registry"),
        ((picture, "-k", "0"), "k=0: a whole number >= 1"),
        (("run=best",), "no image file given"),
        ((picture, f"model_dir={tmp_path}"), "should hold exactly one .onnx file"),
    ]
    for args, message in cases:
        lines = error_lines(predict_command(exported, *args))
        assert len(lines) == 1 and message in lines[0], (args, lines)


def test_help_lists_the_predict_command():
    done = run_module(Path.cwd(), "hwexp.cli", "predict", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: hwexp predict FILE...")
    assert "registry=NAME" in done.stdout and "--json" in done.stdout
