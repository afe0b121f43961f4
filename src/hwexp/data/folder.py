"""A user's own images: any tree of ``<character>/<image>`` files (PNG, JPEG, BMP).

The folder name is the label (one character, or a name that ``labels.txt`` maps — not needed
for plain characters). Images may hold dark ink on light paper or light ink on dark; the
preprocessing stage detects which per image (``ink="auto"``). Writer ids come from the file
name: the part before the first ``_`` if ``writer_from_name`` is on (``w07_3.png`` → writer
``w07``), otherwise each image is its own writer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hwexp.data.errors import DatasetFilesMissing, UnreadableImage
from hwexp.data.raw import ChunkTask, RawChunk

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
# Images of one chunk are scaled (up or down) so that their longer side is this many pixels and
# padded to a square of that side, so they share one array before normalisation.
FOLDER_CANVAS = 128


def list_folder_images(root: Path) -> list[tuple[Path, str]]:
    """``(path, character)`` for every image under ``root/<character>/``, sorted by path.

    Raises:
        DatasetFilesMissing: ``root`` does not exist or holds no class folder with images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetFilesMissing(
            f"image folder {root} does not exist; set dataset.path to a directory laid out as "
            "<character>/<image>.png (PNG, JPEG or BMP)."
        )
    found = [
        (path, path.parent.name)
        for path in sorted(root.glob("*/*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not found:
        raise DatasetFilesMissing(
            f"no images found in {root}: expected <character>/<image> files with suffixes "
            f"{sorted(IMAGE_SUFFIXES)}, e.g. {root}/あ/0001.png."
        )
    return found


def read_folder_images(
    items: Sequence[tuple[str, str]], writer_from_name: bool, canvas: int = FOLDER_CANVAS
) -> RawChunk:
    """Decode the given ``(path, character)`` images into one chunk (ink polarity "auto").

    Each image is converted to grey, scaled (keeping its aspect) so that its longer side is
    ``canvas`` pixels, enlarged if smaller, and padded along its shorter side with its own
    border colour: images of any size share one array, and a character keeps its share of its
    own image, so a 64 x 64 cell and a 28 x 28 one are prepared alike.

    Raises:
        UnreadableImage: naming the file that cannot be decoded.
    """
    images = np.empty((len(items), canvas, canvas), np.uint8)
    for i, (path, _) in enumerate(items):
        images[i] = _letterbox(_read_grey(Path(path)), canvas)
    labels = np.array([char for _, char in items])
    names = [Path(path).stem for path, _ in items]
    writers = [
        f"folder:{_writer_of(name) if writer_from_name else f'{char}/{name}'}"
        for name, (_, char) in zip(names, items, strict=True)
    ]
    meta = {"file": np.array([str(path) for path, _ in items])}
    return RawChunk(images, labels, np.array(writers), ink="auto", meta=meta)


def _read_grey(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA") or "transparency" in image.info:
                # Transparent drawings: composite onto the colour the strokes are not.
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("L")
            return image.convert("L")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UnreadableImage(
            f"cannot read image {path}: {error}. Remove or replace the file (PNG, JPEG or BMP)."
        ) from error


def _letterbox(image: Image.Image, canvas: int) -> np.ndarray:
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
    """Chunked read tasks over every image of ``keep``'s classes (all classes if None).

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
        tasks.append(ChunkTask(load, len(part), f"{root} images, chunk {number + 1} of {chunks}"))
    return tasks


def _writer_of(stem: str) -> str:
    return stem.split("_", 1)[0]
