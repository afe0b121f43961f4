"""Pictures and tables of prepared data: sample grids and per-class / per-writer counts."""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hwexp.data.cache import PreparedSource
from hwexp.fsutil import atomic_write_bytes


@lru_cache(maxsize=4)  # a few sizes: sample grids, captions, MLflow error grids
def japanese_font(size: int = 20) -> ImageFont.ImageFont | None:
    """A font with Japanese glyphs for labels, or None when the machine has none."""
    from hwexp.synth.fonts import display_font

    face = display_font()
    return ImageFont.truetype(face.path, size, index=face.index) if face else None


def sample_grid(
    images: np.ndarray,
    labels: np.ndarray,
    writers: np.ndarray,
    classes: tuple[str, ...],
    per_class: int = 8,
    max_classes: int = 48,
    seed: int = 0,
    cell: int = 48,
) -> Image.Image:
    """A grid: one row per class (at most ``max_classes``, evenly spread), ``per_class``
    samples from different writers where possible; the character is drawn at the row's left.

    Prepared images are ink-bright; the grid shows them dark on white, as on paper.
    """
    rng = np.random.default_rng(seed)
    shown = [
        classes[i]
        for i in np.linspace(0, len(classes) - 1, min(max_classes, len(classes)))
        .round()
        .astype(int)
    ]
    shown = list(dict.fromkeys(shown))
    font = japanese_font(int(cell * 0.6))
    grid = Image.new("L", ((per_class + 1) * cell, len(shown) * cell), 255)
    draw = ImageDraw.Draw(grid)
    for row, char in enumerate(shown):
        members = np.flatnonzero(labels == char)
        rng.shuffle(members)
        # one sample per writer first, then repeats
        _, first = np.unique(writers[members], return_index=True)
        ordered = np.concatenate([members[np.sort(first)], np.setdiff1d(members, members[first])])
        for col, index in enumerate(ordered[:per_class]):
            tile = Image.fromarray(255 - np.asarray(images[index])).resize((cell, cell))
            grid.paste(tile, ((col + 1) * cell, row * cell))
        text = char if font else f"U+{ord(char):04X}" if len(char) == 1 else char
        draw.text(
            (cell * 0.15, row * cell + cell * 0.15),
            text,
            fill=0,
            font=font or ImageFont.load_default(),
        )
    return grid


def captioned_grid(
    images: np.ndarray | list[np.ndarray],
    captions: list[str],
    columns: int = 12,
    cell: int = 56,
    caption_px: int = 14,
) -> Image.Image:
    """Tiles of ink-bright ``images`` shown dark on white, ``cell`` px square, ``columns`` a
    row, each with its caption (one or more lines of ``caption_px`` px text) below it.
    Characters are drawn with a Japanese font when the machine has one, else as code points."""
    font = japanese_font(caption_px)
    lines = max((caption.count("\n") + 1 for caption in captions), default=1)
    height = cell + lines * (caption_px + 3) + 2
    rows = max(1, -(-len(captions) // columns))
    grid = Image.new("L", (columns * cell, rows * height), 255)
    draw = ImageDraw.Draw(grid)
    for k, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (k % columns) * cell, (k // columns) * height
        tile = Image.fromarray(255 - np.asarray(image, dtype=np.uint8))
        grid.paste(tile.resize((cell - 4, cell - 4)), (x + 2, y + 2))
        if font is None:
            caption = "".join(c if c.isascii() else f"U+{ord(c):04X}" for c in caption)
        draw.multiline_text(
            (x + 3, y + cell), caption, fill=0, font=font or ImageFont.load_default(), spacing=3
        )
    return grid


def save_png(image: Image.Image, path: Path) -> Path:
    """Write ``image`` as PNG atomically."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def count_table(source: PreparedSource, classes: tuple[str, ...]) -> str:
    """Counts per class (in class order) and a summary of samples per writer, as text."""
    per_class = Counter(source.labels.tolist())
    per_writer = Counter(source.writers.tolist())
    lines = [
        f"source {source.name}: {len(source)} samples, {len(per_class)} classes, "
        f"{len(per_writer)} writers  ({source.path})",
        "",
        "class  count",
    ]
    lines += [f"{char:<5}  {per_class.get(char, 0)}" for char in classes]
    counts = np.array(sorted(per_writer.values()))
    lines += [
        "",
        f"samples per writer: min {counts.min()} / median {int(np.median(counts))} "
        f"/ max {counts.max()}",
    ]
    top = per_writer.most_common(5)
    lines += ["largest writers: " + ", ".join(f"{w} ({n})" for w, n in top)]
    return "\n".join(lines)
