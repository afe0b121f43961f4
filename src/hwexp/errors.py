"""Every error hwexp reports to its user, and the one wrapper that turns them into an exit code.

Each message names the file, record, run or option and what to do. ``HwexpError`` is the base:
the command line prints ``error: <message>`` and exits with status 1 (``exit_on_error``).
``warn`` and ``note`` print the ``warning:`` and ``note:`` lines of a command that goes on.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class HwexpError(Exception):
    """Base class of every error meant for the user (a message, not a traceback)."""


class DataError(HwexpError):
    """Base class of every data-layer error."""


class DatasetFilesMissing(DataError):
    """A dataset's raw files are not where the configuration says."""


class CorruptDataFile(DataError):
    """A raw file is truncated or not of the expected format."""


class UnreadableImage(DataError):
    """An image in a user's folder cannot be decoded."""


class DownloadError(DataError):
    """A download failed or its checksum does not match."""


class ConfigError(DataError):
    """A dataset, preprocessing or split option is invalid."""


class DamagedCacheEntry(DataError):
    """A prepared-array cache entry is incomplete or no longer matches what was recorded."""


class RunNotFound(HwexpError, LookupError):
    """A run reference names no run, or no run with a trained model."""


class ExportError(HwexpError, RuntimeError):
    """A conversion or a check failed; nothing was written to the output folder."""


class ModelLoadError(HwexpError):
    """A model cannot be loaded; the message says which file or registry entry and why."""


class InputError(HwexpError, ValueError):
    """Input a recognizer cannot read (a picture, a drawing, a file); ``status`` is the HTTP
    status the drawing pad answers it with (400 malformed, 422 no ink)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


INTERRUPTED_STATUS = 130  # 128 + SIGINT, as shells report a command ended by Ctrl+C


@contextlib.contextmanager
def exit_on_error(
    also: tuple[type[BaseException], ...] = (), reraise: bool = False
) -> Iterator[None]:
    """Print an ``HwexpError`` (or one of ``also``) as ``error: <message>`` on stderr and exit
    with status 1; with ``reraise`` (a sweep's trial, whose sweeper records the error) print it
    and raise it again instead. Ctrl+C (``KeyboardInterrupt``) is one line, ``interrupted``
    and what was done about it (the notes added on its way up, e.g. the MLflow run marked
    KILLED), and exit status 130."""
    try:
        yield
    except (HwexpError, *also) as error:
        print(f"error: {error}", file=sys.stderr)
        if reraise:
            raise
        raise SystemExit(1) from None
    except KeyboardInterrupt as interrupt:
        if reraise:
            raise
        notes = "; ".join(getattr(interrupt, "__notes__", ()))
        print(f"interrupted{': ' + notes if notes else ''}", file=sys.stderr)
        raise SystemExit(INTERRUPTED_STATUS) from None


def warn(message: str) -> None:
    """Print ``warning: <message>`` on stderr: not an error, but something that changes what
    the user's results mean (the command goes on)."""
    print(f"warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    """Print ``note: <message>`` on stderr: a choice hwexp made that the user should know of."""
    print(f"note: {message}", file=sys.stderr)
