"""Exporting a sweep's best trial when the sweep ends (``ExportAfterSweep``).

``ExportAfterSweep`` is a Hydra callback exporting the best trial of a sweep when the sweep ends.
Convention shared with the sweeper: the sweep's MLflow *parent* run carries the tag
``hwexp.sweep_id`` = the absolute path of ``hydra.sweep.dir`` and every trial is a child run of
it; the callback exports the child with the highest ``select.metric`` when that is among its
overrides, else the child the sweeper tagged ``hwexp.best_trial=true`` (direction-aware), else
the child with the highest ``optimized_metric`` of the sweep. ``conf/config.yaml`` wires it;
``export.after_sweep=true`` switches it on and ``export.overrides`` (overrides of
``conf/export.yaml``) shape the export::

    python -m hwexp -m hparams_search=katakana export.after_sweep=true \
        'export.overrides=["formats=[coreml,onnx]"]'
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from hwexp import CONF_DIR
from hwexp.contract import summary_metric_name
from hwexp.export.run import ExportResult, export_run, summary

log = logging.getLogger(__name__)


def sweep_export_config(
    sweep_cfg: DictConfig,
    parent_run_id: str,
    overrides: Sequence[str] = (),
    best_child: str | None = None,
) -> DictConfig:
    """``conf/export.yaml`` with ``overrides`` and the sweep's ``paths`` and ``tracking``,
    exporting among the children of ``parent_run_id``: ``select.metric`` when overridden;
    else ``best_child`` (the trial the sweeper tagged best, which knows the direction) when
    given; else ``run=best`` by the sweep's ``optimized_metric`` (highest)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        cfg = compose("export", overrides=list(overrides))
    else:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose("export", overrides=list(overrides))
    metric_given = any(o.lstrip("+~").startswith("select.metric=") for o in overrides)
    with open_dict(cfg):
        cfg.paths = OmegaConf.to_container(sweep_cfg.paths, resolve=True)
        cfg.tracking = OmegaConf.to_container(sweep_cfg.tracking, resolve=True)
        cfg.run = best_child if best_child and not metric_given else "best"
        cfg.select.parent_run = parent_run_id
        cfg.select.experiment = None  # the parent's experiment
        if not metric_given and sweep_cfg.get("optimized_metric"):
            cfg.select.metric = summary_metric_name(str(sweep_cfg.optimized_metric))
    return cfg


class ExportAfterSweep(Callback):
    """Hydra callback: when a multirun ends, export its best trial (see the module docstring).

    ``overrides``: overrides of ``conf/export.yaml`` (formats, coreml.weights, ...);
    ``enabled``: false makes the callback do nothing (for a config switch).
    """

    def __init__(self, overrides: Sequence[str] = (), enabled: bool = True) -> None:
        self.overrides = [str(o) for o in overrides]
        self.enabled = bool(enabled)
        self.result: ExportResult | None = None

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.enabled:
            log.warning(
                "export.after_sweep applies to sweeps (python -m hwexp -m ...); export this run "
                "with: python -m hwexp.export run=<run id>"
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from hwexp.contract import BEST_TRIAL_TAG
        from hwexp.tracking.runs import client_for, find_sweep_parent, tagged_child

        if not self.enabled:
            return
        if not config.tracking.get("enabled", True):
            log.warning("tracking is disabled: no MLflow runs to export after this sweep")
            return
        client = client_for(config.tracking)
        sweep_id = str(Path(str(config.hydra.sweep.dir)).expanduser().resolve())
        parent = find_sweep_parent(client, sweep_id)
        best = tagged_child(client, parent, BEST_TRIAL_TAG)
        self.result = export_run(sweep_export_config(config, parent, self.overrides, best))
        print(summary(self.result))
