import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_config import data_config
from etl_fixtures import make_etl8b2_tree, make_etl8g_tree
from hwexp.data import cache
from hwexp.data.dataset import ImageView, load_splits, prepare_sources
from hwexp.errors import ConfigError, DataError, DatasetFilesMissing, UnreadableImage

HIRA = "あいう"
KANJI = "木"  # one of ETL8's 881 kanji


@pytest.fixture
def etl8g_root(tmp_path):
    make_etl8g_tree(tmp_path / "raw", HIRA + KANJI)
    return tmp_path


def classes_override(chars: str) -> str:
    return f"dataset.classes='chars:{chars}'"


def test_class_set_filters_etl8g_and_labels_are_characters(etl8g_root):
    cfg = data_config(etl8g_root, "dataset=hiragana", classes_override(HIRA))
    splits = load_splits(cfg, progress=False)
    assert splits.classes == tuple(HIRA)
    total = len(splits.train) + len(splits.val) + len(splits.test)
    assert total == 32 * len(HIRA)
    train_chars = {splits.classes[i] for i in splits.train.labels}
    assert train_chars == set(HIRA)
    assert splits.train.images.shape[1:] == (48, 48)
    assert set(splits.train.sources) == {"etl8g"}


def test_writer_split_shares_no_writer(etl8g_root):
    splits = load_splits(
        data_config(etl8g_root, "dataset=hiragana", classes_override(HIRA)), progress=False
    )
    groups = [set(s.writers) for s in (splits.train, splits.val, splits.test)]
    assert (
        not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    )
    assert all(groups)


def test_cache_is_reused_and_invalidated_by_option_or_file_change(etl8g_root):
    cfg = data_config(etl8g_root, "dataset=hiragana", classes_override(HIRA))
    first = prepare_sources(cfg, progress=False)["etl8g"]
    stamp = (first.path / "images.npy").stat().st_mtime_ns
    again = prepare_sources(cfg, progress=False)["etl8g"]
    assert again.path == first.path
    assert (again.path / "images.npy").stat().st_mtime_ns == stamp

    other = prepare_sources(
        data_config(
            etl8g_root, "dataset=hiragana", classes_override(HIRA), "preprocess.margin=0.2"
        ),
        progress=False,
    )["etl8g"]
    assert other.path != first.path
    assert not np.array_equal(np.asarray(other.images), np.asarray(first.images))

    raw = etl8g_root / "raw" / "ETL8G" / "ETL8G_05"
    data = bytearray(raw.read_bytes())
    data[100] ^= 0xFF  # change an image byte of the first record
    raw.write_bytes(bytes(data))
    changed = prepare_sources(cfg, progress=False)["etl8g"]
    assert changed.path != first.path
    assert first.path.exists()  # the old entry is intact


def _prepare_in_process(root: str, queue) -> None:
    cfg = data_config(Path(root), "dataset=hiragana", classes_override(HIRA))
    source = prepare_sources(cfg, progress=False)["etl8g"]
    queue.put((str(source.path), np.asarray(source.images).sum()))


def test_two_processes_preparing_at_once_get_one_whole_entry(etl8g_root):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=_prepare_in_process, args=(str(etl8g_root), queue)) for _ in range(2)
    ]
    for w in workers:
        w.start()
    results = [queue.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    assert results[0] == results[1]
    entries = [p for p in (etl8g_root / "data" / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".")


def test_failed_build_leaves_no_entry(tmp_path):
    from hwexp.data.preprocess import PreprocessOptions
    from hwexp.data.raw import ChunkTask

    def broken():
        raise RuntimeError("disk on fire")

    tasks = [ChunkTask(broken, 3, "broken chunk")]
    with pytest.raises(RuntimeError, match="disk on fire"):
        cache.load_or_prepare(
            tmp_path, "x", "set", {"a": 1}, lambda: tasks, PreprocessOptions(), progress=False
        )
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []


def test_parallel_workers_give_same_arrays_as_one(etl8g_root):
    one = prepare_sources(
        data_config(etl8g_root, "dataset=hiragana", classes_override(HIRA)), progress=False
    )["etl8g"]
    images_one = np.asarray(one.images).copy()
    labels_one = one.labels.copy()
    cache_dir = etl8g_root / "cache2"
    two = prepare_sources(
        data_config(
            etl8g_root,
            "dataset=hiragana",
            classes_override(HIRA),
            "workers=2",
            f"paths.cache_dir={cache_dir}",
        ),
        progress=False,
    )["etl8g"]
    np.testing.assert_array_equal(np.asarray(two.images), images_one)
    np.testing.assert_array_equal(two.labels, labels_one)


def test_mixture_keeps_sources_apart_and_weights(tmp_path):
    make_etl8g_tree(tmp_path / "raw", HIRA)
    make_etl8b2_tree(tmp_path / "raw", HIRA)
    cfg = data_config(
        tmp_path,
        "dataset=hiragana",
        classes_override(HIRA),
        "dataset.source=[etl8g,etl8b2]",
        "+dataset.weights.etl8b2=0.25",
    )
    splits = load_splits(cfg, progress=False)
    assert splits.source_weights == {"etl8g": 1.0, "etl8b2": 0.25}
    for part in (splits.train, splits.val, splits.test):
        assert set(part.sources) == {"etl8g", "etl8b2"}
        for source in ("etl8g", "etl8b2"):
            writers = set(part.writers[part.sources == source])
            assert all(w.startswith(source.upper()) for w in writers)
    assert len(splits.test) == len(splits.test.images)


def test_random_split_is_80_20_and_seeded(etl8g_root):
    cfg = data_config(etl8g_root, "dataset=hiragana", classes_override(HIRA), "split=random")
    a = load_splits(cfg, progress=False)
    b = load_splits(cfg, progress=False)
    n = len(a.train) + len(a.val) + len(a.test)
    assert abs(len(a.test) / n - 0.2) < 0.03
    np.testing.assert_array_equal(a.test.writers, b.test.writers)
    c = load_splits(
        data_config(
            etl8g_root, "dataset=hiragana", classes_override(HIRA), "split=random", "seed=7"
        ),
        progress=False,
    )
    assert not np.array_equal(np.asarray(a.test.images), np.asarray(c.test.images))


def test_missing_raw_files_fail_clearly_without_fallback(tmp_path):
    cfg = data_config(tmp_path, "dataset=kanji3036")
    with pytest.raises(DatasetFilesMissing, match="ETL9G_01.*dataset.source=synthetic"):
        load_splits(cfg, progress=False)
    assert not (tmp_path / "data" / "cache").exists() or not any(
        p.is_dir() for p in (tmp_path / "data" / "cache").iterdir()
    )


def test_source_lacking_classes_is_reported(etl8g_root):
    cfg = data_config(etl8g_root, "dataset=hiragana", classes_override("あかさ"))
    with pytest.raises(DataError, match="2 requested class"):
        load_splits(cfg, progress=False)


def test_unknown_source_and_weights_are_config_errors(etl8g_root):
    with pytest.raises(ConfigError, match="unknown source"):
        load_splits(data_config(etl8g_root, "dataset.source=etl42"), progress=False)
    cfg = data_config(
        etl8g_root, "dataset=hiragana", classes_override(HIRA), "+dataset.weights.synthetic=2"
    )
    with pytest.raises(ConfigError, match="weights"):
        load_splits(cfg, progress=False)


def _draw(path: Path, dark_ink: bool, shift: int) -> None:
    background, ink = (255, 20) if dark_ink else (0, 230)
    image = Image.new("L", (60, 80), background)
    pixels = np.array(image)
    pixels[20 + shift : 60 + shift, 25:32] = ink
    pixels[35:40, 10:50] = ink
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_folder_source_detects_polarity_and_writers(tmp_path):
    root = tmp_path / "mine"
    for writer in range(4):
        for char in "木本":
            _draw(root / char / f"w{writer}_{char}.png", dark_ink=writer % 2 == 0, shift=writer)
    cfg = data_config(
        tmp_path, "dataset=folder", f"dataset.path={root}", "dataset.writer_from_name=true"
    )
    splits = load_splits(cfg, progress=False)
    assert splits.classes == ("木", "本")  # auto: folder names in code point order
    everything = np.concatenate(
        [np.asarray(s.images) for s in (splits.train, splits.val, splits.test)]
    )
    # both polarities normalise to bright ink on black
    assert (everything.mean(axis=(1, 2)) < 100).all()
    writers = np.concatenate([s.writers for s in (splits.train, splits.val, splits.test)])
    assert set(writers) == {f"folder:w{i}" for i in range(4)}


def test_unreadable_image_names_the_file(tmp_path):
    root = tmp_path / "mine"
    for writer in range(3):
        _draw(root / "木" / f"{writer}.png", True, 0)
    bad = root / "木" / "broken.png"
    bad.write_bytes(b"not a png")
    cfg = data_config(tmp_path, "dataset=folder", f"dataset.path={root}")
    with pytest.raises(UnreadableImage, match="broken.png"):
        load_splits(cfg, progress=False)


def test_image_view_indexes_like_an_array():
    a = np.arange(5 * 2 * 2, dtype=np.uint8).reshape(5, 2, 2)
    b = 100 + np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2)
    view = ImageView([(a, np.array([4, 0])), (b, np.array([2]))], (2, 2))
    expected = np.stack([a[4], a[0], b[2]])
    assert len(view) == 3 and view.shape == (3, 2, 2)
    np.testing.assert_array_equal(np.asarray(view), expected)
    np.testing.assert_array_equal(view[[2, 0]], expected[[2, 0]])
    np.testing.assert_array_equal(view[1], expected[1])
    np.testing.assert_array_equal(view[-1], expected[-1])
    np.testing.assert_array_equal(view[1:], expected[1:])
    with pytest.raises(IndexError):
        view[[3]]
    picked = view.subset(np.array([2, 0, 1]))
    np.testing.assert_array_equal(np.asarray(picked), expected[[2, 0, 1]])
    joined = ImageView.concat([view, picked])
    np.testing.assert_array_equal(
        np.asarray(joined), np.concatenate([expected, expected[[2, 0, 1]]])
    )


def test_cache_dir_holds_no_temporary_leftovers(etl8g_root):
    prepare_sources(
        data_config(etl8g_root, "dataset=hiragana", classes_override(HIRA)), progress=False
    )
    names = os.listdir(etl8g_root / "data" / "cache")
    assert not [n for n in names if n.startswith(".")]


def _cell(side: int, fill: float, seed: int) -> np.ndarray:
    """A dark-on-white ``side`` x ``side`` cell holding a character-like shape (a box with a
    cross) whose larger side is ``fill`` of the cell, placed with a little jitter."""
    rng = np.random.default_rng(seed)
    pixels = np.full((side, side), 250, np.uint8)
    ink = max(2, round(side * 0.05))
    extent = round(side * fill)
    top, left = (side - extent) // 2 + rng.integers(-2, 3, 2)
    bottom, right = top + extent, left + round(extent * rng.uniform(0.7, 1.0))
    pixels[top:bottom, left : left + ink] = 20
    pixels[top:bottom, right - ink : right] = 20
    pixels[top : top + ink, left:right] = 20
    pixels[(top + bottom) // 2 : (top + bottom) // 2 + ink, left:right] = 20
    pixels[bottom - ink : bottom, left:right] = 20
    return pixels


def _ink_sides(cfg) -> dict[str, float]:
    """Median ink-box side of each class's prepared images, in output pixels."""
    splits = load_splits(cfg, progress=False)
    sides: dict[str, list[int]] = {}
    for part in (splits.train, splits.val, splits.test):
        for image, label in zip(np.asarray(part.images), part.labels, strict=True):
            rows, cols = np.nonzero(image >= 128)
            side = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
            sides.setdefault(splits.classes[label], []).append(side)
    return {char: float(np.median(values)) for char, values in sides.items()}


def test_a_character_keeps_its_size_whatever_cell_canvas_or_padding_it_arrived_in(tmp_path):
    # Full-size characters fill 0.8 of a 64 px cell, small ones 0.45; the same cells arrive
    # as they are, shrunk to 28 px (KMNIST-like), padded with paper to 144 px, and pasted
    # off-centre into a 150 x 110 scan. Each must come out at the same size, and small ones
    # must stay small (the folder reader once letterboxed small images into a 128 px canvas).
    fills = {"大": 0.8, "木": 0.8, "小": 0.45}
    containers = {
        "cell64": lambda cell: cell,
        "cell28": lambda cell: np.asarray(Image.fromarray(cell).resize((28, 28), Image.BOX)),
        "padded": lambda cell: np.pad(cell, 40, constant_values=250),
        "scan": lambda cell: np.pad(cell, ((10, 36), (70, 16)), constant_values=250),
    }
    measured = {}
    for name, contain in containers.items():
        root = tmp_path / name
        for c, (char, fill) in enumerate(fills.items()):
            for writer in range(6):
                path = root / char / f"{writer}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(contain(_cell(64, fill, seed=10 * c + writer))).save(path)
        cfg = data_config(tmp_path, "dataset=folder", f"dataset.path={root}")
        measured[name] = _ink_sides(cfg)
    reference = measured["cell64"]
    for name, sides in measured.items():
        for char in fills:
            assert abs(sides[char] - reference[char]) <= 2, (name, char, sides, reference)
        assert sides["小"] < 0.85 * sides["大"], (name, sides)
        assert sides["大"] >= 28, (name, sides)  # full-size characters fill most of the frame


def _folder_tree(root: Path, names: str | list[str], per_class: int = 4) -> Path:
    """``per_class`` drawings in each of the folders ``names`` (dark ink, shifted a little)."""
    for name in names:
        for writer in range(per_class):
            _draw(root / name / f"{writer}.png", dark_ink=True, shift=writer)
    return root


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("side", [14_000, 10_000])  # past Pillow's error, past its warning
def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path, side):
    root = _folder_tree(tmp_path / "mine", "木本")
    _png_claiming(root / "木" / "huge.png", side, side)
    assert (root / "木" / "huge.png").stat().st_size < 100
    cfg = data_config(tmp_path, "dataset=folder", f"dataset.path={root}")
    with pytest.raises(UnreadableImage, match=r"huge\.png is too large to decode safely"):
        load_splits(cfg, progress=False)


def test_nfd_folder_names_are_read_as_nfc(tmp_path):
    root = _folder_tree(tmp_path / "mine", ["か\u3099", "き"])  # macOS spells が this way
    cfg = data_config(tmp_path, "dataset=folder", f"dataset.path={root}")
    assert load_splits(cfg, progress=False).classes == ("が", "き")


def test_labels_txt_maps_folder_names_to_characters(tmp_path):
    root = _folder_tree(tmp_path / "mine", ["ka", "ki", "く"])
    (root / "labels.txt").write_text("# folder<TAB>character\nka\tか\n\nki\tき\n", encoding="utf-8")
    cfg = data_config(tmp_path, "dataset=folder", f"dataset.path={root}")
    splits = load_splits(cfg, progress=False)
    assert splits.classes == ("か", "き", "く")
    (root / "labels.txt").write_text("ka\tか\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ki: its name is not one character.*labels\.txt"):
        load_splits(cfg, progress=False)
    (root / "labels.txt").write_text("ka\tか\nki き\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"labels\.txt line 2: 'ki き' is not '<folder><TAB>"):
        load_splits(cfg, progress=False)


def test_a_file_name_that_is_not_utf8_is_prepared(tmp_path):
    root = _folder_tree(tmp_path / "mine", "木本")
    odd = root / "木" / os.fsdecode(b"w\xff\xfe.png")
    _draw(odd, dark_ink=False, shift=2)
    cfg = data_config(tmp_path, "dataset=folder", f"dataset.path={root}")
    source = prepare_sources(cfg, progress=False)["folder"]
    assert len(source) == 9
    assert any(name.endswith("w\\xff\\xfe.png") for name in source.meta["file"])


def test_tiny_and_blank_images_are_skipped_with_one_warning(tmp_path, caplog):
    root = _folder_tree(tmp_path / "mine", "木本")
    Image.new("L", (1, 1), 0).save(root / "木" / "dot.png")
    Image.new("L", (60, 80), 250).save(root / "本" / "blank.png")
    cfg = data_config(tmp_path, "dataset=folder", f"dataset.path={root}")
    with caplog.at_level(logging.WARNING, logger="hwexp.data.cache"):
        source = prepare_sources(cfg, progress=False)["folder"]
    assert len(source) == 8 and source.images.shape[0] == 8
    assert not any(name.endswith(("dot.png", "blank.png")) for name in source.meta["file"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 2 of 10 images" in warnings[0]
    assert "blank.png (blank: no contrast)" in warnings[0] or "dot.png (1x1 pixels)" in warnings[0]
    caplog.clear()
    assert len(prepare_sources(cfg, progress=False)["folder"]) == 8  # cached: no new warning
    assert not caplog.records


def test_folder_dataset_without_a_path_says_how_to_set_it(tmp_path):
    cfg = data_config(tmp_path, "dataset=folder")
    with pytest.raises(ConfigError, match=r"dataset=folder needs .* dataset\.path=<directory>"):
        load_splits(cfg, progress=False)
    cfg = data_config(tmp_path, "dataset=folder", "dataset.classes='chars:あい'")
    with pytest.raises(ConfigError, match=r"dataset\.path=<directory>"):
        load_splits(cfg, progress=False)
