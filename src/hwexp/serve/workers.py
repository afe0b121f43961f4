"""Several server processes behind one port: ``python -m hwexp.serve --workers N``.

One process runs Python one thread at a time (the interpreter lock), so a single server uses
about one CPU core however many requests are in flight. With workers, the parent process binds
the port and starts ``N`` worker processes (fresh interpreters: multiprocessing's ``spawn``),
each loading the models itself and accepting connections from the shared socket. A worker takes
a connection only while it holds at most one more than the worker holding fewest (counts in
shared memory): left to the race for ``accept``, one worker sometimes took most of 16
keep-alive clients, and their wait doubled.

The parent only supervises:

- :meth:`WorkerPool.start` returns once every worker serves; a worker that cannot load its
  models stops the start with that worker's error;
- a worker that dies is logged and replaced; meanwhile the others take its share;
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
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from hwexp.errors import HwexpError, ModelLoadError
from hwexp.recognition import Recognizer
from hwexp.serve.app import PadServer

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0  # a worker still running this long after SIGTERM is killed
DEFER_S = 0.001  # a worker ahead in connections looks again after this long
ABSENT = 2**62  # the connection count of a worker not serving: never the lowest

Loader = Callable[[], Sequence[Recognizer]]  # picklable (a module-level function or partial)


class _SharingServer(PadServer):
    """A worker's :class:`PadServer` on the socket all workers share, counting the connections
    it holds in ``held[index]`` and taking a new one only while that count is at most one above
    the lowest of the others' (an absent worker's count is :data:`ABSENT`)."""

    def __init__(
        self, models: Sequence[Recognizer], listener: socket.socket, held: Any, index: int
    ) -> None:
        super().__init__(models, listener)
        self._held, self._index = held, index
        held[index] = 0

    def _accept(self) -> None:
        """One connection at a time, unless this worker is ahead: then it stops listening for
        :data:`DEFER_S` and a worker holding fewer takes the connection."""
        others = [n for i, n in enumerate(self._held) if i != self._index]
        if others and self.open_connections > min(others) + 1:
            self._pause_accepting(DEFER_S)
            return
        self._take_connection()

    def _connection_count(self, change: int) -> None:
        super()._connection_count(change)
        self._held[self._index] = self.open_connections


def _serve(
    index: int, listener: socket.socket, held: Any, load: Loader, parent: Connection
) -> None:
    """A worker's life: load the models, report ``("ready", model descriptions)`` (or
    ``("error", message)``) to the parent, serve ``listener`` until the parent's end of the pipe
    closes."""
    try:
        models = load()
        server = _SharingServer(models, listener, held, index)
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
    server.server_close()


@dataclass
class _Worker:
    process: Any  # multiprocessing's SpawnProcess
    control: Connection  # ready/error messages from the worker; closed: the worker stops
    ready: bool = False


class WorkerPool:
    """``count`` worker processes serving the models ``load`` returns on ``listener``."""

    def __init__(self, count: int, listener: socket.socket, load: Loader) -> None:
        if count < 1:
            raise ValueError(f"--workers {count}: at least 1")
        self.count = count
        self.listener = listener
        self.load = load
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker | None] = [None] * count
        # Connections each worker holds (shared memory), ABSENT until it serves.
        self._held = self._context.RawArray("q", [ABSENT] * count)

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
        """Replace workers that die, until interrupted (SIGTERM, Ctrl+C: the caller stops the
        pool).

        Raises:
            ModelLoadError: a replacement worker could not load the models, or died before
                serving.
        """
        while True:
            owners: dict[Any, tuple[int, _Worker]] = {}
            for index, worker in enumerate(self._workers):
                if worker is not None:
                    owners[worker.process.sentinel] = (index, worker)
                    if not worker.ready:
                        owners[worker.control] = (index, worker)
            for event in wait(list(owners)):
                index, worker = owners[event]
                if self._workers[index] is not worker:
                    continue  # replaced while handling an earlier event of this batch
                if not worker.ready:  # a message, or the end of a worker still loading
                    self._wait_ready(index)
                else:
                    self._replace(index)

    def stop(self) -> None:
        """Terminate every worker and wait for it (killed after :data:`STOP_TIMEOUT_S`)."""
        running = [w for w in self._workers if w is not None]
        self._workers = [None] * self.count
        for worker in running:
            worker.control.close()
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in running:
            worker.process.join(STOP_TIMEOUT_S)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()

    def _launch(self, index: int) -> None:
        control, theirs = self._context.Pipe()
        self._held[index] = ABSENT
        process = self._context.Process(
            target=_serve,
            args=(index, self.listener, self._held, self.load, theirs),
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
        self._workers[index] = _Worker(process, control)

    def _wait_ready(self, index: int) -> list[dict[str, Any]]:
        worker = self._workers[index]
        try:
            kind, detail = worker.control.recv()
        except EOFError:
            worker.process.join()
            raise ModelLoadError(
                f"server worker {index} exited with status {worker.process.exitcode} before serving"
            ) from None
        if kind == "error":
            raise ModelLoadError(detail)
        worker.ready = True
        return detail

    def _replace(self, index: int) -> None:
        worker = self._workers[index]
        worker.process.join()
        worker.control.close()
        self._held[index] = ABSENT  # the connections it held died with it
        log.warning(
            "server worker %d (pid %d) exited with status %s; starting a new one",
            index,
            worker.process.pid,
            worker.process.exitcode,
        )
        self._launch(index)  # accepting once its models are loaded
