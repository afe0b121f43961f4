"""Tests for the built-in dataset class sets in hwexp.data.charsets."""

from __future__ import annotations

import pytest

from hwexp.data import charsets as cs
from hwexp.data.charsets import (
    CLASS_SETS,
    ETL1_READINGS,
    ETL8G_956,
    ETL9G_3036,
    HIRAGANA_ETL8,
    HIRAGANA_ETL9,
    K49,
    KANJI_ETL8,
    KANJI_JIS_LEVEL1,
    KATAKANA_ETL1,
    KMNIST_10,
    char_to_jis0208,
    jis0208_to_char,
    resolve_class_set,
)

EXPECTED_SIZES = {
    "katakana48": 48,
    "hiragana75": 75,
    "hiragana71": 71,
    "kanji881": 881,
    "etl8_956": 956,
    "kanji2965": 2965,
    "etl9_3036": 3036,
    "kmnist10": 10,
    "k49": 49,
}
JIS_ORDERED = [
    "katakana48",
    "hiragana75",
    "hiragana71",
    "kanji881",
    "etl8_956",
    "kanji2965",
    "etl9_3036",
]
SMALL_KANA = set("ぁぃぅぇぉっゃゅょゎ")


def test_registry_names_and_sizes() -> None:
    assert {name: len(chars) for name, chars in CLASS_SETS.items()} == EXPECTED_SIZES


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_sets_are_unique_single_character_tuples(name: str) -> None:
    chars = CLASS_SETS[name]
    assert isinstance(chars, tuple)
    assert all(isinstance(ch, str) and len(ch) == 1 for ch in chars)
    assert len(set(chars)) == len(chars)


@pytest.mark.parametrize("name", JIS_ORDERED)
def test_jis_sets_are_in_jis_code_order(name: str) -> None:
    codes = [char_to_jis0208(ch) for ch in CLASS_SETS[name]]
    assert codes == sorted(codes)


def test_jis_round_trip() -> None:
    assert char_to_jis0208("あ") == 0x2422
    assert jis0208_to_char(0x2422) == "あ"
    assert jis0208_to_char(0x3021) == "亜"
    for ch in (*ETL8G_956, *KATAKANA_ETL1, *K49):
        assert jis0208_to_char(char_to_jis0208(ch)) == ch


@pytest.mark.parametrize("bad", [0x2020, 0x217F, 0x7F21, 0x4F54, 0x10000, -1])
def test_jis0208_to_char_rejects_invalid_or_unassigned(bad: int) -> None:
    with pytest.raises(ValueError):
        jis0208_to_char(bad)


@pytest.mark.parametrize("bad", ["A", "ｱ", "あい", "", "丂"])
def test_char_to_jis0208_rejects_non_jis0208(bad: str) -> None:
    with pytest.raises(ValueError):
        char_to_jis0208(bad)


def test_kanji_level1_is_rows_16_to_47() -> None:
    assert KANJI_JIS_LEVEL1[0] == "亜"
    assert KANJI_JIS_LEVEL1[-1] == "腕"
    assert char_to_jis0208(KANJI_JIS_LEVEL1[-1]) == 0x4F53
    assert all(0x3021 <= char_to_jis0208(ch) <= 0x4F53 for ch in KANJI_JIS_LEVEL1)


def test_kanji881_is_inside_jis_level1() -> None:
    assert set(KANJI_ETL8) <= set(KANJI_JIS_LEVEL1)


def test_kanji881_is_the_pre_1977_list_as_encoded_in_etl8() -> None:
    kanji = set(KANJI_ETL8)
    assert {"燈", "壱", "弐", "后", "是", "勧", "俵", "蚕"} <= kanji
    assert not kanji & set("灯昔皿笛箱羊豆")  # later spelling / 1977 additions
    assert set("一二三人日月山川田口") <= kanji


def test_hiragana71_is_subset_of_hiragana75() -> None:
    assert set(HIRAGANA_ETL9) < set(HIRAGANA_ETL8)
    assert set(HIRAGANA_ETL8) - set(HIRAGANA_ETL9) == set("っゃゅょ")


def test_hiragana71_is_row4_without_small_kana_wi_we() -> None:
    row4 = [jis0208_to_char(code) for code in range(0x2421, 0x2474)]
    assert len(row4) == 83
    expected = [ch for ch in row4 if ch not in SMALL_KANA and ch not in "ゐゑ"]
    assert list(HIRAGANA_ETL9) == expected


def test_etl_combined_sets() -> None:
    assert set(ETL8G_956) == set(HIRAGANA_ETL8) | set(KANJI_ETL8)
    assert set(ETL9G_3036) == set(HIRAGANA_ETL9) | set(KANJI_JIS_LEVEL1)
    assert ETL9G_3036[:71] == HIRAGANA_ETL9  # hiragana first, as in ETL9B
    assert ETL8G_956[:75] == HIRAGANA_ETL8


def test_katakana48_is_basic_katakana_plus_wi_we() -> None:
    assert KATAKANA_ETL1[0] == "ア"
    assert KATAKANA_ETL1[-5:] == ("ワ", "ヰ", "ヱ", "ヲ", "ン")
    assert not set(KATAKANA_ETL1) & set("ァィゥェォッャュョヮヴヵヶ")
    assert all(0x2522 <= char_to_jis0208(ch) <= 0x2573 for ch in KATAKANA_ETL1)


def test_etl1_readings_map_distinct_readings_to_distinct_katakana() -> None:
    canonical: dict[str, str] = {}
    for key, kana in ETL1_READINGS.items():
        assert len(key) in (1, 2) and key.isascii()
        # padded and stripped spellings of one reading agree
        assert canonical.setdefault(key.strip(), kana) == kana
    assert len(canonical) == 48
    assert sorted(canonical.values()) == sorted(KATAKANA_ETL1)


def test_etl1_readings_use_the_etl1_spellings() -> None:
    expected = {
        " A": "ア", "A": "ア", "KA": "カ", "SI": "シ", "TI": "チ", "TU": "ツ", "HU": "フ",
        "WI": "ヰ", "WE": "ヱ", "WO": "ヲ", " N": "ン", "N": "ン",
    }  # fmt: skip
    assert {key: ETL1_READINGS[key] for key in expected} == expected
    # left-justified single letters are Latin letters in ETL1C_01..06, not katakana
    assert "A " not in ETL1_READINGS
    assert "N " not in ETL1_READINGS
    assert "SHI" not in ETL1_READINGS


def test_kuzushiji_classmap_order() -> None:
    assert "".join(KMNIST_10) == "おきすつなはまやれを"
    assert K49[0] == "あ"
    assert K49[44:] == ("ゐ", "ゑ", "を", "ん", "ゝ")
    assert set(KMNIST_10) <= set(K49)
    assert set(K49) - {"ゝ"} <= set(HIRAGANA_ETL9) | {"ゐ", "ゑ"}


def test_resolve_known_names_return_the_registry_tuples() -> None:
    for name, chars in CLASS_SETS.items():
        assert resolve_class_set(name) is chars


def test_resolve_explicit_specs_keep_order() -> None:
    assert resolve_class_set("chars:うあい") == ("う", "あ", "い")
    assert resolve_class_set(["キ", "カ"]) == ("キ", "カ")
    assert resolve_class_set(("亜",)) == ("亜",)


def test_resolve_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown class set 'kanji999'") as info:
        resolve_class_set("kanji999")
    for name in CLASS_SETS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (["あ", "い", "あ"], "duplicate character 'あ'"),
        ("chars:かきか", "duplicate character 'か'"),
        ([], "empty"),
        ("chars:", "empty"),
        (["あい"], "single character"),
        ([1, 2], "single character"),
    ],
)
def test_resolve_rejects_bad_explicit_lists(spec: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_class_set(spec)  # type: ignore[arg-type]


def test_resolve_rejects_non_sequence() -> None:
    with pytest.raises(ValueError):
        resolve_class_set(42)  # type: ignore[arg-type]


def test_module_exports_exist() -> None:
    assert all(hasattr(cs, name) for name in cs.__all__)
