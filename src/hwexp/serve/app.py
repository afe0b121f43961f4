"""The drawing pad's HTTP server: the page, its static files and a small JSON API.

Built on the standard library alone: three routes need no framework. One :mod:`asyncio` event
loop per process reads every connection (HTTP/1.1, keep-alive and pipelining) and recognises
each request on its own thread as soon as it is complete; one process uses one CPU core, and
``--workers N`` runs N processes on one port (:mod:`hwexp.serve.workers`).

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
``Content-Length``, a malformed request line or header), 404 unknown model or path, 405 wrong
method, 408 a body that does not arrive within :data:`BODY_TIMEOUT_S`, 411 no ``Content-Length``
or a chunked body, 413 body over :data:`MAX_BODY_BYTES`, 414/431 a request line or headers
over :data:`MAX_HEAD_BYTES`, 422 an empty drawing (no points, or no ink), 500 a server fault
(the server keeps serving), 501 a method other than GET, HEAD and POST, 505 HTTP/2 or later.

Under load
----------
The listen backlog is :data:`REQUEST_QUEUE_SIZE` (the standard library's 5 drops connections
when many clients connect at once), and every request's work is bounded: body size, body read
time, head size, JSON nesting, strokes and points, and picture pixels (checked from the image
header before decoding; large JPEGs are decoded reduced). A client that goes away mid-request
costs one log line, not a traceback; a silent one is closed after :data:`IDLE_TIMEOUT_S`.
Figures: ``scripts/bench_serve.py`` and docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import email.utils
import json
import logging
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
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
BODY_TIMEOUT_S = 5.0  # s for the whole body: a lying Content-Length is answered 408
REQUEST_QUEUE_SIZE = 1024  # listen backlog (the kernel caps it at net.core.somaxconn)
MAX_STROKES = 500
MAX_POINTS = 20_000  # over all strokes
MAX_CANVAS = 10_000  # px, either side
MAX_COORDINATE = 1e6  # px, |x| and |y| (points off the canvas are allowed, not drawn)
IDLE_TIMEOUT_S = 30.0  # s a connection may stay silent between requests
MAX_HEAD_BYTES = 64 * 1024  # request line and header fields
MAX_HEADERS = 100
ACCEPT_BATCH = 16  # connections taken per wake-up of the listening socket
ACCEPT_PAUSE_S = 0.5  # accept() failed (out of file descriptors): try again after this
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

_REASONS = {status.value: status.phrase for status in HTTPStatus}
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_SERVER = f"hwexp-serve/{__version__}"


@dataclass
class _Request:
    """A request whose head has been read: what it asks for and how its body is framed."""

    method: str
    target: str
    path: str
    version: tuple[int, int]
    headers: dict[str, list[str]]  # lower-case names
    keep_alive: bool
    length: int = 0  # body bytes that follow the head
    keep_body: bool = True  # False: read away (an oversized body), then answer ``refusal``
    refusal: ApiError | None = None
    received: int = 0  # of them


class PadServer:
    """The drawing pad's server: one event loop (:mod:`asyncio`), run by the thread that calls
    :meth:`serve_forever`, reads every connection; complete requests are answered on that
    thread one at a time, in the order they arrived (:meth:`_answer_next`).

    Threads do not help here: one process runs Python one thread at a time, and 16 connection
    threads spent 3.8 ms of CPU per request (contending for the interpreter lock) against
    2.2 ms for one. A slow client holds nothing but its buffer: bodies are read as they arrive,
    within :data:`BODY_TIMEOUT_S`. One process uses one core: ``--workers N`` runs N
    (:mod:`hwexp.serve.workers`).
    """

    def __init__(self, models: Sequence[Recognizer], listener: socket.socket) -> None:
        """Serve ``models`` (by name, in menu order) on the bound, listening ``listener``."""
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
        self.socket = listener
        self.server_address = listener.getsockname()
        self.open_connections = 0  # accepted and not yet closed
        self._connections: set[_Connection] = set()
        self._loop = asyncio.new_event_loop()
        self._requests: collections.deque[tuple[_Connection, _Request, bytes]] = collections.deque()
        self._stopped = threading.Event()  # serve_forever is not running
        self._stopped.set()
        self._date = (0, "")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def serve_forever(self) -> None:
        """Serve on the calling thread until :meth:`shutdown` (from another thread) or an
        exception (Ctrl+C) stops the loop; open connections are then dropped."""
        self._stopped.clear()
        loop, fd = self._loop, self.socket.fileno()
        self.socket.setblocking(False)  # accept() fails at once when another worker took it
        loop.add_reader(fd, self._accept)
        try:
            loop.run_forever()
        finally:
            loop.remove_reader(fd)
            for connection in list(self._connections):
                connection.transport.abort()
            self._requests.clear()
            loop.run_until_complete(asyncio.sleep(0))  # their connection_lost callbacks
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` and wait until it has returned (thread-safe)."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._stopped.wait()

    def server_close(self) -> None:
        """Close the listening socket and the event loop (not while serving)."""
        self.socket.close()
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()

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

    def date(self) -> str:
        """The ``Date`` header's value, formatted once a second."""
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, email.utils.formatdate(now, usegmt=True))
        return self._date[1]

    def _queue_request(self, connection: _Connection, request: _Request, body: bytes) -> None:
        """Answer ``request`` after those queued before it."""
        self._requests.append((connection, request, body))
        if len(self._requests) == 1:
            self._answer_after_poll()

    def _answer_after_poll(self) -> None:
        # Two hops: the callbacks of what the loop's next poll finds run before the answer
        # (one hop would run ahead of them), so their requests queue first.
        self._loop.call_soon(self._loop.call_soon, self._answer_next)

    def _answer_next(self) -> None:
        """Answer the oldest queued request. One per loop iteration, with a poll for new
        arrivals between: requests are answered in the order they arrived, whichever
        connection they came on (answering every ready connection in the poll's order made
        some requests wait two rounds: p99 twice p50 with 16 keep-alive clients)."""
        connection, request, body = self._requests.popleft()
        if self._requests:
            self._answer_after_poll()
        connection.answer_queued(request, body)

    def _accept(self) -> None:
        """The listening socket is readable: take the connections waiting, a batch at most."""
        for _ in range(ACCEPT_BATCH):
            if not self._take_connection():
                return

    def _take_connection(self) -> bool:
        """Accept one connection and start reading it; False if none was waiting."""
        try:
            sock, address = self.socket.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as error:  # out of file descriptors, say: pause rather than spin
            log.warning("cannot accept connections for %g s: %s", ACCEPT_PAUSE_S, error)
            self._pause_accepting(ACCEPT_PAUSE_S)
            return False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no delayed-ACK wait
        self._connection_count(1)
        started = self._loop.connect_accepted_socket(lambda: _Connection(self, address), sock)
        self._loop.create_task(started).add_done_callback(self._started)
        return True

    def _started(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:  # closed before it started
            self._connection_count(-1)

    def _pause_accepting(self, seconds: float) -> None:
        fd = self.socket.fileno()
        self._loop.remove_reader(fd)
        self._loop.call_later(seconds, self._loop.add_reader, fd, self._accept)

    def _connection_count(self, change: int) -> None:
        self.open_connections += change


class _Connection(asyncio.Protocol):
    """One client connection: its bytes parsed into HTTP/1.1 requests, answered in order
    (pipelined requests included). Routes: ``/`` and ``/static/*`` (the page),
    ``/api/models``, ``/api/predict``."""

    def __init__(self, server: PadServer, address: Any) -> None:
        self.server = server
        self.address = address
        self.transport: asyncio.Transport
        self.buffer = bytearray()
        self.request: _Request | None = None  # head read, body still arriving
        self.timer: asyncio.TimerHandle | None = None
        self.queued = False  # a complete request waits in the server's queue
        self.eof = False  # the client sent all it will send
        self.closing = False

    # asyncio's callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server._connections.add(self)
        self._await_request()

    def connection_lost(self, error: Exception | None) -> None:
        self.server._connections.discard(self)
        self.server._connection_count(-1)
        self._cancel_timer()
        if error is not None:  # reset, broken pipe
            log.info("client %s:%s went away: %s", *self.address[:2], type(error).__name__)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.buffer += data
        self._continue()

    def eof_received(self) -> bool:
        self.eof = True
        self._continue()
        return True  # the transport stays open for the answers; _continue closes it

    def pause_writing(self) -> None:  # a client not reading its answers: stop reading it
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    # reading requests

    def _continue(self) -> None:
        """Read on: queue the next complete request for an answer (one at a time, so that
        answers go out in order); at the end of the client's data, close once answered."""
        if self.closing or self.queued:
            return
        try:
            self._advance()
        except Exception:  # a bug here must not take the server down: drop this connection
            log.exception("error reading a request from %s:%s", *self.address[:2])
            self.closing = True
            self.transport.abort()
            return
        if self.eof and not self.queued and not self.closing:
            request = self.request
            if request is not None:  # the client stopped before the end of its body
                message = (
                    f"request body ended after {request.received} of the {request.length} "
                    "bytes its Content-Length announced"
                )
                self._refuse(ApiError(400, message), request)
            else:
                self.closing = True
                self.transport.close()

    def _advance(self) -> None:
        """Parse the buffer up to the end of the next request; queue it once complete."""
        if self.request is None:
            self.request = self._read_head()
            if self.request is None:
                return
            self._cancel_timer()
            try:
                self._frame_body(self.request)
            except ApiError as error:  # the connection closes: where the next request starts
                self._refuse(error, self.request)  # is unknown
                return
        request = self.request
        if request.keep_body:
            request.received = min(request.length, len(self.buffer))
        else:
            take = min(request.length - request.received, len(self.buffer))
            del self.buffer[:take]
            request.received += take
        if request.received < request.length:
            if self.timer is None:
                self.timer = self.server._loop.call_later(BODY_TIMEOUT_S, self._body_late)
            return
        self._cancel_timer()
        body = b""
        if request.keep_body:
            body = bytes(self.buffer[: request.length])
            del self.buffer[: request.length]
        self.request = None
        self.queued = True
        self.server._queue_request(self, request, body)

    def answer_queued(self, request: _Request, body: bytes) -> None:
        """Answer a request this connection queued, then read on."""
        self.queued = False
        if self.closing or self.transport.is_closing():
            return
        self._answer(request, body)
        if not self.closing:
            self._await_request()
            self._continue()

    def _read_head(self) -> _Request | None:
        """The next request's line and headers, once all arrived (None: not yet, or refused)."""
        while self.buffer[:2] == b"\r\n" or self.buffer[:1] == b"\n":  # blank lines between
            del self.buffer[: 2 if self.buffer[:1] == b"\r" else 1]
        end = _HEAD_END.search(self.buffer, 0, MAX_HEAD_BYTES + 4)
        if end is None:
            if len(self.buffer) > MAX_HEAD_BYTES:
                line_ends = b"\n" in self.buffer[:MAX_HEAD_BYTES]
                self._refuse(
                    ApiError(431, f"request headers over {MAX_HEAD_BYTES} bytes")
                    if line_ends
                    else ApiError(414, f"request line over {MAX_HEAD_BYTES} bytes")
                )
            return None
        head = bytes(self.buffer[: end.start()])
        del self.buffer[: end.end()]
        try:
            return _parse_head(head)
        except ApiError as error:
            self._refuse(error)
            return None

    def _frame_body(self, request: _Request) -> None:
        """Decide how much body follows the head.

        Raises:
            ApiError: a body that cannot be framed, or a POST to a path not served.
        """
        headers = request.headers
        if request.method == "POST" and request.path != "/api/predict":
            # The body, unread, must not pass for the next request: the connection closes.
            served = request.path in self.server.static or request.path == "/api/models"
            raise ApiError(
                405 if served else 404,
                f"POST {request.path!r} is not served; POST /api/predict",
            )
        if "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
            raise ApiError(411, "chunked bodies are not accepted; send a Content-Length")
        declared = headers.get("content-length", [])
        if not declared:
            if request.method == "POST":
                raise ApiError(411, "a Content-Length header is required")
            return  # GET and HEAD: no body
        if len(declared) != 1 or not re.fullmatch(r"[0-9]{1,12}", declared[0].strip()):
            raise ApiError(400, f"bad Content-Length {', '.join(declared)!r}: send one, digits")
        length = int(declared[0])
        if length > MAX_BODY_BYTES:  # read away (up to a limit), so the client sees the answer
            request.keep_body, request.keep_alive = False, False
            request.refusal = ApiError(
                413, f"request body of {length} bytes; at most {MAX_BODY_BYTES}"
            )
            length = min(length, _DRAIN_LIMIT)
        expect = ",".join(headers.get("expect", [])).strip().lower()
        if expect and length:
            if expect != "100-continue":
                raise ApiError(417, f"cannot meet the expectation {expect!r}")
            if request.version >= (1, 1) and request.keep_body:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.length = length

    def _body_late(self) -> None:
        """The body did not arrive within :data:`BODY_TIMEOUT_S`: answer and close."""
        self.timer = None
        request = self.request
        if request is None or self.closing:
            return
        if not request.keep_body:
            self._refuse(request.refusal, request)
            return
        self._refuse(
            ApiError(
                408,
                f"request body incomplete: {request.received} of the "
                f"{request.length} bytes its Content-Length announced "
                f"arrived within {BODY_TIMEOUT_S:g} s",
            ),
            request,
        )

    def _await_request(self) -> None:
        """Wait for the next request's head at most :data:`IDLE_TIMEOUT_S`, then close."""
        self._cancel_timer()
        self.timer = self.server._loop.call_later(IDLE_TIMEOUT_S, self._idle)

    def _idle(self) -> None:
        self.timer = None
        self.closing = True
        self.transport.close()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # answering

    def _answer(self, request: _Request, body: bytes) -> None:
        """Route one complete request; refusals and faults become JSON errors."""
        if request.refusal is not None:
            self._refuse(request.refusal, request)
            return
        try:
            if request.method == "POST":
                answer = predict(self.server.models, parse_json(body))
                self._send_json(request, 200, answer)
            else:
                self._get(request)
        except ApiError as error:
            self._send_json(request, error.status, {"error": error.message})
        except Exception as error:
            log.exception("error answering %s %s", request.method, request.target)
            message = f"server error: {type(error).__name__}: {error}"
            self._send_json(request, 500, {"error": message})

    def _get(self, request: _Request) -> None:
        path = request.path
        if path == "/api/models":
            self._send_json(request, 200, self.server.models_payload())
        elif path in self.server.static:
            body, ctype = self.server.static[path]
            self._send(request, 200, body, ctype, {"Cache-Control": "no-cache"})
        elif path == "/api/predict":
            raise ApiError(405, "use POST for /api/predict")
        else:
            raise ApiError(404, f"no such path {path!r}")

    def _refuse(self, error: ApiError, request: _Request | None = None) -> None:
        """Answer ``error`` and close the connection (where the next request starts is
        unknown, or the client must not wait for more)."""
        if request is not None:
            request.keep_alive = False
        else:
            request = _Request("GET", "", "", (1, 1), {}, keep_alive=False)
        self.request = None
        self._send_json(request, error.status, {"error": error.message})

    def _send_json(self, request: _Request, status: int, payload: Mapping[str, Any]) -> None:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        ctype = "application/json; charset=utf-8"
        self._send(request, status, body, ctype, {"Cache-Control": "no-store"})

    def _send(
        self, request: _Request, status: int, body: bytes, ctype: str, headers: Mapping[str, str]
    ) -> None:
        """One response, head and body in one write; the connection closes after it unless
        the request keeps it alive."""
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}",
            f"Server: {_SERVER}",
            f"Date: {self.server.date()}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
        ]
        if status == 405:
            lines.append(f"Allow: {'POST' if 'predict' in request.path else 'GET, HEAD'}")
        lines += [f"{key}: {value}" for key, value in {**_SECURITY_HEADERS, **headers}.items()]
        if not request.keep_alive:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if not self.transport.is_closing():
            self.transport.write(head if request.method == "HEAD" else head + body)
        if not request.keep_alive:
            self.closing = True
            self._cancel_timer()
            self.transport.close()  # once what is queued has been sent


def _parse_head(head: bytes) -> _Request:
    """The request line and header fields of ``head`` (its blank line excluded).

    Raises:
        ApiError: 400 malformed, 431 too many fields, 501 a method not served, 505 HTTP/2+.
    """
    lines = head.split(b"\n")
    request_line = lines[0].rstrip(b"\r")
    parts = request_line.split()
    if len(parts) != 3:
        raise ApiError(400, f"bad request line {request_line[:200]!r}")
    method, target, version_text = parts
    version = _VERSION.fullmatch(version_text)
    if version is None or version.group(1) == b"0":
        raise ApiError(400, f"bad request version {version_text[:20]!r}")
    if version.group(1) != b"1":
        raise ApiError(505, f"HTTP version {version_text.decode()} is not supported; use 1.1")
    if not _TOKEN.fullmatch(method):
        raise ApiError(400, f"bad request method {method[:20]!r}")
    if method not in (b"GET", b"HEAD", b"POST"):
        raise ApiError(501, f"unsupported method {method.decode()!r}: GET, HEAD or POST")
    if len(lines) - 1 > MAX_HEADERS:
        raise ApiError(431, f"more than {MAX_HEADERS} header fields")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):  # folded lines included (obsolete)
            raise ApiError(400, f"bad header field {line[:100]!r}")
        headers.setdefault(name.decode("ascii").lower(), []).append(
            value.strip(b" \t").decode("latin-1")
        )
    target_text = target.decode("latin-1")
    try:
        path = urlsplit(target_text).path
    except ValueError:
        raise ApiError(400, f"bad request target {target_text[:200]!r}") from None
    major_minor = (1, int(version.group(2)))
    options = {o.strip().lower() for o in ",".join(headers.get("connection", [])).split(",")}
    keep_alive = "close" not in options if major_minor >= (1, 1) else "keep-alive" in options
    return _Request(method.decode(), target_text, path, major_minor, headers, keep_alive)


def listen(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket (address reuse, backlog :data:`REQUEST_QUEUE_SIZE`); worker
    processes share one (hwexp.serve.workers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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
    return PadServer(models, listen(host, port))
