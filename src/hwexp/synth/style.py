"""A synthetic writer: an integer seed that fixes a set of handwriting and scanning habits.

Randomness is never global: every draw comes from ``np.random.default_rng`` seeded with the
writer seed, a purpose tag, and :attr:`SynthOptions.digest`, so the same seed and options always
give the same writer. Which kind a writer is (KanjiVG strokes or a font) depends only on the seed
and ``font_ratio``; raising ``font_ratio`` turns more KanjiVG writers into font writers without
changing any other writer's kind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hwexp.synth.options import SynthOptions

# Purpose tags keep the random streams of one writer independent of each other.
TAG_KIND, TAG_FONT, TAG_STYLE, TAG_CHAR, TAG_IMAGE = 1, 2, 3, 4, 5

# Nominal pen widths as a fraction of the canvas side (pencil: 3.6 px at 128).
PEN_WIDTH = {"pencil": 0.028, "ballpoint": 0.02, "felt": 0.042, "brush": 0.05, "finger": 0.055}


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"writer seed must be >= 0, got {seed}")
    return seed


def writer_kind(seed: int, font_ratio: float) -> str:
    """``"font"`` or ``"kanjivg"``, a deterministic function of ``seed`` and ``font_ratio``."""
    u = np.random.default_rng([_check_seed(seed), TAG_KIND]).random()
    return "font" if u < font_ratio else "kanjivg"


def pick_font(seed: int, fonts: Sequence[str]) -> str:
    """The font a font writer uses, a deterministic function of ``seed`` and ``fonts``."""
    if not fonts:
        return ""
    ordered = sorted(fonts)
    return ordered[int(np.random.default_rng([_check_seed(seed), TAG_FONT]).integers(len(ordered)))]


def _uniform(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])


def _log_uniform(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(math.exp(_uniform(rng, (math.log(r[0]), math.log(r[1])))))


def _choice(rng: np.random.Generator, pairs: tuple[tuple[str, float], ...]) -> str:
    names = [k for k, _ in pairs]
    weights = np.array([w for _, w in pairs], float)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


@dataclass(frozen=True)
class WriterStyle:
    """Habits of one writer. Lengths in frame units unless ``_px`` (canvas pixels) or ``_frac``."""

    seed: int
    kind: str  # "kanjivg" | "font"
    font: str  # font name for font writers, else ""
    pen: str
    width_px: float  # nominal stroke width
    pressure: float  # relative width variation along a stroke
    size: float  # KanjiVG frame side / canvas side
    small_kana: float  # extra scale of small kana against KanjiVG's and the fonts' design
    offset_frac: tuple[float, float]  # habitual (dx, dy) of the character centre
    slant: float  # shear factor x += slant * (centre_y - y)
    rotation: float  # radians
    aspect: float  # width multiplier / height multiplier
    warp: float
    stroke_offset: float
    stroke_rotation: float  # radians (sd)
    stroke_scale: float
    end_bias: float
    end_sd: float
    bend: float  # radians
    bend_wavelength: float
    curvature_gain: float
    stroke_gain_sd: float
    shake: float
    connect_prob: float
    vary_marks: bool  # voicing marks varied by the habits below (SynthOptions.vary_voicing_marks)
    mark_scale: float  # voicing marks: size against KanjiVG's
    mark_shift: tuple[float, float]  # (dx, dy) frame units
    mark_rotation: float  # radians
    mark_spread: float
    mark_tick_sd: float  # radians
    # scanning habits (one sheet per writer is scanned alike)
    scan: str  # "8bit" | "4bit" | "1bit"
    low_res: bool  # scanned at half the canvas resolution (e.g. ETL's 64 x 63 cells)
    blur_px: float
    ink_level: float
    ink_unevenness: float
    grain: float
    background: float
    background_gradient: float
    noise: float
    binarize_threshold: float
    # font writers
    font_warp: float
    font_weight_px: float
    font_round_px: float

    @classmethod
    def from_seed(
        cls, seed: int, options: SynthOptions | None = None, fonts: Sequence[str] | None = None
    ) -> WriterStyle:
        """Draw the habits of writer ``seed`` within the ranges of ``options``.

        ``fonts`` are the usable font names for font writers (default: ``options.fonts``).
        """
        o = options or SynthOptions()
        seed = _check_seed(seed)
        kind = writer_kind(seed, o.font_ratio)
        font = pick_font(seed, o.fonts if fonts is None else fonts) if kind == "font" else ""
        if kind == "font" and not font:
            kind = "kanjivg"
        rng = np.random.default_rng([seed, TAG_STYLE, o.digest])
        pen = _choice(rng, o.pen_weights)
        scan = _choice(rng, o.scan_weights)
        width_px = PEN_WIDTH[pen] * o.canvas_size * _log_uniform(rng, o.width_scale)
        if pen == "finger":  # phone drawings: no pencil grain, scanner noise or grey paper
            scan = "8bit"
        shaky = rng.random() < o.shaky_share
        low_res = bool(rng.random() < o.low_res_share) and pen != "finger"
        return cls(
            seed=seed,
            kind=kind,
            font=font,
            pen=pen,
            width_px=width_px,
            pressure=_uniform(rng, o.pressure) * (0.3 if pen == "finger" else 1.0),
            size=_uniform(rng, o.size),
            offset_frac=(
                float(rng.normal(0, o.placement_frac)),
                float(rng.normal(0, o.placement_frac)),
            ),
            slant=math.tan(math.radians(_uniform(rng, o.slant_deg))),
            rotation=math.radians(_uniform(rng, o.rotation_deg)),
            aspect=_log_uniform(rng, o.aspect),
            warp=_uniform(rng, o.warp),
            stroke_offset=_uniform(rng, o.stroke_offset),
            stroke_rotation=math.radians(_uniform(rng, o.stroke_rotation_deg)),
            stroke_scale=_uniform(rng, o.stroke_scale),
            end_bias=_uniform(rng, o.end_bias),
            end_sd=_uniform(rng, o.end_sd),
            bend=_uniform(rng, o.bend),
            bend_wavelength=_uniform(rng, o.bend_wavelength),
            curvature_gain=_uniform(rng, o.curvature_gain),
            stroke_gain_sd=o.stroke_gain_sd,
            shake=_uniform(rng, o.shake) if shaky else 0.0,
            connect_prob=_uniform(rng, o.connect_prob),
            scan=scan,
            low_res=low_res,
            blur_px=_uniform(rng, o.blur_px) * (0.5 if pen == "finger" else 1.0),
            ink_level=1.0 if pen == "finger" else _uniform(rng, o.ink_level),
            ink_unevenness=0.0 if pen == "finger" else _uniform(rng, o.ink_unevenness),
            grain=_uniform(rng, o.grain) if pen == "pencil" else 0.0,
            background=0.0 if pen == "finger" else _uniform(rng, o.background),
            background_gradient=0.0 if pen == "finger" else _uniform(rng, o.background_gradient),
            noise=0.0 if pen == "finger" else _uniform(rng, o.noise),
            binarize_threshold=_uniform(rng, o.binarize_threshold),
            font_warp=_uniform(rng, o.font_warp),
            font_weight_px=_uniform(rng, o.font_weight_px),
            font_round_px=_uniform(rng, o.font_round_px),
            vary_marks=o.vary_voicing_marks,
            mark_scale=_log_uniform(rng, o.mark_scale),
            mark_shift=(
                float(rng.normal(0, o.mark_shift)),
                float(rng.normal(0, o.mark_shift)),
            ),
            mark_rotation=math.radians(_uniform(rng, o.mark_rotation_deg)),
            mark_spread=_log_uniform(rng, o.mark_spread),
            mark_tick_sd=math.radians(o.mark_tick_sd_deg),
            # Drawn last: a new habit must not change the draws of the habits above.
            small_kana=_uniform(rng, o.small_kana_scale),
        )
