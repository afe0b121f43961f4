"""What a run's reports are made of: CSV and markdown tables, the confusion and training-curve
figures, the grid of misclassified images, and CJK text for them (one font helper)."""

from __future__ import annotations

import csv
import functools
import io
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from matplotlib.font_manager import FontProperties

    from hwexp.metrics import EvaluationReport

log = logging.getLogger(__name__)


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    buffer = io.StringIO()
    columns = list(columns or (rows[0].keys() if rows else []))
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# --------------------------------------------------------------------------- CJK text


@functools.lru_cache(maxsize=1)
def cjk_font_path() -> str | None:
    """Path of a font that draws kana and kanji (the one hwexp installs), or None."""
    from hwexp.synth.fonts import display_font

    face = display_font()
    return face.path if face else None


def codepoints(chars: str) -> str:
    """``"あ"`` -> ``"U+3042"`` (space-separated for several characters)."""
    return " ".join(f"U+{ord(c):04X}" for c in chars)


def pair_text(true: str, predicted: str) -> tuple[str, FontProperties | None]:
    """How to draw ``true→predicted``: the characters with a CJK font when one is installed,
    else their code points (``U+3046→U+3042``) in the default font. Returns (text, font)."""
    path = cjk_font_path()
    if path is not None:
        from matplotlib.font_manager import FontProperties

        return f"{true}→{predicted}", FontProperties(fname=path)
    return f"{codepoints(true)}→{codepoints(predicted)}", None


# --------------------------------------------------------------------------- figures


def misclassified_grid(
    report: EvaluationReport, indices: np.ndarray, columns: int = 6
) -> PIL.Image.Image:
    """A grid of test images (dark on white), each captioned ``true→predicted`` and the
    confidence. Drawn with PIL: a matplotlib grid of 36 axes took 2.6 s, this 0.04 s."""
    from hwexp.data.show import captioned_grid

    indices = np.asarray(indices, dtype=np.int64)
    if not len(indices):
        image = PIL.Image.new("L", (columns * 72, 40), 255)
        PIL.ImageDraw.Draw(image).text((8, 12), "no misclassified samples", fill=0)
        return image
    captions = [
        f"{report.classes[report.labels[i]]}→{report.classes[report.predicted[i]]}\n"
        f"{report.top_k_probs[i, 0]:.0%}"
        for i in indices
    ]
    return captioned_grid(report.images[indices], captions, columns, cell=72, caption_px=15)


def confusion_figure(
    pairs: Sequence[tuple[str, str, int]],
    examples: Sequence[tuple[np.ndarray | None, np.ndarray | None]] = (),
) -> Figure:
    """Horizontal bars: count of each most-confused (true → predicted) pair, most at the top,
    on an integer axis. ``examples[i]``, when given, are two ink-bright images shown (dark on
    white) beside pair i's label: a sample of the true class read as the predicted one, and a
    sample of the predicted class read correctly (None: no such sample)."""
    row_in, tile_pt, gap_pt = (0.45, 27.0, 4.0) if examples else (0.35, 0.0, 0.0)
    figure = Figure(figsize=(6.5, row_in * max(len(pairs), 3) + 1.1), layout="constrained")
    axis = figure.subplots()
    labels = [pair_text(true, predicted) for true, predicted, _ in pairs]
    positions = np.arange(len(pairs))[::-1]
    axis.barh(positions, [count for _, _, count in pairs], color="tab:red")
    axis.set_yticks(positions, [text for text, _ in labels])
    for tick, (_, font) in zip(axis.get_yticklabels(), labels, strict=True):
        if font is not None:
            tick.set_fontproperties(font)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("samples")
    title = "most confused pairs (true → predicted)"
    if examples:
        title += "\nimages: a misread sample, and a sample of the predicted class read right"
        for position, pair_examples in zip(positions, examples, strict=False):
            for k, image in enumerate(pair_examples):  # the misread sample leftmost
                if image is not None:
                    _add_tile(axis, image, position, -(gap_pt + tile_pt) * (2 - k), tile_pt)
        axis.tick_params(axis="y", pad=2 * (gap_pt + tile_pt) + gap_pt)
    axis.set_title(title, fontsize=9 if examples else None)
    return figure


def _add_tile(axis: Any, image: np.ndarray, y: float, x_offset_pt: float, size_pt: float) -> None:
    """Draw ``image`` (ink-bright) dark on white, ``size_pt`` points high, its left edge
    ``x_offset_pt`` points right of the axis's left side, centred on data row ``y``."""
    from matplotlib.colors import Normalize
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    pixels = np.asarray(image, dtype=np.uint8)
    tile = OffsetImage(255 - pixels, zoom=size_pt / pixels.shape[0], cmap="gray")
    tile.get_children()[0].set_norm(Normalize(0, 255))
    box = AnnotationBbox(
        tile,
        (0, y),
        xycoords=("axes fraction", "data"),
        xybox=(x_offset_pt, 0),
        boxcoords="offset points",
        box_alignment=(0, 0.5),
        frameon=True,
        pad=0.1,
        annotation_clip=False,
    )
    box.patch.set_edgecolor("0.7")
    axis.add_artist(box)


def curves_figure(history: Mapping[str, Sequence[float]]) -> Figure:
    """Loss, accuracy (train/val, top-5) and learning rate against completed epochs, from
    per-epoch metrics by their tracked names (``train/loss``, ``val/accuracy``, ...)."""
    panels = [
        ("loss", ["train/loss", "val/loss"], False),
        (
            "accuracy",
            ["train/accuracy", "val/accuracy", "train/top5_accuracy", "val/top5_accuracy"],
            False,
        ),
        ("learning rate", ["train/learning_rate"], True),
    ]
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    for axis, (title, keys, log_scale) in zip(figure.subplots(1, 3), panels, strict=True):
        for key in keys:
            values = history.get(key)
            if values:
                axis.plot(range(1, len(values) + 1), values, marker=".", label=key)
        if log_scale and any(v > 0 for v in history.get("train/learning_rate", [])):
            axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if axis.has_data():
            axis.legend(fontsize=8)
    return figure


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
