"""The ``hwexp`` console command: ``hwexp data …`` runs the data tools, ``hwexp train …`` (or
just ``hwexp …``) the main job; both take the same Hydra overrides as ``python -m``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch on the first argument; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "data":
        from hwexp.data.__main__ import main as data_main

        return data_main(argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    from hwexp.__main__ import main as train_main

    sys.argv = [sys.argv[0], *argv]
    train_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
