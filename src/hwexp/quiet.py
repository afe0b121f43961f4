"""Keeping library chatter off the console, and real warnings on it.

TensorFlow (2.19 and later) writes its C++ start-up messages through absl before its log level
applies, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them, and converters (coremltools, the TFLite
converter, ONNX) print progress bars and notes of their own. What hwexp does about it:

* ``quiet_tensorflow_import``: the first ``import tensorflow`` (whoever asks for it: Keras, the
  exporters) and CUDA's start-up run with file descriptor 2 captured; afterwards every captured
  line is written back except ``is_noise`` ones (absl's pre-init notice, INFO lines, GPU-plugin
  linkage notes, and ``failed call to cuInit`` on a machine without an NVIDIA driver).
* ``captured_output``: a block's output on file descriptors 1 and 2 (C++ included) goes to a
  temporary file, for a caller to drop or show (``export`` shows it when a conversion fails).

``TF_CPP_MIN_LOG_LEVEL=0`` (everything, as TensorFlow means it) turns the filter off.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

# An absl log line after its level letter (I, W, E, F): date, time, thread id, file:line.
_ABSL = r"\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] "
_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rf"|I{_ABSL}"  # INFO
    rf"|[EW]{_ABSL}(?:Unable to register cu\w+ factory|computation placer already registered)"
)
_CUINIT = re.compile(rf"E{_ABSL}.*failed call to cuInit")


def has_nvidia_driver() -> bool:
    """Whether an NVIDIA kernel driver is loaded (Linux), i.e. CUDA is expected to work."""
    return Path("/proc/driver/nvidia").exists()


def is_noise(line: str) -> bool:
    """Whether ``line`` is start-up chatter no user needs: see the module docstring. A failed
    ``cuInit`` is noise only where no NVIDIA driver is loaded (elsewhere it is a real fault)."""
    if _NOISE.match(line):
        return True
    return bool(_CUINIT.match(line)) and not has_nvidia_driver()


@dataclass
class Captured:
    """What ``captured_output`` caught (set when its block ends)."""

    text: str = ""

    def lines(self) -> list[str]:
        return self.text.splitlines()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()


@contextlib.contextmanager
def captured_output(
    fds: tuple[int, ...] = (1, 2), keep_logger: str | None = None
) -> Iterator[Captured]:
    """Within the block, what is written to ``fds`` (by C/C++ code, or by Python through
    ``sys.stdout``/``sys.stderr``, whatever those are) goes to a temporary file instead; its
    text is in the yielded ``Captured`` once the block ends.
    ``keep_logger``: that logger's warnings (e.g. ``hwexp``'s own) still reach the real
    stderr, as ``warning: <message>`` lines, and only there."""
    captured = Captured()
    _flush()
    with tempfile.TemporaryFile() as sink, contextlib.ExitStack() as stack:
        if keep_logger is not None:
            stack.enter_context(_warnings_to_stderr(logging.getLogger(keep_logger)))
        saved = [os.dup(fd) for fd in fds]
        # Python's streams may not write to the descriptors (pytest replaces them): redirect.
        text = stack.enter_context(
            open(os.dup(sink.fileno()), "w", encoding="utf-8", errors="replace", buffering=1)
        )
        if 1 in fds:
            stack.enter_context(contextlib.redirect_stdout(text))
        if 2 in fds:
            stack.enter_context(contextlib.redirect_stderr(text))
        try:
            for fd in fds:
                os.dup2(sink.fileno(), fd)
            yield captured
        finally:
            _flush()
            text.flush()
            for fd, copy in zip(fds, saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", "replace")


@contextlib.contextmanager
def _warnings_to_stderr(logger: logging.Logger) -> Iterator[None]:
    """``logger``'s warnings go to (a copy of) the current stderr file descriptor only."""
    stream = os.fdopen(os.dup(2), "w", encoding="utf-8", errors="replace", buffering=1)
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        stream.close()


def replay(captured: Captured, stream: TextIO | None = None) -> None:
    """Write ``captured``'s lines that are not ``is_noise`` to ``stream`` (default stderr)."""
    kept = [line for line in captured.lines() if line.strip() and not is_noise(line)]
    if kept:
        stream = stream or sys.stderr
        stream.write("\n".join(kept) + "\n")
        stream.flush()


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of ``tensorflow`` with its start-up output filtered."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # as if never wrapped
        captured = Captured()
        try:
            with captured_output((2,)) as captured:
                self.loader.exec_module(module)
                # CUDA starts (and on a CPU machine fails: cuInit) on the first device query.
                with contextlib.suppress(Exception):
                    module.config.list_physical_devices()
        finally:
            replay(captured)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as usual, once, and gives it a ``_QuietLoader``."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_tensorflow_import() -> None:
    """Filter the output of the first ``import tensorflow`` of this process (see the module
    docstring); does nothing once TensorFlow is imported, or with ``TF_CPP_MIN_LOG_LEVEL=0``."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    if not any(isinstance(finder, _QuietTensorFlowFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())
