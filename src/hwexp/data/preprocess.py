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
4. crop to the remaining ink's bounding box, pad to a square (keeping aspect ratio) with a
   margin, and resize with anti-aliasing to ``size`` x ``size``. The crop is never smaller
   than ``min_crop`` of the input's side, so small kana (っ ゃ) stay smaller than つ や.

Everything works on a batch ``(n, h, w)`` at once except the final resize (PIL, per image).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image
from scipy import ndimage

from hwexp.data.errors import ConfigError
from hwexp.data.raw import Ink

# Ink-to-background contrast (grey levels of 255) below which an image counts as blank.
MIN_CONTRAST = 16.0
_EIGHT_CONNECTED = np.ones((3, 3), bool)
_RESAMPLING = {
    "auto": None,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


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
    min_crop: float = 0.55  # of the input's shorter side: ink smaller than this is not enlarged
    margin: float = 0.08  # of the output side, left blank around the ink
    resample: str = "auto"  # box when shrinking, bilinear when enlarging

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 512:
            raise ConfigError(f"preprocess.size={self.size}: choose a side between 8 and 512")
        if not 0 <= self.min_crop <= 1:
            raise ConfigError(f"preprocess.min_crop={self.min_crop}: must be in [0, 1]")
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
        """Build from a config mapping; unknown keys raise :class:`ConfigError` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(
                f"unknown preprocess option(s) {unknown}; known options: {sorted(known)}"
            )
        return cls(**dict(cfg))

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


def normalise_characters(
    images: np.ndarray,
    ink: Ink = "high",
    options: PreprocessOptions | None = None,
    batch: int = 512,
) -> np.ndarray:
    """Normalise ``(n, h, w)`` uint8 character images to ``(n, size, size)`` uint8, ink high.

    An image with no ink left after clean-up comes out black (all zeros).
    """
    options = options or PreprocessOptions()
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected (n, h, w) uint8 images, got {images.shape} {images.dtype}")
    out = np.empty((len(images), options.size, options.size), np.uint8)
    for start in range(0, len(images), batch):
        part = ink_high(images[start : start + batch], ink)
        out[start : start + batch] = _normalise_batch(part, options)
    return out


def _normalise_batch(images: np.ndarray, options: PreprocessOptions) -> np.ndarray:
    n, h, w = images.shape
    # Masks are analysed on a subsampled view: labelling is the costly part and
    # crop boxes need no finer grid (side >= 60); pixels are resampled from full resolution.
    step = max(1, min(h, w) // 60)
    small = np.ascontiguousarray(images[:, ::step, ::step])
    low, high = _levels(small, options)
    mask = small > (low + options.ink_threshold * (high - low))[:, None, None]
    keep = _clean_mask(mask, options)
    images = _keep_only_near(images, keep, step, low)
    boxes = _crop_boxes(keep, options) * step
    resized = _resize_all(images, boxes, options).astype(np.float32)
    if options.contrast_stretch:
        span = np.maximum(high - low, MIN_CONTRAST)
        resized = (resized - low[:, None, None]) / span[:, None, None]
    else:
        resized /= 255.0
    floor = options.noise_floor
    resized = np.clip((resized - floor) / (1.0 - floor), 0.0, 1.0)
    resized[(high - low) < MIN_CONTRAST] = 0.0  # blank: no contrast to call ink
    return (resized * 255.0 + 0.5).astype(np.uint8)


def _levels(small: np.ndarray, options: PreprocessOptions) -> tuple[np.ndarray, np.ndarray]:
    """Per image background and ink grey levels (float, 0..255) from two percentiles."""
    flat = small.reshape(len(small), -1)
    last = flat.shape[1] - 1
    k_low = int(round(options.background_percentile / 100 * last))
    k_high = int(round(options.ink_percentile / 100 * last))
    parted = np.partition(flat, sorted({k_low, k_high}), axis=1)
    return parted[:, k_low].astype(np.float32), parted[:, k_high].astype(np.float32)


def _keep_only_near(
    images: np.ndarray, keep: np.ndarray, step: int, background: np.ndarray
) -> np.ndarray:
    """Full-resolution images with every pixel away from kept ink set to the background level.

    This removes specks and border fragments together with their anti-aliased fringes, and
    background blotches that stayed below the ink threshold; the kept ink's own grey edges
    survive because the kept mask is first grown by two mask cells.
    """
    n, h, w = images.shape
    near = _dilate3x3(_dilate3x3(keep))
    if step > 1:
        near = np.repeat(np.repeat(near, step, axis=1), step, axis=2)
    full = np.zeros((n, h, w), bool)
    full[:, : near.shape[1], : near.shape[2]] = near[:, :h, :w]
    if near.shape[1] < h:  # rows/columns the subsampled mask did not reach: copy the edge
        full[:, near.shape[1] :, :] = full[:, near.shape[1] - 1 : near.shape[1], :]
    if near.shape[2] < w:
        full[:, :, near.shape[2] :] = full[:, :, near.shape[2] - 1 : near.shape[2]]
    fill = np.round(background).astype(np.uint8)[:, None, None]
    return np.where(full, images, fill)


def _dilate3x3(mask: np.ndarray) -> np.ndarray:
    """Binary dilation of each ``(h, w)`` plane by a 3x3 square (two separable passes)."""
    rows = mask.copy()
    rows[:, 1:] |= mask[:, :-1]
    rows[:, :-1] |= mask[:, 1:]
    grown = rows.copy()
    grown[:, :, 1:] |= rows[:, :, :-1]
    grown[:, :, :-1] |= rows[:, :, 1:]
    return grown


def _clean_mask(mask: np.ndarray, options: PreprocessOptions) -> np.ndarray:
    """The ink mask without specks and border fragments."""
    n, h, w = mask.shape
    # Label all images as one tall 2D picture, each followed by an empty separator row:
    # 8-connected components never cross images and get ids in raster (= image) order.
    stacked = np.zeros((n, h + 1, w), bool)
    stacked[:, :h] = mask
    labels, _ = ndimage.label(stacked.reshape(n * (h + 1), w), structure=_EIGHT_CONNECTED)
    labels = labels.reshape(n, h + 1, w)[:, :h]
    count = int(labels.max())
    if count == 0:
        return mask
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    last_label = np.maximum.accumulate(labels.reshape(n, -1).max(axis=1))
    owner = np.searchsorted(last_label, np.arange(count + 1))
    keep = areas >= options.min_speck_area * h * w
    if options.remove_border_fragments:
        keep &= ~_border_fragments(labels, areas, owner, keep, options)
    keep[0] = False
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


def _crop_boxes(mask: np.ndarray, options: PreprocessOptions) -> np.ndarray:
    """Per image ``(x0, y0, x1, y1)`` float crop boxes in pixel coordinates."""
    n, h, w = mask.shape
    if not options.crop:
        return np.tile(np.array([0.0, 0.0, w, h]), (n, 1))
    rows, cols = mask.any(axis=2), mask.any(axis=1)
    has_ink = rows.any(axis=1)
    y0, y1 = rows.argmax(axis=1), h - rows[:, ::-1].argmax(axis=1)
    x0, x1 = cols.argmax(axis=1), w - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x0, y0, x1, y1], axis=1).astype(np.float64)
    boxes[~has_ink] = [0, 0, w, h]
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if options.keep_aspect:
        width = height = np.maximum(width, height)
    # Small characters stay small: っ must not be enlarged into つ.
    floor = options.min_crop * min(h, w)
    width, height = np.maximum(width, floor), np.maximum(height, floor)
    grow = 1.0 / (1.0 - 2.0 * options.margin)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    half_w, half_h = width * grow / 2, height * grow / 2
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)


def _resize_all(grey: np.ndarray, boxes: np.ndarray, options: PreprocessOptions) -> np.ndarray:
    n, h, w = grey.shape
    # Pad once so every crop box lies inside the image: PIL would smear edge pixels outwards.
    pad = int(
        np.ceil(max(0.0, -boxes[:, :2].min(), (boxes[:, 2] - w).max(), (boxes[:, 3] - h).max()))
    )
    if pad:
        grey = np.pad(grey, ((0, 0), (pad, pad), (pad, pad)))
        boxes = boxes + pad
        h, w = h + 2 * pad, w + 2 * pad
    grey = np.ascontiguousarray(grey)
    size = options.size
    if options.resample == "auto":
        # Area averaging when shrinking (anti-aliasing), bilinear when enlarging small crops.
        shrinking = (boxes[:, 2] - boxes[:, 0]) > size
        methods = np.where(shrinking, int(Image.Resampling.BOX), int(Image.Resampling.BILINEAR))
    else:
        methods = np.full(n, int(_RESAMPLING[options.resample]))
    methods = methods.tolist()  # plain ints: PIL's enum handling costs more than the resize
    boxes = boxes.tolist()
    out = bytearray(n * size * size)
    step = size * size
    for i in range(n):
        image = Image.frombuffer("L", (w, h), grey[i], "raw", "L", 0, 1)
        out[i * step : (i + 1) * step] = image.resize(
            (size, size), methods[i], box=boxes[i]
        ).tobytes()
    return np.frombuffer(out, np.uint8).reshape(n, size, size)
