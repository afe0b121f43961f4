"""Format-exact ETL files built with ``struct`` (ETL data itself may not be redistributed).

Every header field is set to a distinct, record-dependent value so decoding can be checked
field by field; images hold a drawn character-like shape whose grey levels are known.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hwexp.data.charsets import char_to_jis0208

ETL1C_FORMAT = ">H2sH6BI4H4B4x2016s4x"
ETL8G_FORMAT = ">2H8sI4B4H2B30x8128s11x"
ETL9G_FORMAT = ">2H8sI4B4H2B34x8128s7x"
ETL8B2_FORMAT = ">2H4s504s"
ETL9B_FORMAT = ">2H4s504s64x"


@dataclass
class FakeRecord:
    """One record's content: the character, its writer (sheet) and a 0..15 / 0..1 image."""

    char: str
    sheet: int
    image: np.ndarray  # (h, w) ints: 0..15 for 4-bit formats, 0..1 for 1-bit
    reading: bytes = b""
    extra: dict = field(default_factory=dict)


def pack_4bit(image: np.ndarray) -> bytes:
    """Two pixels per byte, high nibble first."""
    flat = image.astype(np.uint8).ravel()
    return bytes((flat[0::2] << 4) | flat[1::2])


def pack_1bit(image: np.ndarray) -> bytes:
    return np.packbits(image.astype(np.uint8).ravel()).tobytes()


def stroke_image(height: int, width: int, seed: int, levels: int = 15) -> np.ndarray:
    """A plausible character: a few thick bars at seed-dependent places, grey level ``levels``."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width), np.uint8)
    for _ in range(3):
        top, left = rng.integers(height // 5, height // 2), rng.integers(width // 5, width // 2)
        image[top : top + max(2, height // 12), left : left + width // 3] = levels
        image[top : top + height // 3, left : left + max(2, width // 12)] = levels
    return image


def etl1c_bytes(records: list[FakeRecord]) -> bytes:
    out = b""
    for i, r in enumerate(records):
        out += struct.pack(
            ETL1C_FORMAT,
            1000 + i,  # data number
            r.reading,
            r.sheet,
            0xB1 + i % 40,  # JIS X 0201 code
            0xC1 + i % 40,  # EBCDIC
            i % 3,  # evaluation of image
            i % 5,  # evaluation of group
            1 + i % 2,  # male/female
            20 + i % 50,  # age
            50_000 + i,  # serial data number
            11 + i,  # industry
            21 + i,  # occupation
            7001 + i,  # gathered
            7101 + i,  # scanned
            3 + i % 7,  # sample position y
            5 + i % 9,  # sample position x
            0,  # min level
            15,  # max level
            pack_4bit(r.image),
        )
    return out


def etl_g_bytes(records: Iterable[FakeRecord], fmt: str) -> bytes:
    """ETL8G/ETL9G records (``fmt``), the i-th with header fields derived from ``i``; any
    iterable, so a full-size file (12,144 records) can be built without holding its images."""
    return b"".join(
        struct.pack(
            fmt,
            r.sheet,
            char_to_jis0208(r.char),
            (r.reading or b"A.HIRA").ljust(8),
            90_000 + i,  # serial data number
            i % 3,  # evaluation of image
            i % 5,  # evaluation of group
            1 + i % 2,  # male/female
            18 + i % 60,  # age
            31 + i,  # industry
            41 + i,  # occupation
            7701 + i,  # gathered
            7801 + i,  # scanned
            9 + i % 11,  # sample position x
            4 + i % 13,  # sample position y
            pack_4bit(r.image),
        )
        for i, r in enumerate(records)
    )


def etl_b_bytes(records: list[FakeRecord], fmt: str) -> bytes:
    dummy = struct.pack(fmt, 0, 0, b"    ", bytes(504))
    return dummy + b"".join(
        struct.pack(
            fmt, r.sheet, char_to_jis0208(r.char), (r.reading or b"A").ljust(4), pack_1bit(r.image)
        )
        for r in records
    )


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_g_records(
    chars: str, sheets: range, height: int = 127, width: int = 128, bits: int = 4
) -> list[FakeRecord]:
    """Every char written once by every sheet (writer), as on ETL8G/ETL9G sheets."""
    levels = 15 if bits == 4 else 1
    return [
        FakeRecord(c, sheet, stroke_image(height, width, seed=sheet * 1000 + ord(c), levels=levels))
        for sheet in sheets
        for c in chars
    ]


def make_etl8g_tree(data_dir: Path, chars: str, writers_per_file: int = 1) -> list[Path]:
    """All 32 ETL8G files under ``data_dir/ETL8G``, each with ``writers_per_file`` sheets."""
    paths = []
    for number in range(1, 33):
        first = (number - 1) * writers_per_file + 1
        records = make_g_records(chars, range(first, first + writers_per_file))
        paths.append(
            write(data_dir / "ETL8G" / f"ETL8G_{number:02d}", etl_g_bytes(records, ETL8G_FORMAT))
        )
    return paths


def make_etl8b2_tree(data_dir: Path, chars: str, writers_per_file: int = 4) -> list[Path]:
    """All 3 ETL8B2 files under ``data_dir/ETL8B``."""
    paths = []
    for number in range(1, 4):
        first = 500 + (number - 1) * writers_per_file
        records = make_g_records(chars, range(first, first + writers_per_file), 63, 64, bits=1)
        paths.append(
            write(data_dir / "ETL8B" / f"ETL8B2C{number}", etl_b_bytes(records, ETL8B2_FORMAT))
        )
    return paths
