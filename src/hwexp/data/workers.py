"""Worker processes that die with the process that started them.

:func:`map_in_processes` runs a function over items in a process pool and yields the results
in order. Each worker dies when its parent does, however the parent ends (SIGKILL included):
on Linux the kernel sends it SIGKILL (``PR_SET_PDEATHSIG``), and everywhere a thread in the
worker watches the parent's pid. A consumer that stops early (an error, SIGTERM turned into
``SystemExit`` by :func:`sigterm_exits`) stops the pool at once and ends its workers.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, suppress
from multiprocessing import get_context
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_PR_SET_PDEATHSIG = 1


def map_in_processes(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """``fn(item)`` for each item, in order: in this process if ``workers`` <= 1 (or a single
    item), otherwise in a pool of ``workers`` processes (``fn`` and items must pickle)."""
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
        return
    # fork is fastest, but not once a framework with its own thread pools is loaded.
    threaded = any(name in sys.modules for name in ("tensorflow", "torch", "jax"))
    context = get_context("spawn" if threaded else "fork")
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_started, initargs=(os.getpid(),)
    )
    finished = False
    try:
        yield from pool.map(fn, items)
        finished = True
    finally:
        if finished:
            pool.shutdown()
        else:
            _stop_pool(pool)


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within this block (in the main thread), SIGTERM raises ``SystemExit(143)`` instead of
    ending the process on the spot, so ``finally`` blocks run: pools stop, temporary files go.
    A SIGTERM handler someone else installed is left alone."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def exit_now(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop_pool(pool: ProcessPoolExecutor, grace: float = 5.0) -> None:
    """Cancel what is queued and end the workers now (SIGTERM, then SIGKILL)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(1.0)


def _worker_started(parent: int) -> None:
    """Pool initializer: the worker dies with ``parent`` and ends at once on SIGTERM; Ctrl+C
    (SIGINT to the whole process group) is left to the parent, which stops the pool."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, if forked
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # else each worker prints a traceback
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # Elsewhere, and should the parent have died before prctl: watch the parent's pid.
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int, interval: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)
