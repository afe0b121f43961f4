"""``python -m hwexp.export`` (= ``hwexp export``): export one run and print what was written."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from hwexp import CONF_DIR
from hwexp.errors import exit_on_error


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra task: export one run (``hwexp.export.run.export_run``) and print a summary."""
    from hwexp.export.run import export_run, summary

    with exit_on_error():
        result = export_run(cfg)
    print(summary(result))


if __name__ == "__main__":
    from hwexp.cli import run_hydra_command

    run_hydra_command(main)
