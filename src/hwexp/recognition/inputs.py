"""What a recognizer reads, turned into grey rasters: pen strokes, and pictures (image files,
encoded bytes, PIL images, numpy arrays) of either polarity. Nothing here knows about models:
``hwexp.recognition.recognizer`` prepares these rasters with a model's own preprocessing.

Strokes
-------
Polylines in canvas pixels (:class:`Strokes`, the drawing pad's format) are drawn bright on
black, centred on a square canvas of :data:`RASTER_SIDE` pixels whose side stands for the
longer canvas side, with round pen tips of :data:`STROKE_WIDTH` of that side (supersampled,
then area-averaged: anti-aliased like a scan).

Pictures
--------
Decoded to grey (transparent pixels become the background: white under dark ink, black under
light ink), turned ink-bright when the border is light, then, as ``dataset=folder`` reads a
user's images (``hwexp.data.folder``), scaled so that the longer side is
:data:`~hwexp.data.folder.FOLDER_CANVAS` pixels (enlarged when smaller) and padded to a square
with the picture's border grey. A picture under :data:`~hwexp.data.folder.MIN_IMAGE_SIDE`
pixels a side, or without contrast, is refused.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from hwexp.data.folder import letterbox, unusable
from hwexp.data.preprocess import ink_high
from hwexp.errors import InputError

RASTER_SIDE = 128  # px: the square canvas strokes are drawn on (the synthetic source's canvas)
SUPERSAMPLE = 2  # strokes are drawn at this multiple of RASTER_SIDE, then area-averaged
STROKE_WIDTH = 0.036  # pen width / canvas side: a pencil-to-felt pen of the training data
MAX_PICTURE_PIXELS = 1024 * 1024  # decoded, for pictures sent to the pad (checked from the header)
MAX_JPEG_REDUCTION = 8  # a larger JPEG is decoded at 1/2, 1/4 or 1/8 of its size to fit
PICTURE_FORMATS = frozenset({"PNG", "JPEG", "BMP", "GIF", "WEBP"})


@dataclass(frozen=True)
class Strokes:
    """A drawing as the pad sends it: ``strokes``, each an ``(n, 2)`` array of ``(x, y)`` canvas
    pixels from pen-down to pen-up, on a ``width`` x ``height`` pixel canvas. Strokes without
    points are dropped; a one-point stroke is a dot of the pen's width.

    Raises:
        InputError: a stroke is not a list of ``(x, y)`` number pairs, or the canvas size is not
            a positive number.
    """

    strokes: Sequence[Any]
    width: float
    height: float

    def __post_init__(self) -> None:
        arrays = []
        for index, stroke in enumerate(self.strokes):
            try:
                points = np.asarray(stroke, np.float64)
            except (TypeError, ValueError):
                points = np.empty((0, 3))  # ragged or not numbers: reported below
            if points.size == 0 and points.ndim < 2:
                continue
            if points.ndim != 2 or points.shape[1] != 2 or not np.isfinite(points).all():
                raise InputError(f"stroke {index}: every point must be [x, y], two numbers")
            if len(points):
                arrays.append(points)
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise InputError(
                    f"{name!r} must be a positive number (canvas pixels), not {value!r}"
                )
        object.__setattr__(self, "strokes", tuple(arrays))
        object.__setattr__(self, "width", float(self.width))
        object.__setattr__(self, "height", float(self.height))

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> Strokes:
        """From the pad's request object ``{"strokes": [[[x, y], ...], ...], "width": W,
        "height": H}`` (other keys are ignored)."""
        missing = [key for key in ("strokes", "width", "height") if key not in payload]
        if missing:
            raise InputError(f"a drawing needs 'strokes', 'width' and 'height'; missing {missing}")
        return cls(payload["strokes"], payload["width"], payload["height"])

    def render(self) -> np.ndarray:
        """``(RASTER_SIDE, RASTER_SIDE)`` uint8, ink 255 on 0 (:func:`render_strokes`)."""
        return render_strokes(self.strokes, self.width, self.height)


@dataclass(frozen=True)
class Raster:
    """One input ready for preprocessing: ``pixels`` ``(h, w)`` uint8, ink 255 on 0;
    ``drawn``: rendered strokes rather than a picture."""

    pixels: np.ndarray
    drawn: bool


def raster_of(item: Any) -> Raster:
    """The :class:`Raster` of one input: :class:`Strokes` or the pad's stroke object (a mapping
    with ``strokes``, ``width``, ``height``); an image file's path; encoded image bytes; a PIL
    image; or a numpy array ``(h, w)``, ``(h, w, 1|3|4)`` (uint8, bool, or floats in [0, 1]
    or [0, 255]).

    Raises:
        InputError: unreadable, too small or blank, or of a type not listed.
    """
    if isinstance(item, Strokes):
        return Raster(item.render(), drawn=True)
    if isinstance(item, Mapping):
        return Raster(Strokes.from_json(item).render(), drawn=True)
    if isinstance(item, str | os.PathLike):
        grey = read_picture(item)
    elif isinstance(item, bytes | bytearray | memoryview):
        grey = decode_picture(bytes(item), "the picture", Image.MAX_IMAGE_PIXELS)
    elif isinstance(item, Image.Image):
        grey = flatten_alpha(item)
    elif isinstance(item, np.ndarray):
        grey = grey_array(item)
    else:
        raise InputError(
            f"cannot read a {type(item).__name__}: give an image file's path, image bytes, a PIL "
            "image, a numpy array or hwexp.Strokes"
        )
    return Raster(picture_raster(grey), drawn=False)


def picture_raster(grey: np.ndarray) -> np.ndarray:
    """A ``(h, w)`` uint8 picture of either polarity as ink 255 on 0 (the polarity decided from
    its border, ``hwexp.data.preprocess.ink_high``), letterboxed as ``dataset=folder`` reads a
    picture (module docstring). Deciding the polarity first makes a picture and its negative
    give the same raster, to the grey level.

    Raises:
        InputError: (422) too small to hold a character, or no contrast.
    """
    picture = Image.fromarray(grey)
    why = unusable(picture)
    if why is not None:
        if why.startswith("blank"):
            raise InputError("empty drawing: the image has no ink (no contrast)", 422)
        raise InputError(f"the image is {why}: too small to hold a character", 422)
    return letterbox(Image.fromarray(ink_high(grey[None], "auto")[0]))


def grey_array(array: np.ndarray) -> np.ndarray:
    """A numpy picture as ``(h, w)`` uint8 grey: ``(h, w)`` or ``(h, w, 1|3|4)`` (RGB(A) as a
    picture's colours, alpha flattened); uint8, bool, integers in [0, 255], or floats (in [0, 1]
    when none is above 1, else in [0, 255]).

    Raises:
        InputError: another shape, or values that are not finite numbers.
    """
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InputError(
            f"an image array must be (h, w) or (h, w, 1|3|4), not {array.shape}; a batch is a "
            "list of arrays or an (n, h, w) array"
        )
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise InputError("the image array holds NaN or infinite values")
        scale = 255.0 if array.size and float(array.max()) <= 1.0 else 1.0
        array = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    elif array.dtype.kind in "iu":
        array = np.clip(array, 0, 255).astype(np.uint8)
    else:
        raise InputError(f"an image array must hold numbers, not {array.dtype}")
    if array.ndim == 2:
        return array
    return flatten_alpha(Image.fromarray(np.ascontiguousarray(array)))


def read_picture(path: str | os.PathLike) -> np.ndarray:
    """The picture in file ``path`` as ``(h, w)`` uint8 grey (:func:`decode_picture`, up to
    Pillow's decompression-bomb limit).

    Raises:
        InputError: naming the file: missing, a folder, unreadable, or not an image.
    """
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not an image file") from None
    except OSError as error:
        raise InputError(f"{path}: cannot be read: {error.strerror or error}") from None
    return decode_picture(data, str(path), Image.MAX_IMAGE_PIXELS)


def render_strokes(
    strokes: Sequence[np.ndarray],
    width: float,
    height: float,
    side: int = RASTER_SIDE,
    stroke_width: float = STROKE_WIDTH,
) -> np.ndarray:
    """Draw polylines ``(n_i, 2)`` (x, y in canvas pixels of a ``width`` x ``height`` canvas)
    bright (255) on black, centred on a ``(side, side)`` uint8 square whose side stands for
    ``max(width, height)``; the pen is ``stroke_width`` of that side, with round tips (a
    one-point stroke is a dot)."""
    big = side * SUPERSAMPLE
    scale = big / max(width, height)
    offset = np.array([(big - width * scale) / 2, (big - height * scale) / 2])
    pen = max(1.0, stroke_width * big)
    radius = pen / 2
    image = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        points = np.asarray(stroke, np.float64) * scale + offset
        if len(points) > 1:
            draw.line(points.ravel().tolist(), fill=255, width=round(pen))
        for x, y in points[_round_vertices(points)]:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    # Area-average SUPERSAMPLE x SUPERSAMPLE blocks, rounding once (resize's BOX filter gives
    # the same up to its rounding between passes, at four times the cost).
    return np.asarray(image.reduce(SUPERSAMPLE))


def _round_vertices(points: np.ndarray, max_turn_deg: float = 25.0) -> np.ndarray:
    """Indices of a polyline's ends and of the vertices turning by more than ``max_turn_deg``:
    where a plain wide line would show a notch, a disc rounds it (one disc per vertex, PIL's
    ``joint="curve"``, costs ten times as much on dense pointer input)."""
    ends = [0, len(points) - 1]
    if len(points) < 3:
        return np.array(ends)
    steps = np.diff(points, axis=0)
    lengths = np.maximum(np.hypot(steps[:, 0], steps[:, 1]), 1e-9)
    cosines = np.einsum("ij,ij->i", steps[:-1], steps[1:]) / (lengths[:-1] * lengths[1:])
    sharp = np.flatnonzero(cosines < np.cos(np.radians(max_turn_deg))) + 1
    return np.concatenate([ends, sharp])


def decode_picture(
    data: bytes, what: str = "'image'", max_pixels: int = MAX_PICTURE_PIXELS
) -> np.ndarray:
    """A PNG (or JPEG, BMP, GIF, WebP) as ``(h, w)`` uint8 grey; transparent pixels become
    the background (:func:`flatten_alpha`). ``what`` names the picture in messages.

    The size is read from the header before anything is decoded: a picture over ``max_pixels``
    is refused, except a JPEG that fits once decoded at 1/2, 1/4 or 1/8 of its size (cheap: the
    decoder skips the detail).

    Raises:
        InputError: not an image of those formats, undecodable, or too many pixels.
    """
    try:
        picture = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise InputError(
            _too_large(f"{what} is over PIL's decompression-bomb limit", max_pixels)
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise InputError(
            f"{what} is not a PNG, JPEG, BMP, GIF or WebP image (its data starts {data[:8]!r})"
        ) from None
    with picture:
        if picture.format not in PICTURE_FORMATS:
            raise InputError(
                f"{what}: image format {picture.format} is not accepted; send a PNG (or JPEG, "
                "BMP, GIF, WebP)"
            )
        width, height = picture.size
        if picture.format == "JPEG" and width * height > max_pixels:
            reduction = 1
            while reduction < MAX_JPEG_REDUCTION and (
                width * height > max_pixels * reduction * reduction
            ):
                reduction *= 2
            picture.draft("L", (width // reduction, height // reduction))
        if picture.size[0] * picture.size[1] > max_pixels:
            raise InputError(_too_large(f"{what} is {width}x{height} pixels", max_pixels))
        try:
            picture.load()
            return flatten_alpha(picture)
        except (OSError, ValueError, SyntaxError) as error:
            raise InputError(
                f"{what} is a {picture.format} image that cannot be decoded: {error}"
            ) from None


def _too_large(what: str, max_pixels: int) -> str:
    side = math.isqrt(max_pixels)
    return (
        f"{what}; at most {max_pixels} pixels (e.g. {side}x{side}, or a JPEG up to "
        f"{MAX_JPEG_REDUCTION} times that on each side): send a smaller picture"
    )


def flatten_alpha(picture: Image.Image) -> np.ndarray:
    """``picture`` as ``(h, w)`` uint8 grey; transparent pixels become the background: white
    when the opaque pixels (the ink) are dark, black when they are light."""
    has_alpha = picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info
    if not has_alpha:
        return np.asarray(picture.convert("L"))
    rgba = np.asarray(picture.convert("RGBA"), np.float32)
    grey = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    alpha = rgba[..., 3] / 255.0
    opaque = alpha > 0.5
    dark_ink = not opaque.any() or float(grey[opaque].mean()) < 128
    background = 255.0 if dark_ink else 0.0
    return np.clip(grey * alpha + background * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)
