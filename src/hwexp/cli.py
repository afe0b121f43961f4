"""The ``hwexp`` command: ``hwexp <command> [arguments]``, each command the same as its
``python -m`` form (``hwexp train ...`` = ``python -m hwexp ...``, ``hwexp evaluate ...`` =
``python -m hwexp.evaluate ...``, ...). Without a command, ``hwexp [overrides]`` trains.
Errors are reported by each command's ``hwexp.errors.exit_on_error``: a message, exit status 1.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A subcommand: the module whose ``main`` runs it, and one line of help."""

    module: str
    help: str
    takes_argv: bool = False  # main(argv) (argparse-style); else a Hydra task reading sys.argv


COMMANDS: dict[str, Command] = {
    "train": Command("hwexp.__main__", "prepare the data, train, evaluate, log to MLflow"),
    "evaluate": Command("hwexp.evaluate", "measure a trained run on any dataset (run=best|<id>)"),
    "export": Command("hwexp.export.__main__", "export a run to Core ML, TFLite and ONNX"),
    "data": Command("hwexp.data.__main__", "prepare|show|stats|verify|download data", True),
    "predict": Command(
        "hwexp.predict", "read the characters in image files (run=best|registry=NAME)", True
    ),
    "serve": Command("hwexp.serve.__main__", "the drawing pad: serve exported models", True),
}


def usage() -> str:
    """``hwexp --help``: the commands, one line each."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: hwexp <command> [arguments]   (arguments: Hydra overrides, or see <command> "
        "--help)",
        "",
        "commands:",
        *(f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()),
        "",
        "Without a command, hwexp [overrides] trains (= hwexp train). Each command is the same "
        "as python -m <module>.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``argv``'s command (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"], ["help"]):
        print(usage())
        return 0
    name = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    command = COMMANDS[name]
    entry = importlib.import_module(command.module).main
    if command.takes_argv:
        return int(entry(argv) or 0)
    sys.argv = [f"hwexp {name}", *argv]
    entry()
    return 0


if __name__ == "__main__":
    sys.exit(main())
