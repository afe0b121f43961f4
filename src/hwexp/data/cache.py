"""Prepared arrays, computed once per (source files, class set, preprocessing) and reused.

An entry is a directory ``<cache_dir>/<source>-<classes>-<size>px-<fingerprint>/`` holding
uncompressed ``.npy`` files (memory-mapped when read, so ETL9G at 64x64, about 2.5 GB, never
has to fit in memory twice) and ``entry.json`` describing it, with the shape, size,
modification time and SHA-256 of every file. Building one needs a chunk's worth of memory,
whatever the number of samples: images are written into a memory-mapped ``images.npy``, the
per-sample columns (labels, writers, meta) spilled to disk chunk by chunk.

Building: an entry is written in a hidden sibling ``.<entry>.<random>/``, synced to disk and
renamed into place in one step, by a process that holds the entry's lock file throughout (its
workers do not share it); so concurrent processes never read half an entry and never build one
twice. Worker processes die with the process that started them (:mod:`hwexp.data.workers`),
and SIGTERM removes the temporary folder. A builder killed outright (SIGKILL, power loss)
leaves its temporary folder behind: the next process that finds that entry's lock free removes
it.

Opening: each open checks, without reading the arrays, that every file is present with the
recorded size, shape and type; a file modified since it was recorded is hashed against its
checksum. An entry that fails is rebuilt from its source and replaces the damaged one
atomically; one that cannot be opened gives a :class:`DamagedCacheEntry` naming the folder to
delete. :func:`verify_entries` hashes every entry (``python -m hwexp.data verify``).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hwexp.data.preprocess import PreprocessOptions, normalise_characters
from hwexp.data.raw import ChunkTask
from hwexp.data.workers import map_in_processes, sigterm_exits
from hwexp.errors import DamagedCacheEntry, DataError
from hwexp.fsutil import atomic_write_bytes, make_temporary_dir

log = logging.getLogger(__name__)

# Bump when the meaning of cached arrays changes (reader or preprocessing code).
# 3: batched sparse resize, clean-up independent of an image's place in its batch.
CACHE_FORMAT = 3
ENTRY_FILE = "entry.json"
_ENTRY_NAME = re.compile(r".+-\d+px-[0-9a-f]{16}")
# A build's temporary folder: "." + entry name + "." + the 8 random characters of mkdtemp.
_TEMP_NAME = re.compile(r"\.(?P<entry>[^.]+)\.[a-z0-9_]{8}")
_HASH_BLOCK = 1 << 20


@dataclass
class PreparedSource:
    """The prepared samples of one source: images ``(n, size, size)`` uint8, ink high. Every
    array is a read-only memory map of the entry's files."""

    name: str
    images: np.ndarray
    labels: np.ndarray  # (n,) str characters
    writers: np.ndarray  # (n,) str
    meta: dict[str, np.ndarray]
    path: Path

    def __len__(self) -> int:
        return len(self.labels)


def fingerprint(description: dict) -> str:
    """Stable short hash of a JSON-serialisable description (any ``str``, even one holding
    the surrogates of an undecodable file name)."""
    text = json.dumps(description, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def file_signature(path: Path, head_bytes: int = 1 << 16) -> dict:
    """What identifies a raw file's content cheaply: name, size, mtime and a hash of its head."""
    stat = path.stat()
    with open(path, "rb") as handle:
        head = hashlib.sha256(handle.read(head_bytes)).hexdigest()[:16]
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head": head}


def entry_name(source: str, classes_name: str, options: PreprocessOptions, key: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in classes_name)[:40]
    return f"{source}-{safe}-{options.size}px-{key}"


def entry_identity(path: Path) -> tuple[str, str]:
    """``(label, fingerprint)`` of an entry folder: ``synthetic-hiragana75-48px`` and the 16
    hex digits that key its content (source files, classes, preprocessing, cache format)."""
    label, _, key = Path(path).name.rpartition("-")
    return label, key


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
    """The cached entry for this description, building it first if absent or damaged.

    ``description`` must capture everything the tasks' output depends on except the
    preprocessing options (added here); ``make_tasks`` is called only when building.

    Raises:
        DamagedCacheEntry: the entry fails its checks even after a rebuild (names the folder).
    """
    key = fingerprint({"format": CACHE_FORMAT, "source": description, "pre": options.as_dict()})
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(cache_dir)
    final = cache_dir / entry_name(source, classes_name, options, key)
    state = _inspect(final)
    if state.problem is None and not state.changed:
        try:
            return _open(final, state.info)
        except DamagedCacheEntry:
            pass  # replaced or damaged since the check: settle it under the lock
    with _locked(_lock_path(final)):
        state = _inspect(final)
        if state.problem is None and state.changed:
            state = _rehash(final, state)
        if state.problem is not None:
            if not state.missing:
                log.warning("cache entry %s: %s; rebuilding it", final, state.problem)
            _build(final, source, description, make_tasks(), options, workers, progress)
            state = _inspect(final)
    if state.problem is not None:
        raise _damaged(final, state.problem)
    return _open(final, state.info)


def read_entry(path: Path) -> PreparedSource:
    """Open a whole cache entry (images memory-mapped read-only), checking it first: sizes and
    shapes always, checksums of the files modified since they were recorded.

    Raises:
        DamagedCacheEntry: naming the folder to delete and what is wrong with it.
    """
    state = _inspect(Path(path))
    if state.problem is None and state.changed and state.info.get("files"):
        state = _compare(Path(path), state)
    if state.problem is not None:
        raise _damaged(Path(path), state.problem)
    return _open(Path(path), state.info)


@dataclass(frozen=True)
class EntryReport:
    """One line of :func:`verify_entries`: ``problem`` is None for a whole entry."""

    path: Path
    problem: str | None
    count: int = 0
    nbytes: int = 0
    removed: bool = False


def verify_entries(cache_dir: Path, remove: bool = False) -> Iterator[EntryReport]:
    """Check every entry of ``cache_dir`` in full (each file's checksum), one report each.

    An entry built before checksums were recorded gets them now. With ``remove``, a damaged
    entry is deleted (the next run that needs it builds it again). Stale temporary folders of
    interrupted builds are removed first.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return
    remove_stale_builds(cache_dir)
    entries = (p for p in cache_dir.iterdir() if _ENTRY_NAME.fullmatch(p.name) and p.is_dir())
    for path in sorted(entries):
        with _locked(_lock_path(path)):
            state = _inspect(path)
            if state.problem is None:
                state = _rehash(path, state)
            removed = remove and state.problem is not None
            if removed:
                shutil.rmtree(_move_aside(path), ignore_errors=True)
        files = (state.info or {}).get("files") or {}
        yield EntryReport(
            path=path,
            problem=state.problem,
            count=int((state.info or {}).get("count", 0)),
            nbytes=sum(int(f.get("bytes", 0)) for f in files.values()),
            removed=removed,
        )


def remove_stale_builds(cache_dir: Path) -> list[Path]:
    """Remove the temporary folders of builds that were killed; returns the removed paths.

    A temporary folder is stale when nobody holds its entry's lock (a live builder holds it
    until its folder is renamed into place), so this is safe while other processes prepare.
    """
    cache_dir = Path(cache_dir)
    by_entry: dict[str, list[Path]] = {}
    try:
        for path in cache_dir.iterdir():
            match = _TEMP_NAME.fullmatch(path.name)
            if match and _ENTRY_NAME.fullmatch(match["entry"]) and path.is_dir():
                by_entry.setdefault(match["entry"], []).append(path)
    except OSError:
        return []
    removed = []
    for entry, folders in by_entry.items():
        try:
            with _locked(cache_dir / f"{entry}.lock", blocking=False) as held:
                if held:
                    for folder in folders:
                        shutil.rmtree(folder, ignore_errors=True)
                        removed.append(folder)
        except OSError:  # a read-only cache: leave it as it is
            continue
    if removed:
        log.info("removed %d temporary folder(s) of interrupted builds", len(removed))
    return removed


# --- checking entries ------------------------------------------------------------------------


@dataclass(frozen=True)
class _State:
    info: dict | None
    problem: str | None  # None: whole as far as checked
    changed: bool = False  # a file changed since recorded, or nothing recorded: hash to decide
    missing: bool = False


def _inspect(path: Path) -> _State:
    """Check an entry without reading its arrays: entry.json, each file's header and size."""
    if not path.exists():
        return _State(None, "it does not exist", missing=True)
    try:
        info = _read_info(path)
    except ValueError as error:
        return _State(None, str(error))
    recorded = info.get("files")
    changed = not recorded
    for name, (shape, kinds) in _expected_files(info).items():
        try:
            stat = (path / name).stat()
            header_shape, dtype, offset = _npy_header(path / name)
        except FileNotFoundError:
            return _State(info, f"{name} is missing")
        except (OSError, ValueError, EOFError, SyntaxError, TypeError) as error:
            return _State(info, f"{name} is not a .npy array ({error})")
        needed = offset + int(np.prod(header_shape)) * dtype.itemsize
        if stat.st_size != needed:
            return _State(info, f"{name} is {stat.st_size} bytes, {needed} expected (truncated?)")
        if header_shape[: len(shape)] != shape or dtype.kind not in kinds:
            return _State(info, f"{name} has shape {header_shape} and type {dtype}, not {shape}...")
        if recorded:
            record = recorded.get(name) or {}
            if (record.get("bytes"), record.get("shape"), record.get("dtype")) != (
                stat.st_size,
                list(header_shape),
                dtype.str,
            ):
                return _State(info, f"{name} differs from its record in {ENTRY_FILE}")
            changed = changed or record.get("mtime_ns") != stat.st_mtime_ns
    return _State(info, None, changed=changed)


def _read_info(path: Path) -> dict:
    try:
        info = json.loads((path / ENTRY_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{ENTRY_FILE} is missing (an interrupted build?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{ENTRY_FILE} is unreadable ({error})") from None
    valid = (
        isinstance(info, dict)
        and isinstance(info.get("count"), int)
        and isinstance(info.get("size"), int)
        and isinstance(info.get("source"), str)
        and isinstance(info.get("meta_fields"), list)
        and all(isinstance(f, str) and "/" not in f for f in info["meta_fields"])
        and isinstance(info.get("files") or {}, dict)
    )
    if not valid:
        raise ValueError(f"{ENTRY_FILE} lacks the fields of a cache entry")
    return info


def _expected_files(info: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """File name -> (leading shape, allowed dtype kinds) of every array of an entry."""
    count, size = info["count"], info["size"]
    files = {
        "images.npy": ((count, size, size), "u"),
        "labels.npy": ((count,), "U"),
        "writers.npy": ((count,), "U"),
    }
    files.update({f"meta_{name}.npy": ((count,), "biufcUSMmV") for name in info["meta_fields"]})
    return files


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a .npy file's header, reading nothing else."""
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version not in readers:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = readers[version](handle)
        return tuple(shape), dtype, handle.tell()


def _file_records(path: Path, names: Sequence[str]) -> dict[str, dict]:
    """Shape, type, size, modification time and SHA-256 of each named .npy file."""
    records = {}
    for name in names:
        shape, dtype, _ = _npy_header(path / name)
        digest = hashlib.sha256()
        with open(path / name, "rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
            stat = os.fstat(handle.fileno())
        records[name] = {
            "shape": list(shape),
            "dtype": dtype.str,
            "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": digest.hexdigest(),
        }
    return records


def _compare(path: Path, state: _State) -> _State:
    """Hash the entry's files: the state with a problem naming those whose checksum differs,
    and the current records in ``info["files"]``."""
    current = _file_records(path, list(_expected_files(state.info)))
    recorded = state.info.get("files") or {}
    differing = [
        name
        for name, record in current.items()
        if name in recorded and recorded[name].get("sha256") != record["sha256"]
    ]
    info = state.info | {"files": current}
    if differing:
        return _State(info, f"{', '.join(differing)} changed since built (checksum differs)")
    return _State(info, None, changed=state.changed)


def _rehash(path: Path, state: _State) -> _State:
    """Under the entry's lock: verify every checksum, and record the files anew when they were
    unrecorded (an entry from an older hwexp) or touched without changing content."""
    checked = _compare(path, state)
    if checked.problem is None and checked.changed:
        atomic_write_bytes(path / ENTRY_FILE, _entry_json(checked.info))
    return checked


def _open(path: Path, info: dict) -> PreparedSource:
    """Every array memory-mapped, read only: opening costs no memory, whatever the count."""

    def load(name: str) -> np.ndarray:
        return np.load(path / name, mmap_mode="r")

    try:
        meta = {name: load(f"meta_{name}.npy") for name in info["meta_fields"]}
        return PreparedSource(
            name=info["source"],
            images=load("images.npy"),
            labels=load("labels.npy"),
            writers=load("writers.npy"),
            meta=meta,
            path=path,
        )
    except (OSError, ValueError, EOFError) as error:
        raise _damaged(path, f"it cannot be read ({error})") from error


def _damaged(path: Path, problem: str) -> DamagedCacheEntry:
    return DamagedCacheEntry(
        f"cache entry {path}: {problem}. Delete that folder: the next run that needs it "
        "prepares it again."
    )


def _entry_json(info: dict) -> bytes:
    text = json.dumps(info, ensure_ascii=False, indent=1, default=str)
    return text.encode("utf-8", "backslashreplace")  # a lone surrogate becomes a JSON escape


# --- locks and folders -----------------------------------------------------------------------


def _lock_path(entry: Path) -> Path:
    return entry.with_name(entry.name + ".lock")


# Descriptors of the locks this process holds. A flock belongs to the open file, which a forked
# child shares: a worker still dying after its builder was killed would keep the lock, and the
# next run would take the builder's temporary folder for a live build's and leave it.
_held_locks: set[int] = set()


def _drop_inherited_locks() -> None:
    """In a forked child: point each held lock's descriptor at /dev/null (the number stays
    valid for the code that will close it; the parent's lock is untouched)."""
    if not _held_locks:
        return
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for fd in _held_locks:
            os.dup2(devnull, fd, inheritable=False)
    finally:
        os.close(devnull)
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextmanager
def _locked(lock_path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold ``lock_path`` exclusively; without ``blocking``, yield False if someone holds it.
    Only this process holds it: processes forked meanwhile do not."""
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        _held_locks.add(handle.fileno())
        try:
            yield True
        finally:
            _held_locks.discard(handle.fileno())
            fcntl.flock(handle, fcntl.LOCK_UN)


def _move_aside(path: Path) -> Path:
    """Rename ``path`` to a hidden temporary name of its entry (removed as stale if left)."""
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.rename(path, aside)  # onto the empty folder just made
    return aside


def _install(tmp: Path, final: Path) -> None:
    """Rename the built folder into place, replacing a damaged entry there."""
    old = _move_aside(final) if final.exists() else None
    os.rename(tmp, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- building ---------------------------------------------------------------------------------


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
    with sigterm_exits():
        tmp = make_temporary_dir(final.parent, f".{final.name}.")
        try:
            count, meta_fields, skipped = _write_arrays(
                tmp, source, tasks, options, workers, progress
            )
            info = {
                "source": source,
                "count": count,
                "size": options.size,
                "format": CACHE_FORMAT,
                "preprocess": options.as_dict(),
                "description": description,
                "meta_fields": meta_fields,
            }
            if skipped:
                info["skipped"] = {"count": len(skipped), "example": skipped[0]}
            info["files"] = _file_records(tmp, list(_expected_files(info)))
            for name in info["files"]:
                _fsync(tmp / name)
            atomic_write_bytes(tmp / ENTRY_FILE, _entry_json(info))
            _fsync(tmp)
            _install(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _write_arrays(
    folder: Path,
    source: str,
    tasks: Sequence[ChunkTask],
    options: PreprocessOptions,
    workers: int,
    progress: bool,
) -> tuple[int, list[str], list[str]]:
    """Prepare every task into ``folder``'s .npy files; (samples, meta fields, skipped).

    Memory stays one chunk's worth whatever the number of samples: images go straight into
    the memory-mapped ``images.npy``, and the per-sample columns (labels, writers, meta) are
    appended to spill files, joined into their ``.npy`` files at the end.
    """
    total = sum(task.count for task in tasks)
    images = np.lib.format.open_memmap(
        folder / "images.npy", mode="w+", dtype=np.uint8, shape=(total, options.size, options.size)
    )
    columns = _ColumnSpill(folder)
    skipped: list[str] = []
    position = 0
    # A bar redrawn in place needs a terminal; in a log it would be a line per redraw.
    live = progress and sys.stderr.isatty()
    bar = tqdm(total=total, desc=f"prepare {source}", unit="img", disable=not live, file=sys.stderr)
    started = time.monotonic()
    with bar, closing(_run_tasks(tasks, options, workers)) as chunks:
        for task, chunk in zip(tasks, chunks, strict=True):
            chunk_images, chunk_labels, chunk_writers, chunk_meta, chunk_skipped = chunk
            n = len(chunk_images)
            if n > task.count or (task.exact and n != task.count):
                raise DataError(f"{task.description}: expected {task.count} samples, read {n}")
            images[position : position + n] = chunk_images
            columns.append(
                {
                    "labels": chunk_labels,
                    "writers": chunk_writers,
                    **{f"meta_{name}": values for name, values in chunk_meta.items()},
                },
                task.description,
            )
            skipped.extend(chunk_skipped)
            position += n
            bar.update(task.count)
    if progress and not live:
        seconds = time.monotonic() - started
        print(f"prepare {source}: {total} images in {seconds:.1f} s", file=sys.stderr)
    images.flush()
    del images
    if skipped:
        log.warning(
            "prepare %s: skipped %d of %d images that cannot be used, e.g. %s",
            source,
            len(skipped),
            total,
            skipped[0],
        )
    if position == 0:
        raise DataError(f"source {source!r}: no usable sample is left (e.g. {skipped[0]})")
    if position < total:
        _keep_rows(folder / "images.npy", position)
    meta_fields = sorted(n.removeprefix("meta_") for n in columns.join() if n.startswith("meta_"))
    return position, meta_fields, skipped


class _ColumnSpill:
    """Per-sample columns of a build, chunk after chunk: each column's raw bytes are appended
    to a hidden spill file in the build folder and joined into ``<column>.npy`` (of the
    columns' common type, e.g. the widest string) by :meth:`join`, one chunk in memory at a
    time. Every chunk must have the same columns."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.parts: dict[str, list[tuple[np.dtype, int]]] = {}  # column -> (dtype, n) a chunk

    def _spill(self, name: str) -> Path:
        return self.folder / f".{name}.spill"

    def append(self, columns: dict[str, np.ndarray], description: str) -> None:
        if self.parts and set(columns) != set(self.parts):
            raise DataError(
                f"{description}: its samples have the fields {sorted(columns)}, the chunks "
                f"before it {sorted(self.parts)}"
            )
        for name, values in columns.items():
            values = np.ascontiguousarray(values)
            if values.dtype.hasobject:
                raise DataError(f"{description}: field {name!r} holds Python objects")
            with open(self._spill(name), "ab") as handle:
                handle.write(values.data)
            self.parts.setdefault(name, []).append((values.dtype, len(values)))

    def join(self) -> list[str]:
        """Write every column's ``.npy`` file and remove its spill; returns the column names."""
        for name, parts in self.parts.items():
            dtype = np.result_type(*(part_dtype for part_dtype, _ in parts))
            total = sum(n for _, n in parts)
            out = np.lib.format.open_memmap(
                self.folder / f"{name}.npy", mode="w+", dtype=dtype, shape=(total,)
            )
            position = 0
            with open(self._spill(name), "rb") as handle:
                for part_dtype, n in parts:
                    if n:  # (an empty chunk's strings may be 0 bytes wide: nothing to read)
                        out[position : position + n] = np.fromfile(handle, part_dtype, n)
                    position += n
            out.flush()
            del out
            self._spill(name).unlink()
        return list(self.parts)


def _keep_rows(path: Path, rows: int, block: int = 4096) -> None:
    """Cut the .npy array at ``path`` to its first ``rows`` rows (copied block by block)."""
    old = np.load(path, mmap_mode="r")
    part = path.with_name(f"part-{path.name}")
    new = np.lib.format.open_memmap(part, mode="w+", dtype=old.dtype, shape=(rows, *old.shape[1:]))
    for start in range(0, rows, block):
        new[start : start + block] = old[start : min(start + block, rows)]
    new.flush()
    del new, old
    os.replace(part, path)


def _prepare_chunk(task: ChunkTask, options: PreprocessOptions):
    raw = task.load()
    images = normalise_characters(raw.images, raw.ink, options, writers=raw.writers)
    return images, raw.labels, raw.writers, raw.meta, raw.skipped


def _run_tasks(tasks: Sequence[ChunkTask], options: PreprocessOptions, workers: int):
    """Prepared chunks in task order; a pool that the caller stops early (an error, SIGTERM)
    is stopped at once, its workers ended."""
    return map_in_processes(functools.partial(_prepare_chunk, options=options), tasks, workers)


def resolve_workers(workers: int | str | None) -> int:
    """``"auto"``/None/0 → the CPUs this process may use; otherwise the given count."""
    if workers in (None, "auto", 0):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, int(workers))
