"""Compose the data layer's Hydra config the way ``python -m hwexp.data`` does."""

import os
import subprocess
import sys
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


def run_module(
    root: Path, module: str, *args: str, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in ``root`` with ``HWEXP_ROOT=root`` (plus ``env``)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=os.environ | {"HWEXP_ROOT": str(root)} | (env or {}),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# What the option check prints for the typo ``+dataset.limt_classes=5`` (tests of bad options).
TYPO_ERROR = (
    "error: dataset.limt_classes=5: unknown option (did you mean limit_classes?); known: "
    "classes, limit_classes, name, path, source, weights, writer_from_name"
)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The ``error:`` lines a command printed, after checking it failed with exit 1 and no
    traceback."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]
