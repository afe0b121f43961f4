"""Atomic writes: what other users may read, and that a failed write leaves the old file."""

import contextlib
import os
import stat
from pathlib import Path

import pytest

from hwexp.fsutil import atomic_write_bytes, current_umask, make_temporary_dir


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    "mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_new_files_and_folders_get_the_mode_plain_creation_would(
    tmp_path, mask, file_mode, dir_mode
):
    with umask(mask):
        assert current_umask() == mask
        atomic_write_bytes(tmp_path / "out" / "grid.png", b"png")
        folder = make_temporary_dir(tmp_path, ".entry.")
        (tmp_path / "plain.txt").write_text("x")
    assert mode(tmp_path / "out" / "grid.png") == file_mode == mode(tmp_path / "plain.txt")
    assert mode(folder) == dir_mode
    assert folder.name.startswith(".entry.")


def test_a_replaced_file_keeps_its_mode_and_content_is_never_half_written(tmp_path):
    path = tmp_path / "report.txt"
    path.write_bytes(b"old")
    path.chmod(0o640)
    with umask(0o022):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and mode(path) == 0o640
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # the write fails after the temporary file exists
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["report.txt"]  # no temporary file left
