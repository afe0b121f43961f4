"""``python -m hwexp.data prepare|show|stats|verify [overrides]`` and ``download kmnist|k49``.

Examples::

    python -m hwexp.data prepare dataset=kanji3036 preprocess.size=64
    python -m hwexp.data show dataset=hiragana dataset.source=synthetic
    python -m hwexp.data stats dataset=katakana split=random
    python -m hwexp.data verify                      # checksum every cache entry
    python -m hwexp.data verify verify.remove=true   # ... and delete the damaged ones
    python -m hwexp.data download kmnist
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from hwexp import CONF_DIR
from hwexp.cli import run_hydra_command
from hwexp.errors import ConfigError, DataError, exit_on_error

COMMANDS = ("prepare", "show", "stats", "verify", "download")
USAGE = (
    "usage: python -m hwexp.data {prepare|show|stats|verify} [hydra overrides...]\n"
    "       python -m hwexp.data download {kmnist|k49} [paths.data_dir=...]"
)
HELP = f"""{USAGE}
(hwexp data ... is the same)

commands:
  prepare   decode, preprocess and cache a dataset: dataset=<name>, preprocess.size=64, workers=4
  show      a PNG grid of samples per class: show.per_class=8, show.max_classes=48,
            show.split=train|val|test, show.output=<file.png>
  stats     counts per class, per writer and per split: split=writer|random|official
  verify    checksum every cache entry; verify.remove=true deletes the damaged ones
  download  fetch kmnist or k49 with md5 checks (resumable) into paths.data_dir

options: Hydra overrides of conf/data.yaml, e.g. dataset=katakana dataset.source=synthetic
  "dataset.classes='chars:あいう'" (non-ASCII: single quotes inside double ones)
  paths.data_dir=<raw files> paths.cache_dir=<prepared arrays>
every group and option: python -m hwexp.data prepare --help
"""
_command: list[str] = []


def _run(cfg: DictConfig) -> None:
    with exit_on_error():
        _dispatch(cfg, _command[0])


def _dispatch(cfg: DictConfig, command: str) -> None:
    if command == "download":
        from hwexp.data.download import download_dataset

        paths = download_dataset(_command[1], Path(cfg.paths.data_dir).expanduser().resolve())
        print("\n".join(str(p) for p in paths))
        return
    if command == "verify":
        _verify(Path(cfg.paths.cache_dir).expanduser().resolve(), bool(cfg.verify.remove))
        return
    from hwexp.data.dataset import class_set_of, load_splits, prepare_sources
    from hwexp.data.show import count_table

    classes, _ = class_set_of(cfg.dataset)
    prepared = prepare_sources(cfg)
    if command == "prepare":
        for source in prepared.values():
            print(f"{source.name}: {len(source)} images {source.images.shape[1:]} -> {source.path}")
    elif command == "stats":
        for source in prepared.values():
            print(count_table(source, classes, all_classes=bool(cfg.stats.all_classes)))
        splits = load_splits(cfg, progress=False)
        for split in ("train", "val", "test"):
            part = getattr(splits, split)
            print(f"{split}: {len(part)} samples, {len(np.unique(part.writers))} writers")
    elif command == "show":
        _show(cfg, prepared, classes)


def _show(cfg: DictConfig, prepared: dict, classes: tuple[str, ...]) -> None:
    """One PNG grid per source (``show.split``: of that split's samples only)."""
    from hwexp.data.dataset import load_splits
    from hwexp.data.show import sample_grid, save_png

    split = cfg.show.split
    if split not in (None, "train", "val", "test"):
        raise ConfigError(f"show.split={split}: choose train, val, test or null (every sample)")
    splits = load_splits(cfg, progress=False) if split else None
    for source in prepared.values():
        images, labels, writers = source.images, source.labels, source.writers
        what = "samples"
        if splits is not None:
            part = getattr(splits, split)
            rows = np.flatnonzero(part.sources == source.name)
            images = part.images.subset(rows)
            labels = np.asarray(splits.classes)[part.labels[rows]]
            writers = part.writers[rows]
            what = f"{split} samples (split={cfg.split.method}, seed={cfg.seed})"
        rows_shown = min(int(cfg.show.max_classes), len(classes))
        title = (
            f"{cfg.dataset.name}, source {source.name}: {len(labels)} {what} of "
            f"{len(classes)} classes, writers: {len(np.unique(writers))}; {rows_shown} classes "
            "shown, one a row; writer id under each image"
        )
        grid = sample_grid(
            images,
            labels,
            writers,
            classes,
            per_class=cfg.show.per_class,
            max_classes=cfg.show.max_classes,
            seed=cfg.seed,
            title=title,
        )
        default = Path(cfg.paths.cache_dir).expanduser().resolve().parent / (
            f"show-{cfg.dataset.name}-{source.name}{f'-{split}' if split else ''}.png"
        )
        output = Path(cfg.show.output) if cfg.show.output else default
        if len(prepared) > 1 and cfg.show.output:
            output = output.with_name(f"{output.stem}-{source.name}{output.suffix}")
        print(save_png(grid, output))


def _verify(cache_dir: Path, remove: bool) -> None:
    """One line per cache entry; exit status 1 while a damaged entry is left in place."""
    from hwexp.data.cache import verify_entries

    reports = []
    for report in verify_entries(cache_dir, remove=remove):
        if report.problem is None:
            size = f"{report.count} images, {report.nbytes / 1e6:.1f} MB"
            print(f"ok       {report.path.name} ({size})")
        else:
            state = "removed " if report.removed else "DAMAGED "
            print(f"{state} {report.path.name}: {report.problem}")
        reports.append(report)
    damaged = [r for r in reports if r.problem is not None and not r.removed]
    print(f"{len(reports)} cache entries in {cache_dir}, {len(damaged)} damaged")
    if damaged:
        what = (
            "1 damaged cache entry: delete it"
            if len(damaged) == 1
            else f"{len(damaged)} damaged cache entries: delete them"
        )
        raise DataError(
            f"{what} or run `python -m hwexp.data verify verify.remove=true`; the next run that "
            "needs an entry prepares it again."
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"], ["help"]):
        print(HELP)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2
    command = [argv.pop(0)]
    if command[0] == "download":
        if not argv or argv[0] not in ("kmnist", "k49"):
            print(USAGE, file=sys.stderr)
            return 2
        command.append(argv.pop(0))
    _command[:] = command
    sys.argv = [sys.argv[0], *argv]
    task = hydra.main(config_path=CONF_DIR, config_name="data", version_base="1.3")(_run)
    run_hydra_command(task)
    return 0


if __name__ == "__main__":
    sys.exit(main())
