"""Is the process behind a record still alive? Process identities and heartbeats.

A long job records who runs it (``process_identity``: host, pid and the process's start time,
so that a reused pid is not taken for it) and keeps a heartbeat (``Heartbeat``: a daemon thread
calling ``beat`` every interval). Another process can then tell a live job from a dead one: on
the same host from ``/proc`` (``identity_alive``), elsewhere from the age of the last beat.
Used for MLflow training runs (``hwexp.tracking``) and Optuna trials (``hwexp.sweep``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_PROC = Path("/proc")
_BOOT_ID = _PROC / "sys/kernel/random/boot_id"


class Heartbeat:
    """While the ``with`` block runs, call ``beat()`` at once and then every ``interval_s``
    seconds from a daemon thread. A failing beat in the thread is logged, never raised (a missed
    beat is not worth killing the job); the first one raises. ``interval_s`` None or 0: does
    nothing."""

    def __init__(
        self, beat: Callable[[], None], interval_s: float | None, name: str = "heartbeat"
    ) -> None:
        self.beat = beat
        self.interval_s = interval_s
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.interval_s:
            self.beat()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        assert self.interval_s
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception as error:
                log.warning("%s not recorded: %s", self.name, error)


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state letter, start time in clock ticks since boot)`` of process ``pid`` from
    ``/proc``, or None when there is no such process."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": comm may hold spaces
    return fields[0], fields[19]


def _start_of(pid: int) -> str | None:
    """``<boot id>:<start ticks>`` of process ``pid``: unique on this host across reboots and
    pid reuse; None without ``/proc`` or without such a process."""
    stat = _proc_stat(pid)
    if stat is None:
        return None
    try:
        boot = _BOOT_ID.read_text().strip()
    except OSError:
        boot = ""
    return f"{boot}:{stat[1]}"


def process_identity(pid: int | None = None) -> str:
    """JSON ``{"host", "pid", "start"}`` of this process (or ``pid``), for ``identity_alive``."""
    pid = os.getpid() if pid is None else pid
    return json.dumps({"host": socket.gethostname(), "pid": pid, "start": _start_of(pid)})


def identity_alive(identity: str) -> bool | None:
    """Whether the process that ``process_identity`` described is still running: True or False
    on its own host (a zombie, or another process with the same pid, is not it), None on another
    host or for an unreadable identity (the caller must judge by heartbeats)."""
    try:
        info = json.loads(identity)
        host, pid, start = info["host"], int(info["pid"]), info.get("start")
    except (ValueError, TypeError, KeyError):
        return None
    if host != socket.gethostname():
        return None
    if not (_PROC / "self" / "stat").exists():  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):  # gone, or dead and not yet reaped
        return False
    return start is None or start == _start_of(pid)
