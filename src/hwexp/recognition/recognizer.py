"""``Recognizer``: an exported model that reads characters from pictures and drawings, with
its own training preprocessing, on ONNX Runtime (no TensorFlow).

The drawing pad (``hwexp serve``), ``hwexp predict`` and Python code all use this one class,
so they cannot disagree. Loading (files, Model Registry, runs) is in
``hwexp.recognition.loading``; what inputs it reads is in ``hwexp.recognition.inputs``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, overload

import numpy as np
from PIL import Image

from hwexp.contract import INPUT_NAME, OUTPUT_NAME, TOP_K
from hwexp.data.preprocess import PreprocessOptions, normalise_characters
from hwexp.errors import InputError
from hwexp.recognition.inputs import STROKE_WIDTH, Strokes, raster_of

BATCH = 256  # model inputs per ONNX Runtime call


@dataclass(frozen=True)
class Prediction:
    """The ``k`` most probable characters of one input, most probable first, with their
    probabilities (of all the model's classes, so they sum to at most 1), and the model input
    they were read from: ``(S, S)`` uint8, ink 255 on 0."""

    characters: tuple[str, ...]
    probabilities: tuple[float, ...]
    model_input: np.ndarray = field(repr=False, compare=False)

    @property
    def top(self) -> str:
        """The most probable character."""
        return self.characters[0]

    @property
    def candidates(self) -> list[tuple[str, float]]:
        """``(character, probability)`` pairs, most probable first."""
        return list(zip(self.characters, self.probabilities, strict=True))

    def as_json(self) -> dict[str, Any]:
        """``{"top": "あ", "candidates": [{"char": "あ", "probability": 0.93}, ...]}`` (the
        pad's answer and ``hwexp predict --json`` use this shape)."""
        return {
            "top": self.top,
            "candidates": [{"char": c, "probability": round(p, 6)} for c, p in self.candidates],
        }


@dataclass(frozen=True)
class ModelInfo:
    """What a model reads and where it comes from (from the exporter's ONNX metadata and the
    Model Registry); None where unknown."""

    origin: str = ""  # the file, models:/<name>/<version> or runs:/<id>/export it was loaded from
    run_id: str | None = None  # the training run
    dataset: str | None = None  # the run's dataset config (synthetic, hiragana, folder, ...)
    class_set: str | None = None  # hiragana75, kanji881, chars:あいう, ...
    data_source: str | None = None  # where its training images came from (synthetic, etl8g, ...)
    version: str | None = None  # the Model Registry version
    test_accuracy: float | None = None


# Inputs ``predict`` takes one at a time; anything else iterable is a batch of them.
_SINGLE = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, Strokes, Mapping)
Input = Any  # str | os.PathLike | bytes | PIL.Image.Image | np.ndarray | Strokes | Mapping


@dataclass(frozen=True)
class Recognizer:
    """An ONNX character classifier with its classes (output order) and its training
    preprocessing options; thread-safe.

    Load one with :meth:`from_files` (an export folder or ``.onnx`` file), :meth:`from_registry`
    (the MLflow Model Registry) or :meth:`from_run` (a training run's ONNX export); read
    characters with :meth:`predict`.
    """

    name: str
    classes: tuple[str, ...]
    options: PreprocessOptions
    session: Any = field(repr=False)  # onnxruntime.InferenceSession (its run is thread-safe)
    input_dtype: type = np.uint8
    info: ModelInfo = ModelInfo()

    # ----------------------------------------------------------------------- loading

    @classmethod
    def from_files(
        cls, path: str | os.PathLike, name: str | None = None, threads: int | None = None
    ) -> Recognizer:
        """Load an export folder (``hwexp export``'s ``outputs/exports/<run id>/``: one
        ``.onnx`` file, ``classes.txt``, the preprocessing) or an ``.onnx`` file with those
        beside it. ``threads``: ONNX Runtime's intra-op threads (None: its default).

        Raises:
            ModelLoadError: missing or inconsistent files, or not an hwexp model.
        """
        from hwexp.recognition.loading import load_files

        return load_files(path, name, threads=threads)

    @classmethod
    def from_registry(
        cls,
        name: str,
        version: int | str | None = None,
        *,
        tracking_uri: str | None = None,
        threads: int | None = None,
    ) -> Recognizer:
        """Load registered model ``name`` from the MLflow Model Registry: ``version`` None or
        ``"latest"`` (the highest), a number, or an alias (``"prod"``); ``name`` may also say
        ``NAME/VERSION`` or ``NAME@ALIAS``. ``tracking_uri``: default ``$MLFLOW_TRACKING_URI``,
        else the project's store (``<$HWEXP_ROOT or .>/mlruns/mlflow.db``).

        Raises:
            ModelLoadError: no such model (the message lists the registered names) or version,
                or the version holds no ONNX file.
        """
        from hwexp.recognition.loading import load_registered, tracking_client

        client = tracking_client(tracking_uri)
        return load_registered(client, name, version=version, threads=threads)

    @classmethod
    def from_run(
        cls,
        run: str = "best",
        *,
        experiment: str | None = None,
        metric: str = "test/accuracy",
        tracking_uri: str | None = None,
        export: bool = True,
        threads: int | None = None,
    ) -> Recognizer:
        """Load the ONNX export of a training run: a run id, or ``"best"`` (the finished run
        with a model and the highest ``metric`` in ``experiment``, default ``hwexp``).

        The export is the one ``hwexp export`` logged to the run (``export/``), else the one
        in ``<$HWEXP_ROOT or .>/outputs/exports/<run id>/``. A run with neither is exported now
        when ``export`` is true: ``hwexp export run=<id> formats=[onnx] register=false`` in a
        subprocess (it needs TensorFlow, once: the verified export is logged to the run, and
        later loads use it); otherwise the error says that command.

        Raises:
            RunNotFound: no such run, or no finished run to call best.
            ModelLoadError: the run has no ONNX export (and ``export`` is false), or exporting
                it failed (the message holds the exporter's error).
        """
        from hwexp.recognition.loading import load_run, tracking_client

        client = tracking_client(tracking_uri)
        return load_run(
            client, run, experiment=experiment, metric=metric, export=export, threads=threads
        )

    # ----------------------------------------------------------------------- reading

    @property
    def size(self) -> int:
        """The side of the model's square input, in pixels."""
        return self.options.size

    @cached_property
    def stroke_options(self) -> PreprocessOptions:
        """The options for rendered strokes: the model's own, with the ink level taken as the
        raster's maximum (``ink_percentile=100``). Rendered ink is full (255) on 0, so for a
        drawing with ink on more than 0.5 % of the raster this changes nothing; for a dot or a
        short stroke the scans' 99.5th percentile would be background, and the drawing blank."""
        return dataclasses.replace(self.lone_options, ink_percentile=100.0)

    @cached_property
    def lone_options(self) -> PreprocessOptions:
        """The model's options for inputs read one by one: each input is a lone image, whose
        size reference is ``reference_fill`` of its side (``size_reference="cell"``; for one
        image the writer reference comes to the same), so a batch prepares as its inputs would
        one at a time."""
        return dataclasses.replace(self.options, size_reference="cell")

    @overload
    def predict(
        self, inputs: Sequence[Input], k: int = ..., *, preprocessed: bool = ...
    ) -> list[Prediction]: ...

    @overload
    def predict(self, inputs: Input, k: int = ..., *, preprocessed: bool = ...) -> Prediction: ...

    def predict(
        self, inputs: Any, k: int = TOP_K, *, preprocessed: bool = False
    ) -> Prediction | list[Prediction]:
        """The ``k`` most probable characters of each input (fewer when the model knows fewer).

        An input is an image file's path, encoded image bytes, a PIL image, a numpy array
        ``(h, w)`` or ``(h, w, 1|3|4)`` (any size, either polarity), or a drawing
        (:class:`Strokes`, or the pad's ``{"strokes", "width", "height"}`` object). One input
        gives one :class:`Prediction`; a list (or an ``(n, h, w)`` / ``(n, h, w, 1)`` array)
        gives a list. Each input is prepared as a lone image with the model's own
        preprocessing (``hwexp.data.preprocess``); ``preprocessed=True`` takes arrays that are
        model inputs already (``(S, S)`` uint8, ink 255 on 0, as ``hwexp data prepare`` writes
        them) and feeds them as they are.

        Raises:
            InputError: an input cannot be read or has no ink; a batch's message names the
                input (its path, or ``input <i>``).
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k={k!r}: the number of characters to return must be >= 1")
        single, items = _as_batch(inputs)
        if preprocessed:
            prepared = self._check_prepared(items)
        else:
            prepared = self.prepare(items, labelled=not single)
        probabilities = self.probabilities(prepared)
        best = np.argsort(-probabilities, axis=1, kind="stable")[:, : min(k, len(self.classes))]
        predictions = [
            Prediction(
                tuple(self.classes[i] for i in order),
                tuple(float(p) for p in row[order]),
                image,
            )
            for order, row, image in zip(best, probabilities, prepared, strict=True)
        ]
        return predictions[0] if single else predictions

    def prepare(self, items: Sequence[Input], labelled: bool = True) -> np.ndarray:
        """``(n, S, S)`` uint8 model inputs of ``items`` (see :meth:`predict`), each prepared
        as a lone image with the model's options.

        Raises:
            InputError: an input cannot be read or has no ink; with ``labelled`` the message
                starts with the input's path or ``input <i>``.
        """
        rasters = []
        for index, item in enumerate(items):
            try:
                rasters.append(raster_of(item))
            except InputError as error:
                raise _labelled(error, item, index, labelled) from None
        out = np.empty((len(rasters), self.size, self.size), np.uint8)
        groups: dict[tuple[tuple[int, ...], bool], list[int]] = {}
        for index, raster in enumerate(rasters):
            groups.setdefault((raster.pixels.shape, raster.drawn), []).append(index)
        for (_, drawn), members in groups.items():
            stack = np.stack([rasters[i].pixels for i in members])
            out[members] = self._normalise(stack, drawn)
        for index, (item, raster) in enumerate(zip(items, rasters, strict=True)):
            if not out[index].any():
                blank = (
                    "the drawing has no ink on the canvas"
                    if raster.drawn
                    else ("the image has no ink left after clean-up")
                )
                error = InputError(f"empty drawing: {blank}", 422)
                raise _labelled(error, item, index, labelled)
        return out

    def _normalise(self, stack: np.ndarray, drawn: bool) -> np.ndarray:
        options = self.stroke_options if drawn else self.lone_options
        return normalise_characters(stack, ink="high", options=options)

    def _check_prepared(self, items: Sequence[Input]) -> np.ndarray:
        arrays = [np.asarray(item) for item in items]
        for index, array in enumerate(arrays):
            if array.shape not in ((self.size, self.size), (self.size, self.size, 1)) or (
                array.dtype != np.uint8
            ):
                raise InputError(
                    f"input {index}: a preprocessed input is a ({self.size}, {self.size}) uint8 "
                    f"array (ink 255 on 0), not {array.shape} {array.dtype}"
                )
        shape = (len(arrays), self.size, self.size)
        return np.stack(arrays).reshape(shape) if arrays else np.empty(shape, np.uint8)

    def probabilities(self, prepared: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, classes)`` float32 of ``(n, S, S)`` uint8 model inputs."""
        prepared = np.asarray(prepared)
        out = np.empty((len(prepared), len(self.classes)), np.float32)
        for start in range(0, len(prepared), BATCH):
            batch = prepared[start : start + BATCH].reshape(-1, self.size, self.size, 1)
            feeds = {INPUT_NAME: batch.astype(self.input_dtype)}
            out[start : start + BATCH] = self.session.run([OUTPUT_NAME], feeds)[0]
        return out

    def describe(self) -> dict[str, Any]:
        """What the model is and reads: name, classes (count), input size, the first classes,
        stroke pen width, and :class:`ModelInfo` (``source`` is where it was loaded from)."""
        info = dataclasses.asdict(self.info)
        return {
            "name": self.name,
            "classes": len(self.classes),
            "input_size": self.size,
            "preview": "".join(self.classes[:12]),
            "source": info.pop("origin"),
            "stroke_width": STROKE_WIDTH,
            **info,
        }


def _as_batch(inputs: Any) -> tuple[bool, list[Any]]:
    """``(single, items)``: one input as a one-item list, or the items of a batch."""
    if isinstance(inputs, np.ndarray):
        if inputs.ndim == 2 or (inputs.ndim == 3 and inputs.shape[-1] in (1, 3, 4)):
            return True, [inputs]
        if inputs.ndim in (3, 4):
            return False, list(inputs)
        raise InputError(
            f"an image array must be (h, w), (h, w, 1|3|4), or a batch (n, h, w) or "
            f"(n, h, w, 1|3|4), not {inputs.shape}"
        )
    if isinstance(inputs, _SINGLE):
        return True, [inputs]
    if isinstance(inputs, Iterable):
        return False, list(inputs)
    return True, [inputs]  # raster_of says what it cannot read


def _labelled(error: InputError, item: Any, index: int, labelled: bool) -> InputError:
    """``error`` with its input named: a file by its path (always), another input of a batch
    (``labelled``) as ``input <index>``."""
    if isinstance(item, str | os.PathLike):
        path = str(Path(item).expanduser())
        if str(error).startswith(path):
            return error
        return InputError(f"{path}: {error}", error.status)
    return InputError(f"input {index}: {error}", error.status) if labelled else error
