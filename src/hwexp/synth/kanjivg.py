"""Stroke geometry from KanjiVG, the stroke-order SVGs shipped by the PyPI package ``kanjivg``.

Coordinates are KanjiVG's own 109 x 109 frame: x to the right, y downwards, strokes in the
writing order of the SVG. Each stroke is a polyline resampled at a uniform arc-length spacing
(:data:`SPACING` frame units), so that per-point noise is a function of arc length.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from hwexp.errors import DataError

FRAME = 109.0  # side of the KanjiVG coordinate frame
SPACING = 1.0  # arc-length distance between resampled points, in frame units

_SVG_NAME = re.compile(r"(?:^|/)kanji/([0-9a-f]{5})\.svg$")
_TOKEN = re.compile(r"[MmCcSsLlHhVvZzQqTt]|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_PATH = re.compile(r"<path\b([^>]*)>")
_ATTR_D = re.compile(r"\sd=\"([^\"]+)\"")
_ATTR_TYPE = re.compile(r"kvg:type=\"([^\"]*)\"")


class MissingCharacters(DataError):
    """Some requested characters have no KanjiVG stroke data."""

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = list(chars)
        shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in self.chars[:20])
        more = f" and {len(self.chars) - 20} more" if len(self.chars) > 20 else ""
        super().__init__(
            f"KanjiVG has no strokes for {len(self.chars)} character(s): {shown}{more}; "
            "drop them from the class set or use a source that has them"
        )


@dataclass(frozen=True)
class Glyph:
    """All strokes of one character, concatenated for vectorised transforms.

    ``points[offsets[i]:offsets[i + 1]]`` is stroke ``i`` (float64, frame units); every stroke
    has at least two points.
    """

    char: str
    points: np.ndarray  # (n, 2)
    offsets: np.ndarray  # (n_strokes + 1,) int
    types: tuple[str, ...]  # KanjiVG stroke type per stroke (e.g. "㇒"), "" if absent

    @property
    def n_strokes(self) -> int:
        return len(self.offsets) - 1

    def strokes(self) -> list[np.ndarray]:
        return [self.points[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]


@lru_cache(maxsize=1)
def svg_index() -> dict[str, Path]:
    """Map character -> path of its plain (non-variant) KanjiVG SVG in the installed package."""
    try:
        files = importlib.metadata.files("kanjivg")
    except importlib.metadata.PackageNotFoundError as exc:
        raise DataError("the PyPI package 'kanjivg' is not installed: pip install kanjivg") from exc
    index: dict[str, Path] = {}
    for file in files or ():
        match = _SVG_NAME.search(str(file).replace("\\", "/"))
        if match:
            index[chr(int(match.group(1), 16))] = Path(str(file.locate()))
    if not index:
        raise DataError("the installed 'kanjivg' package lists no kanji/*.svg files")
    return index


def missing_characters(chars: Iterable[str]) -> list[str]:
    """Characters of ``chars`` (deduplicated, in first-seen order) that KanjiVG lacks."""
    index = svg_index()
    return [c for c in dict.fromkeys(chars) if c not in index]


def require_characters(chars: Iterable[str]) -> None:
    """Raise :class:`MissingCharacters` naming every char KanjiVG lacks; else do nothing."""
    missing = missing_characters(chars)
    if missing:
        raise MissingCharacters(missing)


@lru_cache(maxsize=8192)
def load_glyph(char: str) -> Glyph:
    """Parsed, resampled strokes of ``char``; raises :class:`MissingCharacters` if absent."""
    path = svg_index().get(char)
    if path is None:
        raise MissingCharacters([char])
    text = path.read_text(encoding="utf-8")
    strokes, types = [], []
    for attrs in _PATH.findall(text):
        d = _ATTR_D.search(attrs)
        stroke = _resample(parse_path(d.group(1)), SPACING) if d else np.zeros((0, 2))
        if len(stroke):
            kind = _ATTR_TYPE.search(attrs)
            strokes.append(stroke)
            types.append(kind.group(1) if kind else "")
    if not strokes:
        raise DataError(f"KanjiVG file {path} for {char!r} has no stroke paths")
    lengths = [len(s) for s in strokes]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    points = np.concatenate(strokes)
    points.setflags(write=False)
    offsets.setflags(write=False)
    return Glyph(char, points, offsets, tuple(types))


def parse_path(d: str, step: float = 0.5) -> np.ndarray:
    """Polyline ``(n, 2)`` of an SVG path's ``d``; curves sampled at about ``step`` units.

    Supports M L H V C S Q T Z in absolute and relative form (KanjiVG uses M m C c S s).
    """
    tokens = _TOKEN.findall(d)
    out: list[np.ndarray] = []
    pos = np.zeros(2)
    start = np.zeros(2)
    last_ctrl: np.ndarray | None = None
    last_cmd = ""
    i = 0
    cmd = ""

    def nums(k: int) -> np.ndarray:
        nonlocal i
        vals = np.array([float(t) for t in tokens[i : i + k]])
        if len(vals) != k:
            raise DataError(f"malformed SVG path data: {d!r}")
        i += k
        return vals

    while i < len(tokens):
        if tokens[i].isalpha():
            cmd = tokens[i]
            i += 1
        elif not cmd:
            raise DataError(f"SVG path data does not start with a command: {d!r}")
        rel = cmd.islower()
        base = pos if rel else np.zeros(2)
        c = cmd.upper()
        if c == "M":
            pos = base + nums(2)
            start = pos.copy()
            out.append(pos[None])
            cmd = "l" if rel else "L"  # further pairs after M are implicit line-tos
            last_ctrl = None
        elif c in "LHV":
            if c == "L":
                new = base + nums(2)
            elif c == "H":
                new = np.array([nums(1)[0] + (pos[0] if rel else 0.0), pos[1]])
            else:
                new = np.array([pos[0], nums(1)[0] + (pos[1] if rel else 0.0)])
            out.append(new[None])
            pos, last_ctrl = new, None
        elif c in "CS":
            if c == "C":
                v = nums(6)
                c1, c2, end = base + v[0:2], base + v[2:4], base + v[4:6]
            else:
                v = nums(4)
                reflect = last_cmd in "CS" and last_ctrl is not None
                c1 = 2 * pos - last_ctrl if reflect else pos.copy()
                c2, end = base + v[0:2], base + v[2:4]
            out.append(_cubic(pos, c1, c2, end, step))
            pos, last_ctrl = end, c2
        elif c in "QT":
            if c == "Q":
                v = nums(4)
                q, end = base + v[0:2], base + v[2:4]
            else:
                v = nums(2)
                reflect = last_cmd in "QT" and last_ctrl is not None
                q = 2 * pos - last_ctrl if reflect else pos.copy()
                end = base + v
            out.append(_cubic(pos, pos + 2 / 3 * (q - pos), end + 2 / 3 * (q - end), end, step))
            pos, last_ctrl = end, q
        elif c == "Z":
            out.append(start[None])
            pos, last_ctrl = start.copy(), None
        else:
            raise DataError(f"unsupported SVG path command {cmd!r} in {d!r}")
        last_cmd = c
    if not out:
        return np.zeros((0, 2))
    return np.concatenate(out)


def _cubic(
    p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray, step: float
) -> np.ndarray:
    """Points of a cubic Bézier excluding ``p0``, about ``step`` apart."""
    hull = np.linalg.norm(p1 - p0) + np.linalg.norm(p2 - p1) + np.linalg.norm(p3 - p2)
    n = max(2, int(np.ceil(hull / step)))
    t = np.linspace(0.0, 1.0, n + 1)[1:, None]
    s = 1.0 - t
    return s**3 * p0 + 3 * s * s * t * p1 + 3 * s * t * t * p2 + t**3 * p3


def _resample(poly: np.ndarray, spacing: float) -> np.ndarray:
    """Resample a polyline at uniform arc length; a point-like stroke becomes a short dash."""
    if len(poly) == 0:
        return poly
    seg = np.linalg.norm(np.diff(poly, axis=0), axis=1)
    keep = np.concatenate([[True], seg > 1e-9])
    poly, seg = poly[keep], seg[keep[1:]]
    if len(poly) < 2:
        return np.stack([poly[0], poly[0] + [0.3, 0.3]])
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(round(arc[-1] / spacing)) + 1)
    s = np.linspace(0.0, arc[-1], n)
    return np.stack([np.interp(s, arc, poly[:, 0]), np.interp(s, arc, poly[:, 1])], axis=1)
