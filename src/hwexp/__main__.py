"""``python -m hwexp [overrides]``: prepare the data, train, evaluate, and log it all to MLflow.

Returns (to Hydra, for sweeps) the metric named by ``optimized_metric``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from hwexp import CONF_DIR
from hwexp.contract import summary_metric_name, trained_model_files
from hwexp.errors import ConfigError, exit_on_error

if TYPE_CHECKING:
    from hwexp.tracking.writer import Tracker

log = logging.getLogger("hwexp")


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Prepare ``cfg.dataset``, train ``cfg.model`` on it and return the test/val metrics.

    Every option is checked first (``hwexp.config_check``: ``InvalidOptions``), before any data
    is prepared or any MLflow run is started. With ``trainer.init_from`` set, its run is loaded
    before an MLflow run is started, so a bad reference (a ``ConfigError``) leaves no run
    behind. The run keeps a heartbeat while it trains, and runs of its experiment whose process
    died are marked FAILED when it starts (``hwexp.tracking.runs.fail_orphaned_runs``).

    Data is prepared before TensorFlow is imported, so data workers can be forked cheaply.
    With a ``sweep_trial`` block (set by ``hydra/sweeper=hwexp_optuna``) this is one trial of an
    Optuna study: see ``hwexp.sweep.trial.run_trial``.
    """
    from hwexp.config_check import check_config
    from hwexp.data.dataset import load_splits

    check_config(cfg)
    splits = load_splits(cfg)
    if cfg.get("sweep_trial") is not None:
        from hwexp.sweep.trial import run_trial

        return run_trial(splits, cfg)
    from hwexp.contract import default_tracking_uri
    from hwexp.tracking.runs import fail_orphaned_runs
    from hwexp.tracking.writer import Tracker, run_name
    from hwexp.train import load_init_source, prepare_devices, train_and_evaluate

    prepare_devices(cfg.trainer)  # before a model is loaded: that starts TensorFlow's runtime
    init = load_init_source(cfg)  # a bad trainer.init_from fails here, before a run is started
    name = run_name(splits.class_set, cfg.model.name, cfg.trainer.seed)
    tracker = Tracker.from_config(cfg.tracking, run_name=cfg.tracking.run_name or name)
    if tracker is None:
        return train_and_evaluate(splits, cfg, init=init)
    with tracker, tracker.heartbeat():
        fail_orphaned_runs(tracker.client, [tracker.experiment_id])
        metrics = train_and_evaluate(splits, cfg, tracker, init=init)
    uri = cfg.tracking.uri or default_tracking_uri(cfg.tracking.mlruns_dir)
    print(_summary(splits.name, metrics, tracker, uri))
    return metrics


# What a training run's summary points at: label -> artifact path (hwexp.tracking.writer).
RESULT_FILES = {
    "curves": "training/curves.png",
    "confusion pairs": "evaluation/confusion_pairs.png",
    "misclassified": "evaluation/misclassified.png",
    "per class": "evaluation/per_class.csv",
}


def _summary(dataset: str, metrics: dict[str, float], tracker: Tracker, uri: str) -> str:
    """The lines a training run ends with: its test figures, where its files are, and how to
    see it in the MLflow UI (the runs table of its experiment)."""
    from hwexp.tracking.runs import trained_model_uri
    from hwexp.tracking.writer import local_path_of, runs_page_url

    run = tracker.client.get_run(tracker.run_id)
    model_dir = local_path_of(trained_model_uri(tracker.client, run))
    located = {
        "model": str(trained_model_files(model_dir)[0]),
        **{label: tracker.artifact_location(path) for label, path in RESULT_FILES.items()},
    }
    width = max(map(len, located))
    lines = [
        "",
        f"dataset {dataset}: test accuracy {metrics.get('test/accuracy', float('nan')):.4f}, "
        f"top-5 {metrics.get('test/top5_accuracy', float('nan')):.4f}, "
        f"macro F1 {metrics.get('test/macro_f1', float('nan')):.4f}",
        f"MLflow run {tracker.run_id} ({run.info.run_name}) in {uri}",
        *(
            f"  {label:<{width}}  {path}" for label, path in located.items()
        ),
    ]
    if uri.startswith(("http://", "https://")):
        lines.append(f"see it at  {runs_page_url(tracker.experiment_id, uri)}")
    else:
        lines.append(
            f"see it with  mlflow ui --backend-store-uri {uri}\n"
            f"then open    {runs_page_url(tracker.experiment_id)}"
        )
    return "\n".join(lines)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra task: train once; the return value is what sweeps optimise.

    A data or option error is printed as ``error: ...`` lines and exits with status 1; in a
    sweep's trial it is raised instead, so that the sweeper records it as the trial's error
    (``SystemExit`` would end the whole sweep).
    """
    with exit_on_error(reraise=cfg.get("sweep_trial") is not None):
        metrics = run_training(cfg)
        name = summary_metric_name(cfg.optimized_metric)  # val/accuracy: val/best_accuracy
        if name not in metrics:
            raise ConfigError(f"optimized_metric={name}: not among the metrics {sorted(metrics)}")
    return float(metrics[name])


if __name__ == "__main__":
    from hwexp.cli import run_hydra_command

    run_hydra_command(main)
