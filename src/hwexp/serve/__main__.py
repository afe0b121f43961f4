"""``python -m hwexp.serve``: the drawing pad for exported models, at http://127.0.0.1:8000/.

Models (each option repeatable, in menu order; ``NAME=`` renames a model in the menu)::

    --model [NAME=]path/to/model.onnx|DIR   files as hwexp export writes them (hwexp.recognition)
    --registered [NAME=]MODEL[/VERSION|@ALIAS]   MLflow Model Registry (default: highest version)
    --run [NAME=]RUN_ID|best                the ONNX export an exported run holds

With none of them, the highest version of every registered model holding an ONNX file is
served. Registry and runs come from ``--tracking-uri`` (default: ``$MLFLOW_TRACKING_URI``, else
the project's store, ``sqlite:///<$HWEXP_ROOT or .>/mlruns/mlflow.db``). At start the served
models are listed with what they read (class set, number of classes, data source, registry
version, run id); ``--list`` lists every registered model that way and exits. Each model is a
``hwexp.recognition.Recognizer``, the object ``hwexp predict`` and Python code use.

``--workers N`` serves from N processes sharing the port (hwexp.serve.workers), each with its
own copy of the models: one process uses about one CPU core, so under concurrent load N = the
number of cores answers about N times as many requests. SIGTERM stops the server like Ctrl+C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import logging
import os
import re
import signal
from collections.abc import Iterator, Sequence
from typing import Any

from hwexp.errors import ModelLoadError, exit_on_error
from hwexp.recognition import Recognizer
from hwexp.recognition.loading import (
    load_all_registered,
    load_files,
    load_registered,
    load_run,
    registered_models,
    tracking_client,
)
from hwexp.serve.app import listen, make_server
from hwexp.serve.workers import WorkerPool

log = logging.getLogger("hwexp.serve")
_NAMED = re.compile(r"([^=/\\]+)=(.+)")  # NAME=REF, NAME without path separators


def _split_name(spec: str) -> tuple[str | None, str]:
    match = _NAMED.fullmatch(spec)
    return (match.group(1), match.group(2)) if match else (None, spec)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hwexp.serve",
        description="Drawing pad: try exported hwexp models by hand in the browser.",
    )
    add = parser.add_argument
    add(
        "--model",
        action="append",
        default=[],
        metavar="[NAME=]FILE.onnx|DIR",
        help="an exported ONNX model with classes.txt and its preprocessing beside it, or the "
        "export folder holding them",
    )
    add(
        "--registered",
        action="append",
        default=[],
        metavar="[NAME=]MODEL[/VERSION|@ALIAS]",
        help="a model of the MLflow Model Registry",
    )
    add(
        "--run",
        action="append",
        default=[],
        metavar="[NAME=]RUN_ID",
        help="the ONNX export logged to an MLflow run",
    )
    add(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the project's mlruns)",
    )
    add(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; anything else exposes the pad, unauthenticated)",
    )
    add("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    add("--threads", type=int, default=1, help="ONNX Runtime threads per request (default 1)")
    add(
        "--workers",
        type=_at_least_one,
        default=1,
        help="server processes sharing the port, each with its own copy of the models (default "
        "1; one per CPU core serves the most requests)",
    )
    add(
        "--list",
        action="store_true",
        help="list every registered model (what it reads, versions, run) and exit",
    )
    add("-v", "--verbose", action="store_true", help="log every request")
    return parser.parse_args(argv)


def load_models(args: argparse.Namespace) -> list[Recognizer]:
    """The models the options name, in order (see the module docstring).

    Raises:
        ModelLoadError: a model cannot be loaded, or none was found.
    """
    models = []
    for spec in args.model:
        name, path = _split_name(spec)
        models.append(load_files(path, name, threads=args.threads))
    client: Any = None
    if args.registered or args.run or not models:
        client = tracking_client(args.tracking_uri)
    for spec in args.registered:
        name, ref = _split_name(spec)
        models.append(load_registered(client, ref, name, args.threads))
    for spec in args.run:
        name, run_id = _split_name(spec)
        models.append(load_run(client, run_id, name, args.threads))
    if not models:
        models = load_all_registered(client, args.threads)
        if not models:
            raise ModelLoadError(
                f"no registered model with an ONNX export in {client.tracking_uri}: export one "
                "(python -m hwexp.export formats=[onnx]) or pass --model FILE.onnx"
            )
    return models


# Columns of the model lists: (heading, key of Recognizer.describe / RegisteredModel row).
_COLUMNS = (
    ("name", "name"),
    ("class set", "class_set"),
    ("classes", "classes"),
    ("data source", "data_source"),
    ("version", "version"),
    ("run id", "run_id"),
    ("from", "source"),
)


def model_table(rows: Sequence[dict[str, Any]]) -> str:
    """``rows`` (``Recognizer.describe()``-like) as an aligned table, ``-`` where unknown."""
    cells = [[heading for heading, _ in _COLUMNS]]
    cells += [[_cell(row.get(key)) for _, key in _COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def list_registered(client: Any) -> str:
    """Every registered model (its highest version) as ``--list`` prints it."""
    listed = registered_models(client)
    if not listed:
        return (
            f"no registered model in {client.tracking_uri}: export one "
            "(hwexp export run=best formats=[onnx])"
        )
    rows = []
    for model in listed:
        row = {**dataclasses.asdict(model.info), "source": model.info.origin}
        row.update(name=model.name, classes=model.classes)
        if len(model.versions) > 1:
            row["version"] = f"{model.info.version} (of {len(model.versions)})"
        rows.append(row)
    return f"registered models in {client.tracking_uri}:\n{model_table(rows)}"


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    for noisy in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def worker_models(args: argparse.Namespace) -> list[Recognizer]:
    """What a worker process (hwexp.serve.workers) serves: its own logging, its own models."""
    _configure_logging(args.verbose)
    return load_models(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _configure_logging(args.verbose)
    if args.list:
        with exit_on_error():
            print(list_registered(tracking_client(args.tracking_uri)))
        return 0
    with _sigterm_interrupts(), contextlib.suppress(KeyboardInterrupt):
        if args.workers == 1:
            _serve_here(args)
        else:
            _serve_in_workers(args)
    return 0


def _serve_here(args: argparse.Namespace) -> None:
    with exit_on_error(also=(ValueError, OSError)):  # also: a bad host or port
        models = load_models(args)
        server = make_server(models, args.host, args.port)
    _announce(args, [m.describe() for m in models], server.server_address)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def _serve_in_workers(args: argparse.Namespace) -> None:
    with exit_on_error(also=(ValueError, OSError)):
        listener = listen(args.host, args.port)
    # Under python -m this file is __main__, a module that spawned processes do not import:
    # they find the loader under the module's own name.
    here = importlib.import_module("hwexp.serve.__main__")
    pool = WorkerPool(args.workers, listener, functools.partial(here.worker_models, args))
    try:
        with exit_on_error(also=(ValueError, OSError)):  # a worker that cannot load a model
            _announce(args, pool.start(), listener.getsockname())
            with contextlib.suppress(KeyboardInterrupt):  # how a server is stopped: status 0
                pool.supervise()
    finally:
        pool.stop()
        listener.close()


def _announce(args: argparse.Namespace, models: list[dict[str, Any]], address: Any) -> None:
    """List the models (``Recognizer.describe()`` of each) and print the pad's URL."""
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach it can use the pad", args.host)
    print(f"serving {len(models)} model(s):", model_table(models), sep="\n")
    processes = f", {args.workers} server processes" if args.workers > 1 else ""
    host, port = address[:2]
    print(f"drawing pad at http://{host}:{port}/  (Ctrl+C stops it{processes})", flush=True)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops the server as Ctrl+C does (KeyboardInterrupt), so that workers are
    stopped and sockets closed; the previous handler is restored afterwards."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
