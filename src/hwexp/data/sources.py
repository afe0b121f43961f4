"""The pluggable sources of character images, one interface for all.

A source turns configuration into (a) a JSON description of everything its samples depend
on, which keys the cache, and (b) a list of :class:`~hwexp.data.raw.ChunkTask`, built only
when the cache has no entry. Sources: the ETL formats, ``kmnist``/``k49``, ``folder`` (a
user's image tree) and ``synthetic`` (rendered handwriting, no files needed).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from hwexp.data import etl, folder, kmnist
from hwexp.data.cache import file_signature
from hwexp.data.raw import ChunkTask, RawChunk
from hwexp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ETL_SOURCES = ("etl1c", "etl8g", "etl9g", "etl8b2", "etl9b")
KMNIST_SOURCES = ("kmnist", "k49")


@dataclass(frozen=True)
class SourcePlan:
    """What the cache needs to find or build one source's prepared arrays."""

    name: str
    description: dict
    make_tasks: Callable[[], Sequence[ChunkTask]]


def plan_source(name: str, classes: Sequence[str], data_dir: Path, options: Mapping) -> SourcePlan:
    """The plan of source ``name`` restricted to ``classes``.

    ``options`` holds the source's own settings (its ``Source.config_block``): ``path`` and
    ``writer_from_name`` for ``folder``; the renderer options (plus ``writers``,
    ``first_writer``) for ``synthetic``.

    Raises:
        ConfigError: unknown source or bad option; DatasetFilesMissing: files absent;
        DataError: the source lacks some of the classes.
    """
    if name not in SOURCE_TABLE:
        raise ConfigError(f"unknown source {name!r}; choose one of {list(SOURCES)}")
    base = {"source": name, "classes": list(classes)}
    return SOURCE_TABLE[name].plan(name, classes, data_dir, options, base)


def _plan_etl(
    name: str, classes: Sequence[str], data_dir: Path, options: Mapping, base: dict
) -> SourcePlan:
    fmt = etl.FORMATS[name]
    paths = etl.etl_files(data_dir, fmt)
    _require_classes(name, classes, etl.labels_in_files(paths, fmt))
    description = base | {"files": [file_signature(p) for p in paths]}
    tasks = functools.partial(etl.etl_tasks, paths, fmt, frozenset(classes))
    return SourcePlan(name, description, tasks)


def _plan_kmnist(
    name: str, classes: Sequence[str], data_dir: Path, options: Mapping, base: dict
) -> SourcePlan:
    root = kmnist.check_kmnist_files(data_dir, name)
    _require_classes(name, classes, kmnist.read_classmap(root / kmnist.classmap_file(name)))
    files = sorted(p for p in root.iterdir() if p.name.startswith(name))
    description = base | {"files": [file_signature(p) for p in files]}
    tasks = functools.partial(kmnist.kmnist_tasks, data_dir, name, frozenset(classes))
    return SourcePlan(name, description, tasks)


def _require_classes(source: str, classes: Sequence[str], available: Sequence[str] | set) -> None:
    missing = [c for c in classes if c not in set(available)]
    if missing:
        shown = "".join(missing[:40]) + (
            f" (+{len(missing) - 40} more)" if len(missing) > 40 else ""
        )
        raise DataError(
            f"source {source!r} has no samples of {len(missing)} requested class(es): {shown}. "
            "Choose a class set the source covers (dataset.classes) or another source."
        )


def _plan_folder(
    name: str, classes: Sequence[str], data_dir: Path, options: Mapping, base: dict
) -> SourcePlan:
    keep = frozenset(classes)
    root = folder.folder_root(options.get("path"))
    items = folder.list_folder_images(root)
    present = {char for _, char in items}
    _require_classes("folder", classes, present)
    writer_from_name = bool(options.get("writer_from_name", False))
    signature = [
        (folder.printable(str(p.relative_to(root))), p.stat().st_size, p.stat().st_mtime_ns)
        for p, char in items
        if char in keep
    ]
    description = base | {
        "root": folder.printable(str(root)),
        "images": signature,
        "writer_from_name": writer_from_name,
    }
    labels = folder.read_labels_file(root / folder.LABELS_FILE)
    if labels:  # only then, so that the entries of folders without one keep their key
        description["labels"] = labels
    return SourcePlan(
        "folder",
        description,
        functools.partial(folder.folder_tasks, root, keep, writer_from_name),
    )


# Keys of the `synthetic` config that the data layer reads; the rest are renderer options.
SYNTHETIC_DATA_KEYS = ("writers", "first_writer", "chunk_writers")


def renderer_settings(options: Mapping) -> dict:
    """The `synthetic` config without the data layer's keys: what ``SynthOptions.from_config``
    takes."""
    return {k: v for k, v in options.items() if k not in SYNTHETIC_DATA_KEYS}


def _plan_synthetic(
    name: str, classes: Sequence[str], data_dir: Path, options: Mapping, base: dict
) -> SourcePlan:
    try:
        from hwexp.synth.kanjivg import missing_characters
        from hwexp.synth.options import SynthOptions
    except ImportError as error:  # the renderer is an optional part of the package
        raise ConfigError(
            f"source 'synthetic' is not available in this installation ({error}); "
            "choose a source with files (see the README's dataset table)"
        ) from error
    writers = int(options.get("writers", 0))
    first_writer = int(options.get("first_writer", 0))
    settings = renderer_settings(options)
    if writers < 3:
        raise ConfigError(f"synthetic.writers={writers}: render at least 3 writers")
    synth_options = SynthOptions.from_config(settings)
    missing = missing_characters(classes)
    if missing:
        raise DataError(
            f"the synthetic renderer has no strokes for {len(missing)} character(s): "
            f"{''.join(missing)}; drop them from dataset.classes or use another source"
        )
    if synth_options.font_ratio > 0:
        _report_font_gaps(classes, synth_options)
    try:
        renderer_version = metadata.version("kanjivg")
    except metadata.PackageNotFoundError:
        renderer_version = "unknown"
    description = base | {
        "writers": [first_writer, first_writer + writers],
        "renderer": settings,
        "kanjivg": renderer_version,
        "synth_format": getattr(synth_options, "FORMAT", 1),
    }
    chunk_writers = max(1, int(options.get("chunk_writers", max(1, 4096 // max(1, len(classes))))))

    def make_tasks() -> list[ChunkTask]:
        tasks = []
        for start in range(first_writer, first_writer + writers, chunk_writers):
            ids = tuple(range(start, min(start + chunk_writers, first_writer + writers)))
            load = functools.partial(render_writers, tuple(classes), ids, synth_options)
            tasks.append(
                ChunkTask(load, len(ids) * len(classes), f"synthetic writers {ids[0]}..{ids[-1]}")
            )
        return tasks

    return SourcePlan("synthetic", description, make_tasks)


def _report_font_gaps(classes: Sequence[str], synth_options) -> None:
    """Say which fonts lack which characters (their writers draw those from KanjiVG)."""
    from hwexp.synth.fonts import font_coverage

    gaps = font_coverage(classes, synth_options.fonts, synth_options.system_fonts)
    for face, missing in gaps.items():
        if missing:
            shown = "".join(missing[:30]) + (
                f" (+{len(missing) - 30} more)" if len(missing) > 30 else ""
            )
            log.warning(
                "font %s lacks %d of the %d characters: %s; its writers draw them from KanjiVG",
                face,
                len(missing),
                len(classes),
                shown,
            )


@dataclass(frozen=True)
class Source:
    """One source: its reader (``plan``: name, classes, data dir, options, description base ->
    ``SourcePlan``), the config block its options come from (``dataset`` | ``synthetic``), and
    where its data comes from and on what terms (for model cards)."""

    plan: Callable[[str, Sequence[str], Path, Mapping, dict], SourcePlan]
    config_block: str = "dataset"
    origin: str = ""
    licence: str = ""


_ETL = Source(
    _plan_etl,
    origin="ETL Character Database, National Institute of Advanced Industrial Science and "
    "Technology (AIST), etlcdb.db.aist.go.jp: scanned handwriting",
    licence="free after registering with AIST, under its terms of use; redistribution of the "
    "data is forbidden: check those terms before distributing weights trained on it",
)
_KMNIST = Source(
    _plan_kmnist,
    origin="Kuzushiji-MNIST / Kuzushiji-49, ROIS-DS Center for Open Data in the Humanities "
    "(CODH), from the Pre-Modern Japanese Text dataset",
    licence="CC BY-SA 4.0: credit CODH ('KMNIST Dataset' (created by CODH)) and share alike",
)
SOURCE_TABLE: dict[str, Source] = {
    **dict.fromkeys(ETL_SOURCES, _ETL),
    **dict.fromkeys(KMNIST_SOURCES, _KMNIST),
    "folder": Source(
        _plan_folder,
        origin="the user's own images (dataset.path)",
        licence="whatever terms the images are under: state them (export metadata.license)",
    ),
    "synthetic": Source(
        _plan_synthetic,
        config_block="synthetic",
        origin="rendered by hwexp: KanjiVG strokes (Ulrich Apel and contributors) with "
        "synthetic writers, and Japanese fonts (synthetic.fonts)",
        licence="KanjiVG: CC BY-SA 3.0; default fonts: IPAexGothic (IPA Font License), Noto "
        "Sans CJK JP (SIL Open Font License 1.1); other fonts: their own licences",
    ),
}
SOURCES = tuple(SOURCE_TABLE)


def render_writers(chars: tuple[str, ...], writers: tuple[int, ...], options) -> RawChunk:
    """Render every char for each writer seed in ``writers`` into one chunk."""
    from hwexp.synth.render import render_writer

    parts = [render_writer(chars, writer, options) for writer in writers]
    meta_keys = set(parts[0].meta)
    return RawChunk(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        writers=np.concatenate([p.writers for p in parts]),
        ink=parts[0].ink,
        meta={k: np.concatenate([p.meta[k] for p in parts]) for k in meta_keys},
    )
