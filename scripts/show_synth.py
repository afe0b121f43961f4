"""Write a PNG grid of synthetic handwriting (rows = writers, columns = characters).

Usage: python scripts/show_synth.py OUT.png [--chars あいう] [--writers 0-11 | 3,7,9]
       [--config src/hwexp/conf/synthetic/default.yaml] [--set KEY=YAML ...] [--scale 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from hwexp.synth.options import SynthOptions
from hwexp.synth.render import render_writer

DEFAULT_CHARS = "あいうえおかきさなぬねはまやゆるろわを"


def _writers(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--chars", default=DEFAULT_CHARS)
    parser.add_argument("--writers", default="0-11")
    parser.add_argument("--config", type=Path, default=None, help="synthetic options YAML")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=YAML",
        help="override one option, e.g. --set font_ratio=1",
    )
    parser.add_argument("--scale", type=int, default=1, help="integer zoom of the grid")
    parser.add_argument("--invert", action="store_true", help="dark ink on light ground")
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(args.config.read_text()) if args.config else {}
    for item in args.set:
        key, _, value = item.partition("=")
        cfg[key] = yaml.safe_load(value)
    options = SynthOptions.from_config(cfg or {})
    writers = _writers(args.writers)
    rows = []
    for w in writers:
        chunk = render_writer(list(args.chars), w, options)
        rows.append(np.concatenate(list(chunk.images), axis=1))
    grid = np.concatenate(rows, axis=0)
    side = options.canvas_size
    grid[::side, :] = 90  # cell lines, so the border fragments are visible as such
    grid[:, ::side] = 90
    if args.invert:
        grid = 255 - grid
    image = Image.fromarray(grid)
    if args.scale > 1:
        image = image.resize(
            (grid.shape[1] * args.scale, grid.shape[0] * args.scale), Image.Resampling.NEAREST
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out}: {len(writers)} writers x {len(args.chars)} chars", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
