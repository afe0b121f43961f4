from pathlib import Path

import numpy as np
import pytest

from etl_fixtures import (
    ETL8G_FORMAT,
    ETL9G_FORMAT,
    FakeRecord,
    etl1c_bytes,
    etl_b_bytes,
    etl_g_bytes,
    make_etl8g_tree,
    make_g_records,
    stroke_image,
    write,
)
from hwexp.data import etl
from hwexp.data.charsets import KATAKANA_ETL1, char_to_jis0208, jis0208_to_char
from hwexp.errors import CorruptDataFile, DatasetFilesMissing


def test_jis_of_a_is_0x2422():
    assert char_to_jis0208("あ") == 0x2422
    assert jis0208_to_char(0x2422) == "あ"


@pytest.mark.parametrize(
    "fmt, builder, struct_fmt",
    [
        (etl.ETL8G, etl_g_bytes, ">2H8sI4B4H2B30x8128s11x"),
        (etl.ETL9G, etl_g_bytes, ">2H8sI4B4H2B34x8128s7x"),
    ],
)
def test_etl_g_decodes_every_field_and_pixel(tmp_path, fmt, builder, struct_fmt):
    records = make_g_records("あい木", range(7, 9))
    path = write(tmp_path / "f", builder(records, struct_fmt))
    assert path.stat().st_size == len(records) * 8199
    chunk = etl.decode_records(path, fmt)
    assert chunk.labels.tolist() == [r.char for r in records]
    assert chunk.writers.tolist() == [f"{fmt.name}:{r.sheet}" for r in records]
    for i, r in enumerate(records):
        np.testing.assert_array_equal(chunk.images[i], r.image * 17)
        assert chunk.meta["jis"][i] == char_to_jis0208(r.char)
        assert chunk.meta["sheet"][i] == r.sheet
        assert chunk.meta["reading"][i] == b"A.HIRA  "
        assert chunk.meta["serial"][i] == 90_000 + i
        assert chunk.meta["eval_image"][i] == i % 3
        assert chunk.meta["eval_group"][i] == i % 5
        assert chunk.meta["gender"][i] == 1 + i % 2
        assert chunk.meta["age"][i] == 18 + i % 60
        assert chunk.meta["industry"][i] == 31 + i
        assert chunk.meta["occupation"][i] == 41 + i
        assert chunk.meta["gathered"][i] == 7701 + i
        assert chunk.meta["scanned"][i] == 7801 + i
        assert chunk.meta["x"][i] == 9 + i % 11
        assert chunk.meta["y"][i] == 4 + i % 13
        assert chunk.meta["record"][i] == i
    assert chunk.images.shape == (len(records), 127, 128)
    assert chunk.ink == "high"


def test_etl1c_decodes_fields_and_merges_duplicate_categories(tmp_path):
    readings = [b" A", b" I", b" U", b" E", b"KA", b"WI", b"WE", b"WO", b" N", b"SI", b"TU"]
    # file 11/12 style repeats: the ya/wa-row cells of イ, エ, ウ use the plain vowel readings
    readings += [b" I", b" E", b" U"]
    records = [
        FakeRecord("", sheet=100 + i, image=stroke_image(63, 64, seed=i), reading=r)
        for i, r in enumerate(readings)
    ]
    path = write(tmp_path / "ETL1C_07", etl1c_bytes(records))
    chunk = etl.decode_etl1c(path)
    assert chunk.labels.tolist() == list("アイウエカヰヱヲンシツイエウ")
    assert len(set(chunk.labels.tolist())) == 11
    assert set(chunk.labels.tolist()) <= set(KATAKANA_ETL1)
    for i in range(len(records)):
        np.testing.assert_array_equal(chunk.images[i], records[i].image * 17)
        assert chunk.meta["data_number"][i] == 1000 + i
        assert chunk.meta["sheet"][i] == 100 + i
        assert chunk.meta["jis_x0201"][i] == 0xB1 + i % 40
        assert chunk.meta["ebcdic"][i] == 0xC1 + i % 40
        assert chunk.meta["serial"][i] == 50_000 + i
        assert chunk.meta["y"][i] == 3 + i % 7 and chunk.meta["x"][i] == 5 + i % 9
        assert chunk.meta["max_level"][i] == 15
    assert chunk.images.shape[1:] == (63, 64)


def test_etl1c_all_51_categories_give_48_classes(tmp_path):
    from hwexp.data.charsets import ETL1_READINGS

    by_char: dict[str, list[bytes]] = {}
    for reading, char in ETL1_READINGS.items():
        if len(reading) == 2:
            by_char.setdefault(char, []).append(reading.encode())
    readings = [codes[0] for codes in by_char.values()] + [b" I", b" E", b" U"]
    assert len(readings) == 51
    records = [
        FakeRecord("", 1, stroke_image(63, 64, seed=i), reading=r) for i, r in enumerate(readings)
    ]
    chunk = etl.decode_etl1c(write(tmp_path / "ETL1C_11", etl1c_bytes(records)))
    assert sorted(set(chunk.labels.tolist())) == sorted(KATAKANA_ETL1)
    assert len(set(chunk.labels.tolist())) == 48


@pytest.mark.parametrize(
    "fmt, struct_fmt, size",
    [(etl.ETL8B2, ">2H4s504s", 512), (etl.ETL9B, ">2H4s504s64x", 576)],
)
def test_etl_b_skips_dummy_and_unpacks_bits(tmp_path, fmt, struct_fmt, size):
    records = make_g_records("あ木", range(3, 5), height=63, width=64, bits=1)
    path = write(tmp_path / "b", etl_b_bytes(records, struct_fmt))
    assert path.stat().st_size == (len(records) + 1) * size
    chunk = etl.decode_records(path, fmt)
    assert len(chunk.labels) == len(records)
    assert chunk.labels.tolist() == [r.char for r in records]
    assert chunk.meta["sheet"].tolist() == [r.sheet for r in records]
    for i, r in enumerate(records):
        np.testing.assert_array_equal(chunk.images[i], r.image * 255)


def test_truncated_file_names_file_and_record(tmp_path):
    records = make_g_records("あい", range(1, 3))
    data = etl_g_bytes(records, ">2H8sI4B4H2B34x8128s7x")
    path = write(tmp_path / "ETL9G_01", data[:-100])
    with pytest.raises(CorruptDataFile, match=r"ETL9G_01.*record 3 is truncated"):
        etl.decode_etl9g(path)


def test_unknown_jis_code_is_reported_with_record(tmp_path):
    records = make_g_records("あい", range(1, 2))
    data = bytearray(etl_g_bytes(records, ">2H8sI4B4H2B30x8128s11x"))
    data[8199 + 2 : 8199 + 4] = (0x2F7E).to_bytes(2, "big")  # an unassigned JIS cell
    path = write(tmp_path / "ETL8G_01", bytes(data))
    with pytest.raises(CorruptDataFile, match=r"ETL8G_01: record 1"):
        etl.decode_etl8g(path)


def test_missing_files_message_names_files_and_synthetic(tmp_path):
    write(tmp_path / "ETL9G" / "ETL9G_01", b"")
    with pytest.raises(DatasetFilesMissing) as info:
        etl.etl_files(tmp_path, etl.ETL9G)
    message = str(info.value)
    assert "ETL9G_02" in message and str(tmp_path / "ETL9G") in message
    assert "dataset.source=synthetic" in message and "etlcdb" in message


def test_tasks_filter_classes_and_count_exactly(tmp_path):
    records = make_g_records("あい木", range(1, 6))
    path = write(tmp_path / "ETL8G_01", etl_g_bytes(records, ">2H8sI4B4H2B30x8128s11x"))
    tasks = etl.etl_tasks([path], etl.ETL8G, frozenset("あ木"), chunk_records=4)
    chunks = [t.load() for t in tasks]
    assert [t.count for t in tasks] == [len(c.labels) for c in chunks]
    labels = np.concatenate([c.labels for c in chunks])
    assert sorted(labels.tolist()) == sorted("あ木" * 5)
    assert sum(t.count for t in tasks) == 10


def test_decoding_is_vectorised_not_per_record(tmp_path, monkeypatch):
    """The unpacking must not go through PIL per record."""
    import PIL.Image

    calls = []
    monkeypatch.setattr(PIL.Image, "frombytes", lambda *a, **k: calls.append(1))
    records = make_g_records("あ", range(1, 4))
    etl.decode_etl8g(write(tmp_path / "x", etl_g_bytes(records, ">2H8sI4B4H2B30x8128s11x")))
    assert calls == []


def test_4bit_unpacking_spans_blocks_high_nibble_first():
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, (150, 12), dtype=np.uint8)  # more records than one block
    images = etl.unpack_pixels(packed, 4, 4, 6)
    expected = np.stack([packed >> 4, packed & 15], axis=2).reshape(150, 4, 6) * 17
    np.testing.assert_array_equal(images, expected)
    assert images.dtype == np.uint8


def test_format_record_sizes():
    assert etl.ETL1C.record_size == 2052
    assert etl.ETL8G.record_size == 8199
    assert etl.ETL9G.record_size == 8199
    assert etl.ETL8B2.record_size == 512
    assert etl.ETL9B.record_size == 576
    assert Path(etl.ETL9G.file_names[-1]).name == "ETL9G_50"
    assert len(etl.ETL8G.file_names) == 32


def test_etl9g_records_in_an_etl8g_file_are_refused_naming_file_and_format(tmp_path):
    # Same 8,199-byte records; ETL9G's kanji (亜 is not one of ETL8's 881) give it away.
    records = make_g_records("あい亜", range(1, 3))
    path = write(tmp_path / "ETL8G" / "ETL8G_01", etl_g_bytes(records, ETL9G_FORMAT))
    with pytest.raises(CorruptDataFile) as info:
        etl.decode_etl8g(path)
    message = str(info.value)
    assert "ETL8G_01: record 2 is '亜' (JIS 0x3021)" in message
    assert "look like ETL9G" in message and "ETL9G/" in message and "etlcdb" in message
    with pytest.raises(CorruptDataFile, match="ETL8G_01: record 2"):
        etl.labels_in_files([path], etl.ETL8G)  # what planning reads, before any work


def test_etl8g_records_in_an_etl9g_file_are_refused(tmp_path):
    records = make_g_records("あっ木", range(1, 2))  # small っ is ETL8-only
    path = write(tmp_path / "ETL9G_07", etl_g_bytes(records, ETL8G_FORMAT))
    with pytest.raises(CorruptDataFile, match=r"ETL9G_07: record 1 is 'っ'.*look like ETL8G"):
        etl.etl_tasks([path], etl.ETL9G, None)


def test_a_wrong_file_in_a_whole_etl8g_tree_stops_planning(tmp_path):
    from hwexp.data.sources import plan_source

    make_etl8g_tree(tmp_path, "あい木")
    swapped = tmp_path / "ETL8G" / "ETL8G_05"
    write(swapped, etl_g_bytes(make_g_records("あ亜", range(9, 10)), ETL9G_FORMAT))
    with pytest.raises(CorruptDataFile, match="ETL8G_05: record 1 is '亜'.*ETL9G"):
        plan_source("etl8g", tuple("あい"), tmp_path, {})
