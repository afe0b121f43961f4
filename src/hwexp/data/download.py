"""HTTP downloads with md5 verification and resume, using only the standard library.

A file is fetched into ``<dest>.part``; an interrupted download leaves that file behind and
the next call asks the server only for the missing bytes (``Range: bytes=<size>-``). A server
that ignores ``Range`` (answers ``200``) is handled by starting over. Only a file whose md5
matches is moved onto ``dest`` (atomically, with ``os.replace``), so ``dest`` is never partial.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm

from hwexp.data.kmnist import official_files
from hwexp.errors import DownloadError

log = logging.getLogger(__name__)

ENV_KMNIST_BASE_URL = "HWEXP_KMNIST_BASE_URL"
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def md5_of_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex md5 digest of a file, read ``chunk_bytes`` at a time."""
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def download_file(
    url: str,
    dest: Path,
    md5: str | None,
    *,
    chunk_bytes: int = 1 << 20,
    progress: bool = True,
    timeout: float = 30,
) -> Path:
    """Download ``url`` to ``dest``, verifying its md5 (hex, any case; None: no check).

    Contract:

    * an existing ``dest`` whose md5 matches is kept and nothing is fetched (with ``md5=None``
      any existing ``dest`` is kept); an existing ``dest`` that does not match is deleted and
      fetched again;
    * bytes go to ``dest.name + ".part"`` next to ``dest``; an existing ``.part`` is resumed
      with an HTTP ``Range`` request; a ``200`` answer (Range ignored) restarts from byte 0; a
      ``416`` answer means the ``.part`` already holds the whole file;
    * if a resumed download fails the md5 check it is fetched once more from byte 0;
    * ``dest`` appears only complete and verified (``os.replace``).

    ``chunk_bytes`` is the read size in bytes; ``timeout`` is the socket timeout in seconds;
    ``progress`` shows a tqdm bar on stderr.

    Raises:
        DownloadError: md5 mismatch (naming the URL, expected and actual md5; the ``.part`` is
            deleted), an HTTP error status, or a network failure (the ``.part`` is kept so that
            the next call resumes).
    """
    dest = Path(dest)
    expected = md5.strip().lower() if md5 else None
    if dest.is_file():
        if expected is None:
            return dest
        actual = md5_of_file(dest, chunk_bytes)
        if actual == expected:
            return dest
        log.warning("%s has md5 %s, expected %s: fetching it again", dest, actual, expected)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resumed = part.is_file() and part.stat().st_size > 0
    _fetch_into(url, part, chunk_bytes=chunk_bytes, progress=progress, timeout=timeout)
    actual = md5_of_file(part, chunk_bytes) if expected else None
    if expected and actual != expected and resumed:
        log.warning("resumed download of %s has the wrong md5: fetching it from the start", url)
        part.unlink()
        _fetch_into(url, part, chunk_bytes=chunk_bytes, progress=progress, timeout=timeout)
        actual = md5_of_file(part, chunk_bytes)
    if expected and actual != expected:
        size = part.stat().st_size
        part.unlink()
        raise DownloadError(
            f"{url}: md5 mismatch: expected {expected}, got {actual} ({size} bytes). The partial "
            f"file {part} was deleted. The transfer was damaged or the file on the server has "
            "changed; try again, and if it persists check the URL."
        )
    os.replace(part, dest)
    return dest


def download_dataset(
    name: str,
    data_dir: Path,
    base_url: str | None = None,
    *,
    md5s: Mapping[str, str] | None = None,
    progress: bool = True,
    timeout: float = 30,
) -> list[Path]:
    """Download every file of ``name`` ("kmnist" or "k49") into ``data_dir/<name>/``.

    ``base_url`` is the folder URL that holds the variant's files; without it the environment
    variable ``HWEXP_KMNIST_BASE_URL`` is used, else the official CODH URL. A ``{name}`` in the
    URL is replaced by the variant, so one mirror setting can serve both variants
    (``http://mirror/kmnist/dataset/{name}/``). ``md5s`` overrides the official md5 of the files
    it names (for tests and mirrors). Files already present with the right md5 are skipped.

    Returns the paths of the files, in the order of the official table.

    Raises:
        ValueError: unknown ``name``.
        DownloadError: as :func:`download_file`.
    """
    table = official_files(name)
    base = base_url or os.environ.get(ENV_KMNIST_BASE_URL) or table.base_url
    base = base.replace("{name}", name)
    if not base.endswith("/"):
        base += "/"
    expected = table.md5_by_name() | dict(md5s or {})
    folder = Path(data_dir) / name
    return [
        download_file(
            base + urllib.parse.quote(file_name),
            folder / file_name,
            expected[file_name],
            progress=progress,
            timeout=timeout,
        )
        for file_name in table.names
    ]


def _fetch_into(url: str, part: Path, *, chunk_bytes: int, progress: bool, timeout: float) -> None:
    """Append the bytes ``part`` lacks (or all of them) from ``url`` to ``part``."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"Accept-Encoding": "identity", "User-Agent": "hwexp-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        content_range = error.headers.get("Content-Range") if error.headers else None
        error.close()
        if error.code == 416 and offset:
            _, _, total = _parse_content_range(content_range)
            if total == offset:
                return  # the .part already holds the whole file; the md5 check decides
            log.info("%s: range %d- not satisfiable; restarting from byte 0", url, offset)
            part.unlink()
            return _fetch_into(
                url, part, chunk_bytes=chunk_bytes, progress=progress, timeout=timeout
            )
        raise DownloadError(f"{url}: HTTP {error.code} {error.reason}.") from error
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(
            f"{url}: cannot connect ({reason}). Check the network or set a mirror with "
            f"{ENV_KMNIST_BASE_URL}; to run offline use dataset.source=synthetic."
        ) from error

    with response:
        remaining = _int_or_none(response.headers.get("Content-Length"))
        if response.status == 206:
            start, _, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                response.close()
                log.info("%s: server sent a range from %s, not %d; restarting", url, start, offset)
                part.unlink()
                return _fetch_into(
                    url, part, chunk_bytes=chunk_bytes, progress=progress, timeout=timeout
                )
            mode = "ab"
        else:
            if offset:
                log.info("%s: server ignored the Range request; restarting from byte 0", url)
            offset, mode, total = 0, "wb", remaining
        if total is None and remaining is not None:
            total = offset + remaining
        received = 0
        try:
            with (
                part.open(mode) as f,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=part.name.removesuffix(".part"),
                    file=sys.stderr,
                    disable=not progress,
                ) as bar,
            ):
                while block := response.read(chunk_bytes):
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as error:
            raise DownloadError(
                f"{url}: transfer interrupted after {offset + received} bytes ({error}); "
                f"{part} is kept, run the download again to resume."
            ) from error
    if remaining is not None and received < remaining:
        raise DownloadError(
            f"{url}: connection closed after {offset + received} of {offset + remaining} bytes; "
            f"{part} is kept, run the download again to resume."
        )


def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``(first, last, total)`` byte positions of a ``Content-Range`` header; None if unknown."""
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if not match:
        return None, None, None
    first, last, total = match.groups()
    return _int_or_none(first), _int_or_none(last), _int_or_none(total)


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
