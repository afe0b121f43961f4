"""From a dataset configuration to train/validation/test arrays with characters as classes.

A dataset names a class set and one source or a mixture of sources over that class set
(``source: [etl8g, synthetic]`` with ``weights: {synthetic: 0.5}``). Each source is prepared
through the cache and split by its own writers; the splits of all sources are then joined,
every sample remembering its source so metrics can be reported per source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from hwexp.data.cache import PreparedSource, load_or_prepare, resolve_workers
from hwexp.data.charsets import CLASS_SETS, resolve_class_set
from hwexp.data.folder import folder_root, list_folder_images
from hwexp.data.preprocess import PreprocessOptions
from hwexp.data.sources import SOURCE_TABLE, SOURCES, plan_source
from hwexp.data.split import split_samples
from hwexp.errors import ConfigError


class ImageView:
    """Selected rows of one or more (memory-mapped) image arrays, read only when indexed.

    Behaves like a read-only ``(n, size, size)`` uint8 array for ``len``, ``shape``,
    integer / slice / index-array access and ``np.asarray`` (which copies everything).
    """

    def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray]], item_shape: tuple):
        self._bases = [base for base, _ in parts]
        self._rows = [np.asarray(rows, np.int64) for _, rows in parts]
        self._offsets = np.cumsum([0] + [len(r) for r in self._rows])
        self.shape = (int(self._offsets[-1]), *item_shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        positions = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        positions = np.where(positions < 0, positions + len(self), positions)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        out = np.empty((len(positions), *self.shape[1:]), np.uint8)
        part_of = np.searchsorted(self._offsets, positions, side="right") - 1
        for part in np.unique(part_of):
            where = np.flatnonzero(part_of == part)
            rows = self._rows[part][positions[where] - self._offsets[part]]
            order = np.argsort(rows, kind="stable")  # sequential reads from the memory map
            out[where[order]] = self._bases[part][rows[order]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[np.arange(len(self))]
        return array if dtype is None else array.astype(dtype)

    def subset(self, positions: np.ndarray) -> ImageView:
        """A view of the given positions (in that order), still reading nothing."""
        positions = np.asarray(positions, np.int64)
        part_of = np.searchsorted(self._offsets, positions, side="right") - 1
        breaks = np.flatnonzero(np.diff(part_of)) + 1
        parts = []
        for run, owner in zip(np.split(positions, breaks), np.split(part_of, breaks), strict=True):
            if len(run):
                part = owner[0]
                parts.append((self._bases[part], self._rows[part][run - self._offsets[part]]))
        return ImageView(parts, self.shape[1:])

    @staticmethod
    def concat(views: Sequence[ImageView]) -> ImageView:
        """One view over all ``views``, in order."""
        parts = [(b, r) for v in views for b, r in zip(v._bases, v._rows, strict=True)]
        return ImageView(parts, views[0].shape[1:])


@dataclass
class SplitArrays:
    """One split: images (lazy view, ink high), class indices, writers and source names."""

    images: ImageView
    labels: np.ndarray  # (n,) int32 index into PreparedSplits.classes
    writers: np.ndarray  # (n,) str
    sources: np.ndarray  # (n,) str

    def __len__(self) -> int:
        return len(self.labels)


def join_splits(parts: Sequence[SplitArrays]) -> SplitArrays:
    """The samples of several splits as one (e.g. every sample, for evaluation elsewhere)."""
    return SplitArrays(
        images=ImageView.concat([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        writers=np.concatenate([p.writers for p in parts]),
        sources=np.concatenate([p.sources for p in parts]),
    )


@dataclass
class PreparedSplits:
    """Everything a trainer needs; ``classes[i]`` is the character of class index ``i``."""

    classes: tuple[str, ...]
    train: SplitArrays
    val: SplitArrays
    test: SplitArrays
    image_size: int
    source_weights: dict[str, float]
    name: str
    class_set: str = ""  # the class set's short name: hiragana75, hiragana75-first5, custom3, ...
    entries: dict[str, Path] = field(default_factory=dict)  # source -> its cache entry folder

    def samples_of(self, source: str) -> dict[str, int]:
        """Samples of ``source`` per split: ``{"train": n, "val": n, "test": n}``."""
        return {
            part: int(np.sum(getattr(self, part).sources == source))
            for part in ("train", "val", "test")
        }


def dataset_sources(dataset_cfg: Mapping) -> list[str]:
    """The source names of a dataset config (``source`` is a name or a list of names)."""
    source = dataset_cfg.get("source")
    names = [source] if isinstance(source, str) else list(source or [])
    if not names:
        raise ConfigError("dataset.source is empty; name a source, e.g. dataset.source=synthetic")
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ConfigError(
            f"dataset.source: unknown source(s) {unknown}; choose from {list(SOURCES)}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"dataset.source lists a source twice: {names}")
    return names


def class_set_of(dataset_cfg: Mapping) -> tuple[tuple[str, ...], str]:
    """``(characters, short name)`` of the dataset's ``classes`` option, cut to its first
    ``limit_classes`` characters when that option is set (debug runs)."""
    spec = dataset_cfg.get("classes")
    if isinstance(spec, ListConfig):
        spec = list(spec)
    if spec == "auto":
        # a user's folder: every folder name is a class
        if dataset_sources(dataset_cfg) != ["folder"]:
            raise ConfigError("dataset.classes=auto works only with dataset.source=folder")
        root = folder_root(dataset_cfg.get("path"))
        names = sorted({char for _, char in list_folder_images(root)})
        return resolve_class_set(names), f"folder{len(names)}"
    try:
        chars = resolve_class_set(spec)
    except ValueError as error:
        raise ConfigError(f"dataset.classes: {error}") from error
    name = spec if isinstance(spec, str) and spec in CLASS_SETS else f"custom{len(chars)}"
    limit = dataset_cfg.get("limit_classes")
    if limit:
        if int(limit) < 2:
            raise ConfigError(f"dataset.limit_classes={limit}: keep at least 2 classes")
        chars, name = chars[: int(limit)], f"{name}-first{int(limit)}"
    return chars, name


def _plain(cfg) -> dict:
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg or {})


def data_keys(sources: Sequence[str]) -> tuple[str, ...]:
    """The root config keys that define the samples and splits of a dataset of ``sources``,
    besides ``preprocess`` and ``paths``: ``dataset``, ``split``, ``seed`` and the sources'
    option blocks (``synthetic``)."""
    blocks = (SOURCE_TABLE[name].config_block for name in sources if name in SOURCE_TABLE)
    return tuple(dict.fromkeys(("dataset", "split", "seed", *blocks)))


def run_data_config(
    cfg: Mapping, trained_config: Mapping, sources: Sequence[str] | None = None
) -> DictConfig:
    """A trained run's data config (its ``dataset``, ``preprocess``, ``split``, source options
    such as ``synthetic``, ``seed``) with this command's ``paths`` and ``workers``: what
    ``load_splits`` needs to rebuild the run's splits on this machine. ``sources``: keep only
    these of the run's sources; each source is split on its own, so their splits stay the run's.
    """
    merged = OmegaConf.create(dict(trained_config))
    with open_dict(merged):
        merged.paths = OmegaConf.to_container(cfg["paths"], resolve=True)
        merged.workers = cfg.get("workers", "auto")
        if sources is not None and set(sources) != set(dataset_sources(merged.dataset)):
            weights = _plain(merged.dataset.get("weights"))
            merged.dataset.source = sources[0] if len(sources) == 1 else list(sources)
            merged.dataset.weights = {k: v for k, v in weights.items() if k in sources}
    return merged


def prepare_sources(cfg: Mapping, progress: bool = True) -> dict[str, PreparedSource]:
    """Prepare (or load from the cache) every source of ``cfg.dataset``; keyed by source name."""
    dataset_cfg = cfg["dataset"]
    classes, classes_name = class_set_of(dataset_cfg)
    options = PreprocessOptions.from_config(_plain(cfg["preprocess"]))
    data_dir = Path(cfg["paths"]["data_dir"]).expanduser().resolve()
    cache_dir = Path(cfg["paths"]["cache_dir"]).expanduser().resolve()
    workers = resolve_workers(cfg.get("workers"))
    prepared = {}
    for name in dataset_sources(dataset_cfg):
        source_options = _plain(cfg.get(SOURCE_TABLE[name].config_block))
        plan = plan_source(name, classes, data_dir, source_options)
        prepared[name] = load_or_prepare(
            cache_dir,
            name,
            classes_name,
            plan.description,
            plan.make_tasks,
            options,
            workers=workers,
            progress=progress,
        )
    return prepared


def load_splits(cfg: Mapping, progress: bool = True) -> PreparedSplits:
    """Prepared, split data for ``cfg`` (keys ``dataset``, ``preprocess``, ``split``,
    ``paths``, ``seed``, optional ``workers`` and ``synthetic``)."""
    dataset_cfg = cfg["dataset"]
    classes, class_set = class_set_of(dataset_cfg)
    index_of = {char: i for i, char in enumerate(classes)}
    split_cfg = cfg["split"]
    prepared = prepare_sources(cfg, progress=progress)
    weights_cfg = _plain(dataset_cfg.get("weights"))
    unknown = sorted(set(weights_cfg) - set(prepared))
    if unknown:
        raise ConfigError(f"dataset.weights names source(s) {unknown} not in dataset.source")
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for name, source in prepared.items():
        indices = split_samples(
            split_cfg["method"],
            source.writers,
            source.labels,
            source.meta,
            float(split_cfg.get("val") or 0.0),
            float(split_cfg.get("test") or 0.0),
            int(cfg.get("seed", 0)),
            source=name,
        )
        for split in parts:
            parts[split].append((source, getattr(indices, split)))
    size = next(iter(prepared.values())).images.shape[1]

    def join(split: str) -> SplitArrays:
        chosen = parts[split]
        labels = np.concatenate([s.labels[rows] for s, rows in chosen])
        return SplitArrays(
            images=ImageView([(s.images, rows) for s, rows in chosen], (size, size)),
            labels=np.array([index_of[c] for c in labels], np.int32),
            writers=np.concatenate([s.writers[rows] for s, rows in chosen]),
            sources=np.concatenate([np.full(len(rows), s.name) for s, rows in chosen]),
        )

    return PreparedSplits(
        classes=classes,
        train=join("train"),
        val=join("val"),
        test=join("test"),
        image_size=size,
        source_weights={name: float(weights_cfg.get(name, 1.0)) for name in prepared},
        name=str(dataset_cfg.get("name", "dataset")),
        class_set=class_set,
        entries={name: source.path for name, source in prepared.items()},
    )
