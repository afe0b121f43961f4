"""One normalisation for every image a model sees: training, evaluation and the drawing app.

Prepared images are ``uint8``, square, **ink bright (255) on a dark background (0)**, the
convention of MNIST, KMNIST and ETL's own grey levels. The steps, each an option:

1. polarity: inputs with dark ink on a light ground are inverted (``ink="auto"`` decides per
   image from the border, where background dominates);
2. contrast stretch: the background level (a low percentile) maps to 0 and the ink level (a high
   percentile) to 255, because real scans are often faint grey pencil on grey paper;
3. clean-up on the ink mask: specks smaller than ``min_speck_area`` are removed, and so are
   fragments of neighbouring cells: components touching the border that are small relative to
   the character and stay within a band along that border;
4. fit: the ink's extent and centre, either its bounding box (``fit="box"``) or its grey-level
   moments (``fit="moments"``: centre of mass and ``moment_span`` standard deviations, which
   stray marks and padding barely move);
5. size in the writing box: the crop is never smaller than ``min_crop`` times a *reference*
   extent, so small kana (っ ゃ) stay smaller than つ や. With ``size_reference="writer"`` the
   reference is the median extent of the same writer's characters in the call (or, for writers
   with fewer than ``reference_min_images`` images, of all such images together), so a
   character's size means the same whatever cell, canvas, padding or scanner it came from;
   lone images (the drawing pad) and ``size_reference="cell"`` use ``reference_fill`` of the
   input's shorter side;
6. crop to a square (keeping aspect ratio) around the centre with a margin, and resize with
   anti-aliasing to ``size`` x ``size``;
7. optionally (``stroke_width`` > 0), thin the strokes to a skeleton and redraw them at one
   width, a share of the output side, so that pen width and binarisation do not vary.

Everything works on a batch ``(n, h, w)`` at once, in sub-batches small enough to stay in the
CPU cache. The resize is separable and linear: per image, the weights of PIL's filters (box,
bilinear, bicubic, Lanczos) for the crop box give one sparse matrix per axis, and all images of a
sub-batch go through two block-diagonal sparse products. Pixels outside the input count as
0 (black), so a crop box reaching past the border never smears edge pixels outwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
from scipy import ndimage, sparse

from hwexp.data.raw import Ink
from hwexp.errors import ConfigError

# Ink-to-background contrast (grey levels of 255) below which an image counts as blank.
MIN_CONTRAST = 16.0
# 8-connectivity within each image of a stack (none across the first axis), for ndimage.label.
_EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), bool)
_EIGHT_CONNECTED_PER_IMAGE[1] = True


@dataclass(frozen=True)
class _Filter:
    """A resampling kernel as PIL defines it: ``weight(x)`` for a distance ``x`` in input
    pixels (scaled by the shrink factor when shrinking), zero beyond ``support``."""

    support: float
    weight: Callable[[np.ndarray], np.ndarray]


def _box(x: np.ndarray) -> np.ndarray:
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _lanczos3(x: np.ndarray) -> np.ndarray:
    return np.where((x >= -3.0) & (x < 3.0), np.sinc(x) * np.sinc(x / 3.0), 0.0)


_FILTERS = {
    "box": _Filter(0.5, _box),
    "bilinear": _Filter(1.0, _triangle),
    "bicubic": _Filter(2.0, _cubic),
    "lanczos": _Filter(3.0, _lanczos3),
}
_RESAMPLING = ("auto", *_FILTERS)
FITS = ("box", "moments")
SIZE_REFERENCES = ("writer", "cell")


@dataclass(frozen=True)
class PreprocessOptions:
    """Options of :func:`normalise_characters`; fractions are of the image side or area."""

    size: int = 48
    contrast_stretch: bool = True
    background_percentile: float = 50.0
    ink_percentile: float = 99.5
    ink_threshold: float = 0.35  # of the stretched range: what counts as ink for masks
    noise_floor: float = 0.12  # stretched values below this become background
    min_speck_area: float = 0.0004  # of the image area
    remove_border_fragments: bool = True
    fragment_max_share: float = 0.15  # of the image's ink area
    fragment_band: float = 0.2  # of the side: how far in from the border a fragment may reach
    crop: bool = True
    keep_aspect: bool = True
    fit: str = "moments"  # box: the ink's bounding box | moments: centre of mass, moment_span sds
    moment_span: float = 4.0  # fit="moments": extent = this many standard deviations of the ink
    size_reference: str = "writer"  # writer: median extent of the writer's images | cell
    reference_fill: float = 0.75  # cell reference: a full-size character's share of the side
    reference_min_images: int = 12  # writers with fewer images share one pooled reference
    min_crop: float = 0.8  # of the reference extent: ink smaller than this is not enlarged
    margin: float = 0.08  # of the output side, left blank around the ink
    resample: str = "auto"  # box when shrinking, bilinear when enlarging
    stroke_width: float = 0.0  # > 0: redraw strokes at this share of the output side

    # Options as they were before the size reference existed: a run whose config lacks
    # ``size_reference`` was prepared with ``min_crop`` of the input's shorter side.
    LEGACY: ClassVar[dict] = {"size_reference": "cell", "reference_fill": 1.0}

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 512:
            raise ConfigError(f"preprocess.size={self.size}: choose a side between 8 and 512")
        if not 0 <= self.min_crop <= 1.5:
            raise ConfigError(f"preprocess.min_crop={self.min_crop}: must be in [0, 1.5]")
        if self.fit not in FITS:
            raise ConfigError(f"preprocess.fit={self.fit!r}: choose one of {list(FITS)}")
        if self.size_reference not in SIZE_REFERENCES:
            raise ConfigError(
                f"preprocess.size_reference={self.size_reference!r}: choose one of "
                f"{list(SIZE_REFERENCES)}"
            )
        if not 0 < self.reference_fill <= 1:
            raise ConfigError(
                f"preprocess.reference_fill={self.reference_fill}: must be in (0, 1]"
            )
        if self.reference_min_images < 1:
            raise ConfigError(
                f"preprocess.reference_min_images={self.reference_min_images}: must be >= 1"
            )
        if not 1 <= self.moment_span <= 8:
            raise ConfigError(f"preprocess.moment_span={self.moment_span}: must be in [1, 8]")
        if not 0 <= self.stroke_width <= 0.2:
            raise ConfigError(
                f"preprocess.stroke_width={self.stroke_width}: must be in [0, 0.2] "
                "(0 keeps the strokes as they are)"
            )
        if not 0 <= self.margin < 0.5:
            raise ConfigError(f"preprocess.margin={self.margin}: must be in [0, 0.5)")
        if self.resample not in _RESAMPLING:
            raise ConfigError(
                f"preprocess.resample={self.resample!r}: choose one of {sorted(_RESAMPLING)}"
            )
        if not 0 <= self.background_percentile < self.ink_percentile <= 100:
            raise ConfigError(
                "preprocess.background_percentile must be below preprocess.ink_percentile, "
                f"both in [0, 100]; got {self.background_percentile}, {self.ink_percentile}"
            )

    @classmethod
    def from_config(cls, cfg: Mapping) -> PreprocessOptions:
        """Build from a config mapping; unknown keys raise :class:`ConfigError` naming them.

        A mapping without ``size_reference`` (a run prepared before it existed) gets
        :attr:`LEGACY`'s values for the keys it lacks, so an old model keeps its preprocessing.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(
                f"unknown preprocess option(s) {unknown}; known options: {sorted(known)}"
            )
        values = dict(cfg)
        if "size_reference" not in values:
            values = cls.LEGACY | values
        return cls(**values)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def ink_high(images: np.ndarray, ink: Ink) -> np.ndarray:
    """Return ``images`` with ink bright; ``ink="auto"`` inverts images whose border is light."""
    if ink == "high":
        return images
    if ink == "low":
        return 255 - images
    border = np.concatenate(
        [images[:, 0, :], images[:, -1, :], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1
    )
    light = np.median(border, axis=1) > 127
    out = images.copy()
    out[light] = 255 - images[light]
    return out


_BATCH_PIXELS = 80 * 128 * 127  # input pixels per batch by default


def normalise_characters(
    images: np.ndarray,
    ink: Ink = "high",
    options: PreprocessOptions | None = None,
    batch: int | None = None,
    writers: np.ndarray | None = None,
) -> np.ndarray:
    """Normalise ``(n, h, w)`` uint8 character images to ``(n, size, size)`` uint8, ink high.

    ``writers`` (``(n,)``, any hashable ids) groups images by who wrote them, for the size
    reference (module docstring, step 5); None: the images are one group of unknown writers.
    An image's result depends on that image and, with ``size_reference="writer"``, on the
    reference of its group in this call; never on the batching. An image with no ink left after
    clean-up comes out black (all zeros). ``batch`` images are processed at once; the default,
    1.3 million input pixels (80 ETL9G images), keeps a batch's working arrays small enough to
    stay in cache, and large enough that numpy's per-call overhead stays small.
    """
    options = options or PreprocessOptions()
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected (n, h, w) uint8 images, got {images.shape} {images.dtype}")
    if writers is not None and len(writers) != len(images):
        raise ValueError(f"{len(writers)} writers given for {len(images)} images")
    if batch is None:
        batch = max(1, _BATCH_PIXELS // max(1, images.shape[1] * images.shape[2]))
    starts = range(0, len(images), batch)
    # Two passes: the fit of every image first (the reference needs its whole group), then the
    # crops. Each batch's ink-high images and masks are kept between the passes.
    parts = [ink_high(images[s : s + batch], ink) for s in starts]
    fits = [_fit_batch(part, options) for part in parts]
    extents = np.concatenate([f.extent for f in fits]) if fits else np.zeros((0, 2))
    has_ink = np.concatenate([f.has_ink for f in fits]) if fits else np.zeros(0, bool)
    floors = reference_extents(extents, has_ink, min(images.shape[1:]), writers, options)
    floors *= options.min_crop
    out = np.empty((len(images), options.size, options.size), np.uint8)
    for s, part, fit in zip(starts, parts, fits, strict=True):
        out[s : s + batch] = _crop_batch(part, fit, floors[s : s + batch], options)
    if options.stroke_width > 0:
        out = redraw_strokes(out, options.stroke_width * options.size)
    return out


def reference_extents(
    extents: np.ndarray,
    has_ink: np.ndarray,
    cell_side: float,
    writers: np.ndarray | None,
    options: PreprocessOptions,
) -> np.ndarray:
    """Per image, the extent (input pixels) of a full-size character of its writer.

    ``extents`` ``(n, 2)`` are the images' fitted extents (width, height) in input pixels.
    ``size_reference="writer"``: the median of ``max(width, height)`` over the inked images of
    the image's writer if it has at least ``reference_min_images`` of them; else over all
    images of such small groups together, if they are that many; else (a lone drawing, a few
    images) ``reference_fill * cell_side``, as with ``size_reference="cell"``.
    """
    n = len(extents)
    out = np.full(n, options.reference_fill * cell_side, np.float64)
    if options.size_reference == "cell" or n == 0:
        return out
    size = extents.max(axis=1)
    if writers is None:
        groups = np.zeros(n, np.int64)
    else:
        groups = np.unique(np.asarray(writers), return_inverse=True)[1].reshape(n)
    inked = np.flatnonzero(has_ink)
    counts = np.bincount(groups[inked], minlength=groups.max() + 1)
    own = counts >= options.reference_min_images
    for group in np.flatnonzero(own):
        members = groups == group
        out[members] = np.median(size[inked[groups[inked] == group]])
    pooled = inked[~own[groups[inked]]]
    if len(pooled) >= options.reference_min_images:
        out[~own[groups]] = np.median(size[pooled])
    return out


@dataclass
class _Fit:
    """Pass one of a batch: the cleaned ink mask and levels, and the ink's fitted geometry."""

    keep: np.ndarray  # padded bool mask, one cell per step x step pixels
    step: int
    low: np.ndarray  # (n,) background grey level
    high: np.ndarray  # (n,) ink grey level
    centre: np.ndarray  # (n, 2) x, y in input pixels
    extent: np.ndarray  # (n, 2) width, height in input pixels
    has_ink: np.ndarray  # (n,) bool
    shape: tuple[int, int]  # h, w of the images in pixels


def _fit_batch(images: np.ndarray, options: PreprocessOptions) -> _Fit:
    n, h, w = images.shape
    # Masks are analysed on a subsampled view: labelling is the costly part and
    # crop boxes need no finer grid (side >= 60); pixels are resampled from full resolution.
    step = max(1, min(h, w) // 60)
    small = np.ascontiguousarray(images[:, ::step, ::step])
    low, high = _levels(small, options)
    mask = _padded_mask(small, low + options.ink_threshold * (high - low))
    keep = _clean_mask(mask, options)
    has_ink = _any_per_image(keep)
    if not options.crop:
        centre = np.tile([w / 2, h / 2], (n, 1)).astype(np.float64)
        extent = np.tile([float(w), float(h)], (n, 1))
    elif options.fit == "moments":
        centre, extent = _moment_fit(small, keep, low, options.moment_span)
        centre, extent = centre * step, extent * step
    else:
        boxes = _ink_boxes(keep) * step
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        extent = boxes[:, 2:] - boxes[:, :2]
    blank = ~has_ink
    centre[blank], extent[blank] = [w / 2, h / 2], [w, h]
    return _Fit(keep, step, low, high, centre, extent, has_ink, (h, w))


def _crop_batch(
    images: np.ndarray, fit: _Fit, floors: np.ndarray, options: PreprocessOptions
) -> np.ndarray:
    # Everything away from kept ink goes: specks and border fragments with their anti-aliased
    # fringes, and background blotches below the ink threshold. Kept ink's own grey edges
    # survive because the kept mask is first grown by two mask cells. Cleared pixels become 0,
    # like pixels outside the image: below the background level, so black after the stretch.
    # Contrast stretch, noise floor and scaling to 0..255: one affine map per image, its gain
    # applied within the resize.
    n = len(images)
    low, high = fit.low, fit.high
    floor = options.noise_floor
    if options.contrast_stretch:
        span = np.maximum(high - low, MIN_CONTRAST)
        base = low
    else:
        span, base = np.full(n, 255.0, np.float32), np.zeros(n, np.float32)
    gain = 255.0 / ((1.0 - floor) * span)
    gain[(high - low) < MIN_CONTRAST] = 0.0  # blank: no contrast to call ink
    offset = 0.5 - (base + floor * span) * gain  # + 0.5: round to nearest below
    grey = _masked(images, _inner(_dilate(fit.keep, 2)), fit.step)
    boxes = _crop_boxes(fit, floors, options)
    out = _resize_all(grey, boxes, options, gain)
    out += offset[:, None, None]
    return np.clip(out, 0.0, 255.0, out=out).astype(np.uint8)


def _levels(small: np.ndarray, options: PreprocessOptions) -> tuple[np.ndarray, np.ndarray]:
    """Per image background and ink grey levels (float32, 0..255) from two percentiles."""
    flat = small.reshape(len(small), -1)
    last = flat.shape[1] - 1
    k_low = int(round(options.background_percentile / 100 * last))
    k_high = int(round(options.ink_percentile / 100 * last))
    # Usually the darkest level fills more than the low rank and the brightest more than the
    # ranks above the high one: then those are the percentiles, found without a partition.
    low, high = flat.min(axis=1), flat.max(axis=1)
    above = flat.shape[1] - k_high  # cells from the high rank up
    unsure = (_count_equal(flat, low) <= k_low) | (_count_equal(flat, high) < above)
    if unsure.any():
        parted = np.partition(flat[unsure], sorted({k_low, k_high}), axis=1)
        low[unsure], high[unsure] = parted[:, k_low], parted[:, k_high]
    return low.astype(np.float32), high.astype(np.float32)


def _count_equal(flat: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per row of ``flat``, how many cells equal that row's value."""
    return _count_per_image(flat == values[:, None])


# Masks carry a border of this many empty cells, so that shifting a whole batch as one flat
# array (what dilation and neighbour tests do) moves no cell into a neighbouring row or image.
_PAD = 2


def _padded_mask(small: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """``small > threshold`` per image (threshold in 0..255), as ``(n, h + 2 * _PAD,
    w + 2 * _PAD)`` bool."""
    n, h, w = small.shape
    mask = np.zeros((n, h + 2 * _PAD, w + 2 * _PAD), bool)
    # For integer grey levels, > t is > floor(t): compare uint8 with uint8, not as floats.
    whole = np.floor(threshold).astype(np.uint8)[:, None, None]
    np.greater(small, whole, out=_inner(mask))
    return mask


def _inner(mask: np.ndarray) -> np.ndarray:
    """The cells of a padded mask (a view)."""
    return mask[:, _PAD:-_PAD, _PAD:-_PAD]


def _shifted_or(mask: np.ndarray, offsets: tuple[int, ...]) -> np.ndarray:
    """OR of ``mask`` moved by each of ``offsets`` cells through the batch in raster order."""
    flat = mask.reshape(-1)
    out = np.zeros_like(flat)
    for offset in offsets:
        if offset > 0:
            out[offset:] |= flat[:-offset]
        else:
            out[:offset] |= flat[-offset:]
    return out.reshape(mask.shape)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Padded ``mask`` dilated by a square of side ``2 * radius + 1`` (``radius <= _PAD``)."""
    row = mask.shape[2]
    along = tuple(d for r in range(1, radius + 1) for d in (r, -r))
    grown = mask | _shifted_or(mask, along)
    return grown | _shifted_or(grown, tuple(d * row for d in along))


def _has_neighbour(mask: np.ndarray) -> np.ndarray:
    """Cells of padded ``mask`` with at least one of their 8 neighbours set."""
    row = mask.shape[2]
    vertical = _shifted_or(mask, (row, -row))
    vertical |= _shifted_or(vertical | mask, (1, -1))
    return vertical


def _masked(images: np.ndarray, mask: np.ndarray, step: int) -> np.ndarray:
    """``images`` ``(n, h, w)`` uint8 with pixels under cells of ``mask`` that are off set to
    0 (a new array); ``mask`` has one cell per ``step`` x ``step`` pixels, covering the images."""
    n, h, w = images.shape
    cells = mask.view(np.uint8)
    if step in (2, 4, 8):  # repeat each cell along rows in one pass: multiply by 0x0101...
        wide = np.dtype(f"u{step}")
        cells = (cells.astype(wide) * wide.type(int("01" * step, 16))).view(np.uint8)
    elif step > 1:
        cells = np.repeat(cells, step, axis=2)
    cells = cells[:, :, :w]
    out = np.empty_like(images)
    # Along columns, broadcast each row of cells over its ``step`` rows of pixels.
    whole = h // step
    blocks = (n, whole, step, w)
    np.multiply(
        images[:, : whole * step].reshape(blocks),
        cells[:, :whole, None, :],
        out=out[:, : whole * step].reshape(blocks),
    )
    np.multiply(images[:, whole * step :], cells[:, whole : whole + 1], out=out[:, whole * step :])
    return out


def _any_per_image(mask: np.ndarray) -> np.ndarray:
    """Whether each image of a contiguous mask has a set cell."""
    return mask.reshape(len(mask), -1).view(np.uint8).max(axis=1, initial=0).astype(bool)


def _clean_mask(mask: np.ndarray, options: PreprocessOptions) -> np.ndarray:
    """Padded ink ``mask`` without specks and border fragments (padded, a new array).

    Gives the same result as :func:`_clean_mask_labelled`, which labels every image, but
    labels only what it must: when specks are single pixels (``min_speck_area`` at most two
    mask cells) they are found from their neighbours, and border fragments are looked for only
    in the bands along the edges that have ink. Images left with no ink, where the largest
    component has to be kept, go through the labelled path.
    """
    n, h, w = _inner(mask).shape
    speck_cells = options.min_speck_area * h * w
    if speck_cells > 2:
        keep = np.zeros_like(mask)
        _inner(keep)[:] = _clean_mask_labelled(_inner(mask), options)
        return keep
    # Specks are single cells, those with no neighbour.
    keep = mask & _has_neighbour(mask) if speck_cells > 1 else mask.copy()
    if options.remove_border_fragments:
        _remove_border_fragments(keep, options)
    emptied = np.flatnonzero(~_any_per_image(keep) & _any_per_image(mask))
    if len(emptied):
        _inner(keep)[emptied] = _clean_mask_labelled(_inner(mask)[emptied], options)
    return keep


def _remove_border_fragments(padded: np.ndarray, options: PreprocessOptions) -> None:
    """Clear, in place, components that touch an edge, stay within that edge's band and are
    small against the image's ink (the padded mask must hold no specks: its ink is kept ink).

    Each edge is handled on a strip one row deeper than the band, turned so that the edge is
    row 0: a component of the strip that touches row 0 and not the strip's last row is a whole
    component of the image (8-connected pixels differ by at most one row).
    """
    keep = _inner(padded)
    n, h, w = keep.shape
    band_h, band_w = options.fragment_band * h, options.fragment_band * w
    # Rows from each edge a fragment may occupy: rows < band from the top, >= h - band from
    # the bottom (as in _border_fragments), and the same for columns.
    edges = (
        (keep, int(np.ceil(band_h))),
        (keep[:, ::-1], h - int(np.ceil(h - band_h))),
        (keep.transpose(0, 2, 1), int(np.ceil(band_w))),
        (keep.transpose(0, 2, 1)[:, ::-1], w - int(np.ceil(w - band_w))),
    )
    limit = None
    for view, depth in edges:
        if depth <= 0:
            continue
        images = np.flatnonzero(view[:, 0].any(axis=1))
        if not len(images):
            continue
        if limit is None:  # before any removal: the share is of the kept ink
            limit = options.fragment_max_share * _count_per_image(padded)
        strip = view[images, : depth + 1]
        labels, count = ndimage.label(strip, structure=_EIGHT_CONNECTED_PER_IMAGE)
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        owner = _label_owner(labels, count)  # index into images
        fragment = np.zeros(count + 1, bool)
        fragment[labels[:, 0]] = True
        if depth < view.shape[1]:
            fragment[labels[:, depth]] = False
        fragment &= areas <= limit[images[owner]]
        fragment[0] = False
        hit = np.unique(owner[fragment])  # strips with something to clear
        if len(hit):
            view[images[hit], : depth + 1] = strip[hit] & ~fragment[labels[hit]]


def _label_owner(labels: np.ndarray, count: int) -> np.ndarray:
    """Index of the image each label ``0..count`` of a stack of labelled images belongs to."""
    # Labels are numbered in raster order, so each image's labels follow the previous image's.
    last_label = np.maximum.accumulate(labels.reshape(len(labels), -1).max(axis=1))
    return np.searchsorted(last_label, np.arange(count + 1))


def _count_per_image(mask: np.ndarray) -> np.ndarray:
    """Set cells per image of a contiguous bool mask ``(n, ...)``."""
    cells = mask.reshape(len(mask), -1).view(np.uint8)
    dtype = np.uint16 if cells.shape[1] < 2**16 else np.uint32  # narrow sums are faster
    return cells.sum(axis=1, dtype=dtype)


def _clean_mask_labelled(mask: np.ndarray, options: PreprocessOptions) -> np.ndarray:
    """The ink mask without specks and border fragments, from labelling every image."""
    n, h, w = mask.shape
    labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED_PER_IMAGE)
    if count == 0:
        return mask.copy()
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    owner = _label_owner(labels, count)
    keep = areas >= options.min_speck_area * h * w
    keep[0] = False  # the background: neither ink nor a fragment
    if options.remove_border_fragments:
        keep &= ~_border_fragments(labels, areas, owner, keep, options)
    # Never remove every component of an image: keep its largest if nothing else survives.
    ink_left = np.bincount(owner[keep], weights=areas[keep], minlength=n)
    for image in np.flatnonzero(ink_left == 0):
        ids = np.flatnonzero(owner == image)
        ids = ids[ids > 0]
        if len(ids):
            keep[ids[np.argmax(areas[ids])]] = True
    return keep[labels]


def _border_fragments(
    labels: np.ndarray,
    areas: np.ndarray,
    owner: np.ndarray,
    keep: np.ndarray,
    options: PreprocessOptions,
) -> np.ndarray:
    """Components touching the border, small against the image's ink and within a band."""
    n, h, w = labels.shape
    touching = np.zeros(len(areas), bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        touching[edge.ravel()] = True
    touching[0] = False
    fragment = np.zeros(len(areas), bool)
    candidates = np.flatnonzero(touching & keep)
    if not len(candidates):
        return fragment
    image_ink = np.bincount(owner[keep], weights=areas[keep], minlength=n)
    small = areas[candidates] <= options.fragment_max_share * image_ink[owner[candidates]]
    band_h, band_w = options.fragment_band * h, options.fragment_band * w
    for label in candidates[small]:
        image = owner[label]
        rows, cols = np.nonzero(labels[image] == label)
        fragment[label] = (
            (rows.min() == 0 and rows.max() < band_h)
            or (rows.max() == h - 1 and rows.min() >= h - band_h)
            or (cols.min() == 0 and cols.max() < band_w)
            or (cols.max() == w - 1 and cols.min() >= w - band_w)
        )
    return fragment


def _ink_boxes(padded: np.ndarray) -> np.ndarray:
    """Per image ``(x0, y0, x1, y1)`` bounding box of a padded mask's set cells, in cells of
    its inner part (meaningless for an empty image)."""
    n, h, w = _inner(padded).shape
    cols = _any_over_rows(padded)[:, _PAD:-_PAD]
    # First and last rows with ink: first set cell in raster order, from the top and from the
    # bottom (argmax of a bool array stops at the first True).
    row = padded.shape[2]
    y0 = padded.reshape(n, -1).argmax(axis=1) // row - _PAD
    y1 = h + _PAD - np.ascontiguousarray(padded[:, ::-1]).reshape(n, -1).argmax(axis=1) // row
    x0, x1 = cols.argmax(axis=1), w - cols[:, ::-1].argmax(axis=1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float64)


def _moment_fit(
    small: np.ndarray, padded: np.ndarray, low: np.ndarray, span: float
) -> tuple[np.ndarray, np.ndarray]:
    """Centre of mass ``(n, 2)`` and ``span`` standard deviations per axis ``(n, 2)`` of each
    image's kept ink, weighted by grey level above the background, in cells."""
    n, h, w = small.shape
    weight = np.maximum(small.astype(np.float32) - low[:, None, None], 0.0)
    weight *= _inner(padded)
    along_x, along_y = weight.sum(axis=1), weight.sum(axis=2)  # (n, w), (n, h)
    total = np.maximum(along_x.sum(axis=1), 1e-6)
    x, y = np.arange(w) + 0.5, np.arange(h) + 0.5
    cx, cy = along_x @ x / total, along_y @ y / total
    var_x = np.maximum(along_x @ (x * x) / total - cx * cx, 1.0 / 12)
    var_y = np.maximum(along_y @ (y * y) / total - cy * cy, 1.0 / 12)
    centre = np.stack([cx, cy], axis=1).astype(np.float64)
    extent = span * np.sqrt(np.stack([var_x, var_y], axis=1)).astype(np.float64)
    return centre, extent


def _crop_boxes(fit: _Fit, floors: np.ndarray, options: PreprocessOptions) -> np.ndarray:
    """Per image ``(x0, y0, x1, y1)`` float crop boxes in input pixels: the fitted extent,
    squared if ``keep_aspect``, at least ``floors`` (pixels), grown by the margin, around the
    fitted centre. Without ``crop``, the whole image."""
    if not options.crop:
        h, w = fit.shape
        return np.tile(np.array([0.0, 0.0, w, h]), (len(floors), 1))
    width, height = fit.extent[:, 0], fit.extent[:, 1]
    if options.keep_aspect:
        width = height = np.maximum(width, height)
    # Small characters stay small: っ must not be enlarged into つ.
    width, height = np.maximum(width, floors), np.maximum(height, floors)
    grow = 1.0 / (1.0 - 2.0 * options.margin)
    cx, cy = fit.centre[:, 0], fit.centre[:, 1]
    half_w, half_h = width * grow / 2, height * grow / 2
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)


def redraw_strokes(images: np.ndarray, width: float) -> np.ndarray:
    """``(n, s, s)`` uint8 ink-high images with their strokes thinned to a skeleton and redrawn
    ``width`` pixels wide, anti-aliased, at full ink level: pen width and binarisation no longer
    show. Images without ink stay black."""
    from skimage.morphology import skeletonize

    ink = images >= 128
    skeleton = np.stack([skeletonize(image) for image in ink]) if len(ink) else ink
    # Distances to the nearest skeleton pixel of the same image: the first axis counts as far.
    far = 4.0 * images.shape[1] * images.shape[2]
    distance = ndimage.distance_transform_edt(~skeleton, sampling=(far, 1.0, 1.0))
    level = np.clip(width / 2 + 0.5 - distance, 0.0, 1.0)
    return np.round(level * 255.0).astype(np.uint8)


def _any_over_rows(mask: np.ndarray) -> np.ndarray:
    """``mask.any(axis=1)`` of a bool ``(n, h, w)`` mask, by halving (much faster)."""
    while mask.shape[1] > 1:
        half = mask.shape[1] // 2
        folded = mask[:, :half] | mask[:, half : 2 * half]
        if mask.shape[1] % 2:
            folded[:, 0] |= mask[:, -1]
        mask = folded
    return mask[:, 0]


def _resize_all(
    grey: np.ndarray, boxes: np.ndarray, options: PreprocessOptions, gain: np.ndarray | None = None
) -> np.ndarray:
    """Resample each image's crop box ``(x0, y0, x1, y1)`` (pixels, may reach past the border)
    to ``(n, size, size)`` float32 grey levels, times ``gain`` per image if given; pixels
    outside the image count as 0."""
    size = options.size
    gain = np.ones(len(grey), np.float32) if gain is None else gain
    if options.resample == "auto":
        # Area averaging when shrinking (anti-aliasing), bilinear when enlarging small crops.
        shrinking = (boxes[:, 2] - boxes[:, 0]) > size
        if shrinking.all() or not shrinking.any():  # the usual case: one filter for all
            kernel = _FILTERS["box" if shrinking.all() else "bilinear"]
            return _resample(grey, boxes, size, kernel, gain)
        out = np.empty((len(grey), size, size), np.float32)
        for chosen, name in ((shrinking, "box"), (~shrinking, "bilinear")):
            out[chosen] = _resample(grey[chosen], boxes[chosen], size, _FILTERS[name], gain[chosen])
        return out
    return _resample(grey, boxes, size, _FILTERS[options.resample], gain)


def _resample(
    grey: np.ndarray, boxes: np.ndarray, size: int, kernel: _Filter, gain: np.ndarray
) -> np.ndarray:
    """:func:`_resize_all` for one filter: two block-diagonal sparse products, rows first."""
    n, h, w = grey.shape
    scales = (boxes[:, 2:] - boxes[:, :2]) / size  # (n, [x, y]) input pixels per output pixel
    # Box weights are 0/1: integer sums are exact, and uint16 is twice as fast as float32.
    most = np.prod(np.ceil(scales.max(axis=0)) + 1)  # input pixels per output pixel, at most
    exact = kernel.weight is _box and most * 255 < 2**16
    if exact and n <= _DENSE_IMAGES and (scales >= 1).all():
        return _resample_dense_box(grey, boxes, size, gain)
    dtype = np.uint16 if exact else np.float32
    by_rows, row_sums = _axis_matrix(boxes[:, 1], boxes[:, 3], size, h, kernel, dtype)
    by_cols, col_sums = _axis_matrix(boxes[:, 0], boxes[:, 2], size, w, kernel, dtype)
    rows = by_rows @ grey.astype(dtype).reshape(n * h, w)
    rows = rows.reshape(n, size, w).transpose(0, 2, 1).reshape(n * w, size)
    both = (by_cols @ rows).reshape(n, size, size)  # (image, out column, out row)
    # Divide by the weight sums and apply the gain: one factor per output pixel, in
    # (image, row, column) order.
    row_factor = (gain[:, None] / row_sums).astype(np.float32)
    col_factor = (1.0 / col_sums).astype(np.float32)
    out = row_factor[:, :, None] * col_factor[:, None, :]
    out *= both.transpose(0, 2, 1)
    return out


_DENSE_IMAGES = 2  # up to this many images, the box resize multiplies dense matrices


def _resample_dense_box(
    grey: np.ndarray, boxes: np.ndarray, size: int, gain: np.ndarray
) -> np.ndarray:
    """:func:`_resample` of a few images with the box kernel, shrinking: the runs of pixels
    of :func:`_box_runs` as dense 0/1 float32 matrices (for a lone image, building the sparse
    ones costs more than all the arithmetic). The sums are of integers below 2**24, exact in
    any order: the result is the sparse products' to the bit."""
    n, h, w = grey.shape
    row_bounds, row_sums = _box_runs(boxes[:, 1], boxes[:, 3], size, h)
    col_bounds, col_sums = _box_runs(boxes[:, 0], boxes[:, 2], size, w)
    by_rows = _runs_dense(row_bounds, h)  # (n, size, h)
    by_cols = _runs_dense(col_bounds, w)  # (n, size, w)
    both = by_rows @ grey.astype(np.float32) @ by_cols.transpose(0, 2, 1)  # (n, row, column)
    row_factor = (gain[:, None] / row_sums).astype(np.float32)
    col_factor = (1.0 / col_sums).astype(np.float32)
    out = row_factor[:, :, None] * col_factor[:, None, :]
    out *= both
    return out


def _box_runs(
    start: np.ndarray, stop: np.ndarray, size: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """The box kernel shrinking ``start..stop`` to ``size`` samples cuts the axis into runs of
    whole pixels, one per sample (those whose centres fall in its span): the runs' bounds
    ``(n, size + 1)``, clipped to ``0..length``, and each sample's weight sum ``(n, size)``
    (pixels outside the axis count, as zeros)."""
    scale = (stop - start) / size
    bounds = np.floor(start[:, None] + np.arange(size + 1) * scale[:, None] + 0.5)
    sums = np.diff(bounds, axis=1)
    return np.clip(bounds, 0, length).astype(np.int32), sums


def _runs_dense(bounds: np.ndarray, length: int) -> np.ndarray:
    """``(n, size, length)`` float32: 1 where pixel ``j`` lies in sample ``i``'s run."""
    pixels = np.arange(length)
    return ((pixels >= bounds[:, :-1, None]) & (pixels < bounds[:, 1:, None])).astype(np.float32)


def _axis_matrix(
    start: np.ndarray, stop: np.ndarray, size: int, length: int, kernel: _Filter, dtype: type
) -> tuple[sparse.csr_array, np.ndarray]:
    """Resampling ``start..stop`` (pixel coordinates along one axis of ``length`` pixels) of
    each of ``n`` images to ``size`` samples, as a block-diagonal ``(n * size, n * length)``
    matrix of unnormalised weights, and each sample's weight sum ``(n, size)``.

    Weights are PIL's (``ImagingResample``: the kernel centred on each output pixel, widened by
    the shrink factor); taps outside ``0..length`` are left out but count in the sums, as
    pixels of value 0 would.
    """
    n = len(start)
    scale = (stop - start) / size
    if kernel.weight is _box and (scale >= 1).all():
        bounds, sums = _box_runs(start, stop, size, length)
        first, counts = bounds[:, :-1].ravel(), np.diff(bounds, axis=1).ravel()
        values = np.ones(counts.sum(), dtype)
    else:
        index, weights, used, sums = _taps(start, scale, size, length, kernel)
        counts = np.count_nonzero(used, axis=2).ravel()
        first = (index[:, :, 0] + np.argmax(used, axis=2)).ravel()  # unused where no taps
        values = weights[used].astype(dtype)
    indptr = np.zeros(n * size + 1, np.int32)
    np.cumsum(counts, out=indptr[1:])
    # Column of each stored weight: its run's first pixel, plus its place in the run, plus
    # the image's offset in the stacked batch.
    starts = first + np.repeat(np.arange(n, dtype=np.int32) * length, size)
    columns = np.arange(indptr[-1], dtype=np.int32) + np.repeat(starts - indptr[:-1], counts)
    matrix = sparse.csr_array((values, columns, indptr), shape=(n * size, n * length))
    return matrix, sums


def _taps(
    start: np.ndarray, scale: np.ndarray, size: int, length: int, kernel: _Filter
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Input indices, weights and which taps are used, ``(n, size, taps)``, of any kernel as
    :func:`_axis_matrix` describes them, and weight sums ``(n, size)``. A sample's used taps
    are consecutive: those within the kernel's support and within ``0..length``."""
    stretch = np.maximum(scale, 1.0)
    support = kernel.support * stretch
    taps = int(np.ceil(support.max())) * 2 + 1
    centre = start[:, None] + (np.arange(size) + 0.5) * scale[:, None]
    index = np.floor(centre - support[:, None] + 0.5)[:, :, None] + np.arange(taps)
    weights = kernel.weight((index - centre[:, :, None] + 0.5) / stretch[:, None, None])
    end = np.floor(centre + support[:, None] + 0.5)[:, :, None]  # PIL's last tap + 1
    weights[index >= end] = 0.0
    sums = weights.sum(axis=2)
    sums[sums == 0] = 1.0
    used = (index >= 0) & (index < np.minimum(end, length))
    return index.astype(np.int32), weights, used, sums
