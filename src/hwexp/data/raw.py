"""What every reader hands to the preprocessing stage.

Conventions shared by all sources:

* images are ``uint8`` arrays of shape ``(n, height, width)``;
* ``ink`` says which way round they are: ``"high"`` (ink bright on a dark background, the
  convention of ETL's 4-bit scans, MNIST and KMNIST and the convention of every *prepared*
  array in hwexp) or ``"low"`` (dark ink on a light background, as in most photos and
  drawings) or ``"auto"`` (unknown: the preprocessing stage detects it per image);
* labels are the characters themselves (``str``), never class indices;
* writers are strings unique within one source (``"ETL9G:1234"``); two samples with the
  same writer id were written by the same person (or, for synthetic data, the same seed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Ink = Literal["high", "low", "auto"]


@dataclass
class RawChunk:
    """A batch of decoded, not yet normalised character images from one source."""

    images: np.ndarray  # (n, h, w) uint8
    labels: np.ndarray  # (n,) str
    writers: np.ndarray  # (n,) str
    ink: Ink = "high"
    meta: dict[str, np.ndarray] = field(default_factory=dict)  # per-sample header fields
    skipped: tuple[str, ...] = ()  # unusable samples left out, each "<file or record> (<why>)"

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            shape, dtype = self.images.shape, self.images.dtype
            raise ValueError(f"RawChunk.images must be (n, h, w) uint8, got {shape} {dtype}")
        for name in ("labels", "writers"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"RawChunk.{name} has {len(getattr(self, name))} entries for {n} images"
                )
        for key, values in self.meta.items():
            if len(values) != n:
                raise ValueError(f"RawChunk.meta[{key!r}] has {len(values)} entries for {n} images")


@dataclass(frozen=True)
class ChunkTask:
    """A picklable recipe for one chunk: ``load()`` runs in a worker process.

    ``count`` is the number of samples ``load()`` returns (after keeping only the requested
    classes), known without decoding images, so the cache can size its output array up front.
    It is exact unless ``exact`` is False: then ``load()`` may leave out samples it finds
    unusable once decoded (blank images), naming them in :attr:`RawChunk.skipped`.
    """

    load: Callable[[], RawChunk]
    count: int
    description: str  # e.g. "ETL9G_01 records 0..1023"
    exact: bool = True
