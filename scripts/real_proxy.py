"""Development proxy for real handwriting: held-out hands written into real forms' cells.

Real handwriting (ETL8B2, ETL9G, independent scans) may not ship with hwexp, and a model that
reads held-out *fonts* well still failed on it: real cells put a character at another size in
its box, with other pens, scanners and stray marks. This proxy draws characters the model never
trained on (held-out handwriting fonts, and synthetic KanjiVG writers from seeds no recipe
trains on, drawn with the proxy's own size habits) into cells shaped like the real sets'
(``shared/real-cells.json``: cell size, ink-box share, centre offset, stroke width, contrast,
stray marks), writes them as image folders, and evaluates a run on them through the path users
take: ``python -m hwexp.evaluate run=... dataset=folder dataset.path=<set>``.

Sets (one folder each, ``<set>/<character>/<writer>_<n>.png``):

* ``etl8b2``: 1-bit 64 x 63 cells, the character filling its cell, ~4 px strokes;
* ``etl9g``: faint grey 64 x 64 JPEG cells, the character at about half the cell, ~2 px strokes,
  stray marks and neighbours' fragments at the border;
* ``scans``: 84 x 83 JPEG cells, the character at ~0.73 of the cell, left of centre, ~4 px strokes.

Reports per set: top-1, top-1 on the 46 basic hiragana where the class set has them (the real
ETL8B2 set's classes), the small/full-size confusions in both directions (つ → っ and っ → つ),
the class that collects most errors (a catch-all), and the commonest confusions.

Usage::

    python scripts/real_proxy.py build --out proxy/hiragana75 [--classes hiragana75] [--writers 48]
    python scripts/real_proxy.py eval --proxy proxy/hiragana75 --run best [--mlruns mlruns]
        [--json figures.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

# Held-out handwriting fonts (the synthetic source refuses to train on them).
PROXY_FONTS = (
    Path("/usr/share/fonts/truetype/klee/KleeOne-Regular.ttf"),
    Path("/usr/share/fonts/truetype/klee/KleeOne-SemiBold.ttf"),
    Path("/usr/share/fonts/truetype/seto/setofont.ttf"),
)
# Synthetic writer seeds of the proxy: far above any recipe's writer range.
FIRST_PROXY_WRITER = 9_000_000
GLYPH = 192  # side of the canvas glyphs are drawn on before they are put into cells
BASIC_HIRAGANA = (
    "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
)


@dataclass(frozen=True)
class CellStyle:
    """How one real set's cells look (from ``shared/real-cells.json``); fractions of the side.

    ``box`` is the median, low and high (5th and 95th percentile) of a writer's full-size
    character extent; ``offset`` the sd of the centre's offset; ``width`` the stroke width range;
    ``contrast`` the grey levels between paper and ink; ``strays`` the mean number of stray
    marks and ``fragments`` of neighbours' strokes at the border.
    """

    shape: tuple[int, int]  # (height, width)
    box: tuple[float, float, float]
    offset: tuple[float, float]  # mean x, y offset of the centre
    offset_sd: float
    width: tuple[float, float]
    contrast: tuple[float, float]
    binary: bool
    jpeg: int | None
    strays: float
    fragments: float


SETS = {
    "etl8b2": CellStyle(
        (63, 64),
        (1.0, 0.8, 1.05),
        (-0.028, 0.0),
        0.045,
        (0.045, 0.085),
        (255, 255),
        True,
        None,
        0.1,
        0.0,
    ),
    "etl9g": CellStyle(
        (64, 64),
        (0.55, 0.38, 0.8),
        (-0.006, 0.027),
        0.035,
        (0.028, 0.036),
        (86, 146),
        False,
        80,
        1.0,
        0.8,
    ),
    "scans": CellStyle(
        (84, 83),
        (0.73, 0.62, 0.86),
        (-0.06, 0.004),
        0.04,
        (0.034, 0.05),
        (218, 255),
        False,
        85,
        0.0,
        0.0,
    ),
}


def full_size_of(char: str) -> str | None:
    """つ for っ; None for characters with no small form."""
    name = unicodedata.name(char, "")
    if " SMALL " not in name:
        return None
    try:
        return unicodedata.lookup(name.replace(" SMALL ", " "))
    except KeyError:
        return None


# ---------------------------------------------------------------------------------- glyphs


def font_glyph(font: ImageFont.FreeTypeFont, char: str) -> np.ndarray:
    """``(GLYPH, GLYPH)`` float ink map (1 = ink) of ``char`` at the font's own size and place."""
    image = Image.new("L", (GLYPH, GLYPH), 0)
    ImageDraw.Draw(image).text((GLYPH / 2, GLYPH / 2), char, fill=255, font=font, anchor="mm")
    return np.asarray(image, np.float32) / 255.0


def kanjivg_glyphs(chars: list[str], writer: int) -> list[np.ndarray]:
    """Ink maps of ``chars`` by synthetic writer ``writer``, clean and at one size habit: the
    proxy applies its own sizes (small kana at their KanjiVG design size, not the renderer's)."""
    from hwexp.synth.options import SynthOptions
    from hwexp.synth.render import render_writer

    options = SynthOptions.from_config(
        {
            "canvas_size": GLYPH,
            "font_ratio": 0.0,
            "small_kana_scale": [1.0, 1.0],
            "size": [0.9, 0.9],
            "char_size_sd": 0.0,
            "fragment_prob": 0.0,
            "speck_prob": 0.0,
            "noise": [0.0, 0.0],
            "grain": [0.0, 0.0],
            "background": [0.0, 0.0],
            "background_gradient": [0.0, 0.0],
            "blur_px": [0.3, 0.3],
            "ink_level": [1.0, 1.0],
            "ink_unevenness": [0.0, 0.0],
            "scan_weights": {"8bit": 1.0},
            "low_res_share": 0.0,
        }
    )
    chunk = render_writer(chars, writer, options)
    return [image.astype(np.float32) / 255.0 for image in chunk.images]


def _box(ink: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.nonzero(ink > 0.5)
    if not len(rows):
        return None
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def redraw(ink: np.ndarray, width: float) -> np.ndarray:
    """The strokes of a float ink map thinned to a skeleton and redrawn ``width`` px wide."""
    from skimage.morphology import skeletonize

    skeleton = skeletonize(ink > 0.5)
    distance = ndimage.distance_transform_edt(~skeleton)
    return np.clip(width / 2 + 0.5 - distance, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------- cells


def write_cell(
    ink: np.ndarray, extent_frac: float, style: CellStyle, rng: np.random.Generator
) -> np.ndarray:
    """A uint8 cell of ``style``'s shape, dark ink on paper, holding ``ink`` (a glyph's float
    ink map) with its larger side at ``extent_frac`` of the cell's larger side."""
    h, w = style.shape
    side = max(h, w)
    box = _box(ink)
    glyph = ink[box[0] : box[1], box[2] : box[3]]
    scale = extent_frac * side / max(glyph.shape)
    ss = 4  # supersampling: strokes drawn at 4x the cell, then area-averaged
    width_px = rng.uniform(*style.width) * side * ss
    # Redraw the strokes at the cell's pen width: resize the glyph to the supersampled cell
    # first, so the width is in those pixels.
    target = (
        max(1, round(glyph.shape[1] * scale * ss)),
        max(1, round(glyph.shape[0] * scale * ss)),
    )
    big = np.asarray(Image.fromarray(glyph).resize(target, Image.Resampling.BILINEAR))
    big = redraw(big, width_px)
    canvas = np.zeros((h * ss, w * ss), np.float32)
    cx = (0.5 + style.offset[0] + rng.normal(0, style.offset_sd)) * w * ss
    cy = (0.5 + style.offset[1] + rng.normal(0, style.offset_sd)) * h * ss
    top = int(np.clip(round(cy - big.shape[0] / 2), 0, max(0, h * ss - big.shape[0])))
    left = int(np.clip(round(cx - big.shape[1] / 2), 0, max(0, w * ss - big.shape[1])))
    part = big[: h * ss - top, : w * ss - left]
    canvas[top : top + part.shape[0], left : left + part.shape[1]] = part
    _add_strays(canvas, style, rng, ss)
    cell = canvas.reshape(h, ss, w, ss).mean(axis=(1, 3))
    if style.binary:
        cell = (cell > 0.5).astype(np.float32)
    contrast = rng.uniform(*style.contrast)
    paper = rng.uniform(max(contrast, 200), 255) if not style.binary else 255.0
    grey = paper - contrast * cell
    if not style.binary:
        grey += rng.normal(0, 3.0, grey.shape)
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)


def _add_strays(canvas: np.ndarray, style: CellStyle, rng: np.random.Generator, ss: int) -> None:
    """Small specks anywhere and neighbours' stroke ends entering from the border, in place."""
    hh, ww = canvas.shape
    for _ in range(rng.poisson(style.strays)):
        r = rng.uniform(0.6, 1.6) * ss
        y, x = rng.uniform(0, hh), rng.uniform(0, ww)
        yy, xx = np.ogrid[:hh, :ww]
        canvas[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 1.0
    for _ in range(rng.poisson(style.fragments)):
        depth = rng.uniform(0.02, 0.1) * hh
        length = rng.uniform(0.08, 0.3) * ww
        thick = max(1, round(rng.uniform(0.025, 0.04) * ww))
        start = rng.uniform(0, ww - length)
        edge = rng.integers(4)  # top, bottom, left, right: a short stroke poking in
        along, inward = slice(int(start), int(start + thick)), int(depth)
        if edge == 0:
            canvas[:inward, along] = 1.0
        elif edge == 1:
            canvas[hh - inward :, along] = 1.0
        elif edge == 2:
            canvas[along, :inward] = 1.0
        else:
            canvas[along, ww - inward :] = 1.0


# ----------------------------------------------------------------------------------- build


def writer_glyphs(
    chars: list[str], writer: int, fonts: tuple[Path, ...]
) -> tuple[str, list[np.ndarray]]:
    """One proxy writer's glyphs: with ``fonts``, even writers take one of them (glyphs it lacks
    come from KanjiVG); the others are synthetic KanjiVG writers of the proxy's own seeds."""
    if not fonts or writer % 2:
        return "kanjivg", kanjivg_glyphs(chars, FIRST_PROXY_WRITER + writer)
    path = fonts[(writer // 2) % len(fonts)]
    font = ImageFont.truetype(str(path), int(GLYPH * 0.7))
    drawn = [font_glyph(font, char) for char in chars]
    lacking = [char for char, ink in zip(chars, drawn, strict=True) if ink.max() <= 0.5]
    if lacking:
        fill = iter(kanjivg_glyphs(lacking, FIRST_PROXY_WRITER + writer))
        drawn = [ink if ink.max() > 0.5 else next(fill) for ink in drawn]
    return path.stem, drawn


def build(
    out: Path, chars: list[str], writers: int, seed: int, fonts: tuple[Path, ...] = PROXY_FONTS
) -> dict[str, int]:
    """Write every set's folders under ``out``; returns images per set.

    A writer keeps one size habit per set, from the set's spread of ink-box shares, and draws
    each character at its glyph's own size against the writer's median glyph, small kana at
    0.6-0.85 of that (hands write them smaller than fonts do), with 6 % jitter.
    """
    from hwexp.synth.render import SMALL_KANA

    counts = {}
    for name in SETS:
        for char in chars:
            (out / name / char).mkdir(parents=True, exist_ok=True)
        counts[name] = 0
    for writer in range(writers):
        kind, glyphs = writer_glyphs(chars, writer, fonts)
        boxes = [_box(glyph) for glyph in glyphs]
        extents = np.array([max(b[1] - b[0], b[3] - b[2]) for b in boxes], float)
        rng = np.random.default_rng([seed, writer])
        small_factor = rng.uniform(0.6, 0.85)  # hands write small kana smaller than fonts
        natural = extents / np.median(extents)
        natural[[c in SMALL_KANA for c in chars]] *= small_factor
        for name, style in SETS.items():
            # A writer's habitual size: the set's median and spread (5th..95th percentile).
            median, low, high = style.box
            habit = np.clip(rng.normal(median, (high - low) / 3.3), low, high)
            for char, glyph, rel in zip(chars, glyphs, natural, strict=True):
                extent = min(1.0, habit * rel * np.exp(rng.normal(0, 0.06)))
                cell = write_cell(glyph, extent, style, rng)
                path = out / name / char / f"p{writer:03d}_{kind}.png"
                image = Image.fromarray(cell)
                if style.jpeg:
                    path = path.with_suffix(".jpg")
                    image.save(path, quality=style.jpeg)
                else:
                    image.save(path)
                counts[name] += 1
    (out / "proxy.json").write_text(
        json.dumps(
            {"classes": "".join(chars), "writers": writers, "seed": seed, "sets": counts},
            ensure_ascii=False,
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    return counts


# ------------------------------------------------------------------------------------ eval


def confusion_figures(
    classes: tuple[str, ...],
    labels: np.ndarray,
    predicted: np.ndarray,
    hands: np.ndarray | None = None,
) -> dict:
    """Top-1 overall, on the basic hiragana and per kind of hand (``hands``: ``font`` or
    ``kanjivg`` per sample), small/full-size confusions both ways, the class that collects most
    errors, and the commonest confusions."""
    true = np.asarray(classes)[labels]
    guess = np.asarray(classes)[predicted]
    wrong = true != guess
    by_hand = (
        {}
        if hands is None
        else {str(hand): float(1 - wrong[hands == hand].mean()) for hand in np.unique(hands)}
    )
    full_to_small = sum(
        1 for t, g in zip(true[wrong], guess[wrong], strict=True) if full_size_of(g) == t
    )
    small_to_full = sum(
        1 for t, g in zip(true[wrong], guess[wrong], strict=True) if full_size_of(t) == g
    )
    basic = np.isin(true, list(BASIC_HIRAGANA))
    collected = Counter(guess[wrong])
    sink, sink_count = collected.most_common(1)[0] if collected else ("", 0)
    pairs = Counter(zip(true[wrong], guess[wrong], strict=True)).most_common(8)
    return {
        "samples": int(len(true)),
        "accuracy": float(1 - wrong.mean()),
        "basic46_accuracy": float(1 - wrong[basic].mean()) if basic.any() else None,
        "by_hand": by_hand,
        "full_to_small": int(full_to_small),
        "small_to_full": int(small_to_full),
        "errors": int(wrong.sum()),
        "catch_all": {"class": sink, "errors_collected": int(sink_count)},
        "top_confusions": [f"{t}→{g} {n}" for (t, g), n in pairs],
    }


def evaluate_set(run: str, folder: Path, overrides: list[str]) -> dict:
    """``hwexp.evaluate run=<run> dataset=folder dataset.path=<folder>``, as a user runs it."""
    from hydra import compose, initialize_config_dir

    from hwexp import CONF_DIR
    from hwexp.evaluate import evaluate_run

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "evaluate",
            [f"run={run}", "dataset=folder", f"dataset.path={folder}", *overrides],
        )
    result = evaluate_run(cfg)
    report = result.report
    # Writers are "folder:<char>/p<writer>_<hand>": the hand is a held-out font or "kanjivg".
    hands = np.array(["kanjivg" if w.endswith("_kanjivg") else "font" for w in report.writers])
    figures = confusion_figures(report.classes, report.labels, report.predicted, hands)
    figures["top5_accuracy"] = result.metrics["eval/top5_accuracy"]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("build", help="write the proxy's image folders")
    make.add_argument("--out", required=True)
    make.add_argument("--classes", default="hiragana75", help="class set name or chars:...")
    make.add_argument("--writers", type=int, default=48)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument(
        "--no-fonts", action="store_true", help="KanjiVG writers only (no held-out fonts)"
    )
    check = sub.add_parser("eval", help="evaluate a run on every set of a built proxy")
    check.add_argument("--proxy", required=True)
    check.add_argument("--run", default="best")
    check.add_argument("--sets", nargs="*", default=list(SETS))
    check.add_argument("--json", default=None)
    check.add_argument("overrides", nargs="*", help="more hwexp.evaluate overrides")
    args = parser.parse_args()

    if args.command == "build":
        from hwexp.data.charsets import resolve_class_set

        missing = [p for p in PROXY_FONTS if not p.exists()]
        if missing and not args.no_fonts:
            print(
                f"missing proxy fonts {[str(p) for p in missing]}: apt-get install fonts-klee "
                "fonts-seto",
                file=sys.stderr,
            )
            return 1
        chars = list(resolve_class_set(args.classes))
        fonts = () if args.no_fonts else PROXY_FONTS
        counts = build(Path(args.out), chars, args.writers, args.seed, fonts)
        print(f"proxy of {len(chars)} classes, {args.writers} writers: {counts} under {args.out}")
        return 0

    from hwexp.fsutil import atomic_write_text

    results = {}
    print(
        f"{'set':8s} {'samples':>7s} {'top-1':>7s} {'basic46':>7s} {'fonts':>7s} {'kanjivg':>7s} "
        f"{'top-5':>7s} {'full→small':>10s} {'small→full':>10s}  catch-all | top confusions"
    )
    for name in args.sets:
        figures = evaluate_set(args.run, Path(args.proxy).resolve() / name, args.overrides)
        results[name] = figures
        basic = figures["basic46_accuracy"]
        sink = figures["catch_all"]
        print(
            f"{name:8s} {figures['samples']:7d} {figures['accuracy']:7.1%} "
            f"{'' if basic is None else f'{basic:.1%}':>7s} "
            f"{figures['by_hand'].get('font', float('nan')):7.1%} "
            f"{figures['by_hand'].get('kanjivg', float('nan')):7.1%} "
            f"{figures['top5_accuracy']:7.1%} "
            f"{figures['full_to_small']:10d} {figures['small_to_full']:10d}  "
            f"{sink['class']}:{sink['errors_collected']} | "
            + ", ".join(figures["top_confusions"][:5])
        )
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(results, ensure_ascii=False, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
