"""The ``hwexp`` command: ``hwexp <command> [arguments]``, each command the same as its
``python -m`` form (``hwexp train ...`` = ``python -m hwexp ...``, ``hwexp evaluate ...`` =
``python -m hwexp.evaluate ...``, ...). Without a command, ``hwexp [overrides]`` trains.
Errors are reported by each command's ``hwexp.errors.exit_on_error``: a message, exit status 1.

Also what every Hydra command shares: ``hydra_overrides`` (non-ASCII values quoted for Hydra's
grammar), ``own_config_groups`` (the groups ``--help`` lists) and shell completion
(``hwexp -sc install=bash``, routed to the command being typed by ``complete``).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from hwexp.errors import ConfigError, exit_on_error


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


# Hydra's grammar takes non-ASCII only inside quotes; characters that make a value a list, a
# dict, a sweep or a function call cannot be quoted as a whole.
_STRUCTURE = frozenset("[]{}(),")
QUOTING_HINT = (
    "Hydra's override grammar takes non-ASCII text only in quotes that reach it: put single "
    "quotes inside double ones, around the value or each element of a list, e.g. "
    "\"dataset.classes='chars:あいう'\" or \"dataset.classes=['あ','い']\" (bash, zsh)"
)


def quote_non_ascii(argument: str) -> str:
    """``key=value`` with ``value`` quoted for Hydra when it holds non-ASCII text and is a plain
    value (``dataset.classes=chars:あいう`` -> ``dataset.classes='chars:あいう'``, as bash
    passes the documented form); any other argument unchanged."""
    key, sep, value = argument.partition("=")
    if (
        argument.startswith("-")
        or not sep
        or value.isascii()
        or value[0] in "'\""
        or value.endswith("\\")
        or _STRUCTURE & set(value)
    ):
        return argument
    for quote in "'\"":
        if quote not in value:
            return f"{key}={quote}{value}{quote}"
    return argument


def hydra_overrides(arguments: list[str]) -> list[str]:
    """A Hydra command's arguments with ``quote_non_ascii`` applied.

    Raises:
        ConfigError: an override with non-ASCII text that Hydra still cannot parse (a list or
            sweep of such values: quote each), with ``QUOTING_HINT``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    quoted = [quote_non_ascii(a) for a in arguments]
    parser = OverridesParser.create()
    for argument in quoted:
        if argument.isascii() or argument.startswith("-"):
            continue
        try:
            parser.parse_overrides([argument])
        except OverrideParseException:
            raise ConfigError(f"{argument}: {QUOTING_HINT}") from None
    return quoted


def run_hydra_command(main: Callable[[], object]) -> None:
    """Run a Hydra task's ``main`` on ``sys.argv`` made ready by ``hydra_overrides`` (what a
    ``python -m`` form's ``if __name__ == "__main__"`` calls)."""
    register_help_resolver()
    with exit_on_error():
        sys.argv[1:] = hydra_overrides(sys.argv[1:])
    main()


def own_config_groups(*, _root_: object) -> str:
    """Hydra help (``${hwexp_config_groups:}`` in ``conf/in_place.yaml``): the config groups
    this command's config uses (its top-level keys that are groups) with their options, one
    line each, as Hydra lists them, but without the other commands' groups."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    groups = set(loader.list_groups(""))
    used = sorted(str(key) for key in _root_ if key != "hydra" and key in groups)  # type: ignore[attr-defined]
    return "\n".join(f"{g}: {', '.join(sorted(loader.get_group_options(g)))}" for g in used)


def register_help_resolver() -> None:
    """Make ``own_config_groups`` available to the Hydra configs (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("hwexp_config_groups"):
        OmegaConf.register_new_resolver("hwexp_config_groups", own_config_groups)


def complete(line: str) -> int:
    """``hwexp -sc query=bash`` (what the script of ``hwexp -sc install=bash`` runs on Tab):
    complete ``line`` (``$COMP_LINE``). The second word completes to a command (or to a
    training override once it has ``=`` or ``.``: ``hwexp [overrides]`` trains); a
    command's arguments complete by that command's Hydra config (``hwexp data <sub>``: the
    data config); serve's and predict's (their own parsers) do not complete."""
    from hwexp.data.__main__ import COMMANDS as DATA_COMMANDS

    words, typing = line.split(), not line.endswith(" ")
    current = len(words) - 1 if typing else len(words)  # index of the word being completed
    if current <= 1 and not (typing and current == 1 and set(words[1]) & set("=.+~")):
        print(" ".join(COMMANDS))
        return 0
    name = words[1] if words[1] in COMMANDS else "train"
    rest = words[2:] if words[1] in COMMANDS else words[1:]
    if COMMANDS[name].takes_argv and name != "data":  # serve, predict: argparse options
        return 0
    if name == "data":
        if current == 2:
            print(" ".join(DATA_COMMANDS))
            return 0
        if rest[0] == "download":
            print("kmnist k49" if current == 3 else "")
            return 0
        subcommand, rest = rest[:1], rest[1:]
    os.environ["COMP_LINE"] = " ".join(["hwexp", *rest]) + ("" if typing else " ")
    argv = ["-sc", "query=bash"]
    if name == "data":
        return int(importlib.import_module(COMMANDS[name].module).main([*subcommand, *argv]) or 0)
    sys.argv = ["hwexp", *argv]
    importlib.import_module(COMMANDS[name].module).main()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``argv``'s command (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"], ["help"]):
        print(usage())
        return 0
    if argv[:2] in (["-sc", "query=bash"], ["--shell-completion", "query=bash"]):
        return complete(os.environ.get("COMP_LINE", "hwexp "))
    name = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    command = COMMANDS[name]
    entry = importlib.import_module(command.module).main
    if command.takes_argv:
        return int(entry(argv) or 0)
    # Hydra names the completion script's command after argv[0]: the hwexp program itself.
    completing = any(a in ("-sc", "--shell-completion") for a in argv)
    sys.argv = ["hwexp" if completing else f"hwexp {name}", *argv]
    run_hydra_command(entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
