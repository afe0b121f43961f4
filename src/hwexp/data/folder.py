"""A user's own images: any tree of ``<character>/<image>`` files (PNG, JPEG, BMP).

The folder name is the label, normalised to Unicode NFC (macOS writes が as か + U+3099). A
folder whose name is not the character itself (``ka``, ``0041``, a name with a suffix) is
mapped by ``labels.txt`` in the dataset root: one ``<folder><TAB><character>`` line per such
folder (blank lines and lines starting with ``#`` are ignored). Images may hold dark ink on
light paper or light ink on dark; the preprocessing stage detects which per image
(``ink="auto"``). Writer ids come from the file name: the part before the first ``_`` if
``writer_from_name`` is on (``w07_3.png`` → writer ``w07``), otherwise each image is its own
writer.

Images smaller than ``MIN_IMAGE_SIDE`` pixels on a side or blank (grey levels spanning less
than ``MIN_CONTRAST``) are left out, counted in one warning when the cache is built. An
image that cannot be decoded, or one so large that decoding it could exhaust memory
(Pillow's decompression-bomb limit, about 89 million pixels), stops preparation with an
error naming the file.
"""

from __future__ import annotations

import functools
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hwexp.data.raw import ChunkTask, RawChunk
from hwexp.errors import ConfigError, DataError, DatasetFilesMissing, UnreadableImage

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
LABELS_FILE = "labels.txt"
# Images of one chunk are scaled (up or down) so that their longer side is this many pixels and
# padded to a square of that side, so they share one array before normalisation.
FOLDER_CANVAS = 128
MIN_IMAGE_SIDE = 8  # pixels; smaller images cannot show a character
MIN_CONTRAST = 16  # grey levels (of 255) between the darkest and the brightest pixel
_LAYOUT = "<character>/<image>.png (PNG, JPEG or BMP)"


def folder_root(path: str | Path | None) -> Path:
    """The dataset root ``dataset.path`` names, user-expanded and absolute.

    Raises:
        ConfigError: no path is set.
    """
    if path is None or str(path).strip() in ("", "???"):  # ???: OmegaConf's unset value
        raise ConfigError(
            f"dataset=folder needs the folder of your images: add dataset.path=<directory> "
            f"laid out as {_LAYOUT}, e.g. python -m hwexp dataset=folder dataset.path=~/my_chars"
        )
    return Path(path).expanduser().resolve()


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a file name (surrogates) written as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def list_folder_images(root: Path) -> list[tuple[Path, str]]:
    """``(path, character)`` for every image under ``root/<folder>/``, sorted by path; the
    character is the folder name in NFC, or what ``root/labels.txt`` maps the folder to.

    Raises:
        DatasetFilesMissing: ``root`` does not exist or holds no class folder with images.
        DataError: a folder name is not one character and ``labels.txt`` does not map it, or
            ``labels.txt`` is malformed (naming the line).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetFilesMissing(
            f"image folder {root} does not exist; set dataset.path to a directory laid out as "
            f"{_LAYOUT}."
        )
    mapping = read_labels_file(root / LABELS_FILE)
    found = []
    for path in sorted(root.glob("*/*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.append((path, _label_of(path.parent, mapping)))
    if not found:
        raise DatasetFilesMissing(
            f"no images found in {root}: expected <character>/<image> files with suffixes "
            f"{sorted(IMAGE_SUFFIXES)}, e.g. {root}/あ/0001.png."
        )
    return found


def read_labels_file(path: Path) -> dict[str, str]:
    """Folder name (NFC) → character from a ``labels.txt``; empty if there is none.

    Raises:
        DataError: naming the line that is not ``<folder><TAB><character>`` or maps a folder
            twice.
    """
    if not path.is_file():
        return {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error}); save it as UTF-8.") from None
    mapping: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split("\t")
        char = unicodedata.normalize("NFC", fields[-1].strip())
        folder = unicodedata.normalize("NFC", fields[0])
        if len(fields) != 2 or not folder or len(char) != 1:
            raise DataError(
                f"{path} line {number}: {line!r} is not '<folder><TAB><character>' "
                "(one tab between the folder name and one character)."
            )
        if folder in mapping:
            raise DataError(f"{path} line {number}: folder {folder!r} is mapped twice.")
        mapping[folder] = char
    return mapping


def _label_of(folder: Path, mapping: dict[str, str]) -> str:
    name = unicodedata.normalize("NFC", folder.name)
    label = mapping.get(name, name)
    if len(label) == 1 and unicodedata.category(label) not in ("Cc", "Cs"):
        return label
    if any("\udc80" <= c <= "\udcff" for c in name):
        why = "is not valid UTF-8: rename the folder after its character"
    else:
        why = (
            f"is not one character: rename the folder after its character or map it in "
            f"{folder.parent / LABELS_FILE} with a line '{name}<TAB><character>'"
        )
    raise DataError(f"folder {printable(str(folder))}: its name {why}.")


def read_folder_images(
    items: Sequence[tuple[str, str]], writer_from_name: bool, canvas: int = FOLDER_CANVAS
) -> RawChunk:
    """Decode the given ``(path, character)`` images into one chunk (ink polarity "auto").

    Each image is converted to grey, scaled (keeping its aspect) so that its longer side is
    ``canvas`` pixels, enlarged if smaller, and padded along its shorter side with its own
    border colour: images of any size share one array, and a character keeps its share of its
    own image, so a 64 x 64 cell and a 28 x 28 one are prepared alike. Images too small or
    blank to hold a character are left out and listed in ``skipped``.

    Raises:
        UnreadableImage: naming the file that cannot be decoded or is too large to decode.
    """
    images = np.empty((len(items), canvas, canvas), np.uint8)
    kept: list[tuple[str, str]] = []
    skipped: list[str] = []
    for path, char in items:
        grey = _read_grey(Path(path))
        why = unusable(grey)
        if why:
            skipped.append(f"{printable(str(path))} ({why})")
            continue
        images[len(kept)] = letterbox(grey, canvas)
        kept.append((path, char))
    labels = np.array([char for _, char in kept], dtype=str)
    names = [printable(Path(path).stem) for path, _ in kept]
    writers = [
        f"folder:{_writer_of(name) if writer_from_name else f'{char}/{name}'}"
        for name, (_, char) in zip(names, kept, strict=True)
    ]
    meta = {"file": np.array([printable(str(path)) for path, _ in kept], dtype=str)}
    return RawChunk(
        images[: len(kept)],
        labels,
        np.array(writers, dtype=str),
        ink="auto",
        meta=meta,
        skipped=tuple(skipped),
    )


def _read_grey(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Past Pillow's limit (MAX_IMAGE_PIXELS) an image is refused before it is decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                if image.mode in ("RGBA", "LA") or "transparency" in image.info:
                    # Transparent drawings: composite onto the colour the strokes are not.
                    rgba = image.convert("RGBA")
                    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    return Image.alpha_composite(background, rgba).convert("L")
                return image.convert("L")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(
            f"image {printable(str(path))} is too large to decode safely ({error}). A "
            "character image needs a few hundred pixels a side: shrink or remove the file."
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UnreadableImage(
            f"cannot read image {printable(str(path))}: {error}. Remove or replace the file "
            "(PNG, JPEG or BMP)."
        ) from error


def unusable(image: Image.Image) -> str | None:
    """Why ``image`` (grey) cannot hold a character, or None."""
    if min(image.size) < MIN_IMAGE_SIDE:
        return f"{image.width}x{image.height} pixels"
    low, high = image.getextrema()
    if high - low < MIN_CONTRAST:
        return "blank: no contrast"
    return None


def letterbox(image: Image.Image, canvas: int = FOLDER_CANVAS) -> np.ndarray:
    """``(canvas, canvas)`` uint8: grey ``image`` scaled so its longer side is ``canvas`` pixels
    (enlarged when smaller) and padded along its shorter side with its border's median grey."""
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    fill = int(np.median(border))
    scale = canvas / max(image.size)
    if scale != 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        # Area averaging when shrinking; bicubic when enlarging small cells (smooth edges).
        filter_ = Image.Resampling.BOX if scale < 1.0 else Image.Resampling.BICUBIC
        image = image.resize(size, filter_)
    out = np.full((canvas, canvas), fill, np.uint8)
    top, left = (canvas - image.height) // 2, (canvas - image.width) // 2
    out[top : top + image.height, left : left + image.width] = np.asarray(image)
    return out


def folder_tasks(
    root: Path, keep: frozenset[str] | None, writer_from_name: bool, chunk_images: int = 1024
) -> list[ChunkTask]:
    """Chunked read tasks over every image of ``keep``'s classes (all classes if None); a
    task's ``count`` is at most what it returns (unusable images are skipped).

    Preparation takes the size reference of a character from the other images of its writer in
    the same chunk (``hwexp.data.preprocess``). So with ``writer_from_name`` a writer's images
    are kept together; otherwise each chunk takes every n-th image, a sample of every class,
    rather than a run of a few class folders.
    """
    items = [
        (str(path), char) for path, char in list_folder_images(root) if keep is None or char in keep
    ]
    chunks = max(1, -(-len(items) // chunk_images))
    if writer_from_name:
        items.sort(key=lambda item: (_writer_of(Path(item[0]).stem), item[0]))
        parts = [items[i * chunk_images : (i + 1) * chunk_images] for i in range(chunks)]
    else:
        parts = [items[i::chunks] for i in range(chunks)]
    tasks = []
    for number, part in enumerate(parts):
        load = functools.partial(read_folder_images, part, writer_from_name)
        description = f"{printable(str(root))} images, chunk {number + 1} of {chunks}"
        tasks.append(ChunkTask(load, len(part), description, exact=False))
    return tasks


def _writer_of(stem: str) -> str:
    return stem.split("_", 1)[0]
