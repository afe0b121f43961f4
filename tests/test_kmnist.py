"""KMNIST / Kuzushiji-49 readers, on tiny fake files laid out as the official archives."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from hwexp.data.kmnist import (
    K49_FILES,
    KMNIST_FILES,
    check_kmnist_files,
    kmnist_tasks,
    read_classmap,
    read_npz_rows,
)
from hwexp.errors import CorruptDataFile, DatasetFilesMissing

KMNIST_CHARS = "おきすつなはまやれを"
K49_CHARS = (
    "あいうえおかきくけこさしすせそたちつてとなにぬねの"
    "はひふへほまみむめもやゆよらりるれろわゐゑをんゝ"
)
SPLIT_ROWS = {"train": 30, "test": 12}


def pixel_code(split: str, row: int) -> int:
    """The value that fills image ``row`` of ``split``, so a test can tell which row it got."""
    return (row * 3 + (1 if split == "test" else 0)) % 256


def write_fake_variant(
    data_dir: Path, variant: str, chars: str, split_rows: dict[str, int] = SPLIT_ROWS
) -> dict[str, np.ndarray]:
    """Write ``data_dir/<variant>/`` like the official files; return the label indices per split."""
    folder = data_dir / variant
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(chars))
    label_indices = {}
    for split, n in split_rows.items():
        images = np.zeros((n, 28, 28), np.uint8)
        for row in range(n):
            images[row] = pixel_code(split, row)
        images[:, 0, 0] = 255  # one bright ink pixel, as in the real white-on-black images
        labels = rng.integers(0, len(chars), n).astype(np.uint8)
        np.savez_compressed(folder / f"{variant}-{split}-imgs.npz", images)
        np.savez_compressed(folder / f"{variant}-{split}-labels.npz", labels)
        label_indices[split] = labels
    lines = ["index,codepoint,char"]
    lines += [f"{i},U+{ord(c):04X},{c}" for i, c in enumerate(chars)]
    (folder / f"{variant}_classmap.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return label_indices


def load_all(tasks):
    return [task.load() for task in tasks]


@pytest.fixture()
def kmnist_dir(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    return tmp_path, write_fake_variant(tmp_path, "kmnist", KMNIST_CHARS)


def test_official_tables_name_every_file_with_an_md5() -> None:
    for table, variant in ((KMNIST_FILES, "kmnist"), (K49_FILES, "k49")):
        assert table.names == (
            f"{variant}-train-imgs.npz",
            f"{variant}-train-labels.npz",
            f"{variant}-test-imgs.npz",
            f"{variant}-test-labels.npz",
            f"{variant}_classmap.csv",
        )
        assert table.base_url == f"http://codh.rois.ac.jp/kmnist/dataset/{variant}/"
        for entry in table.files:
            assert re.fullmatch(r"[0-9a-f]{32}", entry.md5), entry
            assert entry.size_bytes > 0
        assert len({entry.md5 for entry in table.files}) == len(table.files)


def test_labels_are_the_classmap_characters(kmnist_dir) -> None:
    data_dir, label_indices = kmnist_dir
    chunks = load_all(kmnist_tasks(data_dir, "kmnist", None))
    labels = np.concatenate([c.labels for c in chunks])
    indices = np.concatenate([label_indices["train"], label_indices["test"]])
    expected = [KMNIST_CHARS[i] for i in indices]
    assert labels.tolist() == expected
    assert all(isinstance(label, str) for label in labels.tolist())


def test_images_rows_writers_and_meta_line_up(kmnist_dir) -> None:
    data_dir, _ = kmnist_dir
    chunks = load_all(kmnist_tasks(data_dir, "kmnist", None))
    for chunk in chunks:
        assert chunk.ink == "high"
        assert chunk.images.dtype == np.uint8 and chunk.images.shape[1:] == (28, 28)
        columns = (chunk.images, chunk.meta["official_split"], chunk.meta["row"], chunk.writers)
        for image, split, row, writer in zip(*columns, strict=True):
            assert image[5, 5] == pixel_code(str(split), int(row))
            assert image[0, 0] == 255
            assert writer == f"kmnist:{split}:{row}"
    splits = np.concatenate([c.meta["official_split"] for c in chunks]).tolist()
    assert splits == ["train"] * SPLIT_ROWS["train"] + ["test"] * SPLIT_ROWS["test"]
    writers = np.concatenate([c.writers for c in chunks])
    assert len(set(writers.tolist())) == len(writers)


def test_class_filter_and_counts(kmnist_dir) -> None:
    data_dir, label_indices = kmnist_dir
    keep = frozenset({"お", "れ", "ぬ"})  # ぬ is not a KMNIST class: it simply matches nothing
    tasks = kmnist_tasks(data_dir, "kmnist", keep, chunk_size=8)
    chunks = load_all(tasks)
    for task, chunk in zip(tasks, chunks, strict=True):
        assert task.count == len(chunk.images) > 0
    labels = np.concatenate([c.labels for c in chunks])
    assert set(labels.tolist()) <= keep
    wanted = sum(
        int(np.isin(indices, [KMNIST_CHARS.index("お"), KMNIST_CHARS.index("れ")]).sum())
        for indices in label_indices.values()
    )
    assert len(labels) == sum(task.count for task in tasks) == wanted
    for chunk in chunks:
        for label, split, row in zip(
            chunk.labels, chunk.meta["official_split"], chunk.meta["row"], strict=True
        ):
            assert KMNIST_CHARS[label_indices[str(split)][row]] == label


def test_chunking_covers_every_row_once(kmnist_dir) -> None:
    data_dir, _ = kmnist_dir
    tasks = kmnist_tasks(data_dir, "kmnist", None, chunk_size=7)
    assert len(tasks) == 5 + 2  # ceil(30 / 7) train chunks + ceil(12 / 7) test chunks
    assert all(task.count <= 7 for task in tasks)
    assert sum(task.count for task in tasks) == sum(SPLIT_ROWS.values())
    assert tasks[0].description == "kmnist-train-imgs.npz rows 0..6"
    chunks = load_all(tasks)
    seen = [
        (str(split), int(row))
        for chunk in chunks
        for split, row in zip(chunk.meta["official_split"], chunk.meta["row"], strict=True)
    ]
    assert sorted(seen) == sorted(
        (split, row) for split, n in SPLIT_ROWS.items() for row in range(n)
    )


def test_a_filter_that_matches_nothing_gives_no_tasks(kmnist_dir) -> None:
    data_dir, _ = kmnist_dir
    assert kmnist_tasks(data_dir, "kmnist", frozenset({"A"})) == []


def test_task_load_survives_pickling(kmnist_dir) -> None:
    data_dir, _ = kmnist_dir
    task = kmnist_tasks(data_dir, "kmnist", frozenset({"き", "す"}), chunk_size=16)[1]
    restored = pickle.loads(pickle.dumps(task.load))
    direct, via_pickle = task.load(), restored()
    assert np.array_equal(direct.images, via_pickle.images)
    assert direct.labels.tolist() == via_pickle.labels.tolist()
    assert len(via_pickle.images) == task.count


def test_k49_variant(tmp_path: Path) -> None:
    assert len(K49_CHARS) == 49
    label_indices = write_fake_variant(tmp_path, "k49", K49_CHARS, {"train": 50, "test": 20})
    tasks = kmnist_tasks(tmp_path, "k49", None, chunk_size=32)
    assert [task.count for task in tasks] == [32, 18, 20]
    chunks = load_all(tasks)
    labels = np.concatenate([c.labels for c in chunks]).tolist()
    indices = np.concatenate([label_indices["train"], label_indices["test"]])
    expected = [K49_CHARS[i] for i in indices]
    assert labels == expected
    assert chunks[-1].writers[-1] == "k49:test:19"


def test_read_npz_rows_matches_a_whole_load(tmp_path: Path, monkeypatch) -> None:
    import hwexp.data.kmnist as kmnist

    monkeypatch.setattr(kmnist, "_ROW_BLOCK", 5)  # force several streamed blocks
    images = np.random.default_rng(0).integers(0, 256, (23, 28, 28), dtype=np.uint8)
    for save in (np.savez_compressed, np.savez):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, images)
        rows = np.array([0, 4, 5, 6, 17, 22])
        assert np.array_equal(read_npz_rows(path, rows), images[rows])
        assert read_npz_rows(path, np.array([], np.int64)).shape == (0, 28, 28)


def test_missing_file_names_it_and_the_offline_source(kmnist_dir) -> None:
    data_dir, _ = kmnist_dir
    (data_dir / "kmnist" / "kmnist-test-labels.npz").unlink()
    with pytest.raises(DatasetFilesMissing) as caught:
        kmnist_tasks(data_dir, "kmnist", None)
    message = str(caught.value)
    assert "kmnist-test-labels.npz" in message
    assert "kmnist-train-imgs.npz" not in message  # only the missing file is listed
    assert str(data_dir / "kmnist") in message
    assert "hwexp data download kmnist" in message
    assert KMNIST_FILES.base_url in message
    assert "dataset.source=synthetic" in message


def test_empty_folder_lists_every_k49_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetFilesMissing) as caught:
        check_kmnist_files(tmp_path, "k49")
    for name in K49_FILES.names:
        assert name in str(caught.value)


def test_truncated_images_npz_is_corrupt_and_named(kmnist_dir) -> None:
    data_dir, _ = kmnist_dir
    path = data_dir / "kmnist" / "kmnist-train-imgs.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptDataFile, match="kmnist-train-imgs.npz"):
        kmnist_tasks(data_dir, "kmnist", None)


def test_truncated_labels_npz_is_corrupt_and_named(kmnist_dir) -> None:
    data_dir, _ = kmnist_dir
    path = data_dir / "kmnist" / "kmnist-test-labels.npz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CorruptDataFile, match="kmnist-test-labels.npz"):
        check_kmnist_files(data_dir, "kmnist")


def test_image_data_cut_short_inside_the_archive_is_corrupt(tmp_path: Path) -> None:
    images = np.zeros((10, 28, 28), np.uint8)
    path = tmp_path / "short.npz"
    np.savez(path, images[:4])  # a header for 4 rows: asking for row 9 must fail
    with pytest.raises(CorruptDataFile, match="short.npz"):
        read_npz_rows(path, np.array([9]))


def test_image_and_label_counts_must_agree(kmnist_dir) -> None:
    data_dir, _ = kmnist_dir
    np.savez_compressed(
        data_dir / "kmnist" / "kmnist-test-labels.npz", np.zeros(SPLIT_ROWS["test"] - 1, np.uint8)
    )
    with pytest.raises(CorruptDataFile, match="kmnist-test-imgs.npz") as caught:
        kmnist_tasks(data_dir, "kmnist", None)
    assert "12 images" in str(caught.value) and "11 labels" in str(caught.value)


def test_label_index_outside_the_classmap_is_corrupt(kmnist_dir) -> None:
    data_dir, _ = kmnist_dir
    labels = np.zeros(SPLIT_ROWS["train"], np.uint8)
    labels[3] = 10
    np.savez_compressed(data_dir / "kmnist" / "kmnist-train-labels.npz", labels)
    with pytest.raises(CorruptDataFile, match=r"kmnist-train-labels.npz: row 3 has class index 10"):
        kmnist_tasks(data_dir, "kmnist", None)


def test_classmap_with_bom_and_blank_char_uses_the_codepoint(tmp_path: Path) -> None:
    path = tmp_path / "map.csv"
    path.write_text("\ufeffindex,codepoint,char\n0,U+304A,お\n1,U+304D,\n", encoding="utf-8")
    assert read_classmap(path) == ["お", "き"]


def test_classmap_out_of_order_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "map.csv"
    path.write_text("index,codepoint,char\n1,U+304A,お\n0,U+304D,き\n", encoding="utf-8")
    with pytest.raises(CorruptDataFile, match="map.csv"):
        read_classmap(path)


def test_unknown_variant_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kkanji"):
        kmnist_tasks(tmp_path, "kkanji", None)
