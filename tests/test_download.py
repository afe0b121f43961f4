"""Downloads against a real HTTP server on 127.0.0.1 (no other network is touched)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from hwexp.data.download import ENV_KMNIST_BASE_URL, download_dataset, download_file
from hwexp.data.kmnist import KMNIST_FILES, kmnist_tasks
from hwexp.errors import DownloadError


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


PAYLOAD = np.random.default_rng(7).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


def test_full_download_verifies_md5(tmp_path: Path, serve) -> None:
    server = serve({"blob.bin": PAYLOAD})
    dest = tmp_path / "out" / "blob.bin"
    result = download_file(
        server.url("blob.bin"), dest, md5(PAYLOAD), chunk_bytes=4096, progress=False
    )
    assert result == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("blob.bin.part").exists()
    assert server.bytes_served == len(PAYLOAD)
    assert server.requests == [("/blob.bin", None)]


def test_resume_requests_only_the_missing_bytes(tmp_path: Path, serve) -> None:
    server = serve({"blob.bin": PAYLOAD})
    dest = tmp_path / "blob.bin"
    have = 120_000
    dest.with_name("blob.bin.part").write_bytes(PAYLOAD[:have])
    download_file(server.url("blob.bin"), dest, md5(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/blob.bin", f"bytes={have}-")]
    assert server.bytes_served == len(PAYLOAD) - have


def test_interrupted_download_keeps_part_and_resumes(tmp_path: Path, serve) -> None:
    server = serve({"blob.bin": PAYLOAD}, cut_after=100_000)
    dest = tmp_path / "blob.bin"
    part = dest.with_name("blob.bin.part")
    with pytest.raises(DownloadError, match="resume") as caught:
        download_file(server.url("blob.bin"), dest, md5(PAYLOAD), progress=False)
    assert server.url("blob.bin") in str(caught.value)
    assert part.read_bytes() == PAYLOAD[:100_000]
    assert not dest.exists()
    server.cut_after = None
    download_file(server.url("blob.bin"), dest, md5(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/blob.bin", "bytes=100000-")
    assert server.bytes_served == len(PAYLOAD)  # 100_000 the first time, the rest the second


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path, serve) -> None:
    server = serve({"blob.bin": PAYLOAD}, honour_range=False)
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(PAYLOAD[:50_000])
    download_file(server.url("blob.bin"), dest, md5(PAYLOAD), progress=False)
    assert server.requests == [("/blob.bin", "bytes=50000-")]
    assert server.bytes_served == len(PAYLOAD)
    assert dest.read_bytes() == PAYLOAD  # not the 50_000-byte prefix twice


def test_complete_part_answered_416_is_verified_and_kept(tmp_path: Path, serve) -> None:
    server = serve({"blob.bin": PAYLOAD})
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(PAYLOAD)
    download_file(server.url("blob.bin"), dest, md5(PAYLOAD), progress=False)
    assert server.requests == [("/blob.bin", f"bytes={len(PAYLOAD)}-")]
    assert server.bytes_served == 0
    assert dest.read_bytes() == PAYLOAD


def test_part_longer_than_the_file_starts_over(tmp_path: Path, serve) -> None:
    server = serve({"blob.bin": PAYLOAD})
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(PAYLOAD + b"junk")
    download_file(server.url("blob.bin"), dest, md5(PAYLOAD), progress=False)
    assert [r for _, r in server.requests] == [f"bytes={len(PAYLOAD) + 4}-", None]
    assert dest.read_bytes() == PAYLOAD


def test_stale_part_with_wrong_bytes_is_refetched_whole(tmp_path: Path, serve) -> None:
    server = serve({"blob.bin": PAYLOAD})
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(b"\0" * 1000)  # not PAYLOAD's first bytes
    download_file(server.url("blob.bin"), dest, md5(PAYLOAD), progress=False)
    assert [r for _, r in server.requests] == ["bytes=1000-", None]
    assert server.bytes_served == len(PAYLOAD) - 1000 + len(PAYLOAD)
    assert dest.read_bytes() == PAYLOAD


def test_wrong_md5_raises_and_leaves_no_file(tmp_path: Path, serve) -> None:
    server = serve({"blob.bin": PAYLOAD})
    dest = tmp_path / "blob.bin"
    wrong = "0" * 32
    with pytest.raises(DownloadError) as caught:
        download_file(server.url("blob.bin"), dest, wrong, progress=False)
    message = str(caught.value)
    assert server.url("blob.bin") in message
    assert wrong in message and md5(PAYLOAD) in message
    assert not dest.exists()
    assert not dest.with_name("blob.bin.part").exists()


def test_complete_dest_is_not_fetched_again(tmp_path: Path, serve) -> None:
    server = serve({"blob.bin": PAYLOAD})
    dest = tmp_path / "blob.bin"
    dest.write_bytes(PAYLOAD)
    assert download_file(server.url("blob.bin"), dest, md5(PAYLOAD).upper(), progress=False) == dest
    assert server.requests == []
    assert server.bytes_served == 0


def test_damaged_dest_is_replaced(tmp_path: Path, serve) -> None:
    server = serve({"blob.bin": PAYLOAD})
    dest = tmp_path / "blob.bin"
    dest.write_bytes(PAYLOAD[:-1] + b"x")
    download_file(server.url("blob.bin"), dest, md5(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.bytes_served == len(PAYLOAD)


def test_http_error_names_the_url(tmp_path: Path, serve) -> None:
    server = serve({})
    with pytest.raises(DownloadError, match=r"missing\.bin: HTTP 404"):
        download_file(server.url("missing.bin"), tmp_path / "missing.bin", None, progress=False)
    assert not (tmp_path / "missing.bin").exists()


def test_progress_bar_goes_to_stderr(tmp_path: Path, serve, capsys) -> None:
    server = serve({"blob.bin": PAYLOAD})
    download_file(server.url("blob.bin"), tmp_path / "blob.bin", None, progress=True)
    captured = capsys.readouterr()
    assert "blob.bin" in captured.err and captured.out == ""


def fake_kmnist_files(tmp_path: Path) -> dict[str, bytes]:
    """Tiny files shaped like the official KMNIST ones (30 train + 12 test rows)."""
    folder = tmp_path / "upstream"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 30), ("test", 12)):
        np.savez_compressed(folder / f"kmnist-{split}-imgs.npz", np.zeros((n, 28, 28), np.uint8))
        np.savez_compressed(folder / f"kmnist-{split}-labels.npz", rng.integers(0, 10, n, np.uint8))
    rows = [f"{i},U+{ord(c):04X},{c}" for i, c in enumerate("おきすつなはまやれを")]
    text = "index,codepoint,char\n" + "\n".join(rows) + "\n"
    (folder / "kmnist_classmap.csv").write_text(text, encoding="utf-8")
    return {name: (folder / name).read_bytes() for name in KMNIST_FILES.names}


def test_download_dataset_from_a_mirror_then_read_it(tmp_path: Path, serve) -> None:
    files = fake_kmnist_files(tmp_path)
    server = serve({f"kmnist/{name}": data for name, data in files.items()})
    data_dir = tmp_path / "data"
    paths = download_dataset(
        "kmnist",
        data_dir,
        base_url=f"{server.base_url}/kmnist",
        md5s={name: md5(data) for name, data in files.items()},
        progress=False,
    )
    assert paths == [data_dir / "kmnist" / name for name in KMNIST_FILES.names]
    for name, data in files.items():
        assert (data_dir / "kmnist" / name).read_bytes() == data
    tasks = kmnist_tasks(data_dir, "kmnist", None)
    assert sum(task.count for task in tasks) == 42
    served = server.bytes_served
    download_dataset(
        "kmnist",
        data_dir,
        base_url=f"{server.base_url}/kmnist",
        md5s={name: md5(data) for name, data in files.items()},
        progress=False,
    )
    assert server.bytes_served == served  # all present and verified: nothing fetched


def test_download_dataset_honours_the_environment_mirror(
    tmp_path: Path, serve, monkeypatch
) -> None:
    files = fake_kmnist_files(tmp_path)
    server = serve({f"mirror/kmnist/{name}": data for name, data in files.items()})
    monkeypatch.setenv(ENV_KMNIST_BASE_URL, f"{server.base_url}/mirror/{{name}}/")
    download_dataset(
        "kmnist", tmp_path / "data", md5s={n: md5(d) for n, d in files.items()}, progress=False
    )
    assert sorted(path for path, _ in server.requests) == sorted(
        f"/mirror/kmnist/{name}" for name in KMNIST_FILES.names
    )


def test_download_dataset_checks_the_official_md5s_by_default(tmp_path: Path, serve) -> None:
    files = fake_kmnist_files(tmp_path)  # the fake files cannot match the real md5s
    server = serve(files)
    with pytest.raises(DownloadError, match=KMNIST_FILES.files[0].md5):
        download_dataset("kmnist", tmp_path / "data", base_url=server.base_url, progress=False)
    assert not (tmp_path / "data" / "kmnist" / KMNIST_FILES.names[0]).exists()
