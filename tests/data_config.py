"""Compose the data layer's Hydra config the way ``python -m hwexp.data`` does."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from hwexp import CONF_DIR


def data_config(root: Path, *overrides: str, config_name: str = "data") -> DictConfig:
    """The composed config with every path under ``root`` (raw files in ``root/raw``)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name,
            overrides=[
                f"paths.root_dir={root}",
                f"paths.data_dir={root}/raw",
                "workers=1",
                *overrides,
            ],
        )
