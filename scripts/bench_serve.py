"""Latency of the drawing pad's ``POST /api/predict``: strokes in, top-5 out, over loopback.

Starts ``python -m hwexp.serve`` as a subprocess on an ephemeral 127.0.0.1 port and fires
``--requests`` requests from this process, one at a time over one keep-alive connection (or a
new connection each, ``--new-connections``), cycling through KanjiVG-drawn あいうえお on a
400 px canvas (every stroke point, ~100-300 points per character). Reports client-side latency
(request sent -> JSON answer parsed) p50/p90/p99/max and the server's own ``ms``.

Model: ``--model FILE.onnx`` (or any ``hwexp.serve`` model option after ``--``); without one,
a debug model (5 hiragana) is trained and exported into a temporary folder first (~1 min).

    python scripts/bench_serve.py                                  # train a debug model first
    python scripts/bench_serve.py --model outputs/exports/<run>/hiragana.onnx
    python scripts/bench_serve.py -- --registered hiragana --tracking-uri sqlite:///...
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hwexp.synth.kanjivg import FRAME, load_glyph

CANVAS = 400
CHARS = "あいうえお"


def debug_model(folder: Path) -> Path:
    """Train ``debug=default`` and export it to ONNX under ``folder`` (subprocesses, so this
    process never imports TensorFlow); returns the ``.onnx`` path."""
    env = {**os.environ, "HWEXP_ROOT": str(folder)}
    common = {"cwd": folder, "env": env, "check": True, "stdout": subprocess.DEVNULL}
    print("training and exporting a debug model (about a minute)...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "hwexp", "debug=default", "trainer.verbose=0"], **common)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "hwexp.export",
            "run=best",
            "select.experiment=hwexp-debug",
            "formats=[onnx]",
            "register=false",
        ],
        **common,
    )
    (found,) = sorted((folder / "outputs" / "exports").glob("*/*.onnx"))
    return found


def start_server(model_args: Sequence[str]) -> tuple[subprocess.Popen, str, int]:
    """``(process, host, port)`` of ``python -m hwexp.serve`` once it prints its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "hwexp.serve", *model_args, "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline() if process.stdout else ""
    match = re.search(r"http://([\d.]+):(\d+)/", line)
    if not match:
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return process, match.group(1), int(match.group(2))


def payloads() -> list[dict]:
    """One request object per character of :data:`CHARS` (KanjiVG strokes filling 80% of the
    canvas, every point)."""
    return [
        {
            "strokes": [
                (s / FRAME * CANVAS * 0.8 + CANVAS * 0.1).round(1).tolist()
                for s in load_glyph(char).strokes()
            ],
            "width": CANVAS,
            "height": CANVAS,
        }
        for char in CHARS
    ]


class NoDelayConnection(http.client.HTTPConnection):
    """``http.client`` sends headers and body in two writes; with Nagle's algorithm on, the
    body then waits for the server's delayed ACK (~40 ms). Browsers set TCP_NODELAY: so do we."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def run(host: str, port: int, model: str, count: int, warmup: int, keepalive: bool) -> dict:
    """Fire ``warmup`` + ``count`` requests; latency figures (ms) of the last ``count``."""
    requests = payloads()
    encoded = [json.dumps({**p, "model": model}).encode() for p in requests]
    headers = {"Content-Type": "application/json"}
    connection = NoDelayConnection(host, port, timeout=30)
    client_ms, server_ms, correct = [], [], 0
    for i in range(warmup + count):
        body = encoded[i % len(encoded)]
        start = time.perf_counter()
        connection.request("POST", "/api/predict", body, headers)
        response = connection.getresponse()
        answer = json.loads(response.read())
        elapsed = (time.perf_counter() - start) * 1000.0
        if response.status != 200:
            raise SystemExit(f"request {i}: HTTP {response.status}: {answer}")
        if not keepalive:
            connection.close()
        if i >= warmup:
            client_ms.append(elapsed)
            server_ms.append(answer["ms"])
            correct += answer["candidates"][0]["char"] == CHARS[i % len(CHARS)]
    connection.close()
    client, server = np.array(client_ms), np.array(server_ms)
    return {
        "requests": count,
        "keepalive": keepalive,
        "points_per_request": [sum(len(s) for s in p["strokes"]) for p in requests],
        "client_ms": {
            q: round(float(np.percentile(client, int(q[1:]))), 2) for q in ("p50", "p90", "p99")
        }
        | {"max": round(float(client.max()), 2), "mean": round(float(client.mean()), 2)},
        "server_ms": {
            q: round(float(np.percentile(server, int(q[1:]))), 2) for q in ("p50", "p99")
        },
        "requests_per_s": round(1000.0 / float(client.mean()), 1),
        "top1_correct": correct / count,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an exported .onnx (default: train a debug model)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--new-connections",
        action="store_true",
        help="a new TCP connection per request (default: one keep-alive)",
    )
    parser.add_argument("serve_args", nargs="*", help="hwexp.serve model options, after --")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hwexp-bench-serve-") as tmp:
        model_args = list(args.serve_args)
        if args.model:
            model_args += ["--model", args.model]
        if not model_args:
            model_args = ["--model", str(debug_model(Path(tmp)))]
        process, host, port = start_server(model_args)
        try:
            connection = http.client.HTTPConnection(host, port, timeout=30)
            connection.request("GET", "/api/models")
            model = json.loads(connection.getresponse().read())["default"]
            connection.close()
            result = run(host, port, model, args.requests, args.warmup, not args.new_connections)
        finally:
            process.terminate()
            process.wait(10)
    print(json.dumps({"model": model, **result}, indent=2))


if __name__ == "__main__":
    main()
