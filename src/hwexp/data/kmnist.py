"""Readers for Kuzushiji-MNIST (10 classes) and Kuzushiji-49 (49 classes), by CODH.

Both come as NumPy ``.npz`` archives holding one array under ``arr_0``: images
``(n, 28, 28) uint8`` with white ink on black (ink ``"high"``) and labels ``(n,) uint8``
class indices, plus a class map CSV (``index,codepoint,char``) that turns an index into its
character. Files unpack under ``<data_dir>/kmnist/`` and ``<data_dir>/k49/``.

The datasets have no writer ids, so every sample is its own writer
(``"<variant>:<split>:<row>"``).

Image rows are streamed out of the zip member, so a chunk decompresses the archive only up to
its last row and never holds more than one block of rows it does not keep.
"""

from __future__ import annotations

import csv
import functools
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np

from hwexp.data.raw import ChunkTask, RawChunk
from hwexp.errors import CorruptDataFile, DatasetFilesMissing

KmnistVariant = Literal["kmnist", "k49"]
Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")
CODH_PAGE = "http://codh.rois.ac.jp/kmnist/"


@dataclass(frozen=True)
class OfficialFile:
    """One file of a dataset as CODH publishes it."""

    name: str
    md5: str  # hex digest of the whole file
    size_bytes: int


@dataclass(frozen=True)
class OfficialFiles:
    """Where a variant's files live and how to verify them."""

    variant: KmnistVariant
    base_url: str  # ends with "/"; a file's URL is base_url + name
    files: tuple[OfficialFile, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.files)

    def md5_by_name(self) -> dict[str, str]:
        return {f.name: f.md5 for f in self.files}

    def url(self, name: str) -> str:
        return self.base_url + name


# The official repository (github.com/rois-codh/kmnist: README.md, download_data.py) lists the
# URLs but publishes no checksums. The md5s and sizes below are those of the files fetched from
# these URLs, as recorded in the git-annex keys ("MD5E-s<size>--<md5>") and the md5sums file of
# github.com/datasets-mila/datasets--kmnist (its .log.web entries tie each key to the codh URL).
# The eight .npz md5s agree with a second, independent list (Simon Wenkel's CMNIST generator,
# CONSTANTS["MD5-CHECKSUMS"]) and, for K49, with torchvision-style KMNIST49 datasets; the two
# class map md5s are confirmed by the datasets-mila record only.
KMNIST_FILES = OfficialFiles(
    variant="kmnist",
    base_url="http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
    files=(
        OfficialFile("kmnist-train-imgs.npz", "a183fbc01ed9a345513b145673d3d0bb", 18384171),
        OfficialFile("kmnist-train-labels.npz", "b0e1d240e8afec72b50437fc3bc5908a", 29700),
        OfficialFile("kmnist-test-imgs.npz", "dace6de62ca8b90843cc45366337d02e", 3079479),
        OfficialFile("kmnist-test-labels.npz", "3ae489a79983d0fe386152684e3b5412", 5304),
        OfficialFile("kmnist_classmap.csv", "899202f6e8dc29a321ac210a03d0f2f1", 151),
    ),
)

K49_FILES = OfficialFiles(
    variant="k49",
    base_url="http://codh.rois.ac.jp/kmnist/dataset/k49/",
    files=(
        OfficialFile("k49-train-imgs.npz", "7ac088b20481cf51dcd01ceaab89d821", 66117696),
        OfficialFile("k49-train-labels.npz", "44a8e1b893f81e63ff38d73cad420f7a", 164485),
        OfficialFile("k49-test-imgs.npz", "d352e201d846ce6b94f42c990966f374", 10971201),
        OfficialFile("k49-test-labels.npz", "4da6f7a62e67a832d5eb1bd85c5ee448", 27450),
        OfficialFile("k49_classmap.csv", "f7d0d0391f68bdf0fe4cf160ceb85753", 697),
    ),
)

OFFICIAL_FILES: dict[str, OfficialFiles] = {"kmnist": KMNIST_FILES, "k49": K49_FILES}

_ROW_BLOCK = 4096  # image rows decompressed per read while streaming a chunk


def official_files(variant: str) -> OfficialFiles:
    """The file table of ``variant`` ("kmnist" or "k49"); ValueError for any other name."""
    try:
        return OFFICIAL_FILES[variant]
    except KeyError:
        raise ValueError(
            f"unknown KMNIST variant {variant!r}; expected one of {sorted(OFFICIAL_FILES)}"
        ) from None


def images_file(variant: str, split: str) -> str:
    return f"{variant}-{split}-imgs.npz"


def labels_file(variant: str, split: str) -> str:
    return f"{variant}-{split}-labels.npz"


def classmap_file(variant: str) -> str:
    return f"{variant}_classmap.csv"


def check_kmnist_files(root: Path, variant: str) -> Path:
    """Check that ``root/<variant>/`` holds every file of the variant; return that folder.

    Only presence and the cheap structure are checked (zip directories, ``.npy`` headers, label
    arrays, class map); image data is not decompressed and md5s are not computed.

    Raises:
        DatasetFilesMissing: naming the folder, each missing file, the download command and URL,
            and the offline alternative ``dataset.source=synthetic``.
        CorruptDataFile: a truncated or malformed file, or image and label files of one split
            that disagree on the number of rows, naming the file.
    """
    table = official_files(variant)
    folder = Path(root) / variant
    missing = [name for name in table.names if not (folder / name).is_file()]
    if missing:
        raise DatasetFilesMissing(
            f"{variant.upper()} files missing in {folder}: {', '.join(missing)}. "
            f"Fetch them with `hwexp data download {variant}` (into <data_dir>/{variant}/), or "
            f"by hand from {table.base_url} (see {CODH_PAGE}), or set paths.data_dir to the "
            f"folder that holds {variant}/. To run offline without them, choose the built-in "
            "source: dataset.source=synthetic."
        )
    classes = read_classmap(folder / classmap_file(variant))
    for split in SPLITS:
        labels = _read_label_indices(folder / labels_file(variant, split), len(classes))
        image_rows = _image_rows(folder / images_file(variant, split))
        if image_rows != len(labels):
            raise CorruptDataFile(
                f"{folder / images_file(variant, split)}: {image_rows} images but "
                f"{labels_file(variant, split)} has {len(labels)} labels; one of the two files "
                f"is damaged or from another release; download both again from "
                f"{table.base_url}."
            )
    return folder


def read_classmap(path: Path) -> list[str]:
    """The characters of a class map CSV (``index,codepoint,char``), position = class index.

    A blank ``char`` is rebuilt from ``codepoint`` (``U+304A``).

    Raises:
        CorruptDataFile: missing columns, indices that are not ``0..n-1`` in order, or a
            codepoint that is not a valid ``U+XXXX``, naming the file.
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as error:
        raise CorruptDataFile(f"{path}: not a UTF-8 CSV class map ({error}).") from error
    if not rows or not {"index", "codepoint", "char"} <= set(rows[0]):
        raise CorruptDataFile(
            f"{path}: expected a class map CSV with header index,codepoint,char and one row per "
            "class."
        )
    characters = []
    for position, row in enumerate(rows):
        try:
            index = int(row["index"])
            character = (row["char"] or "").strip() or chr(int(row["codepoint"].strip()[2:], 16))
        except (TypeError, ValueError, AttributeError) as error:
            raise CorruptDataFile(
                f"{path}: class map row {position + 1} is malformed: {row}."
            ) from error
        if index != position:
            raise CorruptDataFile(
                f"{path}: class map row {position + 1} has index {index}; expected {position} "
                "(indices must run 0..n-1 in order)."
            )
        characters.append(character)
    return characters


def kmnist_tasks(
    root: Path, variant: str, classes: frozenset[str] | None, chunk_size: int = 8192
) -> list[ChunkTask]:
    """Chunked load tasks over the train then test rows of ``root/<variant>/``.

    Each task covers ``chunk_size`` consecutive rows of one split; its ``count`` is the exact
    number of rows ``load()`` returns after keeping only labels in ``classes`` (all if None),
    computed from the label files alone. Tasks with no kept row are left out.

    Raises:
        DatasetFilesMissing, CorruptDataFile: as :func:`check_kmnist_files`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    folder = check_kmnist_files(root, variant)
    characters = np.array(read_classmap(folder / classmap_file(variant)))
    tasks = []
    for split in SPLITS:
        indices = _read_label_indices(folder / labels_file(variant, split), len(characters))
        labels = characters[indices]
        wanted = np.ones(len(labels), bool) if classes is None else np.isin(labels, list(classes))
        for start in range(0, len(labels), chunk_size):
            stop = min(start + chunk_size, len(labels))
            count = int(wanted[start:stop].sum())
            if count:
                load = functools.partial(
                    load_kmnist_rows, folder, variant, split, start, stop, classes
                )
                description = f"{images_file(variant, split)} rows {start}..{stop - 1}"
                tasks.append(ChunkTask(load, count, description))
    return tasks


def load_kmnist_rows(
    folder: Path,
    variant: str,
    split: str,
    start: int,
    stop: int,
    classes: frozenset[str] | None,
) -> RawChunk:
    """Rows ``start:stop`` of one split in ``folder``, keeping labels in ``classes`` (all if None).

    Images ``(n, 28, 28) uint8`` ink high; labels are characters; writers
    ``"<variant>:<split>:<row>"``; meta ``official_split`` ("train"/"test") and ``row`` (the
    row index within the split's files).
    """
    folder = Path(folder)
    characters = np.array(read_classmap(folder / classmap_file(variant)))
    indices = _read_label_indices(folder / labels_file(variant, split), len(characters))
    stop = min(stop, len(indices))
    rows = np.arange(start, stop)
    labels = characters[indices[start:stop]]
    if classes is not None:
        kept = np.isin(labels, list(classes))
        rows, labels = rows[kept], labels[kept]
    images = read_npz_rows(folder / images_file(variant, split), rows)
    writers = np.array([f"{variant}:{split}:{row}" for row in rows.tolist()], dtype=str)
    meta = {"official_split": np.full(len(rows), split), "row": rows.astype(np.int64)}
    return RawChunk(images=images, labels=labels, writers=writers, ink="high", meta=meta)


def read_npz_rows(path: Path, rows: np.ndarray) -> np.ndarray:
    """The given rows (sorted, ascending) of the single array in an ``.npz`` file.

    Decompresses the member only up to the last wanted row, ``_ROW_BLOCK`` rows at a time.

    Raises:
        CorruptDataFile: truncated or malformed archive, or rows beyond the array, naming the file.
    """
    path = Path(path)
    rows = np.asarray(rows, dtype=np.int64)
    try:
        with zipfile.ZipFile(path) as archive, _open_array_member(archive, path) as member:
            shape, fortran_order, dtype = _read_npy_header(member, path)
            row_shape = shape[1:]
            out = np.empty((len(rows), *row_shape), dtype=dtype)
            if not len(rows):
                return out
            if fortran_order:  # not what CODH ships; fall back to a whole-array read
                member.seek(0)
                whole = np.lib.format.read_array(member)
                return np.ascontiguousarray(whole[rows])
            if rows[0] < 0 or rows[-1] >= shape[0] or np.any(np.diff(rows) < 0):
                raise CorruptDataFile(
                    f"{path}: asked for rows {rows[0]}..{rows[-1]} (ascending) of {shape[0]}."
                )
            row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
            for block_start, block in _stream_rows(member, path, row_bytes, int(rows[-1]) + 1):
                block_stop = block_start + len(block) // row_bytes
                lo, hi = np.searchsorted(rows, [block_start, block_stop])
                if hi > lo:
                    picked = np.frombuffer(block, dtype=dtype).reshape(-1, *row_shape)
                    out[lo:hi] = picked[rows[lo:hi] - block_start]
            return out
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
        raise _corrupt(path, error) from error


def _stream_rows(
    member: IO[bytes], path: Path, row_bytes: int, rows_needed: int
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(first_row, bytes)`` blocks of whole rows until ``rows_needed`` rows are read."""
    row = 0
    while row < rows_needed:
        take = min(_ROW_BLOCK, rows_needed - row)
        block = member.read(take * row_bytes)
        if len(block) != take * row_bytes:
            raise CorruptDataFile(
                f"{path}: the array data ends inside row {row + len(block) // row_bytes}; the "
                "file is truncated, download it again."
            )
        yield row, block
        row += take


def _open_array_member(archive: zipfile.ZipFile, path: Path) -> IO[bytes]:
    names = [name for name in archive.namelist() if name.endswith(".npy")]
    if not names:
        raise CorruptDataFile(f"{path}: the archive holds no .npy array (expected arr_0.npy).")
    name = "arr_0.npy" if "arr_0.npy" in names else names[0]
    return archive.open(name)


def _read_npy_header(member: IO[bytes], path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise CorruptDataFile(f"{path}: unsupported .npy format version {version}.")
    if dtype.hasobject or not shape:
        raise CorruptDataFile(f"{path}: holds a {dtype} array of shape {shape}, not numbers.")
    return tuple(shape), bool(fortran_order), dtype


def _image_rows(path: Path) -> int:
    """Number of images in an ``.npz`` from its ``.npy`` header; checks ``(n, h, w) uint8``."""
    try:
        with zipfile.ZipFile(path) as archive, _open_array_member(archive, path) as member:
            shape, _, dtype = _read_npy_header(member, path)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
        raise _corrupt(path, error) from error
    if len(shape) != 3 or dtype != np.uint8:
        raise CorruptDataFile(
            f"{path}: holds a {dtype} array of shape {shape}; expected (n, 28, 28) uint8 images."
        )
    return shape[0]


def _read_label_indices(path: Path, class_count: int) -> np.ndarray:
    """The label array of an ``.npz`` as int64 class indices, each below ``class_count``."""
    try:
        with zipfile.ZipFile(path) as archive, _open_array_member(archive, path) as member:
            labels = np.lib.format.read_array(member, allow_pickle=False)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
        raise _corrupt(path, error) from error
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise CorruptDataFile(
            f"{path}: holds a {labels.dtype} array of shape {labels.shape}; expected (n,) "
            "integer class indices."
        )
    labels = labels.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= class_count))
    if len(bad):
        raise CorruptDataFile(
            f"{path}: row {int(bad[0])} has class index {int(labels[bad[0]])}, but the class "
            f"map lists only {class_count} classes; the labels and the class map do not match."
        )
    return labels


def _corrupt(path: Path, error: BaseException) -> CorruptDataFile:
    if isinstance(error, CorruptDataFile):
        return error
    return CorruptDataFile(
        f"{path}: cannot be read as a NumPy .npz archive ({type(error).__name__}: {error}); the "
        "file is truncated or damaged, delete it and download it again."
    )
