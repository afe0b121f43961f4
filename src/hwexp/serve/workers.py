"""Several server processes on one listening socket: ``python -m hwexp.serve --workers N``.

One process runs Python one thread at a time (the interpreter lock), so a single server uses
about one CPU core however many requests are in flight. With workers, the parent process binds
the socket and starts ``N`` worker processes (fresh interpreters: multiprocessing's ``spawn``),
each loading the models itself and accepting connections from the shared socket (the kernel
hands each connection to one of them). The parent only supervises:

- it returns from :meth:`WorkerPool.start` once every worker is serving; a worker that cannot
  load its models stops the start with that worker's error;
- a worker that dies later is logged and replaced;
- :meth:`WorkerPool.stop` (the command line calls it on SIGTERM and Ctrl+C) terminates the
  workers and waits for them; a worker whose parent dies without stopping it (SIGKILL) sees its
  pipe to the parent close and stops by itself.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from hwexp.errors import HwexpError, ModelLoadError
from hwexp.recognition import Recognizer
from hwexp.serve.app import make_server

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0  # a worker still running this long after SIGTERM is killed

Loader = Callable[[], Sequence[Recognizer]]  # picklable (a module-level function or partial)


def _serve(index: int, listener: socket.socket, load: Loader, parent: Connection) -> None:
    """A worker's life: load the models, report ``("ready", model descriptions)`` (or
    ``("error", message)``) to the parent, serve ``listener`` until the parent's end of the pipe
    closes."""
    try:
        models = load()
        server = make_server(models, listener=listener)
    except (HwexpError, ValueError, OSError) as error:
        parent.send(("error", str(error)))
        return
    parent.send(("ready", [m.describe() for m in models]))

    def stop_when_the_parent_goes() -> None:
        with contextlib.suppress(EOFError, OSError):
            parent.recv()
        server.shutdown()

    threading.Thread(target=stop_when_the_parent_goes, daemon=True).start()
    log.debug("worker %d serving", index)
    server.serve_forever()


class WorkerPool:
    """``count`` worker processes serving the models ``load`` returns on ``listener``."""

    def __init__(self, count: int, listener: socket.socket, load: Loader) -> None:
        if count < 1:
            raise ValueError(f"--workers {count}: at least 1")
        self.count = count
        self.listener = listener
        self.load = load
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[tuple[Any, Connection] | None] = [None] * count

    @property
    def pids(self) -> list[int]:
        return [w[0].pid for w in self._workers if w is not None]

    def start(self) -> list[dict[str, Any]]:
        """Start every worker and wait until all serve; returns the models' descriptions
        (:meth:`Recognizer.describe`) as the first worker loaded them.

        Raises:
            ModelLoadError: a worker could not load the models or died before serving (the
                other workers are stopped).
        """
        for index in range(self.count):
            self._launch(index)
        try:
            return [self._wait_ready(index) for index in range(self.count)][0]
        except BaseException:
            self.stop()
            raise

    def supervise(self) -> None:
        """Replace workers that die, until interrupted (SIGTERM, Ctrl+C: the caller stops)."""
        while True:
            sentinels = {w[0].sentinel: i for i, w in enumerate(self._workers) if w is not None}
            for ended in wait(list(sentinels)):
                index = sentinels[ended]
                process = self._workers[index][0]
                process.join()
                log.warning(
                    "worker %d (pid %d) exited with status %s; starting a new one",
                    index,
                    process.pid,
                    process.exitcode,
                )
                self._launch(index)
                self._wait_ready(index)

    def stop(self) -> None:
        """Terminate every worker and wait for it (killed after :data:`STOP_TIMEOUT_S`)."""
        running = [w for w in self._workers if w is not None]
        self._workers = [None] * self.count
        for process, connection in running:
            connection.close()
            if process.is_alive():
                process.terminate()
        for process, _ in running:
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()

    def _launch(self, index: int) -> None:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=_serve,
            args=(index, self.listener, self.load, theirs),
            name=f"hwexp-serve-worker-{index}",
            daemon=True,  # terminated, if still running, when the parent's interpreter exits
        )
        # Ctrl+C reaches every process of the terminal: the parent alone handles it, and the
        # worker inherits SIGINT ignored (from before its interpreter starts).
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            process.start()
        finally:
            signal.signal(signal.SIGINT, handler)
        theirs.close()  # the worker holds the only other end: EOF here when it dies
        self._workers[index] = (process, ours)

    def _wait_ready(self, index: int) -> list[dict[str, Any]]:
        process, connection = self._workers[index]
        try:
            kind, detail = connection.recv()
        except EOFError:
            process.join()
            raise ModelLoadError(
                f"server worker {index} exited with status {process.exitcode} before serving"
            ) from None
        if kind == "error":
            raise ModelLoadError(detail)
        return detail
