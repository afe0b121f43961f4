"""Prepared arrays, computed once per (source files, class set, preprocessing) and reused.

An entry is a directory ``<cache_dir>/<source>-<classes>-<size>px-<fingerprint>/`` holding
uncompressed ``.npy`` files (``images.npy`` is memory-mapped when read, so ETL9G at 64x64,
about 2.5 GB, never has to fit in memory twice) and ``entry.json`` describing it. Entries are
built in a temporary sibling directory and renamed into place in one step, and a lock file
serialises builders, so concurrent workers never read half an entry and never build one twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hwexp.data.errors import DataError
from hwexp.data.preprocess import PreprocessOptions, normalise_characters
from hwexp.data.raw import ChunkTask

# Bump when the meaning of cached arrays changes (reader or preprocessing code).
# 3: batched sparse resize, clean-up independent of an image's place in its batch.
CACHE_FORMAT = 3


@dataclass
class PreparedSource:
    """The prepared samples of one source: images ``(n, size, size)`` uint8, ink high."""

    name: str
    images: np.ndarray  # read-only memory map
    labels: np.ndarray  # (n,) str characters
    writers: np.ndarray  # (n,) str
    meta: dict[str, np.ndarray]
    path: Path

    def __len__(self) -> int:
        return len(self.labels)


def fingerprint(description: dict) -> str:
    """Stable short hash of a JSON-serialisable description."""
    text = json.dumps(description, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_signature(path: Path, head_bytes: int = 1 << 16) -> dict:
    """What identifies a raw file's content cheaply: name, size, mtime and a hash of its head."""
    stat = path.stat()
    with open(path, "rb") as handle:
        head = hashlib.sha256(handle.read(head_bytes)).hexdigest()[:16]
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head": head}


def entry_name(source: str, classes_name: str, options: PreprocessOptions, key: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in classes_name)[:40]
    return f"{source}-{safe}-{options.size}px-{key}"


def load_or_prepare(
    cache_dir: Path,
    source: str,
    classes_name: str,
    description: dict,
    make_tasks: Callable[[], Sequence[ChunkTask]],
    options: PreprocessOptions,
    workers: int = 1,
    progress: bool = True,
) -> PreparedSource:
    """The cached entry for this description, building it first if absent.

    ``description`` must capture everything the tasks' output depends on except the
    preprocessing options (added here); ``make_tasks`` is called only when building.
    """
    key = fingerprint({"format": CACHE_FORMAT, "source": description, "pre": options.as_dict()})
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / entry_name(source, classes_name, options, key)
    if not _complete(final):
        with _locked(final.with_name(final.name + ".lock")):
            if not _complete(final):
                _build(final, source, description, make_tasks(), options, workers, progress)
    return read_entry(final)


def read_entry(path: Path) -> PreparedSource:
    """Open a complete cache entry (images memory-mapped read-only)."""
    info = json.loads((path / "entry.json").read_text(encoding="utf-8"))
    meta = {name: np.load(path / f"meta_{name}.npy") for name in info["meta_fields"]}
    return PreparedSource(
        name=info["source"],
        images=np.load(path / "images.npy", mmap_mode="r"),
        labels=np.load(path / "labels.npy"),
        writers=np.load(path / "writers.npy"),
        meta=meta,
        path=path,
    )


def _complete(path: Path) -> bool:
    return (path / "entry.json").is_file()


@contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(
    final: Path,
    source: str,
    description: dict,
    tasks: Sequence[ChunkTask],
    options: PreprocessOptions,
    workers: int,
    progress: bool,
) -> None:
    total = sum(task.count for task in tasks)
    if total == 0:
        raise DataError(f"source {source!r} has no samples of the requested classes")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        images = np.lib.format.open_memmap(
            tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(total, options.size, options.size)
        )
        labels: list[np.ndarray] = []
        writers: list[np.ndarray] = []
        meta: dict[str, list[np.ndarray]] = {}
        position = 0
        bar = tqdm(
            total=total, desc=f"prepare {source}", unit="img", disable=not progress, file=sys.stderr
        )
        for task, chunk in zip(tasks, _run_tasks(tasks, options, workers), strict=True):
            chunk_images, chunk_labels, chunk_writers, chunk_meta = chunk
            if len(chunk_images) != task.count:
                raise DataError(
                    f"{task.description}: expected {task.count} samples, read {len(chunk_images)}"
                )
            images[position : position + task.count] = chunk_images
            labels.append(chunk_labels)
            writers.append(chunk_writers)
            for name, values in chunk_meta.items():
                meta.setdefault(name, []).append(values)
            position += task.count
            bar.update(task.count)
        bar.close()
        images.flush()
        del images
        np.save(tmp / "labels.npy", np.concatenate(labels))
        np.save(tmp / "writers.npy", np.concatenate(writers))
        for name, parts in meta.items():
            np.save(tmp / f"meta_{name}.npy", np.concatenate(parts))
        info = {
            "source": source,
            "count": total,
            "size": options.size,
            "format": CACHE_FORMAT,
            "preprocess": options.as_dict(),
            "description": description,
            "meta_fields": sorted(meta),
        }
        (tmp / "entry.json").write_text(
            json.dumps(info, ensure_ascii=False, indent=1, default=str), encoding="utf-8"
        )
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prepare_chunk(task: ChunkTask, options: PreprocessOptions):
    raw = task.load()
    images = normalise_characters(raw.images, raw.ink, options, writers=raw.writers)
    return images, raw.labels, raw.writers, raw.meta


def _run_tasks(tasks: Sequence[ChunkTask], options: PreprocessOptions, workers: int):
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield _prepare_chunk(task, options)
        return
    # fork is fastest, but not once a framework with its own thread pools is loaded.
    threaded = any(name in sys.modules for name in ("tensorflow", "torch", "jax"))
    context = get_context("spawn" if threaded else "fork")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(_prepare_chunk, tasks, [options] * len(tasks))


def resolve_workers(workers: int | str | None) -> int:
    """``"auto"``/None/0 → the CPUs this process may use; otherwise the given count."""
    if workers in (None, "auto", 0):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, int(workers))
