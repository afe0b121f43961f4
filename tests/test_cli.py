"""The ``hwexp`` command line: one dispatcher, each command the same as its ``python -m`` form,
errors as one message and exit status 1; and the package as a wheel, outside the checkout."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from mlflow import MlflowClient

from data_config import run_module
from hwexp.cli import COMMANDS, usage

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    assert run_module(Path.cwd(), "hwexp.cli", "--help").returncode == 0
    for name in ("train", "evaluate", "export", "data", "predict", "serve"):
        assert name in COMMANDS
        assert f"  {name} " in usage()


def test_each_command_is_its_python_m_form(tmp_path):
    """``hwexp evaluate`` reaches the evaluate task (once a Hydra parse error): a missing run
    is one error line and exit status 1, as with ``python -m hwexp.evaluate``."""
    args = ["run=0123456789abcdef0123456789abcdef", "tracking.experiment=none"]
    by_cli = run_module(tmp_path, "hwexp.cli", "evaluate", *args)
    by_module = run_module(tmp_path, "hwexp.evaluate", *args)
    for result in (by_cli, by_module):
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert by_cli.stderr.splitlines()[-1] == by_module.stderr.splitlines()[-1]
    assert by_cli.stderr.splitlines()[-1].startswith("error: run ")
    usage_data = run_module(tmp_path, "hwexp.cli", "data")
    assert usage_data.returncode == 2 and "python -m hwexp.data" in usage_data.stderr
    served = run_module(tmp_path, "hwexp.cli", "serve", "--model", str(tmp_path / "none.onnx"))
    assert served.returncode == 1 and "error: " in served.stderr


def test_wheel_trains_outside_the_checkout_with_a_user_config_dir(tmp_path):
    """Build a wheel (from a copy of the sources: setuptools builds in the tree), install it
    into a fresh venv (dependencies: this environment's, through a .pth file), and run a debug
    training from another folder with a user's ``--config-dir`` (about 20 s)."""
    source = tmp_path / "source"
    shutil.copytree(
        REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q"] + ["-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        env=env,
    )
    (wheel,) = wheels.glob("hwexp-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q"]
        + [str(wheel)],
        check=True,
        capture_output=True,
        env=env,
    )
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
            env=env,
        ).strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    user_models = tmp_path / "my_conf" / "model"  # a user's own option of a shipped group
    user_models.mkdir(parents=True)
    (user_models / "small.yaml").write_text(
        "defaults:\n  - vgg_bn\n  - _self_\nwidths: [8, 16]\ndense_units: 16\n"
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    result = subprocess.run(
        [str(env_dir / "bin" / "hwexp"), "train", "debug=default", "model=small"]
        + ["trainer.verbose=0", "--config-dir", str(tmp_path / "my_conf")],
        cwd=work,
        env=env | {"HWEXP_ROOT": str(work)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    located = subprocess.check_output(
        [str(python), "-c", "import hwexp; print(hwexp.CONF_DIR)"], text=True, cwd=work, env=env
    )
    assert Path(located.strip()).is_relative_to(site)
    assert "test accuracy" in result.stdout
    client = MlflowClient(f"sqlite:///{work}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("hwexp-debug").experiment_id])
    assert run.data.params["model.widths"] == "[8, 16]"
