"""``hwexp predict FILE... [run=best|<id> | registry=NAME[/VERSION|@ALIAS] | model_dir=DIR]
[-k 5] [--json]``: the most probable characters in each picture, with an exported model.

FILE is a picture (PNG, JPEG, BMP, GIF, WebP; either polarity, any size) or a ``.json`` file
holding a drawing as the pad sends it (``{"strokes": [[[x, y], ...], ...], "width": W,
"height": H}``). Each is read as a lone image with the model's own preprocessing by
``hwexp.recognition.Recognizer`` (ONNX Runtime; the drawing pad uses the same object).

The model, one of (default ``run=best``)::

    run=best|<run id>        a training run's ONNX export (exported now if it has none)
    registry=NAME[/VERSION|@ALIAS]   the MLflow Model Registry (default: highest version)
    model_dir=DIR            an export folder (or an .onnx file) as hwexp export writes it

with ``select.experiment=NAME`` and ``select.metric=NAME`` (where ``run=best`` looks;
default ``hwexp``, ``test/accuracy``), ``tracking.uri=URI`` (default ``$MLFLOW_TRACKING_URI``,
else ``<$HWEXP_ROOT or .>/mlruns``) and ``export=false`` (a run without an ONNX export is an
error instead of being exported).

Output: one line per file, ``FILE  あ 0.931  お 0.032 ...`` (most probable first), the model on
stderr; ``--json``: ``{"model": {...}, "k": 5, "predictions": [{"input": FILE, "top": "あ",
"candidates": [{"char": "あ", "probability": 0.931}, ...]}, ...]}``. A file that cannot be
read is an ``error:`` line (in JSON: ``{"input": FILE, "error": "..."}``); the others are
still read, and the exit status is 1.
"""

from __future__ import annotations

import difflib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwexp.contract import TOP_K
from hwexp.errors import ConfigError, InputError, exit_on_error

USAGE = (
    "usage: hwexp predict FILE... [run=best|<run id> | registry=NAME[/VERSION|@ALIAS] | "
    "model_dir=DIR] [-k N] [--json]\n"
    "       [select.experiment=NAME] [select.metric=NAME] [tracking.uri=URI] [export=false]"
)
MODEL_KEYS = ("run", "registry", "model_dir")
KEYS = (*MODEL_KEYS, "select.experiment", "select.metric", "tracking.uri", "export", "k")


@dataclass
class PredictArgs:
    """The parsed command line."""

    files: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    k: int = TOP_K
    as_json: bool = False


def parse_args(argv: Sequence[str]) -> PredictArgs:
    """Files, ``key=value`` options (``KEYS``), ``-k N`` and ``--json``; ``--`` ends options.

    Raises:
        ConfigError: an unknown option or flag, a bad ``k``, two models, or no file.
    """
    args = PredictArgs()
    tokens = list(argv)
    only_files = False
    while tokens:
        token = tokens.pop(0)
        if only_files:
            args.files.append(token)
        elif token == "--":
            only_files = True
        elif token == "--json":
            args.as_json = True
        elif token in ("-k", "--k"):
            if not tokens:
                raise ConfigError(f"{token} needs a number: {token} 5")
            args.options["k"] = tokens.pop(0)
        elif token.startswith("-") and not Path(token).exists():
            raise ConfigError(f"unknown flag {token!r}\n{USAGE}")
        elif "=" in token and not Path(token).exists():
            key, value = token.split("=", 1)
            if key not in KEYS:
                close = difflib.get_close_matches(key, KEYS, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"{token}: unknown option{hint}; known: {', '.join(KEYS)}")
            args.options[key] = value
        else:
            args.files.append(token)
    if "k" in args.options:
        value = args.options.pop("k")
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"k={value}: a whole number >= 1 (how many characters per file)")
        args.k = int(value)
    chosen = [key for key in MODEL_KEYS if key in args.options]
    if len(chosen) > 1:
        raise ConfigError(f"give one model: {' or '.join(chosen)}, not both")
    if not args.files:
        raise ConfigError(f"no image file given\n{USAGE}")
    return args


def load_recognizer(options: dict[str, str]) -> Any:
    """The ``Recognizer`` the options name (``run=best`` by default).

    Raises:
        ModelLoadError, RunNotFound: as ``Recognizer.from_*`` say.
        ConfigError: ``export=`` is not true or false.
    """
    from hwexp.recognition import Recognizer

    uri = options.get("tracking.uri") or None
    if "model_dir" in options:
        return Recognizer.from_files(options["model_dir"])
    if "registry" in options:
        return Recognizer.from_registry(options["registry"], tracking_uri=uri)
    export = options.get("export", "true").lower()
    if export not in ("true", "false"):
        raise ConfigError(f"export={options['export']}: true or false")
    return Recognizer.from_run(
        options.get("run", "best"),
        experiment=options.get("select.experiment") or None,
        metric=options.get("select.metric") or "test/accuracy",
        tracking_uri=uri,
        export=export == "true",
    )


def _input_of(path: str) -> Any:
    """What ``Recognizer.predict`` reads for ``path``: the drawing in a ``.json`` file, else
    the path (a picture)."""
    if Path(path).suffix.lower() != ".json":
        return path
    from hwexp.recognition import Strokes

    try:
        payload = json.loads(Path(path).read_text("utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a JSON drawing: {error}") from None
    if not isinstance(payload, dict):
        raise InputError(f"{path}: a drawing is a JSON object with strokes, width and height")
    try:
        return Strokes.from_json(payload)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None


def predict_files(recognizer: Any, files: Sequence[str], k: int) -> list[dict[str, Any]]:
    """One entry per file: ``{"input", "top", "candidates"}`` or ``{"input", "error"}``."""
    import numpy as np

    prepared: dict[int, np.ndarray] = {}
    entries: list[dict[str, Any]] = [{"input": path} for path in files]
    for index, path in enumerate(files):
        try:
            prepared[index] = recognizer.prepare([_input_of(path)], labelled=False)[0]
        except InputError as error:
            message = str(error)
            entries[index]["error"] = message if message.startswith(path) else f"{path}: {message}"
    if prepared:
        predictions = recognizer.predict(list(prepared.values()), k, preprocessed=True)
        for index, prediction in zip(prepared, predictions, strict=True):
            entries[index].update(prediction.as_json())
    return entries


def _describe_model(describe: dict[str, Any]) -> str:
    known = [
        f"{label} {describe[key]}"
        for label, key in (("class set", "class_set"), ("run", "run_id"), ("version", "version"))
        if describe.get(key)
    ]
    return (
        f"model {describe['name']}: {describe['classes']} classes"
        + "".join(f", {item}" for item in known)
        + f" (from {describe['source']})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (1 when a file could not be read)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[: argv.index("--")] if "--" in argv else argv
    if any(token in ("-h", "--help") for token in flags):
        print(USAGE)
        print(__doc__.split("\n\n", 1)[1].rstrip())
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for noisy in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with exit_on_error():
        args = parse_args(argv)
        recognizer = load_recognizer(args.options)
    entries = predict_files(recognizer, args.files, args.k)
    if args.as_json:
        answer = {"model": recognizer.describe(), "k": args.k, "predictions": entries}
        print(json.dumps(answer, ensure_ascii=False, indent=2))
    else:
        print(_describe_model(recognizer.describe()), file=sys.stderr)
        width = max(len(entry["input"]) for entry in entries)
        for entry in entries:
            if "error" not in entry:
                guesses = "  ".join(
                    f"{c['char']} {c['probability']:.3f}" for c in entry["candidates"]
                )
                print(f"{entry['input']:<{width}}  {guesses}")
    failed = [entry["error"] for entry in entries if "error" in entry]
    for message in failed:
        print(f"error: {message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
