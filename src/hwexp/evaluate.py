"""``python -m hwexp.evaluate run=<id|best> dataset=...``: measure a trained model on any dataset.

Classes are matched by character, so a model trained on one source is measured on another
(a synthetic-trained model on a folder of real samples, a hiragana model on ETL8G's hiragana).
The evaluation data is prepared with the *source run's* preprocessing options, whatever the
command line says, so the model sees what it learnt from. Samples whose character the model
does not know are left out and counted. The result is logged as its own MLflow run, tagged with
the source run's id.

A split of the run's own training data (``part=test``, ``val`` or ``train``, and ``auto``
there) is the run's split exactly: the class set, source options (``synthetic.writers``...),
split method and seed come from the run's config, not the command line. Whatever is evaluated,
its writers are compared with those of the run's training split (by source): any shared one
prints a ``warning:`` line and is counted in tag ``hwexp.writer_overlap``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from hwexp import CONF_DIR
from hwexp.contract import EVALUATED_RUN_TAG, WRITER_OVERLAP_TAG
from hwexp.errors import ConfigError, HwexpError, exit_on_error, note, warn

if TYPE_CHECKING:
    from hwexp.data.dataset import SplitArrays
    from hwexp.tracking.runs import TrainedModel
    from hwexp.train import EvaluationReport

__all__ = ["EVALUATED_RUN_TAG", "PARTS", "Evaluation", "WriterOverlap", "evaluate_run"]

PARTS = ("auto", "test", "val", "train", "all")
SPLITS = ("train", "val", "test")
# Options that name or weigh a dataset without changing its samples or splits.
_NOT_DATA = ("dataset.name", "dataset.weights")


@dataclass(frozen=True)
class WriterOverlap:
    """How much of an evaluation the run saw in training: its evaluated writers (a writer is
    its source and id) that wrote samples of the run's training split, and their samples."""

    writers: int  # evaluated writers who are training writers
    evaluated_writers: int
    samples: int  # evaluated samples by those writers
    evaluated_samples: int
    trained_samples: int  # of those, samples of a (writer, character) the run trained on

    def message(self, run_id: str, split_method: str | None = None) -> str:
        """The ``warning:`` text (without the prefix)."""
        text = (
            f"{self.writers} of the {self.evaluated_writers} evaluated writers "
            f"({self.samples} of the {self.evaluated_samples} samples) wrote samples of run "
            f"{run_id}'s training split, and {self.trained_samples} of the evaluated samples "
            "are ones it was trained on: these scores overstate how well it reads new writers"
        )
        if split_method not in (None, "writer"):
            text += f" (the run's split={split_method} puts a writer in several splits)"
        return text + f"; tagged {WRITER_OVERLAP_TAG}={self.writers}"


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate_run`` measured and where it logged it."""

    metrics: dict[str, float]
    run_id: str | None
    source_run_id: str
    part: str
    unknown_characters: dict[str, int]  # characters the model has no class for -> samples
    report: EvaluationReport = field(repr=False)  # the predictions behind the metrics
    overlap: WriterOverlap | None = None  # None: the run's training data could not be rebuilt


def _plain(value: object) -> object:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _same_folder(a: object, b: object) -> bool:
    def where(path: object) -> str | None:
        return str(Path(str(path)).expanduser().resolve()) if path else None

    return where(a) == where(b)


def is_training_data(dataset_cfg: Mapping, trained_config: Mapping) -> bool:
    """Whether ``dataset_cfg`` names data the run was trained on: its sources are among the
    run's, with the same class set (``classes``) and, for ``folder``, the same folder."""
    from hwexp.data.dataset import dataset_sources

    trained = trained_config.get("dataset") or {}
    try:
        trained_sources = dataset_sources(trained)
    except ConfigError:  # a run without a dataset config
        return False
    sources = dataset_sources(dataset_cfg)
    dataset_cfg = _plain(dataset_cfg)  # a missing value (path: ???) is then a plain "???"
    classes = [json.dumps(_plain(d.get("classes"))) for d in (dataset_cfg, trained)]
    return (
        set(sources) <= set(trained_sources)
        and classes[0] == classes[1]
        and ("folder" not in sources or _same_folder(dataset_cfg.get("path"), trained.get("path")))
    )


def shared_sources(dataset_cfg: Mapping, trained_dataset: Mapping) -> list[str]:
    """The sources of ``dataset_cfg`` whose writers may be the run's (``trained_dataset``): those
    the run used too, except ``folder`` when the folders differ and either names its writers by
    image (``writer_from_name=false``: the id is the image's path in its folder)."""
    from hwexp.data.dataset import dataset_sources

    ours, theirs = _plain(dataset_cfg), _plain(trained_dataset)
    shared = [name for name in dataset_sources(ours) if name in dataset_sources(theirs)]
    named = all(d.get("writer_from_name") for d in (ours, theirs))
    if "folder" in shared and not named and not _same_folder(ours.get("path"), theirs.get("path")):
        shared.remove("folder")
    return shared


def choose_part(part: str, training_data: bool) -> str:
    """``auto``: the run's test split when evaluating on its training data (``training_data``;
    the other splits were seen in training), every sample otherwise."""
    if part not in PARTS:
        raise ConfigError(f"part={part!r}: choose one of {list(PARTS)}")
    if part != "auto":
        return part
    return "test" if training_data else "all"


def data_config_for(
    cfg: DictConfig, trained_config: Mapping, own_sources: Sequence[str] | None = None
) -> DictConfig:
    """``cfg`` with its ``preprocess`` block replaced by the trained run's; with
    ``own_sources`` (evaluating the run's own splits of those sources) also every option that
    defines the run's samples and splits (``hwexp.data.dataset.data_keys``), so its splits are
    rebuilt exactly."""
    from hwexp.data.dataset import data_keys, run_data_config

    merged = OmegaConf.to_container(cfg, resolve=True)
    merged["preprocess"] = dict(trained_config["preprocess"])
    if own_sources is not None:
        run = OmegaConf.to_container(
            run_data_config(cfg, trained_config, own_sources), resolve=True
        )
        for key in data_keys(own_sources):
            if key in run:
                merged[key] = run[key]
    return OmegaConf.create(merged)


def replaced_options(cfg: DictConfig, data_cfg: DictConfig, sources: Sequence[str]) -> list[str]:
    """``option=<run's value> (here <cfg's value>)`` for each data option of ``cfg`` that
    ``data_cfg`` (``data_config_for`` with ``own_sources``) replaced by the run's."""
    from hwexp.data.dataset import data_keys
    from hwexp.tracking.writer import flatten_config

    def flat(config: DictConfig) -> dict[str, str]:
        keys = [k for k in data_keys(sources) if k in config]
        return flatten_config(OmegaConf.masked_copy(config, keys))

    given, used = flat(cfg), flat(data_cfg)
    return [
        f"{key}={used.get(key, 'unset')} (here {given.get(key, 'unset')})"
        for key in sorted(set(given) | set(used))
        if given.get(key) != used.get(key) and not key.startswith(_NOT_DATA)
    ]


def _sample_keys(part: SplitArrays, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: its writer as ``source<US>writer`` (ids of different sources never meet),
    and its ``writer<US>character``."""
    writers = np.char.add(np.char.add(part.sources.astype(str), "\x1f"), part.writers.astype(str))
    chars = np.asarray(classes, dtype=str)[part.labels] if len(part) else np.array([], str)
    return writers, np.char.add(np.char.add(writers, "\x1f"), chars)


def writer_overlap(
    evaluated: SplitArrays,
    classes: Sequence[str],
    training: SplitArrays,
    training_classes: Sequence[str],
) -> WriterOverlap:
    """Which ``evaluated`` samples (labels index ``classes``) come from writers of
    ``training`` (labels index ``training_classes``), matched by source and writer id."""
    writers, pairs = _sample_keys(evaluated, classes)
    train_writers, train_pairs = _sample_keys(training, training_classes)
    shared = np.isin(writers, train_writers)
    return WriterOverlap(
        writers=len(np.unique(writers[shared])),
        evaluated_writers=len(np.unique(writers)),
        samples=int(shared.sum()),
        evaluated_samples=len(writers),
        trained_samples=int(np.isin(pairs, train_pairs).sum()),
    )


def _training_split(
    cfg: DictConfig, trained: TrainedModel
) -> tuple[SplitArrays, tuple[str, ...]] | None:
    """The run's training split of ``shared_sources`` (rebuilt from its config, normally from
    the cache) and its classes; None (after a warning) when it cannot be rebuilt here."""
    from hwexp.data.dataset import ImageView, SplitArrays, load_splits, run_data_config

    try:
        shared = shared_sources(cfg.dataset, trained.config.get("dataset") or {})
        if not shared:  # nothing in common: an empty training split
            empty = np.array([], str)
            return SplitArrays(ImageView([], (0, 0)), np.array([], np.int32), empty, empty), ()
        splits = load_splits(run_data_config(cfg, trained.config, shared))
    except HwexpError as error:
        warn(
            f"cannot tell which evaluated writers are in run {trained.run_id}'s training split "
            f"(its data cannot be rebuilt here: {error}); tagged {WRITER_OVERLAP_TAG}=unknown"
        )
        return None
    return splits.train, splits.classes


def _evaluated_data(cfg: DictConfig, trained: TrainedModel) -> tuple[DictConfig, str, bool]:
    """``(data config, part, whether the part is a split of the run's own)`` of ``cfg``; a
    ``note:`` lists the options of ``cfg`` that the run's own split overrides."""
    from hwexp.data.dataset import dataset_sources

    sources = dataset_sources(cfg.dataset)
    training_data = is_training_data(cfg.dataset, trained.config)
    part = choose_part(str(cfg.part), training_data)
    own_split = training_data and part in SPLITS
    data_cfg = data_config_for(cfg, trained.config, sources if own_split else None)
    replaced = replaced_options(cfg, data_cfg, sources) if own_split else []
    if replaced:
        note(
            f"part={part} is run {trained.run_id}'s own {part} split, rebuilt from the run's "
            f"options rather than this command's: {', '.join(replaced)}"
        )
    return data_cfg, part, own_split


def evaluate_run(cfg: DictConfig) -> Evaluation:
    """Load ``cfg.run``, prepare ``cfg.dataset`` as the run was prepared (a split of the run's
    training data: the run's split), compare its writers with the run's training writers
    (``warning:`` when any is shared), predict, log."""
    from hwexp.data.dataset import SplitArrays, join_splits, load_splits
    from hwexp.tracking.runs import client_for, load_selected_model
    from hwexp.tracking.writer import Tracker
    from hwexp.train import evaluate

    client = client_for(cfg.tracking)
    select = cfg.select
    trained = load_selected_model(
        client, str(cfg.run), select.experiment, select.metric, select.parent_run
    )
    run_id = trained.run_id
    data_cfg, part, own_split = _evaluated_data(cfg, trained)
    splits = load_splits(data_cfg)
    chosen: SplitArrays = (
        join_splits([splits.train, splits.val, splits.test])
        if part == "all"
        else getattr(splits, part)
    )
    chars = np.asarray(splits.classes)[chosen.labels]
    index_of = {c: i for i, c in enumerate(trained.classes)}
    known = np.array([c in index_of for c in chars], bool)
    unknown = {c: int((chars == c).sum()) for c in np.unique(chars[~known])}
    if not known.any():
        raise ConfigError(
            f"none of the dataset's characters is a class of run {run_id} "
            f"(its classes start {''.join(trained.classes[:20])})"
        )
    rows = np.flatnonzero(known)
    mapped = SplitArrays(
        images=chosen.images.subset(rows),
        labels=np.array([index_of[c] for c in chars[rows]], np.int32),
        writers=chosen.writers[rows],
        sources=chosen.sources[rows],
    )
    training = (splits.train, splits.classes) if own_split else _training_split(cfg, trained)
    overlap = None if training is None else writer_overlap(mapped, trained.classes, *training)
    if overlap is not None and overlap.writers:
        method = data_cfg.split.method if own_split else None
        warn(overlap.message(run_id, method))
    report = evaluate(trained.model, mapped, trained.classes, int(cfg.batch_size))
    metrics = report.metrics("eval")
    metrics["eval/unknown_samples"] = float(sum(unknown.values()))
    if overlap is not None:
        metrics["eval/overlap_writers"] = float(overlap.writers)
        metrics["eval/overlap_samples"] = float(overlap.samples)
    tracker = Tracker.from_config(
        cfg.tracking,
        run_name=f"evaluate {data_cfg.dataset.name} ({part})",
        tags={
            EVALUATED_RUN_TAG: run_id,
            WRITER_OVERLAP_TAG: "unknown" if overlap is None else str(overlap.writers),
            "dataset": str(data_cfg.dataset.name),
            "part": part,
        },
    )
    result = Evaluation(metrics, None, run_id, part, unknown, report, overlap)
    if tracker is None:
        return result
    with tracker:
        tracker.log_config(data_cfg)
        tracker.log_metrics(metrics)
        tracker.log_evaluation(report)
    return Evaluation(metrics, tracker.run_id, run_id, part, unknown, report, overlap)


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra task: evaluate one run and print its headline metrics."""
    with exit_on_error():
        result = evaluate_run(cfg)
    m = result.metrics
    print(
        f"run {result.source_run_id} on {cfg.dataset.name} ({result.part}, "
        f"{int(m['eval/samples'])} samples): accuracy {m['eval/accuracy']:.4f}, "
        f"top-5 {m['eval/top5_accuracy']:.4f}, macro F1 {m['eval/macro_f1']:.4f}"
    )
    if result.unknown_characters:
        print(
            f"left out {int(m['eval/unknown_samples'])} samples of characters the model does not "
            f"know: {''.join(result.unknown_characters)}"
        )
    if result.run_id:
        print(f"logged as MLflow run {result.run_id}")
    return float(m["eval/accuracy"])


if __name__ == "__main__":
    from hwexp.cli import run_hydra_command

    run_hydra_command(main)
