"""Readers for the ETL Character Database files (AIST), decoded whole-file with numpy.

Each format is a fixed-size big-endian record: a structured dtype laid over the file gives
every header field at once, and the packed image is unpacked for a whole block of records
with one table lookup (4-bit: two pixels per byte, high nibble first; 1-bit: eight pixels
per byte, most significant bit first). Images come out ``uint8`` with ink high: 4-bit grey
levels ``0..15`` are scaled to ``0..255`` (``* 17``), 1-bit pixels to ``0``/``255``.

Record layouts (field names follow the ETL documentation):

* ETL1C   2052 bytes ``>H2sH6BI4H4B4x2016s4x``, image 64x63, 4-bit; katakana in ETL1C_07..13,
  label from the 2-byte ASCII reading ("KA", "WI"), since JIS X 0201 has no ヰ/ヱ.
* ETL8G   8199 bytes ``>2H8sI4B4H2B30x8128s11x``, image 128x127, 4-bit, files 01..32.
* ETL9G   8199 bytes ``>2H8sI4B4H2B34x8128s7x``, image 128x127, 4-bit, files 01..50.
* ETL8B2  512 bytes ``>2H4s504s``, image 64x63, 1-bit; the first record of each file is a dummy.
* ETL9B   576 bytes ``>2H4s504s64x``, image 64x63, 1-bit; the first record is a dummy.

ETL8G and ETL9G records have the same size and header, so a file of one read as the other
would decode with its image shifted by 8 pixels. What tells them apart is the class set: ETL8
holds 956 characters (75 hiragana, 881 kanji), ETL9 3,036 (71 hiragana, the 2,965 JIS level-1
kanji), every file holding every character for its writers; a record outside its format's
set is refused, naming the file and the format it looks like.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hwexp.data.charsets import (
    ETL1_READINGS,
    ETL8G_956,
    ETL9G_3036,
    char_to_jis0208,
    jis0208_to_char,
)
from hwexp.data.raw import ChunkTask, RawChunk
from hwexp.errors import CorruptDataFile, DatasetFilesMissing

ETL_SITE = "http://etlcdb.db.aist.go.jp (free registration)"


@dataclass(frozen=True)
class EtlFormat:
    """One ETL record layout and where its files live under the data directory."""

    name: str
    dtype: np.dtype
    width: int
    height: int
    bits: int  # 4 or 1
    subdir: str
    file_names: tuple[str, ...]
    dummy_first_record: bool = False
    classes: frozenset[str] | None = None  # every character the format's files hold

    @property
    def record_size(self) -> int:
        return self.dtype.itemsize


def _fields(*spec: tuple[str, str]) -> np.dtype:
    return np.dtype(list(spec))


ETL1C = EtlFormat(
    name="ETL1C",
    dtype=_fields(
        ("data_number", ">u2"),
        ("reading", "S2"),
        ("sheet", ">u2"),
        ("jis_x0201", "u1"),
        ("ebcdic", "u1"),
        ("eval_image", "u1"),
        ("eval_group", "u1"),
        ("gender", "u1"),
        ("age", "u1"),
        ("serial", ">u4"),
        ("industry", ">u2"),
        ("occupation", ">u2"),
        ("gathered", ">u2"),
        ("scanned", ">u2"),
        ("y", "u1"),
        ("x", "u1"),
        ("min_level", "u1"),
        ("max_level", "u1"),
        ("_pad0", "V4"),
        ("image", "V2016"),
        ("_pad1", "V4"),
    ),
    width=64,
    height=63,
    bits=4,
    subdir="ETL1",
    file_names=tuple(f"ETL1C_{i:02d}" for i in range(7, 14)),
)


def _etl_g_dtype(pad_before: int, pad_after: int) -> np.dtype:
    return _fields(
        ("sheet", ">u2"),
        ("jis", ">u2"),
        ("reading", "S8"),
        ("serial", ">u4"),
        ("eval_image", "u1"),
        ("eval_group", "u1"),
        ("gender", "u1"),
        ("age", "u1"),
        ("industry", ">u2"),
        ("occupation", ">u2"),
        ("gathered", ">u2"),
        ("scanned", ">u2"),
        ("x", "u1"),
        ("y", "u1"),
        ("_pad0", f"V{pad_before}"),
        ("image", "V8128"),
        ("_pad1", f"V{pad_after}"),
    )


ETL8G = EtlFormat(
    name="ETL8G",
    dtype=_etl_g_dtype(30, 11),
    width=128,
    height=127,
    bits=4,
    subdir="ETL8G",
    file_names=tuple(f"ETL8G_{i:02d}" for i in range(1, 33)),
    classes=frozenset(ETL8G_956),
)
ETL9G = EtlFormat(
    name="ETL9G",
    dtype=_etl_g_dtype(34, 7),
    width=128,
    height=127,
    bits=4,
    subdir="ETL9G",
    file_names=tuple(f"ETL9G_{i:02d}" for i in range(1, 51)),
    classes=frozenset(ETL9G_3036),
)
ETL8B2 = EtlFormat(
    name="ETL8B2",
    dtype=_fields(("sheet", ">u2"), ("jis", ">u2"), ("reading", "S4"), ("image", "V504")),
    width=64,
    height=63,
    bits=1,
    subdir="ETL8B",
    file_names=tuple(f"ETL8B2C{i}" for i in range(1, 4)),
    dummy_first_record=True,
    classes=frozenset(ETL8G_956),
)
ETL9B = EtlFormat(
    name="ETL9B",
    dtype=_fields(
        ("sheet", ">u2"), ("jis", ">u2"), ("reading", "S4"), ("image", "V504"), ("_pad", "V64")
    ),
    width=64,
    height=63,
    bits=1,
    subdir="ETL9B",
    file_names=tuple(f"ETL9B_{i}" for i in range(1, 6)),
    dummy_first_record=True,
    classes=frozenset(ETL9G_3036),
)

FORMATS: dict[str, EtlFormat] = {f.name.lower(): f for f in (ETL1C, ETL8G, ETL9G, ETL8B2, ETL9B)}


_UNPACK_BLOCK = 64  # records unpacked at a time


def unpack_pixels(packed: np.ndarray, bits: int, height: int, width: int) -> np.ndarray:
    """Unpack ``(n, nbytes)`` uint8 image fields into ``(n, height, width)`` uint8, ink high."""
    n = len(packed)
    if bits == 1:
        pixels = np.unpackbits(packed, axis=1)
        pixels *= 255
        return pixels.reshape(n, height, width)
    # Each byte 0xHL becomes the little-endian pair (H, L) in one uint16 lane, without
    # strided writes: ((0x00HL << 12) | 0x00HL) >> 4 = 0x0L0H (bits above 16 fall off).
    # Blocks of records keep the temporary small and in cache.
    pixels = np.empty(packed.shape, "<u2")
    for start in range(0, n, _UNPACK_BLOCK):
        pairs = packed[start : start + _UNPACK_BLOCK].astype(np.uint16)
        block = np.left_shift(pairs, 12)
        block |= pairs
        block >>= 4
        block *= 17  # 4-bit grey 0..15 -> 0..255 in both bytes (no carry: 15 * 17 = 255)
        pixels[start : start + _UNPACK_BLOCK] = block
    return pixels.view(np.uint8).reshape(n, height, width)


def image_bytes(records: np.ndarray, fmt: EtlFormat) -> np.ndarray:
    """The packed image field of each record as a ``(n, nbytes)`` uint8 view (no copy)."""
    field, offset = fmt.dtype.fields["image"][:2]
    as_bytes = records.view(np.uint8).reshape(len(records), fmt.record_size)
    return as_bytes[:, offset : offset + field.itemsize]


def etl_label(fmt: EtlFormat, records: np.ndarray) -> np.ndarray:
    """The character of each record: JIS X 0208 code for ETL8/9, ASCII reading for ETL1."""
    if fmt is ETL1C:
        return _etl1_labels(records["reading"])
    return _jis_labels(records["jis"])


def _jis_labels(codes: np.ndarray) -> np.ndarray:
    unique, inverse = np.unique(codes, return_inverse=True)
    chars = np.array([_char_or_empty(int(c)) for c in unique], dtype="<U1")
    return chars[inverse]


@functools.cache  # at most 65,536 codes; every chunk of every file asks for the same ones
def _char_or_empty(code: int) -> str:
    try:
        return jis0208_to_char(code)
    except ValueError:
        return ""


def _etl1_labels(readings: np.ndarray) -> np.ndarray:
    unique, inverse = np.unique(readings, return_inverse=True)
    chars = []
    for reading in unique:
        text = reading.decode("ascii", "replace")
        chars.append(ETL1_READINGS.get(text, ETL1_READINGS.get(text.strip(), "")))
    return np.array(chars, dtype="<U1")[inverse]


def read_records(path: Path, fmt: EtlFormat, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Records ``start:stop`` of one ETL file as a structured array (a read-only memory map).

    Raises:
        CorruptDataFile: the file size is not a whole number of records, naming the file and
            the index of the truncated record.
    """
    size = os.path.getsize(path)
    if size == 0 or size % fmt.record_size:
        whole = size // fmt.record_size
        raise CorruptDataFile(
            f"{path}: {size} bytes is not a whole number of {fmt.name} records of "
            f"{fmt.record_size} bytes; record {whole} is truncated (the file is damaged or is "
            f"not an {fmt.name} file; download it again from {ETL_SITE})."
        )
    records = np.memmap(path, dtype=fmt.dtype, mode="r")
    first = 1 if fmt.dummy_first_record else 0
    return records[first + start : None if stop is None else first + stop]


def record_count(path: Path, fmt: EtlFormat) -> int:
    """Number of (non-dummy) records in one file, from its size alone."""
    return os.path.getsize(path) // fmt.record_size - (1 if fmt.dummy_first_record else 0)


def decode_records(
    path: Path,
    fmt: EtlFormat,
    start: int = 0,
    stop: int | None = None,
    keep: frozenset[str] | None = None,
) -> RawChunk:
    """Decode records ``start:stop`` of one file, keeping only labels in ``keep`` (all if None).

    Writers are ``"<FORMAT>:<sheet>"``; every header field is kept in ``meta`` (plus
    ``file`` and ``record``, the record's index within its file).
    """
    records = read_records(path, fmt, start, stop)
    labels = etl_label(fmt, records)
    _check_labels(path, fmt, labels, start)
    index = np.arange(start, start + len(records))
    if keep is not None:
        selected = np.isin(labels, list(keep))
        records, labels, index = records[selected], labels[selected], index[selected]
    images = unpack_pixels(image_bytes(records, fmt), fmt.bits, fmt.height, fmt.width)
    # Copies (a few bytes a record), not views: a view would keep the file's memory map, and
    # with it every page read so far, alive for as long as the caller keeps the metadata.
    meta = {
        name: np.array(records[name])
        for name in fmt.dtype.names
        if not name.startswith("_") and name != "image"
    }
    meta["file"] = np.full(len(records), path.name)
    meta["record"] = index
    writers = np.char.add(f"{fmt.name}:", records["sheet"].astype(str))
    return RawChunk(images=images, labels=labels, writers=writers, ink="high", meta=meta)


def _check_labels(path: Path, fmt: EtlFormat, labels: np.ndarray, start: int) -> None:
    """Refuse records whose label names no character, or one that ``fmt`` does not hold: the
    file is damaged or of another format (ETL8G and ETL9G records are both 8,199 bytes, but
    ETL9G's image starts 4 bytes later, so it would decode shifted by 8 pixels)."""
    bad = np.flatnonzero(labels == "")
    if len(bad):
        field = "reading" if fmt is ETL1C else "JIS code"
        raise CorruptDataFile(
            f"{path}: record {start + int(bad[0])} has a {field} that names no known character; "
            f"the file is damaged or is not an {fmt.name} file."
        )
    if fmt.classes is None:
        return
    unique, first = np.unique(labels, return_index=True)
    foreign = [(int(i), str(c)) for c, i in zip(unique, first, strict=True) if c not in fmt.classes]
    if not foreign:
        return
    record, char = min(foreign)
    chars = {str(c) for c in unique}
    alike = [
        other.name
        for other in FORMATS.values()
        if other is not fmt
        and other.record_size == fmt.record_size
        and other.classes is not None
        and chars <= other.classes
    ]
    looks = (
        f"its records look like {alike[0]} ({fmt.record_size:,}-byte records as well): move it "
        f"to {FORMATS[alike[0].lower()].subdir}/ for dataset.source={alike[0].lower()}, and "
        f"get the {fmt.name} file again"
        if alike
        else f"the file is damaged or is not an {fmt.name} file: get it again"
    )
    raise CorruptDataFile(
        f"{path}: record {start + record} is {char!r} (JIS 0x{char_to_jis0208(char):04X}), which "
        f"{fmt.name} does not hold ({len(fmt.classes)} characters); {looks} from {ETL_SITE}."
    )


def decode_etl1c(path: Path) -> RawChunk:
    """Decode a whole ETL1C file (katakana files are ETL1C_07..13)."""
    return decode_records(Path(path), ETL1C)


def decode_etl8g(path: Path) -> RawChunk:
    """Decode a whole ETL8G file."""
    return decode_records(Path(path), ETL8G)


def decode_etl9g(path: Path) -> RawChunk:
    """Decode a whole ETL9G file."""
    return decode_records(Path(path), ETL9G)


def decode_etl8b2(path: Path) -> RawChunk:
    """Decode a whole ETL8B2 file (its dummy first record skipped)."""
    return decode_records(Path(path), ETL8B2)


def decode_etl9b(path: Path) -> RawChunk:
    """Decode a whole ETL9B file (its dummy first record skipped)."""
    return decode_records(Path(path), ETL9B)


def etl_files(data_dir: Path, fmt: EtlFormat) -> list[Path]:
    """The format's files under ``data_dir/<subdir>``; all of them must be present.

    Raises:
        DatasetFilesMissing: naming the directory, the missing files and where to get them.
    """
    folder = Path(data_dir) / fmt.subdir
    paths = [folder / name for name in fmt.file_names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:6]) + (
            f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        )
        raise DatasetFilesMissing(
            f"{fmt.name} files missing in {folder}: {shown}. Expected {len(paths)} files "
            f"{fmt.file_names[0]}..{fmt.file_names[-1]}, as the archive from {ETL_SITE} unpacks "
            f"(set paths.data_dir to the folder that holds {fmt.subdir}/). ETL data may not be "
            "redistributed, so hwexp cannot fetch it for you; to run without it, choose the "
            "built-in source: dataset.source=synthetic."
        )
    return paths


def etl_tasks(
    paths: Sequence[Path], fmt: EtlFormat, keep: frozenset[str] | None, chunk_records: int = 512
) -> list[ChunkTask]:
    """Chunked decode tasks over ``paths``; each task's ``count`` is exact after filtering.

    Labels are read chunk by chunk, each through its own short-lived memory map, so that the
    file's pages are not all mapped (and counted as resident) at once.
    """
    tasks = []
    for path in paths:
        total = record_count(path, fmt)
        read_records(path, fmt)  # size check now, before any worker starts
        for start in range(0, total, chunk_records):
            stop = min(start + chunk_records, total)
            labels = etl_label(fmt, read_records(path, fmt, start, stop))
            _check_labels(path, fmt, labels, start)
            count = len(labels) if keep is None else int(np.isin(labels, list(keep)).sum())
            if count:
                load = functools.partial(decode_records, path, fmt, start, stop, keep)
                tasks.append(ChunkTask(load, count, f"{path.name} records {start}..{stop - 1}"))
    return tasks


def labels_in_files(paths: Iterable[Path], fmt: EtlFormat) -> set[str]:
    """Every character present in the given files (reads only the label fields).

    Raises:
        CorruptDataFile: a record names no character, or one the format does not hold (naming
            the file, the record and the format it looks like).
    """
    found: set[str] = set()
    for path in paths:
        labels = etl_label(fmt, read_records(path, fmt))
        _check_labels(path, fmt, labels, 0)
        found.update(np.unique(labels).tolist())
    return found
