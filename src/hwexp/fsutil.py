"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Files and folders made here get the permissions that plain ``open`` and ``mkdir`` would give
(0666 and 0777 less the umask: 0644 and 0755 under the usual umask 022), not the private 0600
and 0700 of ``tempfile``'s temporary names, so other users can read outputs and cache entries
whenever they could read a file written the ordinary way. A file that is replaced keeps its mode.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe for that instant)
    os.umask(mask)
    return mask


def make_temporary_dir(parent: Path, prefix: str) -> Path:
    """A new uniquely named folder in ``parent`` (``tempfile.mkdtemp``) with the permissions
    ``mkdir`` would give, for content that is renamed into place once complete."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    folder.chmod(0o777 & ~current_umask())
    return folder


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename.

    The file gets ``path``'s current mode when it exists, else the mode ``open`` would give."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))
