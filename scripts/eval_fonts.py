"""Development check: how well does a trained model read handwriting-style fonts it never saw?

Fonts on a clean canvas do not predict real scans (issue 14: they missed the size-in-the-cell
failures entirely); ``scripts/real_proxy.py`` is the check whose figures do. This one still
tells style: brush and handwriting fonts read apart.

The held-out fonts are Debian's handwriting and brush fonts (install them with
``apt-get install fonts-seto fonts-klee fonts-kouzan-mouhitsu fonts-aoyagi-soseki``); the
synthetic source refuses to train on them. Each class character a font has is rendered dark
on white paper, once plain and ``--variants`` times lightly distorted (rotation, shear, scale,
stroke weight, blur, placement), put through the run's own preprocessing, and classified.

Prints top-1 accuracy per font and kind (plain / distorted) and writes a PNG grid of the
misclassified samples (true → predicted) to look at by eye; ``--json`` also writes the figures
(with the run's own test accuracy) for scripts such as ``ab_synth.py``.

Usage::

    python scripts/eval_fonts.py --run best --experiment hwexp [--mlruns mlruns] [--out DIR]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Font folders by kind: handwriting fonts (pen and pencil hands, the nearer stand-in for real
# handwriting) and brush fonts (semi-cursive calligraphy, the harder style shift).
FONT_GROUPS = {"handwriting": ("seto", "klee"), "brush": ("kouzan-mouhitsu", "aoyagi-soseki")}
HELD_OUT_DIRS = tuple(d for dirs in FONT_GROUPS.values() for d in dirs)
FONT_ROOT = Path("/usr/share/fonts/truetype")
CANVAS = 128


def held_out_fonts() -> list[Path]:
    """The installed held-out font files, sorted."""
    return sorted(p for d in HELD_OUT_DIRS for p in (FONT_ROOT / d).glob("*.[ot]tf"))


def covered(font_path: Path, chars: tuple[str, ...]) -> list[str]:
    """The characters of ``chars`` that the font has a glyph for."""
    from fontTools.ttLib import TTFont

    cmap = TTFont(str(font_path), fontNumber=0, lazy=True).getBestCmap() or {}
    return [c for c in chars if ord(c) in cmap]


def _plain_form(char: str) -> str:
    """``char`` without voicing marks and at full size (で → て, ぱ → は, っ → つ)."""
    base = unicodedata.normalize("NFD", char)[0]
    name = unicodedata.name(base, "")
    if " SMALL " in name:
        try:
            return unicodedata.lookup(name.replace(" SMALL ", " "))
        except KeyError:
            return base
    return base


KINDS = ("plain", "distorted")
ERROR_KINDS = ("voicing mark", "small/full size", "other")


def error_kind(true: str, predicted: str) -> str:
    """Kind of a misreading: ``voicing mark`` (で → て, ぱ → ば), ``small/full size``
    (つ → っ), else ``other``."""
    if _plain_form(true) != _plain_form(predicted):
        return "other"
    if unicodedata.normalize("NFD", true)[1:] != unicodedata.normalize("NFD", predicted)[1:]:
        return "voicing mark"
    return "small/full size"


def render(font: ImageFont.FreeTypeFont, char: str, rng: np.random.Generator | None) -> np.ndarray:
    """``char`` dark on white in a CANVAS square; ``rng`` None: plain, else lightly distorted."""
    image = Image.new("L", (CANVAS, CANVAS), 255)
    draw = ImageDraw.Draw(image)
    draw.text((CANVAS / 2, CANVAS / 2), char, fill=0, font=font, anchor="mm")
    if rng is None:
        return np.asarray(image)
    angle = rng.uniform(-6, 6)
    shear = np.tan(np.radians(rng.uniform(-8, 8)))
    scale = rng.uniform(0.85, 1.1)
    dx, dy = rng.uniform(-6, 6, size=2)
    c = CANVAS / 2
    cos, sin = np.cos(np.radians(angle)) / scale, np.sin(np.radians(angle)) / scale
    # inverse affine (output -> input) about the centre, with horizontal shear
    a, b = cos, sin + shear * cos
    d, e = -sin, cos - shear * sin
    coeffs = (a, b, c - a * (c + dx) - b * (c + dy), d, e, c - d * (c + dx) - e * (c + dy))
    image = image.transform(
        image.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=255
    )
    weight = rng.integers(-1, 2)
    if weight > 0:
        image = image.filter(ImageFilter.MinFilter(3))  # thicker dark strokes
    elif weight < 0:
        image = image.filter(ImageFilter.MaxFilter(3))  # thinner
    return np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="best", help="MLflow run id or 'best'")
    parser.add_argument("--experiment", default="hwexp")
    parser.add_argument("--metric", default="test/accuracy")
    parser.add_argument("--mlruns", default="mlruns", help="the project's mlruns directory")
    parser.add_argument("--uri", default=None, help="MLflow tracking URI (default: sqlite)")
    parser.add_argument("--variants", type=int, default=3, help="distorted renders per glyph")
    parser.add_argument("--size", type=int, default=96, help="font size in pixels")
    parser.add_argument("--out", default=".", help="folder for the misclassified grid")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    from hwexp.data.preprocess import PreprocessOptions, normalise_characters
    from hwexp.data.show import save_png
    from hwexp.fsutil import atomic_write_text
    from hwexp.tracking.runs import client_for, load_selected_model

    fonts = held_out_fonts()
    if not fonts:
        print(
            "no held-out fonts installed: apt-get install fonts-seto fonts-klee "
            "fonts-kouzan-mouhitsu fonts-aoyagi-soseki",
            file=sys.stderr,
        )
        return 1
    client = client_for({"uri": args.uri, "mlruns_dir": str(Path(args.mlruns).resolve())})
    trained = load_selected_model(client, args.run, args.experiment, args.metric)
    options = PreprocessOptions.from_config(trained.config["preprocess"])
    index_of = {c: i for i, c in enumerate(trained.classes)}
    rng = np.random.default_rng(0)
    print(
        f"run {trained.run_id}: {len(trained.classes)} classes, "
        f"dataset {trained.config['dataset']['name']} ({trained.config['dataset']['source']})"
    )
    print(f"{'font':36s} {'chars':>5s} {'plain':>7s} {'distorted':>9s}")
    errors: list[tuple[np.ndarray, str, str]] = []
    totals = Counter()
    kinds = Counter()  # (plain | distorted, error kind) -> errors
    per_font: dict[str, dict[str, float]] = {}
    for path in fonts:
        chars = covered(path, trained.classes)
        if not chars:
            continue
        font = ImageFont.truetype(str(path), args.size)
        # Some fonts map code points to empty glyphs (setofont-ex): only drawn glyphs count.
        chars = [c for c in chars if render(font, c, None).min() < 128]
        if not chars:
            print(f"{path.name:36s} draws none of the classes (empty glyphs)")
            continue
        group = next(g for g, dirs in FONT_GROUPS.items() if path.parent.name in dirs)
        results = {}
        for kind, variants in (("plain", 1), ("distorted", args.variants)):
            raw = np.stack(
                [
                    render(font, c, None if kind == "plain" else rng)
                    for c in chars
                    for _ in range(variants)
                ]
            )
            labels = np.repeat([index_of[c] for c in chars], variants)
            images = normalise_characters(raw, ink="low", options=options)
            probs = trained.model.predict(images[..., None], batch_size=256, verbose=0)
            predicted = probs.argmax(axis=1)
            right = predicted == labels
            results[kind] = float(right.mean())
            for scope in ("all", group):
                totals[scope, kind, "right"] += int(right.sum())
                totals[scope, kind, "all"] += len(right)
            names = trained.classes
            for i in np.flatnonzero(~right):
                kinds[kind, error_kind(names[labels[i]], names[predicted[i]])] += 1
            for i in np.flatnonzero(~right)[:20]:
                errors.append(
                    (images[i], trained.classes[labels[i]], trained.classes[predicted[i]])
                )
        per_font[path.name] = results
        print(
            f"{path.name:36s} {len(chars):5d} {results['plain']:7.1%} {results['distorted']:9.1%}"
        )
    scores = {
        scope: {k: totals[scope, k, "right"] / totals[scope, k, "all"] for k in KINDS}
        for scope in ("all", *FONT_GROUPS)
        if totals[scope, "plain", "all"]
    }
    for scope, score in scores.items():
        name = "all held-out fonts" if scope == "all" else f"{scope} fonts"
        print(f"{name:36s} {'':5s} {score['plain']:7.1%} {score['distorted']:9.1%}")
    error_kinds = {}
    for kind in KINDS:
        wrong = totals["all", kind, "all"] - totals["all", kind, "right"]
        error_kinds[kind] = {name: kinds[kind, name] for name in ERROR_KINDS}
        shares = ", ".join(
            f"{name} {kinds[kind, name]} ({kinds[kind, name] / max(wrong, 1):.0%})"
            for name in ERROR_KINDS
        )
        print(f"{kind} errors: {wrong} = {shares}")
    if args.json:
        summary = {
            "run_id": trained.run_id,
            "test_accuracy": client.get_run(trained.run_id).data.metrics.get(args.metric),
            "fonts": scores["all"],
            "groups": {g: scores[g] for g in FONT_GROUPS if g in scores},
            "per_font": per_font,
            "errors": error_kinds,
        }
        atomic_write_text(Path(args.json), json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    if errors:
        grid = error_grid(errors[:96])
        out = save_png(grid, Path(args.out) / f"eval_fonts_errors_{trained.run_id[:8]}.png")
        print(f"misclassified samples: {out}")
    return 0


def error_grid(errors: list[tuple[np.ndarray, str, str]], columns: int = 12) -> Image.Image:
    """Tiles of misclassified images (dark on white) captioned ``true→predicted``."""
    from hwexp.data.show import captioned_grid

    captions = [f"{true}→{predicted}" for _, true, predicted in errors]
    return captioned_grid([image for image, _, _ in errors], captions, columns)


if __name__ == "__main__":
    sys.exit(main())
