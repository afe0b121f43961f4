"""Every knob of the synthetic handwriting source, with defaults (see conf/synthetic/default.yaml).

Units: ``*_deg`` in degrees; ``*_px`` in output pixels at ``canvas_size``; "frame units" are the
109 x 109 KanjiVG frame (a character is about 75 frame units tall); fractions ``*_frac`` are of
``canvas_size``. A pair ``(low, high)`` is the range a writer's habit is drawn from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, ClassVar

Range = tuple[float, float]

PEN_TYPES = ("pencil", "ballpoint", "felt", "brush", "finger")
SCAN_MODES = ("8bit", "4bit", "1bit")
DEFAULT_FONTS = ("japanize-matplotlib", "noto-cjk-sans-jp-regular")


@dataclass(frozen=True)
class SynthOptions:
    """Options of :func:`hwexp.synth.render_writer`; build from config with :meth:`from_config`."""

    # Bumped whenever the same options render different pixels (cache keys include it).
    FORMAT: ClassVar[int] = 3

    canvas_size: int = 128
    supersample: int = 2  # strokes are drawn at this multiple of the canvas, then reduced
    # --- writer kinds -----------------------------------------------------------------------
    font_ratio: float = 0.15  # share of writer seeds that are fonts instead of KanjiVG writers
    fonts: tuple[str, ...] = DEFAULT_FONTS  # PyPI distribution names or font file paths
    system_fonts: bool = False  # also use `fc-list :lang=ja` fonts (held-out fonts excluded)
    # --- pen (KanjiVG writers) --------------------------------------------------------------
    pen_weights: tuple[tuple[str, float], ...] = (
        ("pencil", 0.45),
        ("ballpoint", 0.25),
        ("felt", 0.12),
        ("brush", 0.08),
        ("finger", 0.10),
    )
    width_scale: Range = (0.6, 1.6)  # multiplies the pen's nominal width (log-uniform)
    pressure: Range = (0.0, 0.35)  # relative width variation along a stroke
    # --- geometry habits --------------------------------------------------------------------
    size: Range = (0.8, 1.15)  # KanjiVG frame side / canvas side: ink fills ~0.55-0.9 of it
    small_kana_scale: Range = (0.6, 0.9)  # a writer's extra scale of small kana (っ ゃ ...)
    placement_frac: float = 0.05  # sd of a writer's habitual offset of the character centre
    slant_deg: Range = (-14.0, 10.0)  # shear; positive leans the top to the right
    rotation_deg: Range = (-5.0, 5.0)
    aspect: Range = (0.8, 1.25)  # width / height multiplier (log-uniform)
    warp: Range = (0.5, 3.0)  # rms smooth whole-character displacement, frame units
    stroke_offset: Range = (0.5, 3.5)  # sd of per-stroke translation, frame units
    stroke_rotation_deg: Range = (1.0, 7.0)  # sd of per-stroke rotation about its centre
    stroke_scale: Range = (0.02, 0.14)  # sd of per-stroke relative scale
    end_bias: Range = (-3.0, 3.0)  # mean end extension (<0 short, separated joints; >0 overshoot)
    end_sd: Range = (0.5, 2.5)  # sd of per-end extension, frame units
    bend: Range = (0.02, 0.2)  # rms smooth tangent-angle change along a stroke, radians
    bend_wavelength: Range = (40.0, 90.0)  # frame units of arc length
    curvature_gain: Range = (-0.12, 0.15)  # habit: flatter (<0) or rounder, tighter (>0) curves
    stroke_gain_sd: float = 0.06  # per-stroke variation of the curvature gain
    shaky_share: float = 0.1  # share of writers with a tremor
    shake: Range = (0.05, 0.35)  # tremor amplitude of shaky writers, frame units
    connect_prob: Range = (0.0, 0.12)  # chance of a faint hairline joining consecutive strokes
    # voicing marks (the dakuten ticks of で, the handakuten circle of ぱ): hands vary them more
    # than other strokes. Off by default: on held-out fonts it cost 1.3 / 3.0 points
    # (docs/results.md); real handwriting may differ
    vary_voicing_marks: bool = False
    mark_scale: Range = (0.7, 1.35)  # size of the marks against KanjiVG's (log-uniform)
    mark_shift: float = 3.0  # sd of a writer's habitual offset of the marks, frame units
    mark_rotation_deg: Range = (-25.0, 15.0)  # habitual turn of the marks about their centre
    mark_spread: Range = (0.6, 1.4)  # distance between the two dakuten ticks against KanjiVG's
    mark_tick_sd_deg: float = 18.0  # sd of each dakuten tick's own turn
    # --- per character and per image variation of one writer ---------------------------------
    char_slant_sd_deg: float = 3.0
    char_rotation_sd_deg: float = 2.0
    char_aspect_sd: float = 0.05
    char_size_sd: float = 0.04  # relative
    placement_jitter_frac: float = 0.025  # per image
    instance_jitter: float = 0.5  # 0: a writer repeats a character exactly; 1: independently
    # --- scan / image ----------------------------------------------------------------------
    margin_frac: float = 0.03  # ink is kept at least this far from the canvas edge
    blur_px: Range = (0.3, 1.3)  # Gaussian sigma
    ink_level: Range = (0.4, 1.0)  # peak ink brightness (faint pencil .. dark ink)
    ink_unevenness: Range = (0.0, 0.35)  # smooth multiplicative variation of ink darkness
    grain: Range = (0.0, 0.4)  # pencil grain (multiplicative per-pixel noise on ink)
    background: Range = (0.0, 0.12)  # paper level
    background_gradient: Range = (0.0, 0.08)  # uneven background, relative to ink contrast
    noise: Range = (0.0, 0.08)  # scanner noise sd, relative to ink contrast
    speck_prob: float = 0.3  # chance of a few small specks per image
    fragment_prob: float = 0.3  # chance of neighbouring-character fragments per image
    max_fragments: int = 2
    fragment_depth_frac: Range = (0.01, 0.08)  # how far fragments reach into the cell
    scan_weights: tuple[tuple[str, float], ...] = (("8bit", 0.3), ("4bit", 0.55), ("1bit", 0.15))
    binarize_threshold: Range = (0.35, 0.6)  # of the ink's peak, for 1-bit writers
    low_res_share: float = 0.3  # share of writers scanned at half resolution, then enlarged
    # --- font writers ----------------------------------------------------------------------
    font_scale: float = 0.86  # em square / KanjiVG frame side (CJK glyphs fill more of it)
    font_warp: Range = (1.0, 3.5)  # rms elastic displacement, frame units
    font_weight_px: Range = (-1.0, 1.8)  # <0 thins, >0 thickens strokes
    font_round_px: Range = (0.6, 1.6)  # blur before re-thresholding: rounds corners

    def __post_init__(self) -> None:
        if not 16 <= self.canvas_size <= 1024:
            raise ValueError(f"canvas_size={self.canvas_size}: choose between 16 and 1024")
        if self.supersample not in (1, 2, 3, 4):
            raise ValueError(f"supersample={self.supersample}: choose 1, 2, 3 or 4")
        if not 0.0 <= self.font_ratio <= 1.0:
            raise ValueError(f"font_ratio={self.font_ratio}: must be in [0, 1]")
        if not 0.0 <= self.instance_jitter <= 1.0:
            raise ValueError(f"instance_jitter={self.instance_jitter}: must be in [0, 1]")
        for name, allowed in (("pen_weights", PEN_TYPES), ("scan_weights", SCAN_MODES)):
            pairs = getattr(self, name)
            bad = sorted({k for k, _ in pairs} - set(allowed))
            if bad:
                raise ValueError(f"{name}: unknown {bad}; choose among {list(allowed)}")
            if any(w < 0 for _, w in pairs) or sum(w for _, w in pairs) <= 0:
                raise ValueError(f"{name}: weights must be >= 0 with a positive sum")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "Range" and not (len(value) == 2 and value[0] <= value[1]):
                raise ValueError(f"{f.name}={value}: expected a range [low, high], low <= high")

    @classmethod
    def from_config(cls, cfg: Mapping) -> SynthOptions:
        """Build from a mapping (e.g. parsed YAML); unknown keys raise ValueError naming them.

        Ranges may be lists; ``pen_weights`` and ``scan_weights`` mappings of name -> weight.
        """
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise ValueError(f"unknown synthetic option(s) {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in dict(cfg).items():
            kind = known[key].type
            if key in ("pen_weights", "scan_weights"):
                items = value.items() if isinstance(value, Mapping) else value
                value = tuple((str(k), float(w)) for k, w in items)
            elif kind == "Range":
                value = tuple(float(v) for v in value)
            elif key == "fonts":
                value = tuple(str(v) for v in (value or ()))
            elif kind == "float":
                value = float(value)
            elif kind == "int":
                value = int(value)
            elif kind == "bool" and not isinstance(value, bool):
                raise ValueError(f"{key}={value!r}: expected true or false")
            kwargs[key] = value
        return cls(**kwargs)

    def as_dict(self) -> dict[str, Any]:
        """Plain-data form (lists and dicts), suitable for YAML and for hashing."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("pen_weights", "scan_weights"):
                value = {k: w for k, w in value}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @cached_property
    def digest(self) -> int:
        """A stable 64-bit hash of all options, mixed into every random seed."""
        text = json.dumps(self.as_dict(), sort_keys=True)
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
