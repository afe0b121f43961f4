"""Where and how large a character lands once prepared, per source: a normalisation no source
can fool gives every source the same distribution.

Prepares the same classes from several sources with one set of preprocess options and prints,
per source, the prepared ink box's larger side (output pixels: 10th / 50th / 90th percentile)
of full-size and of small kana, the ratio of つ to っ, and the spread of the ink's centre of
mass around the image centre. Sources:

* ``synthetic``: the built-in renderer (writers ``--writers``, each its own size reference);
* ``<set>`` of a proxy built by ``scripts/real_proxy.py`` (image folders read as
  ``dataset=folder`` reads them: scaled to the canvas, one pooled reference per chunk);
* ``pad``: KanjiVG strokes drawn as the drawing pad draws them, each drawing alone.

Usage::

    python scripts/prepared_geometry.py --proxy proxy/hiragana75 [--writers 20]
        [--set fit=moments --set min_crop=0.8] [--classes hiragana75] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml


def ink_geometry(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per prepared image (ink high): the ink box's larger side in pixels (pixels >= 128) and
    the centre of mass's offset ``(n, 2)`` from the image centre in pixels (NaN if blank)."""
    n, h, w = images.shape
    ink = images >= 128
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    height = h - rows.argmax(axis=1) - rows[:, ::-1].argmax(axis=1)
    width = w - cols.argmax(axis=1) - cols[:, ::-1].argmax(axis=1)
    side = np.where(ink.any(axis=(1, 2)), np.maximum(height, width), 0).astype(float)
    weight = images.astype(np.float64)
    total = np.maximum(weight.sum(axis=(1, 2)), 1e-9)
    cy = (weight.sum(axis=2) @ (np.arange(h) + 0.5)) / total - h / 2
    cx = (weight.sum(axis=1) @ (np.arange(w) + 0.5)) / total - w / 2
    offset = np.stack([cx, cy], axis=1)
    offset[side == 0] = np.nan
    return side, offset


def synthetic_images(chars: list[str], writers: int, options) -> tuple[np.ndarray, np.ndarray]:
    from hwexp.data.preprocess import normalise_characters
    from hwexp.synth.options import SynthOptions
    from hwexp.synth.render import render_writer

    synth = SynthOptions.from_config(
        {k: v for k, v in _synthetic_defaults().items() if k not in ("writers", "first_writer")}
    )
    chunks = [render_writer(chars, writer, synth) for writer in range(writers)]
    raw = np.concatenate([c.images for c in chunks])
    ids = np.concatenate([c.writers for c in chunks])
    labels = np.concatenate([c.labels for c in chunks])
    return normalise_characters(raw, "high", options, writers=ids), labels


def folder_images(root: Path, options) -> tuple[np.ndarray, np.ndarray]:
    from hwexp.data.folder import folder_tasks
    from hwexp.data.preprocess import normalise_characters

    images, labels = [], []
    for task in folder_tasks(root, None, writer_from_name=False):
        raw = task.load()
        images.append(normalise_characters(raw.images, raw.ink, options, writers=raw.writers))
        labels.append(raw.labels)
    return np.concatenate(images), np.concatenate(labels)


def pad_images(chars: list[str], options) -> tuple[np.ndarray, np.ndarray]:
    """KanjiVG's strokes drawn on a pad the size of KanjiVG's frame (the character fills about
    0.7 of it, as people fill a drawing box), each prepared alone as the server does."""
    from hwexp.data.preprocess import normalise_characters
    from hwexp.recognition.inputs import render_strokes
    from hwexp.synth.kanjivg import FRAME, load_glyph

    images = []
    for char in chars:
        glyph = load_glyph(char)
        ends = glyph.offsets
        strokes = [glyph.points[a:b] for a, b in zip(ends[:-1], ends[1:], strict=True)]
        images.append(normalise_characters(render_strokes(strokes, FRAME, FRAME), "high", options))
    return np.concatenate(images), np.array(chars)


def _synthetic_defaults() -> dict:
    from hwexp import CONF_DIR

    return yaml.safe_load((Path(CONF_DIR) / "synthetic" / "default.yaml").read_text())


def summarise(images: np.ndarray, labels: np.ndarray) -> dict:
    from hwexp.synth.render import SMALL_KANA

    side, offset = ink_geometry(images)
    small = np.isin(labels, list(SMALL_KANA))
    out = {}
    for name, rows in (("full-size", ~small), ("small kana", small)):
        if rows.any():
            out[name] = [float(v) for v in np.percentile(side[rows], [10, 50, 90])]
    tsu, small_tsu = side[labels == "つ"], side[labels == "っ"]
    if len(tsu) and len(small_tsu):
        out["っ/つ"] = float(np.median(small_tsu) / np.median(tsu))
    out["centre sd"] = [float(v) for v in np.nanstd(offset, axis=0)]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", default=None, help="a folder built by real_proxy.py build")
    parser.add_argument("--classes", default="hiragana75")
    parser.add_argument("--writers", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], help="preprocess KEY=VALUE")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from hwexp import CONF_DIR
    from hwexp.data.charsets import resolve_class_set
    from hwexp.data.preprocess import PreprocessOptions

    config = yaml.safe_load((Path(CONF_DIR) / "preprocess" / "default.yaml").read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        config[key] = yaml.safe_load(value)
    options = PreprocessOptions.from_config(config)
    chars = list(resolve_class_set(args.classes))
    sources = {"synthetic": synthetic_images(chars, args.writers, options)}
    if args.proxy:
        for folder in sorted(p for p in Path(args.proxy).iterdir() if p.is_dir()):
            sources[folder.name] = folder_images(folder, options)
    sources["pad"] = pad_images(chars, options)
    results = {name: summarise(*prepared) for name, prepared in sources.items()}
    print(f"prepared ink box, larger side in pixels of {options.size} (p10 / p50 / p90)")
    header = ("source", "full-size", "small kana", "っ/つ", "centre sd x, y")
    print("{:10s} {:>18s} {:>18s} {:>6s} {:>15s}".format(*header))
    for name, r in results.items():
        full = " / ".join(f"{v:.0f}" for v in r.get("full-size", []))
        small = " / ".join(f"{v:.0f}" for v in r.get("small kana", []))
        ratio = f"{r['っ/つ']:.2f}" if "っ/つ" in r else ""
        sd = ", ".join(f"{v:.1f}" for v in r["centre sd"])
        print(f"{name:10s} {full:>18s} {small:>18s} {ratio:>6s} {sd:>15s}")
    if args.json:
        from hwexp.fsutil import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
