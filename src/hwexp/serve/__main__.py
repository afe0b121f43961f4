"""``python -m hwexp.serve``: the drawing pad for exported models, at http://127.0.0.1:8000/.

Models (each option repeatable, in menu order; ``NAME=`` renames a model in the menu)::

    --model [NAME=]path/to/model.onnx       files as hwexp.export writes them (hwexp.serve.models)
    --registered [NAME=]MODEL[/VERSION|@ALIAS]   MLflow Model Registry (default: highest version)
    --run [NAME=]RUN_ID                     the export/ an exported run holds

With none of them, the highest version of every registered model holding an ONNX file is
served. Registry and runs come from ``--tracking-uri`` (default: ``$MLFLOW_TRACKING_URI``, else
the project's store, ``sqlite:///<$HWEXP_ROOT or .>/mlruns/mlflow.db``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from hwexp.errors import exit_on_error
from hwexp.serve.app import make_server
from hwexp.serve.models import (
    ModelLoadError,
    ServedModel,
    load_all_registered,
    load_onnx,
    load_registered,
    load_run,
    tracking_client,
)

log = logging.getLogger("hwexp.serve")
_NAMED = re.compile(r"([^=/\\]+)=(.+)")  # NAME=REF, NAME without path separators


def _split_name(spec: str) -> tuple[str | None, str]:
    match = _NAMED.fullmatch(spec)
    return (match.group(1), match.group(2)) if match else (None, spec)


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
        metavar="[NAME=]FILE.onnx",
        help="an exported ONNX model with classes.txt and its preprocessing beside it",
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
    add("-v", "--verbose", action="store_true", help="log every request")
    return parser.parse_args(argv)


def load_models(args: argparse.Namespace) -> list[ServedModel]:
    """The models the options name, in order (see the module docstring).

    Raises:
        ModelLoadError: a model cannot be loaded, or none was found.
    """
    models = []
    for spec in args.model:
        name, path = _split_name(spec)
        models.append(load_onnx(path, name, threads=args.threads))
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    for noisy in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with exit_on_error(also=(ValueError, OSError)):  # also: a bad host or port
        models = load_models(args)
        server = make_server(models, args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach it can use the pad", args.host)
    for model in models:
        log.info(
            "model %s: %d classes, %dx%d input, from %s",
            model.name,
            len(model.classes),
            model.size,
            model.size,
            model.source,
        )
    print(f"drawing pad at {server.url}  (Ctrl+C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
