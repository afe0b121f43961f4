"""Latency of the drawing pad's ``POST /api/predict`` under load: strokes in, top-5 out, over
loopback.

Starts ``python -m hwexp.serve`` as a subprocess on an ephemeral 127.0.0.1 port and fires
``--requests`` requests from ``--clients`` concurrent clients (threads of this process), in two
modes: ``keepalive`` (each client keeps one connection) and ``new`` (a new TCP connection per
request, as simple scripts and some proxies do). Requests cycle through KanjiVG-drawn あいうえお
on a 400 px canvas (every stroke point, ~100-300 points per character). Reports per mode the
client-side latency (request sent -> JSON answer parsed) p50/p90/p99/max, the server's own
``ms``, throughput and errors (resets, timeouts, non-200 answers: counted, never fatal). Each
mode stops after ``--requests`` or ``--max-seconds``, whichever comes first; requests go only to
127.0.0.1.

Model: ``--model FILE.onnx`` (or any ``hwexp.serve`` model option after ``--``); without one,
a debug model (5 hiragana) is trained and exported into a temporary folder first (~1 min).

    python scripts/bench_serve.py                                  # train a debug model first
    python scripts/bench_serve.py --model outputs/exports/<run>/hiragana75-synthetic.onnx
    python scripts/bench_serve.py --model m.onnx --clients 1 --mode keepalive   # one client
    python scripts/bench_serve.py -- --registered hiragana75-synthetic --tracking-uri sqlite:///...
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
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


MODES = {"keepalive": True, "new": False}


def run(
    host: str,
    port: int,
    model: str,
    count: int,
    warmup: int,
    keepalive: bool,
    clients: int = 1,
    max_seconds: float = 60.0,
) -> dict:
    """Fire ``warmup`` requests, then ``count`` from ``clients`` concurrent clients (at most
    ``max_seconds``); latency figures (ms) and errors of the ``count``."""
    requests = payloads()
    encoded = [json.dumps({**p, "model": model}).encode() for p in requests]
    headers = {"Content-Type": "application/json"}
    lock = threading.Lock()
    issued = iter(range(warmup + count))
    client_ms: list[float] = []
    server_ms: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    correct = 0
    start_at: list[float] = []
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        nonlocal correct
        connection = None
        while time.monotonic() < deadline:
            with lock:
                i = next(issued, None)
                if i == warmup:
                    start_at.append(time.perf_counter())
            if i is None:
                break
            try:
                if connection is None:
                    connection = NoDelayConnection(host, port, timeout=30)
                start = time.perf_counter()
                connection.request("POST", "/api/predict", encoded[i % len(encoded)], headers)
                response = connection.getresponse()
                answer = json.loads(response.read())
                elapsed = (time.perf_counter() - start) * 1000.0
                outcome = "ok" if response.status == 200 else f"HTTP {response.status}"
            except (OSError, http.client.HTTPException, ValueError) as error:
                outcome, answer = type(error).__name__, None
            if outcome != "ok" or not keepalive or response.will_close:
                connection.close()
                connection = None
            if i < warmup:
                continue
            with lock:
                if outcome != "ok":
                    errors[outcome] += 1
                    continue
                client_ms.append(elapsed)
                server_ms.append(answer["ms"])
                correct += answer["candidates"][0]["char"] == CHARS[i % len(CHARS)]
        if connection is not None:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start_at[0] if start_at else float("nan")
    done = len(client_ms) + sum(errors.values())
    client, server = np.array(client_ms or [np.nan]), np.array(server_ms or [np.nan])
    return {
        "mode": "keepalive" if keepalive else "new",
        "clients": clients,
        "requests": done,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "points_per_request": [sum(len(s) for s in p["strokes"]) for p in requests],
        "client_ms": {
            q: round(float(np.percentile(client, int(q[1:]))), 2) for q in ("p50", "p90", "p99")
        }
        | {"max": round(float(client.max()), 2), "mean": round(float(client.mean()), 2)},
        "server_ms": {
            q: round(float(np.percentile(server, int(q[1:]))), 2) for q in ("p50", "p99")
        },
        "requests_per_s": round(done / wall, 1),
        "top1_correct": round(correct / max(1, len(client_ms)), 3),
    }


def machine() -> dict:
    """The CPU this ran on and how busy it was: the figures depend on both."""
    cpuinfo = Path("/proc/cpuinfo")
    names = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((n.split(":", 1)[1].strip() for n in names if n.startswith("model name")), None)
    return {
        "cpu": model or platform.processor() or "unknown",
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an exported .onnx (default: train a debug model)")
    parser.add_argument("--requests", type=int, default=800, help="per mode (default 800)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument(
        "--max-seconds", type=float, default=30.0, help="per mode, warm-up included (30)"
    )
    parser.add_argument("serve_args", nargs="*", help="hwexp.serve model options, after --")
    args = parser.parse_args(argv)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    with tempfile.TemporaryDirectory(prefix="hwexp-bench-serve-") as tmp:
        model_args = list(args.serve_args)
        if args.model:
            model_args += ["--model", args.model]
        if not model_args:
            model_args = ["--model", str(debug_model(Path(tmp)))]
        report = {"machine": machine()}
        process, host, port = start_server(model_args)
        try:
            connection = http.client.HTTPConnection(host, port, timeout=30)
            connection.request("GET", "/api/models")
            report["model"] = json.loads(connection.getresponse().read())["default"]
            connection.close()
            for mode in modes:
                report[mode] = run(
                    host,
                    port,
                    report["model"],
                    args.requests,
                    args.warmup,
                    MODES[mode],
                    args.clients,
                    args.max_seconds,
                )
        finally:
            process.terminate()
            process.wait(10)
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
