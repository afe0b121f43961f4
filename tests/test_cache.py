"""The prepared-array cache under faults: damaged entries, killed and terminated preparers."""

import fcntl
import functools
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_config import run_module
from hwexp.data import cache
from hwexp.data.preprocess import PreprocessOptions
from hwexp.data.raw import ChunkTask, RawChunk
from hwexp.errors import DamagedCacheEntry

OPTIONS = PreprocessOptions(size=16)


def _tiny_chunk(first: int, n: int) -> RawChunk:
    """``n`` 24 x 24 bars on black, one per writer, labels alternating あ/い."""
    images = np.zeros((n, 24, 24), np.uint8)
    for i in range(n):
        images[i, 4 + (first + i) % 8 : 18, 10:14] = 255
    labels = np.array(["あい"[(first + i) % 2] for i in range(n)])
    writers = np.array([f"w{first + i}" for i in range(n)])
    return RawChunk(images, labels, writers, meta={"n": np.arange(first, first + n)})


def _tasks(chunks: int = 2, per_chunk: int = 6) -> list[ChunkTask]:
    return [
        ChunkTask(functools.partial(_tiny_chunk, c * per_chunk, per_chunk), per_chunk, f"c{c}")
        for c in range(chunks)
    ]


def _broken() -> RawChunk:
    raise RuntimeError("disk on fire")


def _prepare(cache_dir: Path, description: dict | None = None) -> cache.PreparedSource:
    return cache.load_or_prepare(
        cache_dir, "tiny", "ai", description or {"n": 1}, _tasks, OPTIONS, progress=False
    )


def _entries(cache_dir: Path) -> list[Path]:
    return [p for p in cache_dir.iterdir() if p.is_dir()]


def _truncate(entry: Path) -> None:
    path = entry / "images.npy"
    path.write_bytes(path.read_bytes()[:-100])


def _empty_images(entry: Path) -> None:
    (entry / "images.npy").write_bytes(b"")


def _garbage_labels(entry: Path) -> None:
    path = entry / "labels.npy"
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _bad_json(entry: Path) -> None:
    (entry / "entry.json").write_text('{"source": "tiny", "count": ', encoding="utf-8")


def _no_json(entry: Path) -> None:
    (entry / "entry.json").unlink()


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_truncate, "images.npy is"),
        (_empty_images, "images.npy is not a .npy array"),
        (_garbage_labels, "labels.npy is not a .npy array"),
        (_bad_json, "entry.json is unreadable"),
        (_no_json, "entry.json is missing"),
    ],
)
def test_a_damaged_entry_is_rebuilt_in_place(tmp_path, caplog, damage, reason):
    first = _prepare(tmp_path)
    images, labels = np.array(first.images), first.labels.copy()
    damage(first.path)
    with caplog.at_level(logging.WARNING, logger="hwexp.data.cache"):
        again = _prepare(tmp_path)
    assert again.path == first.path
    np.testing.assert_array_equal(np.asarray(again.images), images)
    np.testing.assert_array_equal(again.labels, labels)
    assert f"cache entry {first.path}: {reason}" in caplog.text and "rebuilding" in caplog.text
    assert _entries(tmp_path) == [first.path]  # the damaged one replaced, no leftovers
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_damaged_entry_that_cannot_be_rebuilt_is_named(tmp_path):
    entry = _prepare(tmp_path).path
    _truncate(entry)
    with pytest.raises(DamagedCacheEntry) as info:
        cache.read_entry(entry)
    assert str(entry) in str(info.value) and "Delete that folder" in str(info.value)


def test_overwritten_pixels_are_caught_on_open_when_the_file_changed(tmp_path):
    first = _prepare(tmp_path)
    expected = np.array(first.images)
    with open(first.path / "images.npy", "r+b") as handle:  # same size, new content
        handle.seek(-50, os.SEEK_END)
        handle.write(b"\x7f" * 50)
    again = _prepare(tmp_path)
    np.testing.assert_array_equal(np.asarray(again.images), expected)


def test_verify_reports_overwritten_content_even_with_its_old_mtime(tmp_path):
    entry = _prepare(tmp_path).path
    labels = entry / "labels.npy"
    stat = labels.stat()
    values = np.load(labels)
    np.save(labels, values[::-1].copy())  # same header and size, other labels
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _prepare(tmp_path).path == entry  # an open checks sizes only: not seen
    report = next(cache.verify_entries(tmp_path))
    assert report.path == entry and "labels.npy changed since built" in report.problem
    assert not report.removed and entry.exists()
    report = next(cache.verify_entries(tmp_path, remove=True))
    assert report.removed and not entry.exists()
    np.testing.assert_array_equal(_prepare(tmp_path).labels, values)


def test_verify_command_reports_each_entry_and_exits_1_on_damage(tmp_path):
    cache_dir = tmp_path / "data" / "cache"
    good = _prepare(cache_dir, {"n": 1}).path
    bad = _prepare(cache_dir, {"n": 2}).path
    _truncate(bad)
    result = run_module(tmp_path, "hwexp.data", "verify", timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"ok       {good.name} (12 images" in result.stdout
    assert f"DAMAGED  {bad.name}: images.npy is" in result.stdout
    assert "verify.remove=true" in result.stderr and "Traceback" not in result.stderr
    fixed = run_module(tmp_path, "hwexp.data", "verify", "verify.remove=true", timeout=120)
    assert fixed.returncode == 0 and f"removed  {bad.name}" in fixed.stdout
    assert _entries(cache_dir) == [good]


def test_checksums_are_recorded_and_an_unchanged_entry_is_not_rehashed(tmp_path, monkeypatch):
    entry = _prepare(tmp_path).path
    info = json.loads((entry / "entry.json").read_text(encoding="utf-8"))
    assert set(info["files"]) == {"images.npy", "labels.npy", "writers.npy", "meta_n.npy"}
    assert info["files"]["images.npy"]["shape"] == [12, 16, 16]
    assert len(info["files"]["labels.npy"]["sha256"]) == 64
    monkeypatch.setattr(cache, "_file_records", lambda *a: pytest.fail("hashed again"))
    _prepare(tmp_path)


def test_entries_are_readable_by_others_as_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        entry = _prepare(tmp_path / "cache").path
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [entry, *entry.iterdir()]}
    assert modes == {
        entry.name: 0o755,
        **dict.fromkeys(["images.npy", "labels.npy", "writers.npy", "meta_n.npy"], 0o644),
        "entry.json": 0o644,
    }


def test_an_entry_from_before_checksums_gets_them(tmp_path):
    entry = _prepare(tmp_path).path
    info = json.loads((entry / "entry.json").read_text(encoding="utf-8"))
    del info["files"]
    (entry / "entry.json").write_text(json.dumps(info), encoding="utf-8")
    assert _prepare(tmp_path).path == entry
    assert "files" in json.loads((entry / "entry.json").read_text(encoding="utf-8"))


def test_stale_temp_folder_is_removed_only_once_its_builder_is_gone(tmp_path):
    entry = _prepare(tmp_path).path
    stale = tmp_path / f".{entry.name}.abcd_123"
    stale.mkdir()
    (stale / "images.npy").write_bytes(b"half")
    with open(tmp_path / f"{entry.name}.lock", "a+") as lock:  # a live builder holds the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert cache.remove_stale_builds(tmp_path) == []
        assert stale.exists()
    _prepare(tmp_path)
    assert not stale.exists()


def _wordy_chunk(first: int, n: int) -> RawChunk:
    """``_tiny_chunk`` with long writer ids and a long meta field (4 kB a sample), the width
    of both depending on the chunk, so the columns outweigh the images."""
    chunk = _tiny_chunk(first, n)
    width = 1000 - first % 7
    chunk.writers = np.array([f"{first + i:06d}".ljust(width, "w") for i in range(n)])
    chunk.meta["note"] = np.array([f"{first + i}".ljust(width + 3, "n") for i in range(n)])
    return chunk


def test_a_build_holds_one_chunk_of_columns_in_memory_not_all(tmp_path):
    """Labels, writers and meta go to disk chunk by chunk (spilled, then joined), as images
    do: the builder's memory does not grow with the number of samples."""
    import tracemalloc

    chunks, per_chunk = 24, 150
    tasks = [
        ChunkTask(functools.partial(_wordy_chunk, c * per_chunk, per_chunk), per_chunk, f"c{c}")
        for c in range(chunks)
    ]
    columns_bytes = chunks * per_chunk * 2 * 4 * 1000  # writers + note, UTF-32, ~1000 wide
    tracemalloc.start()
    try:
        source = cache.load_or_prepare(
            tmp_path, "wordy", "ai", {"w": 1}, lambda: tasks, OPTIONS, workers=1, progress=False
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < columns_bytes / 4, f"peak {peak / 1e6:.1f} MB, columns {columns_bytes / 1e6} MB"
    expected = [_wordy_chunk(c * per_chunk, per_chunk) for c in range(chunks)]
    assert source.writers.tolist() == [w for e in expected for w in e.writers.tolist()]
    assert source.writers.dtype == np.dtype("<U1000")  # the widest chunk's
    assert source.meta["note"].tolist() == [x for e in expected for x in e.meta["note"].tolist()]
    assert source.meta["n"].tolist() == list(range(chunks * per_chunk))
    assert source.labels.tolist() == [x for e in expected for x in e.labels.tolist()]
    assert not list(source.path.glob(".*"))  # no spill file left in the entry


def test_a_failing_worker_pool_is_stopped_and_leaves_nothing(tmp_path):
    tasks = [ChunkTask(_broken, 3, "broken"), *_tasks(3)]
    with pytest.raises(RuntimeError, match="disk on fire"):
        cache.load_or_prepare(
            tmp_path, "x", "s", {"a": 1}, lambda: tasks, OPTIONS, workers=2, progress=False
        )
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


# --- killed and terminated preparers (real processes) ------------------------------------------

SLOW_PREPARE = (  # synthetic, two workers, many small chunks: a minute or more if left alone
    "prepare",
    "workers=2",
    "synthetic.writers=400",
    "+synthetic.chunk_writers=2",
)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that does not reap it counts as gone, unless
    other threads of it are still exiting: they hold its files)."""
    proc = Path("/proc") / str(pid)
    try:
        zombie = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        return not zombie or len(list((proc / "task").iterdir())) > 1
    except OSError:
        return False


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _start_slow_prepare(root: Path) -> tuple[subprocess.Popen, list[int]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "hwexp.data", *SLOW_PREPARE],
        env=os.environ | {"HWEXP_ROOT": str(root)},
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        workers = []

        def started() -> bool:  # forked workers: children with their parent's command line
            if process.poll() is not None:
                pytest.fail(f"prepare ended early: {process.communicate()[1][-2000:]}")
            own = _cmdline(process.pid)
            workers[:] = [p for p in _children(process.pid) if _cmdline(p) == own]
            return b"hwexp.data" in own and len(workers) == 2

        assert _wait_for(started, 60), "the two workers never started"
        assert _wait_for(lambda: _temp_folders(root), 30)
        return process, workers
    except BaseException:
        process.kill()
        process.wait()
        raise


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _temp_folders(root: Path) -> list[Path]:
    cache_dir = root / "data" / "cache"
    return [p for p in cache_dir.glob(".synthetic-*")] if cache_dir.is_dir() else []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_sigkill_of_prepare_takes_its_workers_and_the_next_run_clears_the_temp_folder(tmp_path):
    process, workers = _start_slow_prepare(tmp_path)
    try:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        assert _wait_for(lambda: not any(_alive(w) for w in workers), 5), "orphaned workers"
    finally:
        for worker in workers:
            if _alive(worker):
                os.kill(worker, signal.SIGKILL)
    stale = _temp_folders(tmp_path)
    assert stale  # what a SIGKILL leaves behind
    _prepare(tmp_path / "data" / "cache")  # any later preparation in that cache
    assert not _temp_folders(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_process_forked_by_a_builder_does_not_hold_its_lock(tmp_path):
    lock = tmp_path / "entry.lock"
    read_end, write_end = os.pipe()
    builder = os.fork()
    if builder == 0:  # holds the lock, forks a long-lived child, dies without unlocking
        with cache._locked(lock):
            child = os.fork()
            if child == 0:
                time.sleep(60)
                os._exit(0)
            os.write(write_end, str(child).encode())
            os._exit(0)
    os.close(write_end)
    os.waitpid(builder, 0)
    child = int(os.read(read_end, 32))
    os.close(read_end)
    try:
        assert _alive(child)
        with cache._locked(lock, blocking=False) as held:
            assert held, "the builder's child kept the lock"
        assert _alive(child)
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_sigterm_of_prepare_stops_workers_and_removes_its_temp_folder(tmp_path):
    process, workers = _start_slow_prepare(tmp_path)
    try:
        os.kill(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
        assert process.returncode == 128 + signal.SIGTERM
        assert "Traceback" not in stderr
        assert not any(_alive(w) for w in workers)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for worker in workers:
            if _alive(worker):
                os.kill(worker, signal.SIGKILL)
    assert not _temp_folders(tmp_path)
