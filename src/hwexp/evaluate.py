"""``python -m hwexp.evaluate run=<id|best> dataset=...``: measure a trained model on any dataset.

Classes are matched by character, so a model trained on one source is measured on another
(a synthetic-trained model on a folder of real samples, a hiragana model on ETL8G's hiragana).
The evaluation data is prepared with the *source run's* preprocessing options, whatever the
command line says, so the model sees what it learnt from. Samples whose character the model
does not know are left out and counted. The result is logged as its own MLflow run, tagged with
the source run's id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from hwexp import CONF_DIR
from hwexp.errors import ConfigError, exit_on_error

if TYPE_CHECKING:
    from hwexp.train import EvaluationReport

EVALUATED_RUN_TAG = "hwexp.evaluated_run"
PARTS = ("auto", "test", "val", "train", "all")


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate_run`` measured and where it logged it."""

    metrics: dict[str, float]
    run_id: str | None
    source_run_id: str
    part: str
    unknown_characters: dict[str, int]  # characters the model has no class for -> samples
    report: EvaluationReport = field(repr=False)  # the predictions behind the metrics


def data_config_for(cfg: DictConfig, trained_config: Mapping) -> DictConfig:
    """``cfg`` with its ``preprocess`` block replaced by the trained run's."""
    merged = OmegaConf.to_container(cfg, resolve=True)
    merged["preprocess"] = dict(trained_config["preprocess"])
    return OmegaConf.create(merged)


def choose_part(part: str, cfg: Mapping, trained_config: Mapping) -> str:
    """``auto``: the test split when evaluating on the training dataset (other splits were
    seen in training), every sample otherwise."""
    if part not in PARTS:
        raise ConfigError(f"part={part!r}: choose one of {list(PARTS)}")
    if part != "auto":
        return part
    trained = trained_config.get("dataset", {})
    same = (trained.get("name"), trained.get("source"), trained.get("classes")) == (
        cfg["dataset"].get("name"),
        cfg["dataset"].get("source"),
        cfg["dataset"].get("classes"),
    )
    return "test" if same else "all"


def evaluate_run(cfg: DictConfig) -> Evaluation:
    """Load ``cfg.run``, prepare ``cfg.dataset`` as the run was prepared, predict, log."""
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
    data_cfg = data_config_for(cfg, trained.config)
    part = choose_part(str(cfg.part), cfg, trained.config)
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
    report = evaluate(trained.model, mapped, trained.classes, int(cfg.batch_size))
    metrics = report.metrics("eval")
    metrics["eval/unknown_samples"] = float(sum(unknown.values()))
    tracker = Tracker.from_config(
        cfg.tracking,
        run_name=f"evaluate {data_cfg.dataset.name} ({part})",
        tags={EVALUATED_RUN_TAG: run_id, "dataset": str(data_cfg.dataset.name), "part": part},
    )
    if tracker is None:
        return Evaluation(metrics, None, run_id, part, unknown, report)
    with tracker:
        tracker.log_config(data_cfg)
        tracker.log_metrics(metrics)
        tracker.log_evaluation(report)
    return Evaluation(metrics, tracker.run_id, run_id, part, unknown, report)


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
    main()
