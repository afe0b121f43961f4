"""Full-scale ETL9G: preparation and training time and memory on 607,200 records, 3,036 classes.

ETL data may not be redistributed, so ``generate`` writes a tree of the same size and format:
50 files ``ETL9G/ETL9G_01..50`` of 12,144 struct-exact records (4 writers x 3,036 classes,
4.98 GB), built with the test fixtures' record packer (``tests/etl_fixtures.py``). Images are
real-looking cells: a pool of characters drawn once by hwexp's synthetic writers (KanjiVG
strokes, pen, blur, scan noise, stray marks; 128x127, 4-bit like ETL9G), each record one of
them shifted by a few pixels, so preprocessing works on strokes, not noise. Which pool image
a record gets does not depend on its class: the data is for timing, not for accuracy.

* ``prepare``: runs ``python -m hwexp.data prepare dataset=kanji3036`` at each ``--sizes``
  into an empty cache and samples the memory of its process tree (the command and its data
  workers) every 0.2 s: RSS summed over the processes, PSS (shared pages counted once) and
  its anonymous part (the processes' own memory; the rest is file pages, e.g. the
  memory-mapped output, which the kernel can write back and drop). Prints wall time,
  records/s and the peaks against the size of the output array.
* ``train``: in a child process, loads the 48 px cache entry through ``hwexp.data`` (writer
  split: 160 / 20 / 20 writers), builds and compiles the default model (``conf/model``,
  ``conf/trainer``, ``conf/augment`` defaults) on the 3,036 classes, and runs ``--steps``
  training batches through ``hwexp.pipeline``. Prints the steady time per step and the full
  epoch extrapolated from it (labelled so), and the memory of the child at each stage. Then,
  for ``experiment=kanji3036_gpu``, what this host can say about a GPU run: the input
  pipeline's rate alone at its size and batch, and the model's FLOPs a training sample.
* ``all``: generate (if missing), prepare, train.

    python scripts/bench_scale.py all --data-dir /work/scale-data --steps 300

Figures are in the README (Scale). The load average is printed before and after each run:
this is meant for a shared machine, whose other work slows every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the struct-exact ETL record packer
sys.path.insert(0, str(ROOT / "scripts"))  # bench_train's FLOP count

FILES = 50
WRITERS_PER_FILE = 4
ETL9G_SIZE = (127, 128)  # rows, columns of an ETL9G cell
SAMPLE_SECONDS = 0.2


# --------------------------------------------------------------------------- generate


def glyph_pool(count: int, seed: int = 0) -> np.ndarray:
    """``count`` ETL9G-like cells ``(count, 127, 128)`` of 4-bit grey levels 0..15, ink high:
    characters spread over the ETL9G class set, drawn by hwexp's synthetic writers (no fonts:
    KanjiVG stroke writers only)."""
    from hwexp.data.charsets import ETL9G_3036
    from hwexp.synth import SynthOptions, render_writer

    options = SynthOptions.from_config({"font_ratio": 0.0, "canvas_size": ETL9G_SIZE[1]})
    writers = 3
    per_writer = -(-count // writers)
    step = max(1, len(ETL9G_3036) // per_writer)
    chars = ETL9G_3036[::step][:per_writer]
    cells = np.concatenate(
        [render_writer(chars, seed + w, options).images for w in range(writers)]
    )[:count, : ETL9G_SIZE[0]]
    return ((cells.astype(np.uint16) * 15 + 127) // 255).astype(np.uint8)


def jittered_records(
    sheets: Sequence[int], pool: np.ndarray, rng: np.random.Generator, max_shift: int = 4
) -> Iterator:
    """Every ETL9G character written once per sheet (writer), in class-set order: a pool cell
    at random, shifted by up to ``max_shift`` pixels each way."""
    from etl_fixtures import FakeRecord
    from hwexp.data.charsets import ETL9G_3036

    for sheet in sheets:
        picks = rng.integers(0, len(pool), len(ETL9G_3036))
        shifts = rng.integers(-max_shift, max_shift + 1, (len(ETL9G_3036), 2))
        for char, pick, shift in zip(ETL9G_3036, picks, shifts, strict=True):
            yield FakeRecord(char, sheet, np.roll(pool[pick], tuple(shift), axis=(0, 1)))


def generate_tree(data_dir: Path, pool_size: int = 384, seed: int = 0) -> list[Path]:
    """Write ``data_dir/ETL9G/ETL9G_01..50``; a file already there at full size is kept.
    Sheets (writers) are numbered 1..200, four per file, as the real files hold them."""
    from etl_fixtures import ETL9G_FORMAT, etl_g_bytes
    from hwexp.data.charsets import ETL9G_3036
    from hwexp.data.etl import ETL9G

    folder = data_dir / ETL9G.subdir
    folder.mkdir(parents=True, exist_ok=True)
    expected = WRITERS_PER_FILE * len(ETL9G_3036) * ETL9G.record_size
    paths = [folder / name for name in ETL9G.file_names]
    todo = [p for p in paths if not (p.is_file() and p.stat().st_size == expected)]
    if not todo:
        return paths
    start = time.perf_counter()
    pool = glyph_pool(pool_size, seed)
    print(f"rendered {len(pool)} cells in {time.perf_counter() - start:.1f} s", flush=True)
    for path in todo:
        number = ETL9G.file_names.index(path.name)
        first = number * WRITERS_PER_FILE + 1
        rng = np.random.default_rng([seed, number])
        records = jittered_records(range(first, first + WRITERS_PER_FILE), pool, rng)
        part = path.with_name(f".{path.name}.part")
        part.write_bytes(etl_g_bytes(records, ETL9G_FORMAT))
        os.replace(part, path)
        print(f"{path} ({time.perf_counter() - start:.0f} s)", flush=True)
    return paths


# --------------------------------------------------------------------------- memory


def smaps_rollup(pid: int) -> dict[str, int]:
    """``Rss``, ``Pss``, ``Pss_Anon``, ``Pss_File`` ... of a process, in bytes ({} if gone)."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, rest = line.partition(":")
        value = rest.split()
        if value and value[0].isdigit():
            out[name] = int(value[0]) * 1024
    return out


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant (found through each process's parent pid)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


MEMORY_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File")


@dataclass
class TreeMemory:
    """Peaks over time of the sums over a process tree of ``MEMORY_FIELDS``, and of the number
    of processes; sampled by a thread until ``stop``."""

    root: int
    peaks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MEMORY_FIELDS, 0))
    processes: int = 0
    series: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        pids = process_tree(self.root)
        rollups = [smaps_rollup(pid) for pid in pids]
        sums = {name: sum(r.get(name, 0) for r in rollups) for name in MEMORY_FIELDS}
        for name in MEMORY_FIELDS:
            self.peaks[name] = max(self.peaks[name], sums[name])
        self.processes = max(self.processes, sum(1 for r in rollups if r))
        self.series.append((time.perf_counter(), sums))

    def anon_at(self, *fractions: float) -> list[int]:
        """Peak anonymous memory (PSS) in the tenth of the run around each fraction of it."""
        times = np.array([t for t, _ in self.series])
        anon = np.array([sums["Pss_Anon"] for _, sums in self.series])
        span = times[-1] - times[0]
        out = []
        for f in fractions:
            near = np.abs(times - (times[0] + f * span)) <= 0.05 * span
            out.append(int(anon[near].max()) if near.any() else 0)
        return out

    def run(self) -> None:
        ticks = 0
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()
            ticks += 1
            if ticks % int(5 / SAMPLE_SECONDS) == 0:
                self.loads.append(os.getloadavg()[0])

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Measured:
    seconds: float
    memory: TreeMemory
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    stdout: str


def measured_run(command: Sequence[str], env: dict[str, str] | None = None) -> Measured:
    """Run ``command``, sampling its process tree's memory; raises if it fails."""
    load_before = os.getloadavg()
    start = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    memory = TreeMemory(child.pid)
    sampler = threading.Thread(target=memory.run, daemon=True)
    sampler.start()
    stdout, stderr = child.communicate()
    seconds = time.perf_counter() - start
    memory.stop()
    sampler.join()
    if child.returncode:
        raise SystemExit(
            f"{' '.join(command)} failed with exit status {child.returncode}:\n{stderr[-3000:]}"
        )
    return Measured(seconds, memory, load_before, os.getloadavg(), stdout)


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.0f} MB"


def loads(measured: Measured) -> str:
    during = measured.memory.loads or [measured.load_after[0]]
    return (
        f"load average (1 min) {measured.load_before[0]:.2f} before, "
        f"{min(during):.2f}-{max(during):.2f} during, {measured.load_after[0]:.2f} after"
    )


# --------------------------------------------------------------------------- prepare


def hwexp_env() -> dict[str, str]:
    """This environment with ``src/`` first on the path (the checkout, not an install)."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def cache_dir_for(work: Path, size: int) -> Path:
    return work / "cache" / f"{size}px"


def bench_prepare(data_dir: Path, work: Path, sizes: Sequence[int]) -> None:
    from hwexp.data.charsets import ETL9G_3036

    records = FILES * WRITERS_PER_FILE * len(ETL9G_3036)
    print(f"\n## prepare dataset=kanji3036: {records:,} records, workers auto\n")
    print(
        "| size | wall s | records/s | output array | peak RSS (sum) | peak PSS | "
        "of which anonymous | anonymous at 10 / 50 / 90 % of the run | processes | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        cache_dir = cache_dir_for(work, size)
        shutil.rmtree(cache_dir, ignore_errors=True)  # a fresh preparation, not a cache hit
        command = [
            sys.executable,
            "-m",
            "hwexp.data",
            "prepare",
            "dataset=kanji3036",
            f"preprocess.size={size}",
            f"paths.data_dir={data_dir}",
            f"paths.cache_dir={cache_dir}",
            "hydra/job_logging=disabled",
        ]
        measured = measured_run(command, hwexp_env())
        output = records * size * size
        peaks = measured.memory.peaks
        print(
            f"| {size} | {measured.seconds:.0f} | {records / measured.seconds:,.0f} | "
            f"{mb(output)} | {mb(peaks['Rss'])} | {mb(peaks['Pss'])} | "
            f"{mb(peaks['Pss_Anon'])} | "
            f"{' / '.join(mb(a) for a in measured.memory.anon_at(0.1, 0.5, 0.9))} | "
            f"{measured.memory.processes} | {loads(measured)} |",
            flush=True,
        )


# --------------------------------------------------------------------------- train


def bench_train(data_dir: Path, work: Path, steps: int, size: int) -> None:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "train-child",
        "--data-dir",
        str(data_dir),
        "--work",
        str(work),
        "--steps",
        str(steps),
        "--size",
        str(size),
    ]
    measured = measured_run(command, hwexp_env())
    result = json.loads(measured.stdout.strip().splitlines()[-1])
    peaks = measured.memory.peaks
    per_step = result["steady_seconds_per_step"]
    epoch = result["steps_per_epoch"] * per_step
    print(f"\n## train: default model, {result['classes']:,} classes, {size} px\n")
    print(
        f"train split {result['train']:,} samples ({result['train_writers']} writers), "
        f"batch {result['batch_size']}, {result['steps_per_epoch']:,} steps per epoch; "
        f"{result['params']:,} parameters; ran {result['steps']} steps in "
        f"{result['fit_seconds']:.0f} s (first {result['warmup_steps']} steps, with graph "
        f"tracing, {result['warmup_seconds']:.1f} s)"
    )
    rate = result["batch_size"] / per_step
    print(
        f"steady: {per_step * 1000:.0f} ms/step, {rate:,.0f} samples/s "
        f"({rate * result['training_flops'] / 1e9:,.0f} GFLOP/s achieved at "
        f"{result['training_flops'] / 1e9:.3f} GFLOP a training sample); one epoch "
        f"EXTRAPOLATED from {result['steps'] - result['warmup_steps']} steady steps: "
        f"{epoch / 60:.1f} min"
    )
    print(f"whole child process: {measured.seconds:.0f} s; {loads(measured)}")
    print(
        f"peak memory: RSS {mb(peaks['Rss'])}, PSS {mb(peaks['Pss'])}, of which anonymous "
        f"{mb(peaks['Pss_Anon'])} and file pages {mb(peaks['Pss_File'])}; cached images "
        f"{mb(result['images_bytes'])} (train split {mb(result['train_images_bytes'])})"
    )
    print("child's own memory at each stage (anonymous / file pages):")
    for stage, memory in result["stages"].items():
        print(f"  {stage:34s} {mb(memory['Pss_Anon']):>9s} / {mb(memory['Pss_File']):>9s}")


def kanji3036_config(data_dir: Path, work: Path, size: int, *overrides: str):
    """The main command's config for ``dataset=kanji3036`` at ``size`` px on the generated
    tree and this benchmark's cache, checked."""
    from hydra import compose, initialize_config_dir

    import hwexp
    from hwexp.config_check import check_config

    with initialize_config_dir(config_dir=hwexp.CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "dataset=kanji3036",
                *overrides,
                f"preprocess.size={size}",
                f"paths.data_dir={data_dir}",
                f"paths.cache_dir={cache_dir_for(work, size)}",
            ],
        )
    check_config(cfg)
    return cfg


def train_child(data_dir: Path, work: Path, steps: int, size: int, warmup: int = 20) -> None:
    """Load the prepared kanji3036 splits and run ``steps`` training batches of the default
    model; prints one JSON line of figures."""
    from bench_train import training_flops_per_sample
    from hwexp.data.dataset import load_splits

    stages = {"started": smaps_rollup(os.getpid())}
    cfg = kanji3036_config(data_dir, work, size)
    splits = load_splits(cfg, progress=False)
    stages["splits loaded"] = smaps_rollup(os.getpid())
    import keras

    from hwexp.pipeline import training_batches
    from hwexp.train import compile_model, initial_model

    batch_size, seed = int(cfg.trainer.batch_size), int(cfg.trainer.seed)
    keras.utils.set_random_seed(seed)
    train = training_batches(splits.train, batch_size, seed, splits.source_weights)
    model = initial_model(splits, cfg)
    compile_model(model, cfg.trainer, train.steps_per_epoch)
    stages["model built"] = smaps_rollup(os.getpid())
    every = max(1, steps // 3)

    class StepClock(keras.callbacks.Callback):
        """The time at the end of each batch; the process's memory at a few of them."""

        def __init__(self) -> None:
            super().__init__()
            self.times = [time.perf_counter()]

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.times.append(time.perf_counter())
            if (batch + 1) % every == 0:
                stages[f"after {batch + 1} steps"] = smaps_rollup(os.getpid())

    clock = StepClock()
    start = time.perf_counter()
    model.fit(train.dataset, epochs=1, steps_per_epoch=steps, callbacks=[clock], verbose=0)
    fit_seconds = time.perf_counter() - start
    times = np.array(clock.times)
    warmup = min(warmup, steps - 1)
    records = len(splits.train) + len(splits.val) + len(splits.test)
    print(
        json.dumps(
            {
                "classes": len(splits.classes),
                "train": len(splits.train),
                "train_writers": len(np.unique(splits.train.writers)),
                "batch_size": batch_size,
                "steps_per_epoch": train.steps_per_epoch,
                "params": model.count_params(),
                "training_flops": training_flops_per_sample(model),
                "steps": steps,
                "warmup_steps": warmup,
                "warmup_seconds": float(times[warmup] - times[0]),
                "steady_seconds_per_step": float((times[-1] - times[warmup]) / (steps - warmup)),
                "fit_seconds": fit_seconds,
                "images_bytes": records * size * size,
                "train_images_bytes": len(splits.train) * size * size,
                "stages": {
                    name: {k: m.get(k, 0) for k in MEMORY_FIELDS} for name, m in stages.items()
                },
            }
        )
    )


def bench_gpu_recipe(data_dir: Path, work: Path, batches: int = 200) -> None:
    """What bounds ``experiment=kanji3036_gpu`` on a GPU, from this host: how fast the input
    pipeline alone delivers its batches (a GPU cannot train faster than it is fed) and the
    model's FLOPs a training sample."""
    from bench_train import training_flops_per_sample
    from hwexp.data.dataset import load_splits
    from hwexp.pipeline import training_batches
    from hwexp.train import initial_model

    cfg = kanji3036_config(data_dir, work, 64, "experiment=kanji3036_gpu")
    splits = load_splits(cfg, progress=False)
    batch_size = int(cfg.trainer.batch_size)
    train = training_batches(splits.train, batch_size, int(cfg.seed), splits.source_weights)
    load = os.getloadavg()[0]
    iterator = iter(train.dataset)
    for _ in range(10):  # warm-up: the prefetch buffer fills
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * batch_size / (time.perf_counter() - start)
    flops = training_flops_per_sample(initial_model(splits, cfg))
    print(
        f"\n## experiment=kanji3036_gpu ({cfg.preprocess.size} px, batch {batch_size}, "
        f"{len(splits.classes):,} classes)\n"
    )
    print(
        f"input pipeline alone: {rate:,.0f} samples/s over {batches} batches (load average "
        f"{load:.2f} before), so an epoch of {len(splits.train):,} samples takes at least "
        f"{len(splits.train) / rate:.0f} s on this host; the model needs {flops / 1e9:.3f} "
        f"GFLOP a training sample: {len(splits.train) * flops / 1e12:.0f} TFLOP an epoch"
    )


# --------------------------------------------------------------------------- main


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"# {cpu}, {len(os.sched_getaffinity(0))} CPUs, {memory / 2**30:.0f} GiB memory"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["generate", "prepare", "train", "all", "train-child"])
    parser.add_argument("--data-dir", type=Path, required=True, help="ETL9G/ is made here")
    parser.add_argument(
        "--work", type=Path, help="cache entries go here (default: <data-dir>/bench)"
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[48, 64])
    parser.add_argument("--steps", type=int, default=300, help="training steps to time")
    parser.add_argument("--size", type=int, default=48, help="image size for training")
    args = parser.parse_args()
    data_dir = args.data_dir.expanduser().resolve()
    work = (args.work or data_dir / "bench").expanduser().resolve()
    if args.command == "train-child":
        train_child(data_dir, work, args.steps, args.size)
        return
    print(machine())
    if args.command in ("generate", "all"):
        generate_tree(data_dir)
    if args.command in ("prepare", "all"):
        bench_prepare(data_dir, work, args.sizes)
    if args.command in ("train", "all"):
        bench_train(data_dir, work, args.steps, args.size)
        bench_gpu_recipe(data_dir, work)


if __name__ == "__main__":
    main()
