"""Benchmark: decode and prepare a full-size ETL9G-format file, hwexp's path vs the article's.

Generates one file of 12,144 format-exact ETL9G records (4 writers x 3,036 classes) in a
temporary folder and prints records/s of:

* reading the file's bytes;
* hwexp decoding alone (structured dtype + vectorised 4-bit unpack);
* hwexp's whole prepare path to 48x48 (decode, contrast stretch, clean-up, crop, resize,
  written to a memory-mapped .npy cache entry), with 1 worker and with every CPU;
* the reference article's path: per-record ``struct.unpack`` + ``Image.frombytes(..., 'bit', 4)``,
  alone and followed by ``skimage.transform.resize`` per image.

Each path runs ``--repeat`` times (a fresh cache entry each time for the prepare paths); the
best run counts and the spread is shown, since other work on the machine slows single runs. The
load average is printed before and after. Also prints the peak resident memory of a child
process that prepares the file, next to the size of the output array.
Usage: ``python scripts/bench_decode.py [--records N] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ETL9G_FORMAT = ">2H8sI4B4H2B34x8128s7x"
RECORD = struct.calcsize(ETL9G_FORMAT)


def make_file(path: Path, records: int) -> None:
    from hwexp.data.charsets import ETL9G_3036, char_to_jis0208

    rng = np.random.default_rng(0)
    shapes = []
    for _ in range(64):  # a pool of stroke images, packed once
        image = Image.new("L", (128, 127), 0)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 9))):
            draw.line(
                rng.integers(15, 112, size=4).tolist(),
                fill=int(rng.integers(9, 16)),
                width=int(rng.integers(3, 7)),
            )
        if rng.random() < 0.3:
            draw.line([0, 5, 30, 4], fill=12, width=3)
        flat = np.asarray(image, np.uint8).ravel()
        shapes.append(bytes((flat[0::2] << 4) | flat[1::2]))
    codes = [char_to_jis0208(c) for c in ETL9G_3036]
    with open(path, "wb") as handle:
        for i in range(records):
            sheet = 1 + i // len(codes)
            handle.write(
                struct.pack(
                    ETL9G_FORMAT,
                    sheet,
                    codes[i % len(codes)],
                    b"KANJI   ",
                    i,
                    0,
                    0,
                    1,
                    30,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    shapes[i % len(shapes)],
                )
            )


def article_records(path: Path, resize: bool, _run: int = 0) -> int:
    from skimage.transform import resize as sk_resize

    count = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(RECORD):
            record = struct.unpack(ETL9G_FORMAT, chunk)
            image = Image.frombytes("F", (128, 127), record[14], "bit", 4).convert("L")
            if resize:
                sk_resize(np.asarray(image), (48, 48))
            count += 1
    return count


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def timed_runs(repeat: int, fn, *args) -> list[float]:
    """Seconds of ``repeat`` runs of ``fn(*args, run_index)``."""
    return [timed(fn, *args, run) for run in range(repeat)]


def prepare(path: Path, cache_dir: Path, workers: int, run: int = 0) -> None:
    """Prepare ``path`` into a new cache entry under ``cache_dir`` (one per workers and run)."""
    from hwexp.data import etl
    from hwexp.data.cache import load_or_prepare
    from hwexp.data.preprocess import PreprocessOptions

    tasks = etl.etl_tasks([path], etl.ETL9G, None)
    load_or_prepare(
        cache_dir,
        "etl9g",
        "all",
        {"bench": str(path), "w": workers, "run": run},
        lambda: tasks,
        PreprocessOptions(),
        workers=workers,
        progress=False,
    )


def child_peak_rss(path: Path, cache_dir: Path, work: bool = True) -> int:
    """Peak RSS (bytes) of a fresh process that imports hwexp's data layer and, if ``work``,
    prepares ``path`` with one worker. VmHWM, not ru_maxrss: the latter survives exec and
    would report this (parent) process's peak."""
    work_line = f"b.prepare(Path({str(path)!r}), Path({str(cache_dir)!r}), 1)" if work else "pass"
    code = "; ".join(
        [
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})",
            "import bench_decode as b",
            "from hwexp.data import cache, etl, preprocess",
            "from pathlib import Path",
            work_line,
            "print([x.split()[1] for x in open('/proc/self/status') if x.startswith('VmHWM')][0])",
        ]
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=12_144)
    parser.add_argument("--repeat", type=int, default=3, help="runs per path; the best counts")
    args = parser.parse_args()
    from hwexp.data import etl
    from hwexp.data.cache import resolve_workers

    n, repeat = args.records, max(1, args.repeat)
    cpus = resolve_workers("auto")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ETL9G_01"
        make_file(path, n)
        os.sync()
        runs = {}
        runs["read bytes"] = timed_runs(repeat, lambda _: path.read_bytes())
        # decoded in the chunks the prepare path uses (warm page cache)
        runs["hwexp decode"] = timed_runs(
            repeat, lambda _: [t.load() for t in etl.etl_tasks([path], etl.ETL9G, None)]
        )
        runs["hwexp prepare, 1 worker"] = timed_runs(repeat, prepare, path, Path(tmp) / "c1", 1)
        runs[f"hwexp prepare, {cpus} workers"] = timed_runs(
            repeat, prepare, path, Path(tmp) / "c2", cpus
        )
        runs["article decode"] = timed_runs(repeat, article_records, path, False)
        runs["article decode + resize"] = timed_runs(repeat, article_records, path, True)
        peak = child_peak_rss(path, Path(tmp) / "c3")
        baseline = child_peak_rss(path, Path(tmp) / "c4", work=False)
    load_after = os.getloadavg()
    results = {name: min(seconds) for name, seconds in runs.items()}
    rates = {name: n / seconds for name, seconds in results.items()}
    print(f"{n} ETL9G records ({n * RECORD / 1e6:.0f} MB), {cpus} CPUs, best of {repeat} runs")
    loads = [", ".join(f"{x:.2f}" for x in load) for load in (load_before, load_after)]
    print(f"load average (1, 5, 15 min): {loads[0]} before, {loads[1]} after")
    print(f"{'path':34s} {'seconds':>8s} {'records/s':>11s}   all runs (records/s)")
    for name, seconds in results.items():
        spread = ", ".join(f"{n / s:,.0f}" for s in runs[name])
        print(f"{name:34s} {seconds:8.2f} {rates[name]:11,.0f}   {spread}")
    best = max(v for k, v in rates.items() if k.startswith("hwexp prepare"))
    print(
        f"prepare speed-up over the article's decode + resize: "
        f"{best / rates['article decode + resize']:.1f}x (target >= 10x)"
    )
    print(
        f"decode alone vs reading bytes: {rates['read bytes'] / rates['hwexp decode']:.1f}x "
        "slower (target <= 3x)"
    )
    output = n * 48 * 48
    chunk = inspect.signature(etl.etl_tasks).parameters["chunk_records"].default
    print(
        f"peak RSS of a 1-worker prepare: {peak / 1e6:.0f} MB, of which {baseline / 1e6:.0f} MB "
        f"is the interpreter and libraries; output array {output / 1e6:.0f} MB; raw file "
        f"{n * RECORD / 1e6:.0f} MB. Working memory is per {chunk:,}-record chunk, so it does "
        "not grow with the number of files."
    )
    print(json.dumps({k: round(v) for k, v in rates.items()}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
