"""Pictures and tables of prepared data: sample grids and per-class / per-writer counts."""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hwexp.data.cache import PreparedSource
from hwexp.fsutil import atomic_write_bytes

SUMMARY_ABOVE = 50  # class sets larger than this get a summary of counts per class, not a table


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
    title: str | None = None,
) -> Image.Image:
    """A grid: ``title`` (wrapped to the grid's width) on top, then one row per class (at most
    ``max_classes``, evenly spread), ``per_class`` samples from different writers where
    possible, each with its writer id below it (without the ``<source>:`` prefix, shortened
    from the left to fit); the character is drawn at the row's left.

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
    caption_px, title_px = max(9, cell // 5), max(12, cell // 4)
    small = japanese_font(caption_px) or ImageFont.load_default()
    title_font = japanese_font(title_px) or ImageFont.load_default()
    width = (per_class + 1) * cell
    row_height = cell + caption_px + 3
    title_lines = _wrap(title, title_font, width - 8) if title else []
    top = len(title_lines) * (title_px + 4) + (6 if title_lines else 0)
    grid = Image.new("L", (width, top + len(shown) * row_height), 255)
    draw = ImageDraw.Draw(grid)
    for k, line in enumerate(title_lines):
        draw.text((4, 3 + k * (title_px + 4)), line, fill=0, font=title_font)
    for row, char in enumerate(shown):
        y = top + row * row_height
        members = np.flatnonzero(labels == char)
        rng.shuffle(members)
        # one sample per writer first, then repeats
        _, first = np.unique(writers[members], return_index=True)
        ordered = np.concatenate([members[np.sort(first)], np.setdiff1d(members, members[first])])
        for col, index in enumerate(ordered[:per_class]):
            tile = Image.fromarray(255 - np.asarray(images[index])).resize((cell, cell))
            grid.paste(tile, ((col + 1) * cell, y))
            writer = _fit(draw, str(writers[index]).split(":", 1)[-1], small, cell - 2)
            x = (col + 1) * cell + (cell - draw.textlength(writer, font=small)) / 2
            draw.text((x, y + cell + 1), writer, fill=0, font=small)
        text = char if font else f"U+{ord(char):04X}" if len(char) == 1 else char
        draw.text(
            (cell * 0.15, y + cell * 0.15),
            text,
            fill=0,
            font=font or ImageFont.load_default(),
        )
    return grid


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """``text``, or its end after an ellipsis, whichever fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    for start in range(1, len(text)):
        if draw.textlength("…" + text[start:], font=font) <= width:
            return "…" + text[start:]
    return "…"


def _wrap(text: str, font, width: float) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` pixels (a longer word alone)."""
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


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


def count_table(
    source: PreparedSource, classes: tuple[str, ...], all_classes: bool = False, extremes: int = 10
) -> str:
    """Counts per class and a summary of samples per writer, as text. Up to
    ``SUMMARY_ABOVE`` classes (or with ``all_classes``), one line per class in class order;
    beyond, the distribution (min / quartiles / median / max), the classes without samples
    and the ``extremes`` classes with the fewest and the most samples."""
    per_class = Counter(source.labels.tolist())
    per_writer = Counter(source.writers.tolist())
    lines = [
        f"source {source.name}: {len(source)} samples, {len(per_class)} classes, "
        f"{len(per_writer)} writers  ({source.path})",
        "",
    ]
    if all_classes or len(classes) <= SUMMARY_ABOVE:
        lines += ["class  count"]
        lines += [f"{char:<5}  {per_class.get(char, 0)}" for char in classes]
    else:
        lines += _class_summary(per_class, classes, extremes)
    counts = np.array(sorted(per_writer.values()))
    lines += [
        "",
        f"samples per writer: min {counts.min()} / median {int(np.median(counts))} "
        f"/ max {counts.max()}",
    ]
    top = per_writer.most_common(5)
    lines += ["largest writers: " + ", ".join(f"{w} ({n})" for w, n in top)]
    return "\n".join(lines)


def _class_summary(per_class: Counter, classes: tuple[str, ...], extremes: int) -> list[str]:
    counts = np.array([per_class.get(char, 0) for char in classes])
    q1, median, q3 = np.percentile(counts, [25, 50, 75])
    empty = "".join(classes[i] for i in np.flatnonzero(counts == 0))

    def listed(order: np.ndarray) -> str:  # ties in class order
        return ", ".join(f"{classes[i]} {counts[i]}" for i in order[:extremes])

    head = f"samples per class ({len(classes)} classes; one line each: stats.all_classes=true):"
    if counts.min() == counts.max():
        return [f"{head} {counts.min()} each"]
    lines = [
        f"{head} min {counts.min()} / 25% {q1:g} / median {median:g} / 75% {q3:g} / "
        f"max {counts.max()}, mean {counts.mean():.1f}",
        f"fewest: {listed(np.argsort(counts, kind='stable'))}",
        f"most: {listed(np.argsort(-counts, kind='stable'))}",
    ]
    if empty:
        shown = empty if len(empty) <= 40 else f"{empty[:40]} (+{len(empty) - 40} more)"
        lines.append(f"classes without samples: {len(empty)}: {shown}")
    return lines
