"""Render characters as one synthetic writer would write them and a scanner would see them.

Entry point: :func:`render_writer`. Output images are ``uint8`` ``(canvas, canvas)`` with ink
high (bright ink on a dark ground), a scanned-cell look: the character roughly centred with the
writer's placement habit, a margin, sometimes fragments of neighbouring cells at the border.

Randomness: the writer's habits come from :class:`WriterStyle`; the shape of each character is
a mix of a per-(writer, character) "habitual" draw and a per-image draw (``instance_jitter``), so
one writer's repeated images of a character resemble each other more than other writers' do.
The n-th occurrence of a character in ``chars`` is image instance n of that character.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from hwexp.data.raw import RawChunk
from hwexp.synth.fonts import GLYPH_EM, FontFace, face_has, glyph_bitmap, resolve_fonts
from hwexp.synth.kanjivg import FRAME, SPACING, Glyph, load_glyph, require_characters
from hwexp.synth.options import SynthOptions
from hwexp.synth.style import TAG_CHAR, TAG_IMAGE, WriterStyle, writer_kind

__all__ = ["SynthOptions", "WriterStyle", "render_char", "render_writer"]

_CENTRE = FRAME / 2
# Neighbouring characters whose strokes poke into a cell from the border (a fixed pool, so a
# character's pixels never depend on which other characters are rendered with it).
_NEIGHBOURS = (
    "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
    "アイウエオカキクケコサシスセソタチツテトナニヌネノハヒフヘホマミムメモヤユヨラリルレロワン"
    "日本人大学生年月山川田中上下"
)
# Low-frequency Fourier modes (cycles per frame) of the smooth whole-character warp.
_WARP_MODES = np.array([(1, 0), (0, 1), (1, 1), (1, -1), (2, 0), (0, 2), (2, 1), (1, 2)], float)
# Mode k gets amplitude ~ 1 / |k|^2 so the strain (displacement gradient) stays moderate.
_WARP_WEIGHT = 1.0 / np.sum(_WARP_MODES**2, axis=1)
_WARP_WEIGHT /= math.sqrt(float(np.sum(2 * _WARP_WEIGHT**2)))  # rms displacement per axis 1
_COARSE = 17  # side of the coarse grid on which font warps are evaluated
_HARAI = set("㇒㇏㇀㇓㇙㇖㇚㇟㇂")  # KanjiVG stroke types that end in a sweep or flick


def render_writer(chars: Sequence[str], writer: int, options: SynthOptions) -> RawChunk:
    """One image per char of ``chars`` as written by synthetic writer ``writer`` (seed >= 0).

    Raises :class:`~hwexp.synth.kanjivg.MissingCharacters` (a ``DataError``) naming every char
    KanjiVG lacks, and :class:`~hwexp.synth.fonts.FontUnavailable` if a font writer's fonts
    cannot be found. A font writer renders chars its font lacks from KanjiVG strokes instead,
    which ``meta["writer_kind"]`` shows per sample.
    """
    chars = list(chars)
    for c in chars:
        if not isinstance(c, str) or len(c) != 1:
            raise ValueError(f"each char must be a one-character string, got {c!r}")
    require_characters(chars)
    faces: tuple[FontFace, ...] = ()
    if writer_kind(writer, options.font_ratio) == "font":
        faces = resolve_fonts(options.fonts, options.system_fonts)
    style = WriterStyle.from_seed(writer, options, fonts=[f.name for f in faces])
    face = next((f for f in faces if f.name == style.font), None)
    size = options.canvas_size
    images = np.empty((len(chars), size, size), np.uint8)
    kinds, fonts = [], []
    seen: dict[str, int] = {}
    for i, c in enumerate(chars):
        instance = seen.get(c, 0)
        seen[c] = instance + 1
        use_face = face if face is not None and face_has(face, c) else None
        images[i] = render_char(c, style, options, instance, use_face)
        kinds.append("font" if use_face else "kanjivg")
        fonts.append(use_face.name if use_face else "")
    return RawChunk(
        images=images,
        labels=np.array(chars, dtype=str).reshape(len(chars)),
        writers=np.full(len(chars), f"synthetic:{writer}"),
        ink="high",
        meta={
            "writer_kind": np.array(kinds, dtype=str).reshape(len(chars)),
            "font": np.array(fonts, dtype=str).reshape(len(chars)),
        },
    )


def render_char(
    char: str,
    style: WriterStyle,
    options: SynthOptions,
    instance: int = 0,
    face: FontFace | None = None,
) -> np.ndarray:
    """``(canvas, canvas)`` uint8 image, ink high; from ``face`` if given, else KanjiVG."""
    cp = ord(char)
    rng_c = np.random.default_rng([style.seed, TAG_CHAR, cp, options.digest])
    rng_i = np.random.default_rng([style.seed, TAG_IMAGE, cp, int(instance), options.digest])
    mix = _Mix(rng_c, rng_i, options.instance_jitter)
    ss = options.supersample
    side = options.canvas_size
    affine = _char_affine(char, style, options, mix)
    layer = Image.new("L", (side * ss, side * ss), 0)
    draw = ImageDraw.Draw(layer)
    glyph_ink = None
    if face is None:
        _draw_kanjivg(draw, load_glyph(char), style, options, mix, affine)
    else:
        glyph_ink = _font_ink(face, char, style, options, mix, affine)
    extras = _draw_extras(draw, style, options, rng_i, affine)
    if glyph_ink is not None and not extras:
        ink = glyph_ink
    else:
        ink = np.asarray(layer.reduce(ss) if ss > 1 else layer, dtype=np.float32) / 255.0
        if glyph_ink is not None:
            ink = np.maximum(ink, glyph_ink)
    return _scan(ink, style, options, rng_i)


SMALL_KANA = frozenset("ぁぃぅぇぉっゃゅょゎゕゖァィゥェォッャュョヮヵヶ")


class _Mix:
    """Standard normals mixing a habitual (per writer and char) and a per-image draw."""

    def __init__(self, rng_c: np.random.Generator, rng_i: np.random.Generator, jitter: float):
        self.rng_c, self.rng_i = rng_c, rng_i
        self.a, self.b = math.sqrt(1.0 - jitter * jitter), jitter

    def normal(self, shape: int | tuple[int, ...] = ()) -> np.ndarray:
        habit, instance = self.rng_c.standard_normal(shape), self.rng_i.standard_normal(shape)
        return self.a * habit + self.b * instance


@dataclass(frozen=True)
class _Affine:
    """Frame -> canvas map ``p @ m.T + t``, clamped later to keep the ink inside."""

    m: np.ndarray  # (2, 2)
    t: np.ndarray  # (2,)
    scale: float  # canvas px per frame unit (mean)


def _char_affine(char: str, style: WriterStyle, o: SynthOptions, mix: _Mix) -> _Affine:
    side = o.canvas_size
    z = mix.normal(6)
    slant = style.slant + math.tan(math.radians(o.char_slant_sd_deg)) * z[0]
    rot = style.rotation + math.radians(o.char_rotation_sd_deg) * z[1]
    aspect = style.aspect * math.exp(o.char_aspect_sd * z[2])
    scale = style.size * math.exp(o.char_size_sd * z[3]) * side / FRAME
    if char in SMALL_KANA:
        # KanjiVG and fonts draw small kana at ~0.8 of full size; hands write them smaller.
        scale *= style.small_kana
    ax, ay = math.sqrt(aspect), 1.0 / math.sqrt(aspect)
    cos, sin = math.cos(rot), math.sin(rot)
    m = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, -slant], [0.0, 1.0]])
    m = scale * m @ np.diag([ax, ay])
    jitter = o.placement_jitter_frac * mix.rng_i.standard_normal(2)
    centre = side / 2 + side * (np.array(style.offset_frac) + jitter)
    return _Affine(m, centre - m @ np.array([_CENTRE, _CENTRE]), scale)


def _fit(points: np.ndarray, pad: float, o: SynthOptions) -> tuple[float, np.ndarray, np.ndarray]:
    """Scale and shift keeping ``points`` (canvas px, plus ``pad``) inside the margins."""
    side = o.canvas_size
    lo_lim, hi_lim = o.margin_frac * side + pad, side - o.margin_frac * side - pad
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = np.maximum(hi - lo, 1e-6)
    k = min(1.0, float(np.min((hi_lim - lo_lim) / span)))
    centre = (lo + hi) / 2
    lo2, hi2 = centre - k * span / 2, centre + k * span / 2
    shift = np.maximum(lo_lim - lo2, 0) - np.maximum(hi2 - hi_lim, 0)
    return k, centre, shift


# --------------------------------------------------------------------------------------------
# KanjiVG strokes


@dataclass(frozen=True)
class _Geom:
    """Per-point and per-stroke quantities of a glyph that do not change between renders."""

    sid: np.ndarray  # stroke id per point
    s: np.ndarray  # arc length from the stroke start
    length: np.ndarray  # per stroke
    centroid: np.ndarray  # per stroke (n_strokes, 2)
    t_start: np.ndarray  # unit tangent at the start (n_strokes, 2)
    t_end: np.ndarray
    harai: np.ndarray  # bool per stroke: ends in a sweep
    offsets_end: np.ndarray  # index of each stroke's last point
    marks: int  # voicing-mark strokes at the end: 2 dakuten ticks, 1 handakuten circle, or 0


@lru_cache(maxsize=8192)
def _geom(char: str) -> _Geom:
    g = load_glyph(char)
    counts = np.diff(g.offsets)
    sid = np.repeat(np.arange(g.n_strokes), counts)
    s = (np.arange(len(g.points)) - g.offsets[sid]) * SPACING
    length = (counts - 1) * SPACING
    centroid = np.stack([np.bincount(sid, g.points[:, k]) / counts for k in (0, 1)], axis=1)
    look = np.minimum(4, counts - 1)
    first, last = g.offsets[:-1], g.offsets[1:] - 1
    t_start = g.points[first + look] - g.points[first]
    t_end = g.points[last] - g.points[last - look]
    t_start /= np.maximum(np.linalg.norm(t_start, axis=1, keepdims=True), 1e-9)
    t_end /= np.maximum(np.linalg.norm(t_end, axis=1, keepdims=True), 1e-9)
    harai = np.array([t[:1] in _HARAI for t in g.types])
    return _Geom(sid, s, length, centroid, t_start, t_end, harai, last, voicing_mark_strokes(g))


def voicing_mark_strokes(g: Glyph) -> int:
    """How many of ``g``'s last strokes are its voicing mark: 2 for a dakuten (で), 1 for a
    handakuten (ぱ), else 0. KanjiVG writes the mark last, as short strokes at the top right."""
    decomposed = unicodedata.normalize("NFD", g.char)
    n = {"\u3099": 2, "\u309a": 1}.get(decomposed[-1], 0) if len(decomposed) > 1 else 0
    if n == 0 or g.n_strokes <= n:
        return 0
    mark = g.points[g.offsets[-n - 1] :]
    extent = np.ptp(mark, axis=0)
    centre = mark.mean(axis=0)
    # Guard against a KanjiVG file that orders strokes differently: the mark must be small
    # and right of the frame's centre.
    if extent.max() > 0.25 * FRAME or centre[0] < _CENTRE:
        return 0
    return n


def _deform(g: Glyph, geo: _Geom, style: WriterStyle, mix: _Mix) -> np.ndarray:
    """Per-stroke and whole-character deformation of ``g``'s points, in frame units."""
    n = g.n_strokes
    sid, s, length = geo.sid, geo.s, geo.length
    pts = g.points.copy()
    # Ends: stretch or shrink the last few units along the end tangents (joints open or cross).
    short = np.clip(length / 8.0, 0.15, 1.0)
    ends = (style.end_bias + style.end_sd * mix.normal((2, n))) * short
    reach = np.clip(length / 2, 1.5, 10.0)
    ends = np.maximum(ends, -0.45 * reach)
    w_start = np.clip(1.0 - s / reach[sid], 0.0, 1.0) ** 2
    w_end = np.clip(1.0 - (length[sid] - s) / reach[sid], 0.0, 1.0) ** 2
    pts -= (w_start * ends[0, sid])[:, None] * geo.t_start[sid]
    pts += (w_end * ends[1, sid])[:, None] * geo.t_end[sid]
    # Smooth bending: perturb the tangent angle along the arc length and scale curvature,
    # then re-integrate, so shapes change smoothly (rounder, flatter, bulging) without bumps.
    gain = style.curvature_gain + style.stroke_gain_sd * mix.normal(n)
    lam = style.bend_wavelength
    k = np.arange(1, 3)
    coef = mix.normal((n, 2, 2)) * (style.bend / k / math.sqrt(1.25))[None, :, None]
    pts = _bend(pts, geo, gain, coef, lam)
    # Per-stroke rotation and scale about the stroke centre, then offset.
    z = mix.normal((n, 4))
    ang = style.stroke_rotation * z[:, 0] * np.clip(length / 20.0, 0.3, 1.0)
    sc = np.exp(style.stroke_scale * z[:, 1])
    cos, sin = (np.cos(ang) * sc)[sid], (np.sin(ang) * sc)[sid]
    rel = pts - geo.centroid[sid]
    pts = geo.centroid[sid] + np.stack(
        [cos * rel[:, 0] - sin * rel[:, 1], sin * rel[:, 0] + cos * rel[:, 1]], axis=1
    )
    pts += style.stroke_offset * z[sid, 2:]
    if geo.marks and style.vary_marks:
        _vary_marks(pts, g, geo, style, mix)
    # Tremor: high-frequency, per image only.
    if style.shake > 0:
        noise = mix.rng_i.standard_normal((len(pts), 2))
        noise = ndimage.gaussian_filter1d(noise, 1.5, axis=0, mode="nearest") * 2.2
        pts += style.shake * noise
    return pts + _warp(pts, style.warp, mix)


def _vary_marks(pts: np.ndarray, g: Glyph, geo: _Geom, style: WriterStyle, mix: _Mix) -> None:
    """Resize, turn, move (and for dakuten spread and turn each tick of) the voicing mark,
    in place: the writer's habit plus per-character and per-image variation."""
    first = g.offsets[-geo.marks - 1]
    mark = pts[first:]
    sid = geo.sid[first:] - (g.n_strokes - geo.marks)
    z = mix.normal(5 + geo.marks)
    centre = mark.mean(axis=0)
    scale = style.mark_scale * math.exp(0.12 * z[0])
    turn = style.mark_rotation + math.radians(10.0) * z[1]
    shift = np.array(style.mark_shift) + 1.5 * z[2:4]
    spread = style.mark_spread * math.exp(0.15 * z[4])
    tick = style.mark_tick_sd * z[5:]  # each stroke's own turn (dakuten only)
    if geo.marks == 1:
        tick[:] = 0.0
    own = np.stack([mark[sid == k].mean(axis=0) for k in range(geo.marks)])
    rel = mark - own[sid]
    cos, sin = np.cos(tick)[sid], np.sin(tick)[sid]
    rel = np.stack([cos * rel[:, 0] - sin * rel[:, 1], sin * rel[:, 0] + cos * rel[:, 1]], 1)
    local = spread * (own[sid] - centre) + rel
    c, s_ = math.cos(turn), math.sin(turn)
    local = local @ np.array([[c, -s_], [s_, c]]).T
    pts[first:] = centre + shift + scale * local


def _bend(
    pts: np.ndarray, geo: _Geom, gain: np.ndarray, coef: np.ndarray, lam: float
) -> np.ndarray:
    """Re-integrate strokes with turning angles scaled by ``1 + gain`` (per stroke) plus a
    smooth angle offset ``sum_k coef[:, k] . (sin, cos)(2 pi s k / lam)``; ends stay put."""
    seg = np.flatnonzero(geo.sid[1:] == geo.sid[:-1])  # segment j joins points j and j + 1
    sid = geo.sid[seg]
    d = pts[seg + 1] - pts[seg]
    theta = np.arctan2(d[:, 1], d[:, 0])
    first = np.ones(len(seg), bool)
    first[1:] = sid[1:] != sid[:-1]
    start_of = np.flatnonzero(first)[np.cumsum(first) - 1]
    tau = np.zeros(len(seg))
    tau[1:] = (np.diff(theta) + np.pi) % (2 * np.pi) - np.pi
    tau[first] = 0.0
    # Sharp corners (a box's turn) keep their angle nearly: only smooth curves round or flatten.
    scale = np.where(np.abs(tau) < 0.3, 1.0 + gain[sid], 1.0 + 0.2 * gain[sid])
    turned = np.cumsum(tau * scale)
    turned -= turned[start_of]
    s_mid = geo.s[seg] + 0.5 * SPACING
    arg = 2 * np.pi * s_mid[:, None] * np.arange(1, coef.shape[1] + 1) / lam
    c = coef[sid]
    delta = np.sum(c[:, :, 0] * np.sin(arg) + c[:, :, 1] * np.cos(arg), axis=1)
    new_theta = theta[start_of] + turned + delta
    step = np.linalg.norm(d, axis=1)[:, None] * np.stack([np.cos(new_theta), np.sin(new_theta)], 1)
    walked = np.cumsum(step, axis=0)
    walked -= walked[start_of] - step[start_of]
    out = pts.copy()
    out[seg + 1] = pts[seg[start_of]] + walked
    # Keep each stroke's end where it was: spread the drift linearly along the arc length.
    last = geo.offsets_end
    drift = pts[last] - out[last]
    frac = geo.s / np.maximum(geo.length[geo.sid], 1e-9)
    return out + drift[geo.sid] * frac[:, None]


def _warp(pts: np.ndarray, amplitude: float, mix: _Mix) -> np.ndarray:
    """Smooth displacement (frame units, rms ~ ``amplitude``) of frame points ``(N, 2)``."""
    coef = mix.normal((2, len(_WARP_MODES), 2)) * _WARP_WEIGHT[None, :, None]
    arg = 2 * np.pi * (pts / FRAME) @ _WARP_MODES.T  # (N, M)
    disp = coef[:, :, 0] @ np.sin(arg).T + coef[:, :, 1] @ np.cos(arg).T  # (2, N)
    return amplitude * disp.T


def _widths(geo: _Geom, style: WriterStyle, mix: _Mix, px: float) -> np.ndarray:
    """Stroke width (canvas px) at every point: pen habit, pressure, tapering ends."""
    sid, s, length = geo.sid, geo.s, geo.length
    n = len(length)
    rng = mix.rng_i
    z = mix.normal((n, 4))
    arg = 2 * np.pi * s / 30.0
    pressure = 1.0 + style.pressure * (
        0.7 * z[sid, 0] + 0.5 * (z[sid, 1] * np.sin(arg) + z[sid, 2] * np.cos(arg))
    )
    w = px * np.clip(pressure, 0.45, 1.7)
    to_end = length[sid] - s
    if style.pen == "brush":
        entry = 0.6 + 0.4 * np.clip(s / 4.0, 0.0, 1.0)
        sweep = np.where(geo.harai, 0.85, 0.3) > rng.random(n)
        tail_len = np.maximum(0.4 * length, 3.0)[sid]
        tail = np.where(sweep[sid], np.clip(to_end / tail_len, 0.12, 1.0) ** 0.7, 1.0)
        w = w * entry * tail
    elif style.pen != "finger":
        lift = 0.75 + 0.25 * np.clip(np.minimum(s, to_end) / 3.0, 0.0, 1.0)
        w = w * lift
    return np.maximum(w, 0.6)


def _draw_kanjivg(
    draw: ImageDraw.ImageDraw,
    g: Glyph,
    style: WriterStyle,
    o: SynthOptions,
    mix: _Mix,
    affine: _Affine,
) -> None:
    geo = _geom(g.char)
    pts = _deform(g, geo, style, mix) @ affine.m.T + affine.t
    # Strokes stay below ~12% of the character height (75 frame units), less for dense
    # characters, else loops and many-stroke kanji fill in (people write those larger).
    cap = 0.12 * 75.0 * affine.scale / math.sqrt(max(1.0, g.n_strokes / 4))
    width = min(style.width_px * min(1.0, (10.0 / g.n_strokes) ** 0.3), cap)
    widths = _widths(geo, style, mix, width)
    k, centre, shift = _fit(pts, float(widths.max()) / 2, o)
    pts = (pts - centre) * k + centre + shift
    widths = widths * max(k, 0.7)
    ss = o.supersample
    n = g.n_strokes
    rng = mix.rng_i
    shade = np.ones(n)
    if style.pen in ("pencil", "ballpoint"):
        spread = 0.18 if style.pen == "pencil" else 0.06
        shade = np.clip(1.0 - spread * np.abs(rng.normal(size=n)), 0.5, 1.0)
    off = g.offsets
    _draw_strokes(draw, pts * ss, widths * ss, off, np.rint(255 * shade).astype(int).tolist())
    if style.connect_prob > 0 and n > 1:
        _draw_connections(draw, pts, off, style, o, rng, shade)


def _draw_connections(
    draw: ImageDraw.ImageDraw,
    pts: np.ndarray,
    off: np.ndarray,
    style: WriterStyle,
    o: SynthOptions,
    rng: np.random.Generator,
    shade: np.ndarray,
) -> None:
    """Lighter, thinner strokes joining some stroke ends to the next start (a pen not lifted)."""
    ss = o.supersample
    joined = np.flatnonzero(rng.random(len(off) - 2) < style.connect_prob)
    t = np.linspace(0.0, 1.0, 12)[:, None]
    for i in joined.tolist():
        a, b = pts[off[i + 1] - 1], pts[off[i + 1]]
        gap = float(np.linalg.norm(b - a))
        if gap > 0.45 * o.canvas_size or gap < 1.0:
            continue
        out = a - pts[max(off[i + 1] - 3, off[i])]
        into = pts[min(off[i + 1] + 2, off[i + 2] - 1)] - b
        out /= max(float(np.linalg.norm(out)), 1e-9)
        into /= max(float(np.linalg.norm(into)), 1e-9)
        c1, c2 = a + out * gap / 3, b - into * gap / 3  # leave and arrive along the strokes
        curve = (1 - t) ** 3 * a + 3 * (1 - t) ** 2 * t * c1 + 3 * (1 - t) * t * t * c2 + t**3 * b
        width = max(0.6, rng.uniform(0.3, 0.9) * style.width_px)
        fill = int(255 * shade[i] * rng.uniform(0.45, 0.9))
        _draw_polyline(draw, curve * ss, np.full(len(curve), width * ss), fill)


def _draw_polyline(
    draw: ImageDraw.ImageDraw, pts: np.ndarray, widths: np.ndarray, fill: int
) -> None:
    """One round-capped polyline with per-point widths (supersampled px)."""
    _draw_strokes(draw, pts, widths, np.array([0, len(pts)]), [fill])


def _draw_strokes(
    draw: ImageDraw.ImageDraw,
    pts: np.ndarray,
    widths: np.ndarray,
    offsets: np.ndarray,
    fills: Sequence[int],
) -> None:
    """Round-capped polylines ``pts[offsets[i]:offsets[i + 1]]`` in grey ``fills[i]``.

    ``widths`` are per point (supersampled px). Runs of segments of equal rounded width are
    drawn as one PIL line; discs at the ends, at width changes and at sharp turns round them.
    """
    n = len(pts)
    pts = pts - 0.5  # PIL addresses pixel centres
    q = np.maximum(1, np.rint(widths)).astype(np.int64)
    sid = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    inner = sid[1:] == sid[:-1]  # segment j (points j, j + 1) lies within one stroke
    seg_w = np.maximum(q[:-1], q[1:])
    d = np.diff(pts, axis=0)
    # A run starts at each stroke start and where the segment width changes inside a stroke.
    change = np.zeros(n, bool)
    change[offsets[:-1]] = True
    change[1:-1] |= inner[1:] & inner[:-1] & (seg_w[1:] != seg_w[:-1])
    starts = np.flatnonzero(change)
    stops = np.append(starts[1:], n)
    stops = np.minimum(stops, offsets[1:][sid[starts]] - 1)  # runs end at their stroke's end
    # Sharp turns: angle between consecutive segments of one stroke above ~17 degrees.
    cross = d[1:, 0] * d[:-1, 1] - d[1:, 1] * d[:-1, 0]
    dot = np.sum(d[1:] * d[:-1], axis=1)
    sharp = np.zeros(n, bool)
    sharp[1:-1] = inner[1:] & inner[:-1] & (np.abs(np.arctan2(cross, dot)) > 0.3)
    caps = np.flatnonzero(change | sharp)
    caps = np.union1d(caps, offsets[1:] - 1)
    flat = pts.tolist()
    for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
        if b > a:
            draw.line(flat[a : b + 1], fill=fills[sid[a]], width=int(seg_w[a]))
    radius = widths[caps] / 2
    keep = radius >= 0.75
    for i, r in zip(caps[keep].tolist(), radius[keep].tolist(), strict=True):
        x, y = flat[i]
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fills[sid[i]])


# --------------------------------------------------------------------------------------------
# Fonts


@lru_cache(maxsize=8)
def _upsampler(side: int) -> np.ndarray:
    """``(side, _COARSE)`` linear-interpolation matrix from the coarse grid to every pixel."""
    pos = np.linspace(0.0, _COARSE - 1, side)
    low = np.minimum(np.floor(pos).astype(int), _COARSE - 2)
    frac = pos - low
    out = np.zeros((side, _COARSE))
    out[np.arange(side), low] = 1.0 - frac
    out[np.arange(side), low + 1] = frac
    return out


def _font_ink(
    face: FontFace, char: str, style: WriterStyle, o: SynthOptions, mix: _Mix, affine: _Affine
) -> np.ndarray:
    """Ink coverage (float32, canvas) of a warped, re-weighted font glyph."""
    bitmap = glyph_bitmap(face, char)
    side = o.canvas_size
    # Glyph pixel -> frame units: the em square spans FRAME * font_scale frame units.
    em_to_frame = FRAME * o.font_scale / GLYPH_EM
    mid = bitmap.shape[0] / 2
    ys, xs = np.nonzero(bitmap > 0.3)
    if len(xs) == 0:
        return np.zeros((side, side), np.float32)
    corners = np.array(
        [
            [xs.min(), ys.min()],
            [xs.max() + 1, ys.min()],
            [xs.min(), ys.max() + 1],
            [xs.max() + 1, ys.max() + 1],
        ],
        float,
    )
    corners_frame = (corners - mid) * em_to_frame + _CENTRE
    pad = style.font_warp * 1.5 * affine.scale + max(style.font_weight_px, 0.0) + 1.0
    k, centre, shift = _fit(corners_frame @ affine.m.T + affine.t, pad, o)
    m = affine.m * k
    t = (affine.t - centre) * k + centre + shift
    # Inverse map canvas pixel centres -> frame -> (approximately un-warped) glyph pixels,
    # computed on a coarse grid and interpolated: the warp is smooth at that scale.
    coarse = np.linspace(0.5, side - 0.5, _COARSE)
    grid = np.stack(np.meshgrid(coarse, coarse), axis=-1).reshape(-1, 2)
    frame = (grid - t) @ np.linalg.inv(m).T
    frame -= _warp(frame, style.font_warp, mix)
    src = ((frame - _CENTRE) / em_to_frame + mid - 0.5).reshape(_COARSE, _COARSE, 2)
    up = _upsampler(side)
    rows, cols = up @ src[:, :, 1] @ up.T, up @ src[:, :, 0] @ up.T
    ink = ndimage.map_coordinates(bitmap, [rows, cols], order=1, cval=0.0).astype(np.float32)
    # Re-weight: blur, then re-threshold below / above the edge level to thicken / thin.
    weight = style.font_weight_px + 0.3 * mix.normal()
    sigma = max(style.font_round_px, abs(weight) / 1.5)
    blurred = ndimage.gaussian_filter(ink, sigma)
    level = float(np.clip(0.5 - 0.5 * math.erf(weight / (sigma * math.sqrt(2))), 0.06, 0.94))
    return np.clip((blurred - level) / 0.18 + 0.5, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Border fragments, specks and the scan


def _draw_extras(
    draw: ImageDraw.ImageDraw,
    style: WriterStyle,
    o: SynthOptions,
    rng: np.random.Generator,
    affine: _Affine,
) -> bool:
    """Draw neighbours' fragments and specks onto ``draw``; True if anything was drawn."""
    ss, side = o.supersample, o.canvas_size
    drew = False
    if o.max_fragments > 0 and rng.random() < o.fragment_prob:
        for _ in range(int(rng.integers(1, o.max_fragments + 1))):
            g = load_glyph(_NEIGHBOURS[int(rng.integers(len(_NEIGHBOURS)))])
            pts = g.points @ affine.m.T
            side_id = int(rng.integers(4))
            axis, sign = side_id % 2, (1 if side_id < 2 else -1)  # 0/1: left/top; 2/3: right/bottom
            depth = rng.uniform(*o.fragment_depth_frac) * side
            along = rng.uniform(0.1, 0.9) * side
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            shift = np.empty(2)
            shift[axis] = depth - hi[axis] if sign > 0 else side - depth - lo[axis]
            shift[1 - axis] = along - (lo[1 - axis] + hi[1 - axis]) / 2
            pts = pts + shift
            # Only a window of the shared border: what pokes through is pieces, not whole strokes.
            window = np.abs(pts[:, 1 - axis] - along) <= rng.uniform(0.1, 0.25) * side
            inside = ((pts >= 0) & (pts <= side)).all(axis=1)
            for a, b in zip(g.offsets[:-1], g.offsets[1:], strict=True):
                runs = np.flatnonzero(np.diff(np.concatenate([[0], window[a:b], [0]]).astype(int)))
                for r0, r1 in zip(runs[::2] + a, runs[1::2] + a, strict=True):
                    if r1 - r0 >= 2 and inside[r0:r1].any() and not inside[r0:r1].all():
                        width = np.full(r1 - r0, style.width_px * ss)
                        _draw_polyline(draw, pts[r0:r1] * ss, width, 255)
                        drew = True
    if style.pen != "finger" and rng.random() < o.speck_prob:
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.uniform(0, side * ss, 2)
            r = rng.uniform(0.3, 0.9) * ss
            draw.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.uniform(80, 255)))
            drew = True
    return drew


def _smooth_field(rng: np.random.Generator, side: int, cells: int = 4) -> np.ndarray:
    """Smooth random field in about [-1, 1] on a ``side`` x ``side`` grid."""
    coarse = Image.fromarray(rng.uniform(-1, 1, (cells, cells)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)


def _scan(
    ink: np.ndarray, style: WriterStyle, o: SynthOptions, rng: np.random.Generator
) -> np.ndarray:
    """Ink coverage (float, canvas) -> uint8 scanned cell, ink high.

    Low-resolution writers are sampled at half the canvas (like ETL's 64 x 63 cells) and
    blown up again by pixel repetition, so their quantisation steps and jaggies are coarse.
    """
    side = o.canvas_size
    if style.ink_unevenness > 0:
        ink = ink * (1.0 - style.ink_unevenness * (0.5 + 0.5 * _smooth_field(rng, side)))
    if style.grain > 0:
        ink = ink * (1.0 - style.grain * rng.random((side, side), dtype=np.float32))
    sigma = style.blur_px * math.exp(0.15 * rng.standard_normal())
    if style.scan == "1bit":
        sigma = min(sigma, 0.7)
    if sigma > 0.05:
        ink = ndimage.gaussian_filter(ink, sigma, truncate=3.0)
    factor = 2 if style.low_res and side % 2 == 0 else 1
    if factor > 1:
        ink = ink.reshape(side // 2, 2, side // 2, 2).mean(axis=(1, 3))
    if style.scan == "1bit":
        # Relative to the ink's own peak, so thin faint strokes survive as in real binary scans.
        peak = max(float(ink.max()), 1e-3)
        out = np.where(ink > style.binarize_threshold * peak, 255, 0).astype(np.uint8)
        return _blow_up(out, factor)
    n = side // factor
    level = min(1.0, style.ink_level * math.exp(0.08 * rng.standard_normal()))
    # Gradient and noise scale with the ink contrast: a faint scan is noisy in proportion,
    # as the contrast stretch of the data layer would otherwise turn noise into ink.
    contrast = max(level - style.background, 0.2)
    ground = style.background + style.background_gradient * contrast * _smooth_field(rng, n, 3)
    ground = np.clip(ground, 0.0, None)
    value = ground + (level - ground) * ink
    if style.noise > 0:
        sd = style.noise * contrast
        value = value + sd * rng.standard_normal((n, n), dtype=np.float32)
    value = np.clip(value, 0.0, 1.0)
    if style.scan == "4bit":
        return _blow_up((np.rint(value * 15.0) * 17).astype(np.uint8), factor)
    return _blow_up(np.rint(value * 255.0).astype(np.uint8), factor)


def _blow_up(image: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
