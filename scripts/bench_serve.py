"""Latency of the drawing pad's ``POST /api/predict`` under load: strokes in, top-5 out, over
loopback.

Starts ``python -m hwexp.serve --workers N`` as a subprocess on an ephemeral 127.0.0.1 port and
fires ``--requests`` requests from ``--clients`` concurrent closed-loop clients, in two modes:
``keepalive`` (each client keeps one connection) and ``new`` (a new TCP connection per request,
as simple scripts and some proxies do). Requests cycle through KanjiVG-drawn あいうえお on a
400 px canvas (every stroke point, ~100-300 points per character). Reports per mode the
client-side latency (request sent -> JSON answer parsed) p50/p90/p99/max, the server's own
``ms``, throughput, errors (resets, timeouts, non-200 answers: counted, never fatal) and the CPU
time per request of the server (all its processes) and of the load generator, and the cores
other processes kept busy meanwhile (on Linux; they compete with the server). Each mode stops
after ``--requests`` or ``--max-seconds``, whichever comes first; requests go only to 127.0.0.1.

The load generator shares the machine with the server, so it is made cheap: plain non-blocking
sockets on one asyncio event loop, requests encoded once, answers parsed only as far as the
checks need (measured on 2 cores: 0.10 ms of CPU per keep-alive request, 0.18 ms with a new
connection; ``http.client`` in 16 threads took 0.21-0.38 and 0.28 ms). Several ``--workers``
values and ``--rounds`` alternate, so that each is measured under the same background load.

Model: ``--model FILE.onnx`` (or any ``hwexp.serve`` model option after ``--``); without one,
a debug model (5 hiragana) is trained and exported into a temporary folder first (~1 min).

    python scripts/bench_serve.py                                  # train a debug model first
    python scripts/bench_serve.py --model outputs/exports/<run>/hiragana75-synthetic.onnx
    python scripts/bench_serve.py --model m.onnx --workers 1 2 --rounds 3   # A/B, alternated
    python scripts/bench_serve.py --model m.onnx --clients 1 --mode keepalive   # one client
    python scripts/bench_serve.py -- --registered hiragana75-synthetic --tracking-uri sqlite:///...
"""

from __future__ import annotations

import argparse
import asyncio
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
    printed = ""
    for line in process.stdout or ():  # the served models' table, then the URL
        printed += line
        match = re.search(r"drawing pad at http://([\d.]+):(\d+)/", line)
        if match:
            return process, match.group(1), int(match.group(2))
    process.kill()
    raise SystemExit(f"the server did not start: {printed!r}")


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


MODES = {"keepalive": True, "new": False}
REQUEST_TIMEOUT_S = 30.0


class Stats:
    """Per-mode outcome counters, filled by the clients."""

    def __init__(self) -> None:
        self.client_ms: list[float] = []
        self.server_ms: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.correct = 0


async def exchange(sock: socket.socket, request: bytes) -> tuple[int, bytes, bool]:
    """Send one prepared request on non-blocking ``sock``; ``(status, body, the server closes
    the connection)``. Raises ConnectionError if the server closes it before answering."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, request)
    received = b""
    while b"\r\n\r\n" not in received:
        received += await _receive(loop, sock)
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = dict(line.lower().split(":", 1) for line in lines[1:] if ":" in line)
    length = int(fields["content-length"])
    while len(body) < length:
        body += await _receive(loop, sock)
    return status, body, fields.get("connection", "").strip() == "close"


async def _receive(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    data = await loop.sock_recv(sock, 65536)
    if not data:
        raise ConnectionResetError("the server closed the connection before answering")
    return data


async def connect(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def load(
    host: str,
    port: int,
    requests: Sequence[bytes],
    expected: Sequence[str],
    count: int,
    warmup: int,
    keepalive: bool,
    clients: int,
    deadline: float,
) -> tuple[Stats, float]:
    """``clients`` closed-loop clients (each sends its next request when the last is answered)
    sharing ``warmup + count`` requests; returns the stats of the ``count`` and the wall time
    from the first of them to the last answer. Plain non-blocking sockets on the event loop:
    asyncio's streams and ``wait_for`` tasks cost more CPU than the server's parsing."""
    stats, issued, started = Stats(), iter(range(warmup + count)), []

    async def client() -> None:
        sock = None
        for i in issued:
            if time.monotonic() > deadline:
                break
            if i == warmup:
                started.append(time.perf_counter())
            start = time.perf_counter()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    if sock is None:
                        sock = await connect(host, port)
                    status, body, closing = await exchange(sock, requests[i % len(requests)])
                answer = json.loads(body)
                elapsed = (time.perf_counter() - start) * 1000.0
                outcome = "ok" if status == 200 else f"HTTP {status}"
            except (OSError, TimeoutError, ValueError, KeyError, IndexError) as error:
                outcome, closing = type(error).__name__, True
            if sock is not None and (closing or not keepalive):
                sock.close()
                sock = None
            if i < warmup:
                continue
            if outcome != "ok":
                stats.errors[outcome] += 1
                continue
            stats.client_ms.append(elapsed)
            stats.server_ms.append(answer["ms"])
            stats.correct += answer["candidates"][0]["char"] == expected[i % len(expected)]
        if sock is not None:
            sock.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return stats, time.perf_counter() - started[0] if started else float("nan")


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of process ``pid`` and its living descendants (Linux
    ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for child in children:
        total += process_cpu_s(int(child)) or 0.0
    return total


def machine_busy_s() -> float | None:
    """CPU seconds all processes of the machine have used since boot (Linux ``/proc/stat``;
    None elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run(
    host: str,
    port: int,
    model: str,
    count: int,
    warmup: int,
    keepalive: bool,
    clients: int = 1,
    max_seconds: float = 60.0,
    server_pid: int | None = None,
) -> dict:
    """Fire ``warmup`` requests, then ``count`` from ``clients`` concurrent clients (at most
    ``max_seconds``); latency figures (ms), errors and CPU cost of the ``count``, and how many
    cores other processes kept busy meanwhile (they compete with the server)."""
    objects = payloads()
    requests = []
    for payload in objects:
        body = json.dumps({**payload, "model": model}).encode()
        head = (
            f"POST /api/predict HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        requests.append(head.encode() + body)
    server_cpu = process_cpu_s(server_pid) if server_pid else None
    client_cpu, busy, began = time.process_time(), machine_busy_s(), time.monotonic()
    stats, wall = asyncio.run(
        load(
            host,
            port,
            requests,
            CHARS,
            count,
            warmup,
            keepalive,
            clients,
            time.monotonic() + max_seconds,
        )
    )
    client_cpu = time.process_time() - client_cpu
    others = None
    if server_cpu is not None:
        server_cpu = process_cpu_s(server_pid) - server_cpu
        if busy is not None:
            others = machine_busy_s() - busy - server_cpu - client_cpu
            others = round(max(0.0, others) / (time.monotonic() - began), 2)
    answered = len(stats.client_ms)
    done = answered + sum(stats.errors.values())
    sent = done + warmup  # the CPU figures cover the warm-up too

    def per_request_ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1000.0 / max(1, sent), 2)

    client, server = np.array(stats.client_ms or [np.nan]), np.array(stats.server_ms or [np.nan])
    return {
        "mode": "keepalive" if keepalive else "new",
        "clients": clients,
        "requests": done,
        "errors": sum(stats.errors.values()),
        "error_kinds": dict(stats.errors),
        "points_per_request": [sum(len(s) for s in p["strokes"]) for p in objects],
        "client_ms": {
            q: round(float(np.percentile(client, int(q[1:]))), 2) for q in ("p50", "p90", "p99")
        }
        | {"max": round(float(client.max()), 2), "mean": round(float(client.mean()), 2)},
        "server_ms": {
            q: round(float(np.percentile(server, int(q[1:]))), 2) for q in ("p50", "p99")
        },
        "requests_per_s": round(done / wall, 1),
        "cpu_ms_per_request": {
            "load_generator": per_request_ms(client_cpu),
            "server": per_request_ms(server_cpu),
        },
        "other_processes_cores": others,
        "top1_correct": round(stats.correct / max(1, answered), 3),
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


def summary(runs: Sequence[dict]) -> str:
    """One line per run and mode: the figures to compare."""
    lines = [
        "workers round mode       errors   p50    p90    p99    max  req/s  cpu ms/req: "
        "server load-generator  other processes (cores)"
    ]
    for run_ in runs:
        for mode in MODES:
            if mode not in run_:
                continue
            r, ms, cpu = run_[mode], run_[mode]["client_ms"], run_[mode]["cpu_ms_per_request"]
            lines.append(
                f"{run_['workers']:>7} {run_['round']:>5} {mode:<10} {r['errors']:>6} "
                f"{ms['p50']:>5.1f} {ms['p90']:>6.1f} {ms['p99']:>6.1f} {ms['max']:>6.1f} "
                f"{r['requests_per_s']:>6.0f}  {_or_nan(cpu['server']):>17.2f} "
                f"{cpu['load_generator']:>14.2f} {_or_nan(r['other_processes_cores']):>6.2f}"
            )
    return "\n".join(lines)


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an exported .onnx (default: train a debug model)")
    parser.add_argument("--requests", type=int, default=800, help="per mode (default 800)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[2],
        metavar="N",
        help="hwexp.serve --workers; several values are measured in turn (default 2)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat every --workers value this often (1)"
    )
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
        report: dict = {"machine": machine(), "runs": []}
        for round_ in range(1, args.rounds + 1):
            for workers in args.workers:
                workers_option = ["--workers", str(workers)] if workers > 1 else []
                process, host, port = start_server([*model_args, *workers_option])
                try:
                    connection = http.client.HTTPConnection(host, port, timeout=30)
                    connection.request("GET", "/api/models")
                    report["model"] = json.loads(connection.getresponse().read())["default"]
                    connection.close()
                    measured: dict = {"workers": workers, "round": round_}
                    for mode in modes:
                        load_average = os.getloadavg()[0]
                        measured[mode] = run(
                            host,
                            port,
                            report["model"],
                            args.requests,
                            args.warmup,
                            MODES[mode],
                            args.clients,
                            args.max_seconds,
                            process.pid,
                        )
                        measured[mode]["load_average_1m"] = round(load_average, 2)
                    report["runs"].append(measured)
                finally:
                    process.terminate()
                    process.wait(10)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    print(summary(report["runs"]), file=sys.stderr)


if __name__ == "__main__":
    main()
