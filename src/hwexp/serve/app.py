"""The drawing pad's HTTP server: the page, its static files and a small JSON API.

Built on the standard library's ``ThreadingHTTPServer``: three routes need no framework, it adds
no dependency, each connection has a thread of its own (reused for later connections; ONNX
Runtime sessions are thread-safe), and HTTP/1.1 keep-alive is on. The threads share one
interpreter lock, so one process uses about one CPU core: ``--workers N`` runs N of them on one
port (:mod:`hwexp.serve.workers`).

API
---
``GET /api/models`` ->
``{"models": [{"name", "classes": <count>, "input_size": S, "preview", "source",
"stroke_width", "run_id", "dataset", "class_set", "data_source", "version", "test_accuracy"}],
"default": <name>, "limits": {...}}`` (``Recognizer.describe``); ``stroke_width`` is the pen
width as a fraction of the canvas side that the server renders strokes with, ``source`` where
the model was loaded from, ``data_source`` where its training images came from.

``POST /api/predict`` with a JSON object, either strokes::

    {"model": "hiragana", "strokes": [[[x, y], ...], ...], "width": W, "height": H}

(points in canvas pixels, ``0 <= x < W``, ``0 <= y < H``; a stroke is one pen-down..pen-up), or
a picture of one character, ink of either polarity (a ``data:`` URL prefix is accepted)::

    {"model": "hiragana", "image": "<base64 PNG, JPEG, BMP, GIF or WebP>"}

``model`` is optional (default: the first model loaded). The model's ``Recognizer``
(``hwexp.recognition``) reads it, as ``hwexp predict`` and Python code would. Answer (200)::

    {"top": "あ",
     "candidates": [{"char": "あ", "probability": 0.93}, ...],   # top 5, most probable first
     "input_png": "<base64 PNG of the S x S model input, ink white on black>",
     "model": "hiragana", "ms": 2.4}                             # server time, milliseconds

Errors are JSON ``{"error": "<what is wrong and what is accepted>"}``: 400 malformed (not
JSON or nested too deeply, wrong types, not an image, a picture over
:data:`~hwexp.recognition.inputs.MAX_PICTURE_PIXELS`, more than :data:`MAX_STROKES` strokes or
:data:`MAX_POINTS` points, two ``Content-Length`` headers, a body shorter than its
``Content-Length``), 404 unknown model or path, 405 wrong method, 408 a body that does not arrive
within :data:`BODY_TIMEOUT_S`, 411 no ``Content-Length``, 413 body over :data:`MAX_BODY_BYTES`,
422 an empty drawing (no points, or no ink), 500 a server fault (the server keeps serving).

Under load
----------
The listen backlog is :data:`REQUEST_QUEUE_SIZE` (the standard library's 5 drops connections
when many clients connect at once), and every request's work is bounded: body size, body read
time, JSON nesting, strokes and points, and picture pixels (checked from the image header before
decoding; large JPEGs are decoded reduced). A client that goes away mid-request costs one log
line, not a traceback. Figures: ``scripts/bench_serve.py`` and docs/benchmarks.md.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import queue
import re
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from hwexp import __version__
from hwexp.errors import InputError
from hwexp.recognition import Recognizer, Strokes
from hwexp.recognition.inputs import decode_picture

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 2 * 1024 * 1024
BODY_TIMEOUT_S = 5.0  # s for the whole body: a lying Content-Length holds a thread no longer
REQUEST_QUEUE_SIZE = 1024  # listen backlog (the kernel caps it at net.core.somaxconn)
MAX_STROKES = 500
MAX_POINTS = 20_000  # over all strokes
MAX_CANVAS = 10_000  # px, either side
MAX_COORDINATE = 1e6  # px, |x| and |y| (points off the canvas are allowed, not drawn)
IDLE_THREAD_S = 60.0  # a connection thread waits this long for another connection, then ends
_DRAIN_LIMIT = 16 * 1024 * 1024  # an oversized body up to this is read away before answering
STATIC_DIR = Path(__file__).parent / "static"
_STATIC = {  # URL path -> (file, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/pad.js": ("pad.js", "text/javascript; charset=utf-8"),
    "/static/pad.css": ("pad.css", "text/css; charset=utf-8"),
}
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


class ApiError(Exception):
    """A request the API refuses: HTTP ``status`` and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------- request parsing


def _reject_constant(name: str) -> float:
    raise ApiError(400, f"request body is not valid JSON: {name} is not a number")


def parse_json(body: bytes) -> dict[str, Any]:
    """The request object; NaN/Infinity are refused. Raises :class:`ApiError` (400)."""
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"request body is not valid JSON: {error}") from None
    except RecursionError:  # the decoder gives up at the interpreter's recursion limit
        raise ApiError(400, "request body is JSON nested too deeply") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"request body must be a JSON object, not {type(payload).__name__}")
    return payload


def _number(payload: Mapping[str, Any], key: str) -> float:
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"{key!r} must be a number (canvas pixels), got {value!r}")
    if not 1 <= value <= MAX_CANVAS:
        raise ApiError(400, f"{key!r}={value}: must be between 1 and {MAX_CANVAS} pixels")
    return float(value)


def parse_strokes(payload: Mapping[str, Any]) -> Strokes:
    """The drawing of a request; empty strokes are dropped.

    Raises:
        ApiError: 400 wrong types or too many strokes/points; 422 no points at all.
    """
    width, height = _number(payload, "width"), _number(payload, "height")
    strokes = payload["strokes"]
    if not isinstance(strokes, list):
        raise ApiError(400, "'strokes' must be a list of strokes, each a list of [x, y] points")
    if len(strokes) > MAX_STROKES:
        raise ApiError(400, f"too many strokes: {len(strokes)} (at most {MAX_STROKES})")
    total = sum(len(s) for s in strokes if isinstance(s, list))
    if total > MAX_POINTS:
        raise ApiError(400, f"too many points: {total} (at most {MAX_POINTS} in all strokes)")
    arrays = []
    for index, stroke in enumerate(strokes):
        if not isinstance(stroke, list):
            raise ApiError(400, f"stroke {index} must be a list of [x, y] points")
        if not stroke:
            continue
        try:
            points = np.asarray(stroke)
        except ValueError:
            points = np.empty(0)  # ragged: reported below
        if points.ndim != 2 or points.shape[1] != 2 or points.dtype.kind not in "iuf":
            raise ApiError(400, f"stroke {index}: every point must be [x, y], two numbers")
        if np.abs(points).max() > MAX_COORDINATE:
            raise ApiError(400, f"stroke {index}: coordinates beyond ±{MAX_COORDINATE:g} px")
        arrays.append(points.astype(np.float64))
    if not arrays:
        raise ApiError(422, "empty drawing: no strokes with points")
    return Strokes(arrays, width, height)


def parse_image(value: Any) -> np.ndarray:
    """A base64 picture (optionally a ``data:`` URL) as ``(h, w)`` uint8 grey.

    Raises:
        ApiError: (400) not a string, not base64, or not an image.
    """
    if not isinstance(value, str):
        raise ApiError(400, f"'image' must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "'image' is not valid base64") from None
    if not data:
        raise ApiError(422, "empty drawing: 'image' is empty")
    try:
        return decode_picture(data)
    except InputError as error:
        raise ApiError(error.status, str(error)) from None


def _png_base64(image: np.ndarray) -> str:
    """An ``(h, w)`` uint8 grey image as a base64 PNG, written directly with zlib: PIL's
    encoder took 0.15 ms of the server's time per request (mostly its plugin machinery)."""
    height, width = image.shape
    rows = np.zeros((height, width + 1), np.uint8)  # each row: filter type 0, then its pixels
    rows[:, 1:] = image
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    png = b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)),
            _png_chunk(b"IEND", b""),
        ]
    )
    return base64.b64encode(png).decode("ascii")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def predict(models: Mapping[str, Recognizer], payload: Mapping[str, Any]) -> dict[str, Any]:
    """Answer one ``POST /api/predict`` request object (see the module docstring).

    Raises:
        ApiError: the request is malformed, names an unknown model, or has no ink.
    """
    start = time.perf_counter()
    name = payload.get("model", next(iter(models)))
    if not isinstance(name, str):
        raise ApiError(400, f"'model' must be a string, got {type(name).__name__}")
    model = models.get(name)
    if model is None:
        raise ApiError(404, f"unknown model {name!r}; loaded: {', '.join(models)}")
    has_strokes, has_image = "strokes" in payload, "image" in payload
    if has_strokes == has_image:
        raise ApiError(400, "send either 'strokes' (with 'width' and 'height') or 'image'")
    try:
        drawing = parse_strokes(payload) if has_strokes else parse_image(payload["image"])
        result = model.predict(drawing)
    except InputError as error:
        raise ApiError(error.status, str(error)) from None
    return {
        **result.as_json(),
        "input_png": _png_base64(result.model_input),
        "model": name,
        "ms": round((time.perf_counter() - start) * 1000.0, 2),
    }


# --------------------------------------------------------------------------- the server


class PadServer(ThreadingHTTPServer):
    """A threaded HTTP server holding the loaded models (by name, in menu order).

    Each connection has a thread of its own, as with ``ThreadingHTTPServer``, but threads are
    reused: a thread done with its connection waits up to :data:`IDLE_THREAD_S` for the next.
    Starting a thread makes the serving loop wait until the new thread has run, that is until it
    gets the interpreter lock: about 3 ms with 16 requests in flight, which capped a process at
    some 300 new connections a second.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = REQUEST_QUEUE_SIZE

    def __init__(
        self, address: tuple[str, int], models: Sequence[Recognizer], bind: bool = True
    ) -> None:
        """Serve ``models`` on ``address``; with ``bind=False`` the caller gives the server its
        listening socket (``server.socket``) before serving."""
        if not models:
            raise ValueError("no models to serve")
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"two models named {duplicates}: rename one with NAME=...")
        self.models = {m.name: m for m in models}
        self.static = {
            path: ((STATIC_DIR / file).read_bytes(), ctype)
            for path, (file, ctype) in _STATIC.items()
        }
        self._waiting: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._idle_threads = 0  # threads waiting on _waiting, less the connections put there
        self._idle_lock = threading.Lock()
        self._closed = False
        super().__init__(address, PadHandler, bind_and_activate=bind)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to an idle thread, or start one (see the class docstring)."""
        with self._idle_lock:
            if self._idle_threads:
                self._idle_threads -= 1
                self._waiting.put((request, client_address))
                return
        threading.Thread(
            target=self._serve_connections, args=(request, client_address), daemon=True
        ).start()

    def _serve_connections(self, request: Any, client_address: Any) -> None:
        """Serve this connection, then the ones handed over while idle (none: return)."""
        while True:
            self.process_request_thread(request, client_address)  # errors: handle_error
            with self._idle_lock:
                if self._closed:
                    return
                self._idle_threads += 1
            try:
                handed = self._waiting.get(timeout=IDLE_THREAD_S)
            except queue.Empty:
                with self._idle_lock:  # one may have been handed over since the timeout
                    try:
                        handed = self._waiting.get_nowait()
                    except queue.Empty:
                        self._idle_threads -= 1
                        return
            if handed is None:  # server_close
                return
            request, client_address = handed

    def server_close(self) -> None:
        """Close the socket and let the idle threads go."""
        super().server_close()
        with self._idle_lock:
            self._closed = True
            for _ in range(self._idle_threads):
                self._waiting.put(None)
            self._idle_threads = 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (reset, broken pipe) is one log line; any other error
        escaping a handler is logged with its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            log.info("client %s:%s went away: %s", *client_address[:2], type(error).__name__)
        else:
            log.exception("error serving %s:%s", *client_address[:2])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def models_payload(self) -> dict[str, Any]:
        return {
            "models": [m.describe() for m in self.models.values()],
            "default": next(iter(self.models)),
            "limits": {
                "max_body_bytes": MAX_BODY_BYTES,
                "max_strokes": MAX_STROKES,
                "max_points": MAX_POINTS,
            },
        }


class PadHandler(BaseHTTPRequestHandler):
    """Routes: ``/`` and ``/static/*`` (the page), ``/api/models``, ``/api/predict``."""

    server: PadServer
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries Content-Length
    server_version = f"hwexp-serve/{__version__}"
    disable_nagle_algorithm = True  # a response leaves at once (no 40 ms delayed-ACK wait)
    wbufsize = 64 * 1024  # headers and body are one send, flushed after each request
    timeout = 30  # seconds a connection may stay silent

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _get(self) -> None:
        path = urlsplit(self.path).path
        if path == "/api/models":
            self._send_json(200, self.server.models_payload())
        elif path in self.server.static:
            body, ctype = self.server.static[path]
            self._send(200, body, ctype, {"Cache-Control": "no-cache"})
        elif path == "/api/predict":
            raise ApiError(405, "use POST for /api/predict")
        else:
            raise ApiError(404, f"no such path {path!r}")

    def _post(self) -> None:
        path = urlsplit(self.path).path
        if path != "/api/predict":
            self.close_connection = True  # its body, unread, must not pass for the next request
            raise ApiError(
                405 if path in self.server.static or path == "/api/models" else 404,
                f"POST {path!r} is not served; POST /api/predict",
            )
        payload = parse_json(self._read_body())
        self._send_json(200, predict(self.server.models, payload))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "chunked bodies are not accepted; send a Content-Length")
        declared = self.headers.get_all("Content-Length") or []
        if len(declared) != 1 or not re.fullmatch(r"[0-9]{1,12}", declared[0].strip()):
            self.close_connection = True  # where the body ends is unknown
            if not declared:
                raise ApiError(411, "a Content-Length header is required")
            raise ApiError(400, f"bad Content-Length {', '.join(declared)!r}: send one, digits")
        length = int(declared[0])
        if length > MAX_BODY_BYTES:
            self._drain(length)
            raise ApiError(413, f"request body of {length} bytes; at most {MAX_BODY_BYTES}")
        return self._receive(length)

    def _receive(self, length: int, keep: bool = True) -> bytes:
        """The next ``length`` bytes of the body (discarded unless ``keep``), all of them within
        :data:`BODY_TIMEOUT_S` seconds, so that a client announcing more than it sends holds a
        thread no longer.

        Raises:
            ApiError: 408 the bytes did not arrive in time; 400 the client stopped sending.
        """
        parts, left = [], length
        deadline = time.monotonic() + BODY_TIMEOUT_S
        try:
            while left > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    raise ApiError(
                        400,
                        f"request body ended after {length - left} of the {length} bytes its "
                        "Content-Length announced",
                    )
                left -= len(chunk)
                if keep:
                    parts.append(chunk)
        except TimeoutError:
            raise ApiError(
                408,
                f"request body incomplete: {length - left} of the {length} bytes its "
                f"Content-Length announced arrived within {BODY_TIMEOUT_S:g} s",
            ) from None
        finally:
            if left > 0:
                self.close_connection = True  # the rest of the body must not pass for a request
            self.connection.settimeout(self.timeout)
        return b"".join(parts)

    def _drain(self, length: int) -> None:
        """Read away an oversized body (up to a limit, within the body time limit) so the client
        sees the answer rather than a reset connection; the connection is closed afterwards."""
        self.close_connection = True
        with contextlib.suppress(ApiError):
            self._receive(min(length, _DRAIN_LIMIT), keep=False)

    def _guarded(self, route: Any) -> None:
        """Run ``route``; refusals and faults become JSON errors, never a dead server."""
        try:
            route()
        except ApiError as error:
            self._send_json(error.status, {"error": error.message})
        except (ConnectionError, TimeoutError):
            raise  # the client went away: PadServer.handle_error logs one line
        except Exception as error:
            log.exception("error answering %s %s", self.command, self.path)
            self._send_json(500, {"error": f"server error: {type(error).__name__}: {error}"})

    def _send_json(self, status: int, payload: Mapping[str, Any]) -> None:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", {"Cache-Control": "no-store"})

    def _send(self, status: int, body: bytes, ctype: str, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if status == 405:
            self.send_header("Allow", "POST" if "predict" in self.path else "GET")
        for key, value in {**_SECURITY_HEADERS, **headers}.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, unsupported method) as JSON."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        with contextlib.suppress(ConnectionError, TimeoutError):
            self._send_json(code, {"error": text})

    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):  # called for every request: format only if logged
            log.debug("%s %s", self.address_string(), format % args)


def listen(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket as :class:`PadServer` binds one (address reuse, backlog
    :data:`REQUEST_QUEUE_SIZE`), for worker processes to share (hwexp.serve.workers)."""
    sock = socket.socket(PadServer.address_family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(REQUEST_QUEUE_SIZE)
    except OSError:
        sock.close()
        raise
    return sock


def make_server(
    models: Sequence[Recognizer], host: str = "127.0.0.1", port: int = 8000
) -> PadServer:
    """A ready, not yet serving server (``port=0``: an ephemeral port; see ``server.url``)."""
    return PadServer((host, port), models)
