"""The ``hwexp`` command line: one dispatcher, each command the same as its ``python -m`` form,
errors as one message and exit status 1; and the package as a wheel, outside the checkout."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from mlflow import MlflowClient

from data_config import error_lines, run_module
from hwexp.cli import COMMANDS, QUOTING_HINT, hydra_overrides, quote_non_ascii, usage

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


def test_data_help_lists_its_subcommands_and_options(tmp_path):
    result = run_module(tmp_path, "hwexp.cli", "data", "--help")
    assert result.returncode == 0, result.stderr
    for subcommand in ("prepare", "show", "stats", "download", "verify"):
        assert re.search(rf"^  {subcommand} ", result.stdout, re.M), subcommand
    assert "show.per_class" in result.stdout and "verify.remove=true" in result.stdout


# Prints the help of `hwexp <command>` and whether TensorFlow was imported meanwhile.
HELP_AND_IMPORTS = """
import sys
from hwexp.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("tensorflow imported:", "tensorflow" in sys.modules)
"""


@pytest.mark.parametrize(
    "command, groups", [("evaluate", {"dataset", "split", "tracking"}), ("export", {"tracking"})]
)
def test_evaluate_and_export_help_list_their_own_groups_without_loading_tensorflow(
    tmp_path, command, groups
):
    result = subprocess.run(
        [sys.executable, "-c", HELP_AND_IMPORTS, command, "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"hwexp {command} ")
    listed = set(re.findall(r"^(\w+): ", result.stdout.split("== Config ==")[0], re.M))
    assert groups <= listed
    assert not {"model", "augment", "callbacks", "trainer", "hparams_search"} & listed, listed
    assert result.stdout.strip().endswith("tensorflow imported: False")


def test_unquoted_non_ascii_values_reach_hydra_quoted_or_fail_with_a_quoting_hint(tmp_path):
    """What bash passes for the README's ``dataset.classes='chars:あいう'`` works; a list of
    non-ASCII values that cannot be quoted as a whole is one error line saying how to quote."""
    assert hydra_overrides(["dataset.classes=chars:あいう", "+x=あ's", "seed=1"]) == [
        "dataset.classes='chars:あいう'",
        '+x="あ\'s"',
        "seed=1",
    ]
    assert quote_non_ascii("dataset.path=~/データ") == "dataset.path='~/データ'"
    stats = run_module(
        tmp_path,
        "hwexp.cli",
        "data",
        "stats",
        "dataset.classes=chars:あいう",
        "synthetic.writers=12",
        "workers=1",
    )
    assert stats.returncode == 0, stats.stderr
    assert "3 classes" in stats.stdout
    listed = run_module(tmp_path, "hwexp", "dataset.classes=[あ,い]")
    assert error_lines(listed) == [f"error: dataset.classes=[あ,い]: {QUOTING_HINT}"]
    assert "LexerNoViableAltException" not in listed.stderr


def test_tab_completion_in_bash_completes_commands_and_each_commands_options(tmp_path):
    """``eval "$(hwexp -sc install=bash)"`` as the README says, then Tab pressed on a few
    command lines (bash's completion variables set as bash sets them)."""
    hwexp = shutil.which("hwexp", path=Path(sys.executable).parent)
    assert hwexp, "the hwexp command is not installed beside this Python (pip install -e .)"
    script = """
eval "$(hwexp -sc install=bash)"
tab() {
    COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; read -ra COMP_WORDS <<< "$COMP_LINE"
    COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); COMPREPLY=()
    hydra_bash_completion; echo "$1 -> ${COMPREPLY[*]}"
}
tab "hwexp ev"
tab "hwexp evaluate pa"
tab "hwexp train dataset=ka"
tab "hwexp dataset=hi"
tab "hwexp data pre"
tab "hwexp data prepare dataset=kan"
tab "hwexp export regi"
"""
    env = os.environ | {"PATH": f"{Path(hwexp).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    completed = dict(line.split(" -> ") for line in done.stdout.splitlines())
    assert completed == {
        "hwexp ev": "evaluate",
        "hwexp evaluate pa": "part= paths. paths=",
        "hwexp train dataset=ka": "dataset=kanji dataset=kanji3036 dataset=katakana",
        "hwexp dataset=hi": "dataset=hiragana",
        "hwexp data pre": "prepare",
        "hwexp data prepare dataset=kan": "dataset=kanji dataset=kanji3036",
        "hwexp export regi": "register= register_name=",
    }
