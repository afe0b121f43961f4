"""The drawing pad's JSON API (``hwexp.serve``) against a small model trained and exported here.

The helpers above the tests (``exported_model``, ``running_server``, ``glyph_strokes``,
``request``) are shared with ``test_serve_e2e.py``; one model is trained per session.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_config import data_config
from hwexp.contract import INPUT_NAME, OUTPUT_NAME
from hwexp.data.preprocess import PreprocessOptions, normalise_characters
from hwexp.errors import ModelLoadError, RunNotFound
from hwexp.recognition import Recognizer
from hwexp.recognition.inputs import render_strokes
from hwexp.recognition.loading import (
    load_all_registered,
    load_onnx,
    load_registered,
    load_run,
    tracking_client,
)
from hwexp.serve import app
from hwexp.serve.__main__ import main as serve_main
from hwexp.serve.__main__ import parse_args
from hwexp.serve.app import MAX_BODY_BYTES, MAX_POINTS, MAX_STROKES, make_server, predict
from hwexp.synth.kanjivg import FRAME, load_glyph

# Enough data and epochs that KanjiVG-drawn あいうえお are recognised (about 30 s on 2 CPUs).
TRAIN_OVERRIDES = ("debug=default", "trainer.verbose=0", "synthetic.writers=40", "trainer.epochs=8")
CANVAS = 400  # px: the side of the canvas the tests "draw" on
NAME = "hiragana75-first5-synthetic"  # what the exporter names the debug model: what it reads


class ExportedModel(NamedTuple):
    root: Path
    onnx: Path  # <output_dir>/<run id>/<name>.onnx, as hwexp.export wrote it
    run_id: str
    tracking_uri: str
    registered: str  # "<registered model name>/<version>"
    preprocess: dict[str, Any]  # the trained run's preprocess block


_TRAINED: dict[str, ExportedModel] = {}


def exported_model(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    """Train the debug model (once per session) and export it with ``hwexp.export`` (ONNX,
    logged to the run and registered in the MLflow Model Registry)."""
    if "model" not in _TRAINED:
        from hwexp.__main__ import run_training
        from hwexp.export.run import export_run
        from hwexp.tracking.runs import client_for

        root = tmp_path_factory.mktemp("serve")
        train_cfg = data_config(root, *TRAIN_OVERRIDES, config_name="config")
        run_training(train_cfg)
        export_cfg = data_config(
            root,
            "run=best",
            "select.experiment=hwexp-debug",
            "formats=[onnx]",
            config_name="export",
        )
        result = export_run(export_cfg)
        client = client_for(train_cfg.tracking)
        _TRAINED["model"] = ExportedModel(
            root,
            result.files["onnx"],
            result.run_id,
            client.tracking_uri,
            str(result.registered),
            dict(train_cfg.preprocess),
        )
    return _TRAINED["model"]


@contextmanager
def running_server(models: Sequence[Recognizer]) -> Iterator[tuple[str, int]]:
    """Serve ``models`` on an ephemeral 127.0.0.1 port in a thread; yields ``(host, port)``."""
    server = make_server(models, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def glyph_strokes(char: str, side: float, scale: float = 0.8) -> list[list[list[float]]]:
    """KanjiVG strokes of ``char`` as canvas points: the 109-unit frame scaled to ``scale`` of
    a ``side``-pixel canvas, centred."""
    shift = side * (1 - scale) / 2
    return [
        (stroke / FRAME * side * scale + shift).round(1).tolist()
        for stroke in load_glyph(char).strokes()
    ]


def request(
    address: tuple[str, int],
    method: str,
    path: str,
    body: bytes | dict | list | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """``(status, decoded JSON body)`` of one request on a fresh connection."""
    if isinstance(body, dict | list):
        body = json.dumps(body).encode()
    connection = http.client.HTTPConnection(*address, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode_png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def drawn_picture(char: str, side: int, ink: int, paper: int, mode: str = "L") -> Image.Image:
    """``char``'s KanjiVG strokes drawn with a pen of about 4% of ``side``."""
    image = Image.new(mode, (side, side), paper)
    draw = ImageDraw.Draw(image)
    for stroke in glyph_strokes(char, side):
        draw.line([tuple(p) for p in stroke], fill=ink, width=side // 25, joint="curve")
    return image


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    return exported_model(tmp_path_factory)


@pytest.fixture(scope="module")
def model(exported: ExportedModel) -> Recognizer:
    return load_onnx(exported.onnx)


@pytest.fixture(scope="module")
def server(model: Recognizer) -> Iterator[tuple[str, int]]:
    with running_server([model]) as address:
        yield address


# --------------------------------------------------------------------------- good input


def test_models_lists_names_class_counts_and_input_size(server, model):
    status, answer = request(server, "GET", "/api/models")
    assert status == 200
    assert answer["default"] == model.name == NAME
    (listed,) = answer["models"]
    assert (listed["name"], listed["classes"], listed["input_size"]) == (NAME, 5, 48)
    assert listed["preview"] == "あいうえお"
    assert 0 < listed["stroke_width"] < 0.1


def test_strokes_are_recognised_as_the_drawn_character(server, model):
    for char in model.classes:
        status, answer = request(
            server,
            "POST",
            "/api/predict",
            {
                "model": NAME,
                "strokes": glyph_strokes(char, CANVAS),
                "width": CANVAS,
                "height": CANVAS,
            },
        )
        assert status == 200, answer
        candidates = answer["candidates"]
        assert candidates[0]["char"] == char
        assert [c["char"] for c in candidates] != [] and len(candidates) == 5
        probabilities = [c["probability"] for c in candidates]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)
        assert answer["model"] == NAME and answer["ms"] > 0
        shown = decode_png(answer["input_png"])
        assert shown.shape == (48, 48) and shown.dtype == np.uint8 and shown.max() == 255


def test_input_is_the_runs_own_training_preprocessing(server, model, exported):
    # The served model's options are the trained run's preprocess block, ...
    assert model.options == PreprocessOptions.from_config(exported.preprocess)
    strokes = glyph_strokes("え", CANVAS, scale=0.5)  # small and off-centre: crop and margin
    strokes = [[[x + 60, y - 40] for x, y in s] for s in strokes]
    status, answer = request(
        server, "POST", "/api/predict", {"strokes": strokes, "width": CANVAS, "height": CANVAS}
    )
    assert status == 200
    # ... and the input shown is normalise_characters of the rendered strokes, with them.
    arrays = [np.asarray(s, float) for s in strokes]
    expected = normalise_characters(
        render_strokes(arrays, CANVAS, CANVAS)[None], "high", model.options
    )[0]
    np.testing.assert_array_equal(decode_png(answer["input_png"]), expected)
    # Bright ink on black, centred by the crop: the margin rows are blank.
    margin = int(model.options.margin * model.options.size)
    assert expected[:margin].max() == 0 and expected[-margin:].max() == 0


def test_pictures_of_either_polarity_or_transparent_give_the_same_input(server):
    dark_on_light = drawn_picture("あ", 300, ink=0, paper=255)
    light_on_dark = drawn_picture("あ", 300, ink=255, paper=0)
    canvas_export = drawn_picture("あ", 300, ink=(20, 20, 20, 255), paper=(0, 0, 0, 0), mode="RGBA")
    shown = []
    for picture in (dark_on_light, light_on_dark, canvas_export):
        status, answer = request(server, "POST", "/api/predict", {"image": png_base64(picture)})
        assert status == 200, answer
        assert answer["candidates"][0]["char"] == "あ"
        shown.append(decode_png(answer["input_png"]).astype(int))
    np.testing.assert_array_equal(shown[0], shown[1])
    assert np.abs(shown[2] - shown[0]).mean() < 8
    data_url = "data:image/png;base64," + png_base64(dark_on_light)
    status, answer = request(server, "POST", "/api/predict", {"image": data_url})
    assert (
        status == 200
        and answer["input_png"]
        == request(server, "POST", "/api/predict", {"image": png_base64(dark_on_light)})[1][
            "input_png"
        ]
    )


def test_model_own_preprocess_options_decide_the_input(model, exported, tmp_path):
    wide = tmp_path / "wide"
    wide.mkdir()
    shutil.copy(exported.onnx, wide / "wide.onnx")
    (wide / "preprocess.json").write_text(json.dumps({**exported.preprocess, "margin": 0.3}))
    wide_model = load_onnx(wide / "wide.onnx")
    assert wide_model.name == "wide" and wide_model.options.margin == 0.3
    assert wide_model.classes == model.classes  # from the ONNX metadata: no classes.txt here
    models = {"default": model, "wide": wide_model}
    payload = {"strokes": glyph_strokes("い", CANVAS), "width": CANVAS, "height": CANVAS}

    def ink_rows(name: str) -> int:
        shown = decode_png(predict(models, {**payload, "model": name})["input_png"])
        return int((shown.max(axis=1) > 0).sum())

    assert ink_rows("wide") < ink_rows("default") - 8


def test_files_without_preprocessing_or_with_inconsistent_files_are_refused(exported, tmp_path):
    metadata_only = tmp_path / "meta"
    metadata_only.mkdir()
    shutil.copy(exported.onnx, metadata_only / "m.onnx")
    assert load_onnx(metadata_only / "m.onnx").options.size == 48  # exporter's metadata

    bad_classes = tmp_path / "classes"
    bad_classes.mkdir()
    shutil.copy(exported.onnx, bad_classes / "m.onnx")
    (bad_classes / "classes.txt").write_text("あ\nい\n", "utf-8")
    with pytest.raises(ModelLoadError, match="lists 2 classes; the model has 5"):
        load_onnx(bad_classes / "m.onnx")

    other_size = tmp_path / "size"
    other_size.mkdir()
    shutil.copy(exported.onnx, other_size / "m.onnx")
    (other_size / "config.yaml").write_text("preprocess:\n  size: 64\n", "utf-8")
    with pytest.raises(ModelLoadError, match="does not match preprocess.size=64"):
        load_onnx(other_size / "m.onnx")

    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not a loadable ONNX model"):
        load_onnx(tmp_path / "junk.onnx")
    with pytest.raises(ModelLoadError, match="no model file"):
        load_onnx(tmp_path / "missing.onnx")


def test_tensor_names_are_the_exporters():
    from hwexp.model import INPUT_LAYER_NAME, OUTPUT_LAYER_NAME

    assert (INPUT_NAME, OUTPUT_NAME) == (INPUT_LAYER_NAME, OUTPUT_LAYER_NAME)


def test_models_load_from_the_registry_and_from_runs(exported, model):
    client = tracking_client(exported.tracking_uri)
    name, version = exported.registered.split("/")
    by_name = load_registered(client, name)
    by_version = load_registered(client, f"{name}/{version}", name="pinned")
    by_run = load_run(client, exported.run_id)
    assert by_name.info.origin == f"models:/{name}/{version}" and by_name.name == name
    assert by_name.info.version == version and by_name.info.run_id == exported.run_id
    assert by_version.name == "pinned"
    assert by_run.info.origin == f"runs:/{exported.run_id}/export"
    for loaded in (by_name, by_version, by_run):
        assert loaded.classes == model.classes
        assert loaded.options == PreprocessOptions.from_config(exported.preprocess)
    assert [m.name for m in load_all_registered(client)] == [name]
    with pytest.raises(ModelLoadError, match=f"no registered model 'katakana'.*registered: {name}"):
        load_registered(client, "katakana")
    with pytest.raises(RunNotFound, match="does not exist"):
        load_run(client, "0123456789abcdef0123456789abcdef")


def test_concurrent_requests_are_all_answered(server):
    payload = {"strokes": glyph_strokes("う", CANVAS), "width": CANVAS, "height": CANVAS}
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: request(server, "POST", "/api/predict", payload), range(24))
        )
    assert all(status == 200 and a["candidates"][0]["char"] == "う" for status, a in answers)


def test_one_keep_alive_connection_serves_many_requests(server):
    body = json.dumps(_strokes()).encode()
    connection = http.client.HTTPConnection(*server, timeout=30)
    try:
        for _ in range(3):
            connection.request("POST", "/api/predict", body)
            response = connection.getresponse()
            assert response.status == 200 and response.getheader("Connection") != "close"
            assert json.loads(response.read())["candidates"][0]["char"] == "あ"
        connection.request("POST", "/api/models", b'{"x": 1}')  # refused, body unread: closed
        response = connection.getresponse()
        assert (response.status, response.getheader("Connection")) == (405, "close")
    finally:
        connection.close()


# --------------------------------------------------------------------------- bad input


def _strokes(**changes: Any) -> dict[str, Any]:
    return {"strokes": glyph_strokes("あ", CANVAS), "width": CANVAS, "height": CANVAS, **changes}


BLANK_PNG = png_base64(Image.new("L", (64, 64), 255))
BAD_REQUESTS = {
    "not json": (b"{'strokes': nope", 400, "not valid JSON"),
    "json array": ([1, 2], 400, "must be a JSON object"),
    "nan": (b'{"strokes": [[[NaN, 1]]], "width": 9, "height": 9}', 400, "NaN is not a number"),
    "not utf-8": (b"\xff\xfe\x00garbage", 400, "not valid JSON"),
    "not an image": ({"image": base64.b64encode(b"hello").decode()}, 400, "not a PNG, JPEG"),
    "not base64": ({"image": "@@not base64@@"}, 400, "not valid base64"),
    "image not a string": ({"image": 5}, 400, "'image' must be a base64 string"),
    "blank image": ({"image": BLANK_PNG}, 422, "empty drawing"),
    "no strokes": (_strokes(strokes=[]), 422, "empty drawing"),
    "empty strokes": (_strokes(strokes=[[], []]), 422, "empty drawing"),
    "off the canvas": (_strokes(strokes=[[[-500, -500], [-450, -450]]]), 422, "empty drawing"),
    "too many points": (_strokes(strokes=[[[1, 1]] * (MAX_POINTS + 1)]), 400, "too many points"),
    "too many strokes": (_strokes(strokes=[[[1, 1]]] * (MAX_STROKES + 1)), 400, "too many strokes"),
    "unknown model": (_strokes(model="klingon"), 404, "unknown model 'klingon'"),
    "model not a string": (_strokes(model=5), 400, "'model' must be a string"),
    "width a string": (_strokes(width="400"), 400, "'width' must be a number"),
    "height a bool": (_strokes(height=True), 400, "'height' must be a number"),
    "width zero": (_strokes(width=0), 400, "must be between 1"),
    "width missing": ({"strokes": [[[1, 2]]], "height": 9}, 400, "'width' must be a number"),
    "strokes a string": (_strokes(strokes="abc"), 400, "'strokes' must be a list"),
    "stroke a number": (_strokes(strokes=[5]), 400, "stroke 0 must be a list"),
    "point of strings": (_strokes(strokes=[[["a", "b"]]]), 400, "two numbers"),
    "point of three": (_strokes(strokes=[[[1, 2, 3]]]), 400, "two numbers"),
    "ragged points": (_strokes(strokes=[[[1, 2], [3]]]), 400, "two numbers"),
    "bool points": (_strokes(strokes=[[[True, False]]]), 400, "two numbers"),
    "huge coordinate": (_strokes(strokes=[[[1e300, 2]]]), 400, "coordinates beyond"),
    "strokes and image": (_strokes(image=BLANK_PNG), 400, "either 'strokes'"),
    "neither": ({"model": NAME}, 400, "either 'strokes'"),
    "huge body": (b" " * (MAX_BODY_BYTES + 1000), 413, "at most 2097152"),
}


@pytest.mark.parametrize("body, status, message", BAD_REQUESTS.values(), ids=BAD_REQUESTS)
def test_bad_predict_requests_get_a_clear_4xx_and_the_server_keeps_serving(
    server, body, status, message
):
    got, answer = request(server, "POST", "/api/predict", body)
    assert (got, set(answer)) == (status, {"error"})
    assert message in answer["error"]
    assert request(server, "GET", "/api/models")[0] == 200


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/api/predict", 405),
        ("POST", "/api/models", 405),
        ("GET", "/etc/passwd", 404),
        ("GET", "/static/../app.py", 404),
        ("PUT", "/api/predict", 501),
    ],
)
def test_wrong_method_or_path_gets_a_json_error(server, method, path, status):
    got, answer = request(server, method, path, b"{}" if method != "GET" else None)
    assert got == status and answer["error"]


def test_body_without_content_length_is_refused(server):
    with socket.create_connection(server, timeout=10) as sock:
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b"".join(iter(lambda: sock.recv(65536), b"")).decode()  # until it closes
    assert reply.startswith("HTTP/1.1 411") and "Content-Length header is required" in reply


def test_a_failing_model_gives_500_and_the_server_keeps_serving(model):
    class BrokenSession:
        def run(self, *args: Any) -> None:
            raise RuntimeError("out of cheese")

    broken = dataclasses.replace(model, name="broken", session=BrokenSession())
    with running_server([broken, model]) as address:
        status, answer = request(address, "POST", "/api/predict", _strokes(model="broken"))
        assert status == 500 and "out of cheese" in answer["error"]
        status, answer = request(address, "POST", "/api/predict", _strokes(model=NAME))
        assert status == 200 and answer["candidates"][0]["char"] == "あ"


# --------------------------------------------------------------------------- command line


def test_command_line_serves_files_and_never_imports_tensorflow(exported):
    code = (
        "import sys, threading\n"
        "import hwexp.serve.__main__ as cli\n"
        "from hwexp.serve.app import make_server\n"
        f"models = cli.load_models(cli.parse_args(['--model', 'pad={exported.onnx}']))\n"
        "print(models[0].name, len(models[0].classes))\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
        "print('heavy:', heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.splitlines() == ["pad 5", "heavy: []"]


def test_command_line_reports_what_cannot_be_loaded(tmp_path, capsys):
    for args, message in [
        (["--model", str(tmp_path / "none.onnx")], "no model file"),
        (["--tracking-uri", f"sqlite:///{tmp_path}/empty.db"], "no registered model with an ONNX"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            serve_main([*args, "--port", "0"])
        assert exit_info.value.code == 1
        assert message in capsys.readouterr().err


def _table_rows(text: str) -> list[list[str]]:
    """The rows of a model table (after its heading line ``name  class set ...``), split on
    runs of two or more spaces."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("name  "))
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith("drawing pad at"):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_list_shows_every_registered_model_and_what_it_reads(exported, capsys):
    name, version = exported.registered.split("/")
    assert serve_main(["--list", "--tracking-uri", exported.tracking_uri]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"registered models in {exported.tracking_uri}:")
    assert _table_rows(out) == [
        [
            name,
            "hiragana75",
            "5",
            "synthetic",
            version,
            exported.run_id,
            f"models:/{name}/{version}",
        ]
    ]
    empty = f"sqlite:///{exported.root}/empty/mlflow.db"
    assert serve_main(["--list", "--tracking-uri", empty]) == 0
    assert capsys.readouterr().out.startswith("no registered model in")


def test_serve_lists_the_models_it_serves_and_refuses_unknown_names(exported, capsys):
    name, version = exported.registered.split("/")
    with pytest.raises(SystemExit) as exit_info:
        serve_main(["--registered", "hiragana", "--tracking-uri", exported.tracking_uri])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == (
        f"error: no registered model 'hiragana' in {exported.tracking_uri}; registered: {name}"
    )
    command = [sys.executable, "-m", "hwexp.serve", "--port", "0"]
    command += ["--tracking-uri", exported.tracking_uri, "--model", f"files={exported.onnx}"]
    server = subprocess.Popen(command + ["--registered", name], stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith("drawing pad at"):
            line = server.stdout.readline()
            assert line, "the server exited before serving"
            lines.append(line.rstrip("\n"))
    finally:
        server.terminate()
        server.wait(30)
    assert lines[0] == "serving 2 model(s):"
    files, registered = _table_rows("\n".join(lines))
    common = ["hiragana75", "5", "synthetic"]
    assert files == ["files", *common, "-", exported.run_id, str(exported.onnx)]
    assert registered == [name, *common, version, exported.run_id, f"models:/{name}/{version}"]


# --------------------------------------------------------------------------- under load


class FixedSession:
    """An ONNX session stand-in: the same probabilities for any input (no model to train)."""

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert feeds[INPUT_NAME].shape == (1, 48, 48, 1)
        return [np.array([[0.7, 0.2, 0.1]], np.float32)]


@pytest.fixture(scope="module")
def light_server() -> Iterator[tuple[str, int]]:
    """A server whose model needs no training: the real input handling, fixed answers."""
    fixed = Recognizer("fixed", ("あ", "い", "う"), PreprocessOptions(), FixedSession())
    with running_server([fixed]) as address:
        yield address


def _read_response(sock: socket.socket, pending: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response read off ``sock`` (bytes after it stay in ``pending``)."""
    while b"\r\n\r\n" not in pending:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {bytes(pending)!r}"
        pending += chunk
    head, _, rest = bytes(pending).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(fields["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        rest += chunk
    pending[:] = rest[length:]
    return int(lines[0].split()[1]), fields, rest[:length]


def test_pipelined_requests_are_answered_in_order_on_one_connection(light_server):
    body = json.dumps(_strokes()).encode()
    post = f"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    burst = (
        b"GET /api/models HTTP/1.1\r\nHost: x\r\n\r\n"
        + post.encode()
        + body
        + b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"GET /static/pad.css HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    with socket.create_connection(light_server, timeout=10) as sock:
        sock.sendall(burst)
        pending = bytearray()
        answers = [_read_response(sock, pending) for _ in range(4)]
    assert [status for status, _, _ in answers] == [200, 200, 404, 200]
    assert json.loads(answers[0][2])["default"] == "fixed"
    assert json.loads(answers[1][2])["candidates"][0]["char"] == "あ"
    assert answers[3][1]["content-type"].startswith("text/css")
    assert all("connection" not in fields for _, fields, _ in answers)


def test_a_slow_client_holds_up_no_one_else(light_server):
    """A client trickling its body holds a buffer, nothing else: others are answered at once
    (the event loop reads what arrives, it never waits on one connection)."""
    body = json.dumps(_strokes()).encode()
    head = f"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    slow = [socket.create_connection(light_server, timeout=10) for _ in range(8)]
    try:
        for sock in slow:
            sock.sendall(head.encode() + body[:10])
        start = time.monotonic()
        for _ in range(5):
            assert request(light_server, "POST", "/api/predict", _strokes())[0] == 200
        assert time.monotonic() - start < 2
        for sock in slow:  # the slow ones are answered too, once their bodies are complete
            sock.sendall(body[10:])
            assert _read_response(sock, bytearray())[0] == 200
    finally:
        for sock in slow:
            sock.close()


class NotingSession(FixedSession):
    """A FixedSession that notes its model's name in ``order`` and takes ``seconds``."""

    def __init__(self, name: str, order: list[str], seconds: float) -> None:
        self.name, self.order, self.seconds = name, order, seconds

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.order.append(self.name)
        time.sleep(self.seconds)
        return super().run(outputs, feeds)


def test_a_pipelined_burst_takes_turns_with_other_connections():
    order: list[str] = []
    models = [
        Recognizer(name, ("あ", "い", "う"), PreprocessOptions(), NotingSession(name, order, 0.1))
        for name in ("a", "b")
    ]

    def post(model: str) -> bytes:
        body = json.dumps(_strokes(model=model)).encode()
        head = f"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode() + body

    with running_server(models) as address:
        burst = socket.create_connection(address, timeout=10)
        late = socket.create_connection(address, timeout=10)
        try:
            burst.sendall(post("a") * 4)  # four requests at once, pipelined
            time.sleep(0.05)  # the first of them is being answered
            late.sendall(post("b"))  # arrived after the burst, before its last two are read
            pending = bytearray()
            assert [_read_response(burst, pending)[0] for _ in range(4)] == [200] * 4
            assert _read_response(late, bytearray())[0] == 200
        finally:
            burst.close()
            late.close()
    # A connection has one request queued at a time: the burst's second is queued as its first
    # is answered, "b" at the next poll, the burst's third only after its second is answered.
    assert order == ["a", "a", "b", "a", "a"], order


def test_a_silent_connection_is_closed_after_the_idle_time(light_server, monkeypatch):
    monkeypatch.setattr(app, "IDLE_TIMEOUT_S", 0.3)
    with socket.create_connection(light_server, timeout=10) as sock:
        sock.sendall(b"GET /api/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock, bytearray())[0] == 200
        start = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server
        assert 0.2 < time.monotonic() - start < 5


def test_http_1_0_head_and_expect_100_continue(light_server):
    reply, _ = raw_exchange(light_server, b"GET /api/models HTTP/1.0\r\n\r\n")
    assert reply.startswith("HTTP/1.1 200") and "Connection: close" in reply  # 1.0: one request
    with socket.create_connection(light_server, timeout=10) as sock:
        sock.sendall(b"HEAD /api/models HTTP/1.1\r\nHost: x\r\n\r\n")
        head = sock.recv(65536).decode()
        length = int(re.search(r"Content-Length: (\d+)", head).group(1))
        assert head.startswith("HTTP/1.1 200") and head.endswith("\r\n\r\n") and length > 100
        # curl asks before sending a large body: it is told to go on, then answered.
        body = json.dumps(_strokes()).encode()
        sock.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert _read_response(sock, bytearray())[0] == 200


MALFORMED_HEADS = {
    "two words": (b"GET /api/models\r\n\r\n", 400, "bad request line"),
    "bad version": (b"GET / HTTP/x\r\n\r\n", 400, "bad request version"),
    "http/2": (b"GET / HTTP/2.0\r\n\r\n", 505, "not supported"),
    "no colon": (b"GET / HTTP/1.1\r\nHost x\r\n\r\n", 400, "bad header field"),
    "folded": (b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", 400, "bad header field"),
    "delete": (b"DELETE / HTTP/1.1\r\n\r\n", 501, "unsupported method 'DELETE'"),
    "many fields": (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 101 + b"\r\n", 431, "more than 100"),
    "huge head": (b"GET / HTTP/1.1\r\nA: " + b"b" * 70_000 + b"\r\n\r\n", 431, "over 65536"),
    "huge line": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "over 65536"),
    "expect": (
        b"POST /api/predict HTTP/1.1\r\nExpect: magic\r\nContent-Length: 2\r\n\r\n{}",
        417,
        "cannot meet",
    ),
}


@pytest.mark.parametrize("data, status, message", MALFORMED_HEADS.values(), ids=MALFORMED_HEADS)
def test_a_malformed_request_head_gets_a_json_error_and_a_closed_connection(
    light_server, data, status, message
):
    reply, _ = raw_exchange(light_server, data)
    head, _, body = reply.partition("\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ") and "Connection: close" in head
    assert message in json.loads(body)["error"]
    assert request(light_server, "GET", "/api/models")[0] == 200


def raw_exchange(address: tuple[str, int], data: bytes, shut: bool = False) -> tuple[str, float]:
    """Send ``data`` on a new connection (then half-close it if ``shut``); the whole reply
    (until the server closes) and the seconds it took."""
    start = time.monotonic()
    with socket.create_connection(address, timeout=20) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    return reply.decode("utf-8", "replace"), time.monotonic() - start


def test_the_listen_backlog_takes_a_burst_of_connections():
    """64 clients connecting at once to a server that has not accepted yet all get in (the
    standard library's backlog of 5 dropped their SYNs: ~1 s retries, resets)."""
    fixed = Recognizer("fixed", ("あ",), PreprocessOptions(), FixedSession())
    server = make_server([fixed], "127.0.0.1", 0)
    clients = []
    try:
        for _ in range(64):
            clients.append(socket.create_connection(server.server_address[:2], timeout=0.5))
        assert len(clients) == 64
    finally:
        for client in clients:
            client.close()
        server.server_close()


def test_deeply_nested_json_is_a_400_not_a_server_error(light_server):
    status, answer = request(light_server, "POST", "/api/predict", b"[" * 200_000)
    assert status == 400 and "nested too deeply" in answer["error"]
    assert request(light_server, "GET", "/api/models")[0] == 200


def test_a_huge_picture_is_refused_from_its_header_before_decoding(light_server):
    huge = Image.new("L", (4096, 4096), 255)
    status, answer = request(light_server, "POST", "/api/predict", {"image": png_base64(huge)})
    assert status == 400 and "4096x4096 pixels; at most 1048576" in answer["error"]
    # The header says the size: refused with no pixel data at all (decoding it would fail).
    buffer = io.BytesIO()
    Image.new("L", (4096, 4096)).save(buffer, format="PNG")
    data = buffer.getvalue()
    header_only = base64.b64encode(data[: data.index(b"IDAT") + 8]).decode()
    status, answer = request(light_server, "POST", "/api/predict", {"image": header_only})
    assert status == 400 and "4096x4096 pixels" in answer["error"]
    # A large JPEG (a phone photo) is decoded at a fraction of its size instead.
    photo = drawn_picture("あ", 3000, ink=0, paper=255).convert("RGB")
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=80)
    payload = {"image": base64.b64encode(buffer.getvalue()).decode()}
    assert request(light_server, "POST", "/api/predict", payload)[0] == 200


def test_an_undecodable_image_says_what_it_is_not(light_server):
    for data, message in (
        (b"hello, world", "'image' is not a PNG, JPEG, BMP, GIF or WebP image"),
        (base64.b64decode(BLANK_PNG)[:60], "'image' is a PNG image that cannot be decoded"),
    ):
        payload = {"image": base64.b64encode(data).decode()}
        status, answer = request(light_server, "POST", "/api/predict", payload)
        assert status == 400 and answer["error"].startswith(message), answer
        assert "BytesIO" not in answer["error"] and "0x" not in answer["error"]


def test_a_lying_content_length_is_answered_408_within_the_body_time_limit(
    light_server, monkeypatch
):
    from hwexp.serve import app

    assert app.BODY_TIMEOUT_S <= 5
    monkeypatch.setattr(app, "BODY_TIMEOUT_S", 0.5)
    head = b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    reply, seconds = raw_exchange(light_server, head + b'{"strokes": ')
    assert reply.startswith("HTTP/1.1 408") and "12 of the 100 bytes" in reply
    assert "Connection: close" in reply and seconds < 5
    reply, _ = raw_exchange(light_server, head + b'{"strokes": ', shut=True)  # it stops early
    assert reply.startswith("HTTP/1.1 400") and "ended after 12 of the 100 bytes" in reply


@pytest.mark.parametrize("lengths", [["2", "2"], ["2", "3"], ["+2"], ["2_0"], ["0x2"], ["2, 2"]])
def test_a_content_length_that_is_not_one_number_is_refused(light_server, lengths):
    fields = "".join(f"Content-Length: {value}\r\n" for value in lengths)
    data = f"POST /api/predict HTTP/1.1\r\nHost: x\r\n{fields}\r\n{{}}".encode()
    reply, _ = raw_exchange(light_server, data)
    assert reply.startswith("HTTP/1.1 400") and "bad Content-Length" in reply
    assert "Connection: close" in reply


def test_a_client_that_goes_away_costs_one_log_line_not_a_traceback(light_server, caplog, capfd):
    caplog.set_level(logging.INFO, logger="hwexp.serve.app")
    body = json.dumps(_strokes()).encode()
    head = f"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    for data in (b"", head.encode() + body, head.encode()):  # idle, all sent, body missing
        sock = socket.create_connection(light_server, timeout=10)
        sock.sendall(data)
        time.sleep(0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # with a reset, as a crashed client or a dropped network would
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(_went_away(caplog)) < 2:
        time.sleep(0.05)
    assert request(light_server, "GET", "/api/models")[0] == 200
    went_away = _went_away(caplog)
    assert 2 <= len(went_away) <= 3 and all("\n" not in r.getMessage() for r in went_away)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Traceback" not in capfd.readouterr().err


def _went_away(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "went away" in r.getMessage()]


@pytest.mark.parametrize("stroke", [[[200, 200]], [[200, 200], [201, 200]]], ids=["dot", "1px"])
def test_a_dot_or_a_very_short_stroke_is_drawn_and_recognised(light_server, stroke):
    payload = {"strokes": [stroke], "width": CANVAS, "height": CANVAS}
    status, answer = request(light_server, "POST", "/api/predict", payload)
    assert status == 200, answer
    assert answer["candidates"][0] == {"char": "あ", "probability": 0.7}
    shown = decode_png(answer["input_png"])
    ink = np.argwhere(shown > 0)
    assert shown.max() == 255 and 1 <= len(ink) <= 25  # a dot ...
    assert np.abs(ink.mean(axis=0) - 23.5).max() < 3  # ... in the middle


# --------------------------------------------------------------------------- worker processes


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _workers(pid: int) -> list[int]:
    """The server processes among ``pid``'s children (not multiprocessing's resource tracker)."""
    return [c for c in _children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has exited, only its exit status is left


def _accepted_by(server_port: int, client_port: int, pids: Sequence[int]) -> int:
    """Which of ``pids`` holds the server's end of the loopback connection from
    ``client_port`` (its socket's inode, from /proc/net/tcp, among the processes' files)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(a.split(":")[1], 16) for a in fields[1:3])
        if (local, remote) == (server_port, client_port):
            link = f"socket:[{fields[9]}]"
            for pid in pids:
                fds = Path(f"/proc/{pid}/fd")
                if any(os.readlink(fds / fd) == link for fd in os.listdir(fds)):
                    return pid
    raise AssertionError(f"no process of {pids} holds the connection from port {client_port}")


def _wait_until(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"after {seconds} s: {what}"
        time.sleep(0.1)


@contextmanager
def serving_workers(
    exported: ExportedModel, workers: int
) -> Iterator[tuple[subprocess.Popen, int]]:
    """``python -m hwexp.serve --workers N`` on an ephemeral port: ``(process, port)`` once it
    prints its URL (the process is killed afterwards if still running)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hwexp.serve",
            "--model",
            str(exported.onnx),
            "--port",
            "0",
            "--workers",
            str(workers),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        printed = []  # the served models' table, then the URL
        while not printed or "drawing pad at" not in printed[-1]:
            printed.append(process.stdout.readline())
            assert printed[-1], f"the server stopped: {''.join(printed)}"
        assert f"{workers} server processes" in printed[-1], printed
        yield process, int(printed[-1].split("127.0.0.1:")[1].split("/")[0])
    finally:
        process.kill()
        process.wait(10)


def _answering_processes(port: int, pids: Sequence[int], seconds: float = 60) -> set[int]:
    """Have drawings recognised, each on a new connection, until every one of ``pids`` has
    answered one (or ``seconds`` passed: a worker still loading its model accepts nothing);
    the processes that answered."""
    answered: set[int] = set()
    deadline = time.monotonic() + seconds
    while answered != set(pids) and time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("POST", "/api/predict", json.dumps(_strokes()).encode())
            response = connection.getresponse()
            assert response.status == 200
            assert json.loads(response.read())["candidates"][0]["char"] == "あ"
            answered.add(_accepted_by(port, connection.sock.getsockname()[1], pids))
        finally:
            connection.close()
    return answered


def _keep_alive_split(port: int, pids: Sequence[int], clients: int = 16) -> list[int]:
    """Open ``clients`` keep-alive connections one after the other, each recognising a
    drawing and staying open; how many of them each of ``pids`` holds."""
    connections = []
    try:
        for _ in range(clients):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connections.append(connection)
            connection.request("POST", "/api/predict", json.dumps(_strokes()).encode())
            assert connection.getresponse().read()
        held = [_accepted_by(port, c.sock.getsockname()[1], pids) for c in connections]
    finally:
        for connection in connections:
            connection.close()
    return [held.count(pid) for pid in pids]


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_workers_share_the_port_a_dead_one_is_replaced_and_sigterm_stops_them_all(exported):
    with serving_workers(exported, 2) as (process, port):
        workers = _workers(process.pid)
        assert len(workers) == 2
        assert _answering_processes(port, workers) == set(workers)
        # A worker takes a connection only while it holds at most one more than the other.
        split = _keep_alive_split(port, workers)
        assert sum(split) == 16 and max(split) - min(split) <= 2, split
        # A worker that dies is replaced; the pad answers throughout.
        os.kill(workers[0], signal.SIGKILL)
        assert request(("127.0.0.1", port), "POST", "/api/predict", _strokes())[0] == 200
        _wait_until(lambda: len(set(_workers(process.pid)) - set(workers)) == 1, 60, "no new one")
        replaced = _workers(process.pid)
        assert workers[1] in replaced
        assert _answering_processes(port, replaced) == set(replaced)
        started = _children(process.pid)  # the workers and multiprocessing's resource tracker
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        _wait_until(lambda: not any(map(_running, started)), 10, f"{started} still running")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_workers_stop_by_themselves_when_the_parent_is_killed(exported):
    with serving_workers(exported, 2) as (process, port):
        workers = _workers(process.pid)
        process.kill()  # no chance to stop them: they see their pipe to it close
        process.wait(10)
        _wait_until(lambda: not any(map(_running, workers)), 15, f"{workers} still running")


def test_workers_that_cannot_load_the_model_stop_the_start_with_its_error(tmp_path):
    missing = tmp_path / "none.onnx"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hwexp.serve",
            "--model",
            str(missing),
            "--port",
            "0",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("error: no model file") == 1, done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--workers", "0"])
    assert exit_info.value.code == 2
