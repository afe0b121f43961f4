"""Exported models for the drawing pad: loading, rendering user input, ONNX Runtime inference.

Nothing here imports TensorFlow: models run with ONNX Runtime, and mlflow is imported only to
load from a tracking store.

Model files
-----------
The layout ``python -m hwexp.export formats=[onnx]`` writes into ``<output_dir>/<run id>/``
(and logs to the run as ``export/``, the folder registered in the MLflow Model Registry)::

    <name>.onnx       input ``image``: uint8 (n, S, S, 1), ink WHITE (255) on BLACK (0), prepared
                      by hwexp.data.preprocess; output ``probabilities``: float32 (n, classes)
    classes.txt       UTF-8, one character per line; line i is output i
    preprocess.json   optional: the run's ``preprocess`` options, a JSON object
    config.yaml       optional: a run config (its ``preprocess:`` block is used)

Where the preprocessing options come from, first found: ``preprocess.json``, ``config.yaml``,
the ONNX metadata ``hwexp.preprocess`` (JSON, written by the exporter). Classes: ``classes.txt``,
else the ONNX metadata ``hwexp.classes`` (a JSON list). A model with neither is refused: the pad
never guesses how a model's training data was prepared.

User input
----------
Strokes (polylines in canvas pixels) are drawn bright on black, centred on a square canvas of
:data:`RASTER_SIDE` pixels whose side stands for the longer canvas side, with round pen tips of
:data:`STROKE_WIDTH` of that side (supersampled, then area-averaged: anti-aliased like a scan).
Pictures may be either polarity (``ink="auto"``). Both then go through
``normalise_characters(..., options=<the model's own preprocess options>)``: the same polarity,
contrast stretch, clean-up, crop, margin and size as the model's training data.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw, UnidentifiedImageError

from hwexp.contract import (
    CLASSES_FILE,
    CLASSES_KEY,
    CONFIG_FILE,
    EXPORT_DIR,
    INPUT_NAME,
    OUTPUT_NAME,
    PREPROCESS_KEY,
    TOP_K,
    default_mlruns_dir,
    default_tracking_uri,
    read_classes,
)
from hwexp.data.preprocess import PreprocessOptions, normalise_characters
from hwexp.data.raw import Ink
from hwexp.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

RASTER_SIDE = 128  # px: the square canvas strokes are drawn on (the synthetic source's canvas)
SUPERSAMPLE = 2  # strokes are drawn at this multiple of RASTER_SIDE, then area-averaged
STROKE_WIDTH = 0.036  # pen width / canvas side: a pencil-to-felt pen of the training data
MAX_PICTURE_PIXELS = 1024 * 1024  # decoded; checked from the header, before decoding
MAX_JPEG_REDUCTION = 8  # a larger JPEG is decoded at 1/2, 1/4 or 1/8 of its size to fit
PICTURE_FORMATS = frozenset({"PNG", "JPEG", "BMP", "GIF", "WEBP"})


class InputError(ValueError):
    """User input the pad cannot read: the message is meant for the client."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Prediction:
    """The ``k`` most probable ``(character, probability)`` pairs and the model input seen."""

    candidates: list[tuple[str, float]]
    model_input: np.ndarray  # (S, S) uint8, ink high


@dataclass(frozen=True)
class ServedModel:
    """An ONNX classifier with its classes (output order) and its training preprocessing."""

    name: str
    classes: tuple[str, ...]
    options: PreprocessOptions
    source: str  # the file, models:/<name>/<version> or runs:/<id>/export it came from
    session: Any  # onnxruntime.InferenceSession (thread-safe run)
    input_dtype: type = np.uint8

    @property
    def size(self) -> int:
        return self.options.size

    def describe(self) -> dict[str, Any]:
        """What ``GET /api/models`` says about this model."""
        return {
            "name": self.name,
            "classes": len(self.classes),
            "input_size": self.size,
            "preview": "".join(self.classes[:12]),
            "source": self.source,
            "stroke_width": STROKE_WIDTH,
        }

    @cached_property
    def stroke_options(self) -> PreprocessOptions:
        """The options for rendered strokes: the model's own, with the ink level taken as the
        raster's maximum (``ink_percentile=100``). Rendered ink is full (255) on 0, so for a
        drawing with ink on more than 0.5 % of the raster this changes nothing; for a dot or a
        short stroke the scans' 99.5th percentile would be background, and the drawing blank."""
        return dataclasses.replace(self.options, ink_percentile=100.0)

    def prepare_strokes(
        self, strokes: Sequence[np.ndarray], width: float, height: float
    ) -> np.ndarray:
        """``(S, S)`` uint8 model input of ``strokes`` drawn on a ``width`` x ``height`` canvas
        (a one-point or very short stroke is a dot of the pen's width).

        Raises:
            InputError: (422) nothing of the drawing lands on the canvas.
        """
        raster = render_strokes(strokes, width, height)
        return self._normalise(
            raster, "high", "the drawing has no ink on the canvas", self.stroke_options
        )

    def prepare_picture(self, grey: np.ndarray) -> np.ndarray:
        """``(S, S)`` uint8 model input of a ``(h, w)`` uint8 picture of either polarity.

        Raises:
            InputError: (422) the picture has no ink (no contrast).
        """
        return self._normalise(grey, "auto", "the image has no ink (no contrast)")

    def _normalise(
        self, grey: np.ndarray, ink: Ink, blank: str, options: PreprocessOptions | None = None
    ) -> np.ndarray:
        prepared = normalise_characters(grey[None], ink=ink, options=options or self.options)[0]
        if not prepared.any():
            raise InputError(f"empty drawing: {blank}", 422)
        return prepared

    def probabilities(self, prepared: np.ndarray) -> np.ndarray:
        """Class probabilities ``(classes,)`` float32 of one ``(S, S)`` uint8 model input."""
        batch = prepared.reshape(1, self.size, self.size, 1).astype(self.input_dtype)
        return np.asarray(self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0][0], np.float32)

    def predict(self, prepared: np.ndarray, k: int = TOP_K) -> Prediction:
        """The ``k`` best candidates (most probable first) for one prepared model input."""
        probs = self.probabilities(prepared)
        best = np.argsort(-probs, kind="stable")[: min(k, len(probs))]
        return Prediction([(self.classes[i], float(probs[i])) for i in best], prepared)


# --------------------------------------------------------------------------- user input


def render_strokes(
    strokes: Sequence[np.ndarray],
    width: float,
    height: float,
    side: int = RASTER_SIDE,
    stroke_width: float = STROKE_WIDTH,
) -> np.ndarray:
    """Draw polylines ``(n_i, 2)`` (x, y in canvas pixels of a ``width`` x ``height`` canvas)
    bright (255) on black, centred on a ``(side, side)`` uint8 square whose side stands for
    ``max(width, height)``; the pen is ``stroke_width`` of that side, with round tips (a
    one-point stroke is a dot)."""
    big = side * SUPERSAMPLE
    scale = big / max(width, height)
    offset = np.array([(big - width * scale) / 2, (big - height * scale) / 2])
    pen = max(1.0, stroke_width * big)
    radius = pen / 2
    image = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        points = np.asarray(stroke, np.float64) * scale + offset
        if len(points) > 1:
            draw.line(points.ravel().tolist(), fill=255, width=round(pen))
        for x, y in points[_round_vertices(points)]:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    return np.asarray(image.resize((side, side), Image.Resampling.BOX))


def _round_vertices(points: np.ndarray, max_turn_deg: float = 25.0) -> np.ndarray:
    """Indices of a polyline's ends and of the vertices turning by more than ``max_turn_deg``:
    where a plain wide line would show a notch, a disc rounds it (one disc per vertex, PIL's
    ``joint="curve"``, costs ten times as much on dense pointer input)."""
    ends = [0, len(points) - 1]
    if len(points) < 3:
        return np.array(ends)
    steps = np.diff(points, axis=0)
    lengths = np.maximum(np.hypot(steps[:, 0], steps[:, 1]), 1e-9)
    cosines = np.einsum("ij,ij->i", steps[:-1], steps[1:]) / (lengths[:-1] * lengths[1:])
    sharp = np.flatnonzero(cosines < np.cos(np.radians(max_turn_deg))) + 1
    return np.concatenate([ends, sharp])


def decode_picture(data: bytes) -> np.ndarray:
    """A PNG (or JPEG, BMP, GIF, WebP) as ``(h, w)`` uint8 grey; transparent pixels become
    the background (white under dark ink, black under light ink).

    The size is read from the header before anything is decoded: a picture over
    :data:`MAX_PICTURE_PIXELS` is refused, except a JPEG that fits once decoded at 1/2, 1/4 or
    1/8 of its size (cheap: the decoder skips the detail).

    Raises:
        InputError: not an image of those formats, undecodable, or too many pixels.
    """
    try:
        picture = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise InputError(_too_large("image is over PIL's decompression-bomb limit")) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise InputError(
            f"'image' is not a PNG, JPEG, BMP, GIF or WebP image (its data starts {data[:8]!r})"
        ) from None
    with picture:
        if picture.format not in PICTURE_FORMATS:
            raise InputError(
                f"image format {picture.format} is not accepted; send a PNG (or JPEG, BMP, "
                "GIF, WebP)"
            )
        width, height = picture.size
        if picture.format == "JPEG" and width * height > MAX_PICTURE_PIXELS:
            reduction = 1
            while reduction < MAX_JPEG_REDUCTION and (
                width * height > MAX_PICTURE_PIXELS * reduction * reduction
            ):
                reduction *= 2
            picture.draft("L", (width // reduction, height // reduction))
        if picture.size[0] * picture.size[1] > MAX_PICTURE_PIXELS:
            raise InputError(_too_large(f"image is {width}x{height} pixels"))
        try:
            picture.load()
            return _flatten_alpha(picture)
        except (OSError, ValueError, SyntaxError) as error:
            raise InputError(
                f"'image' is a {picture.format} image that cannot be decoded: {error}"
            ) from None


def _too_large(what: str) -> str:
    side = math.isqrt(MAX_PICTURE_PIXELS)
    return (
        f"{what}; at most {MAX_PICTURE_PIXELS} pixels (e.g. {side}x{side}, or a JPEG up to "
        f"{MAX_JPEG_REDUCTION} times that on each side): send a smaller picture"
    )


def _flatten_alpha(picture: Image.Image) -> np.ndarray:
    has_alpha = picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info
    if not has_alpha:
        return np.asarray(picture.convert("L"))
    rgba = np.asarray(picture.convert("RGBA"), np.float32)
    grey = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    alpha = rgba[..., 3] / 255.0
    opaque = alpha > 0.5
    dark_ink = not opaque.any() or float(grey[opaque].mean()) < 128
    background = 255.0 if dark_ink else 0.0
    return np.clip(grey * alpha + background * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- loading


def _onnx_session(path: Path, threads: int) -> Any:
    """``hwexp.export.onnx.onnx_session``; its errors become ``ModelLoadError``."""
    from hwexp.export.onnx import onnx_session

    try:
        return onnx_session(path, threads)
    except Exception as error:  # onnxruntime raises its own, unexported exception types
        raise ModelLoadError(f"{path}: not a loadable ONNX model: {error}") from error


def _preprocess_options(folder: Path, metadata: Mapping[str, str]) -> tuple[dict, str]:
    """``(options mapping, where from)``; see the module docstring for the order."""
    json_path, yaml_path = folder / "preprocess.json", folder / "config.yaml"
    if json_path.is_file():
        return json.loads(json_path.read_text("utf-8")), str(json_path)
    if yaml_path.is_file():
        config = yaml.safe_load(yaml_path.read_text("utf-8")) or {}
        if isinstance(config, Mapping) and isinstance(config.get("preprocess"), Mapping):
            return dict(config["preprocess"]), str(yaml_path)
    if PREPROCESS_KEY in metadata:
        return json.loads(metadata[PREPROCESS_KEY]), f"ONNX metadata {PREPROCESS_KEY}"
    raise ModelLoadError(
        f"no preprocessing options for the model in {folder}: expected preprocess.json, a "
        "config.yaml with a preprocess block, or ONNX metadata hwexp.preprocess (hwexp.export "
        "writes it)"
    )


def _classes(folder: Path, metadata: Mapping[str, str], outputs: int) -> tuple[str, ...]:
    path = folder / CLASSES_FILE
    if path.is_file():
        classes, where = read_classes(path), str(path)
    elif CLASSES_KEY in metadata:
        classes, where = json.loads(metadata[CLASSES_KEY]), f"ONNX metadata {CLASSES_KEY}"
    else:
        raise ModelLoadError(f"no {CLASSES_FILE} beside the model in {folder}")
    if len(classes) != outputs:
        raise ModelLoadError(f"{where} lists {len(classes)} classes; the model has {outputs}")
    return tuple(classes)


def load_onnx(
    path: str | Path, name: str | None = None, source: str | None = None, threads: int = 1
) -> ServedModel:
    """Load ``path`` (``.onnx``) with its classes and preprocessing from the files beside it
    (see the module docstring); ``name`` defaults to the file's stem.

    Raises:
        ModelLoadError: missing or inconsistent files, or not an hwexp image classifier.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"no model file {path}")
    session = _onnx_session(path, threads)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    names = ([i.name for i in inputs], [o.name for o in outputs])
    if names != ([INPUT_NAME], [OUTPUT_NAME]) or len(inputs[0].shape) != 4:
        raise ModelLoadError(
            f"{path}: expected one input {INPUT_NAME!r} (n, S, S, 1) and one output "
            f"{OUTPUT_NAME!r}, as hwexp.export writes; got inputs/outputs {names}"
        )
    dtypes = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}
    if inputs[0].type not in dtypes:
        raise ModelLoadError(f"{path}: input type {inputs[0].type}; expected uint8 or float")
    metadata = session.get_modelmeta().custom_metadata_map
    n_out = outputs[0].shape[-1]
    if not isinstance(n_out, int):
        raise ModelLoadError(f"{path}: the number of classes (output shape) is not fixed")
    classes = _classes(path.parent, metadata, n_out)
    raw_options, where = _preprocess_options(path.parent, metadata)
    try:
        options = PreprocessOptions.from_config(raw_options)
    except (ConfigError, TypeError) as error:
        raise ModelLoadError(f"{where}: invalid preprocess options: {error}") from error
    shape = inputs[0].shape
    if shape[1:] != [options.size, options.size, 1]:
        raise ModelLoadError(
            f"{path}: input shape {shape} does not match preprocess.size={options.size} "
            f"from {where}"
        )
    return ServedModel(
        name or path.stem, classes, options, source or str(path), session, dtypes[inputs[0].type]
    )


def _single_onnx(folder: Path, what: str) -> Path:
    found = sorted(folder.rglob("*.onnx"))
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise ModelLoadError(
            f"{what} should hold exactly one .onnx file (found: {listed}); export the run with "
            "`python -m hwexp.export run=<run id> formats=[onnx]` (or add onnx to its formats)"
        )
    return found[0]


def tracking_client(uri: str | None = None) -> Any:
    """An ``MlflowClient`` of ``uri``, or of the project's default store (``conf/paths``:
    ``sqlite:///<$HWEXP_ROOT or .>/mlruns/mlflow.db``), which must exist.

    Raises:
        ModelLoadError: the default store does not exist yet.
    """
    from mlflow import MlflowClient

    if not uri:
        uri = default_tracking_uri(default_mlruns_dir(), create=False)
        database = Path(uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise ModelLoadError(
                f"no MLflow store at {database}: train and export a model first "
                "(python -m hwexp; python -m hwexp.export), or pass --tracking-uri or --model"
            )
    return MlflowClient(tracking_uri=uri)


def _load_export(
    client: Any,
    run_id: str | None,
    artifact_uri: str,
    name: str | None,
    source: str,
    threads: int,
) -> ServedModel:
    """Download the export folder at ``artifact_uri`` and run ``run_id``'s ``config.yaml``
    beside it (its preprocess block is the run's own), then load the folder's ONNX model."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="hwexp-serve-") as tmp:
        try:
            folder = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=artifact_uri, dst_path=tmp, tracking_uri=client.tracking_uri
                )
            )
        except (MlflowException, OSError) as error:
            raise ModelLoadError(f"{source}: cannot download {artifact_uri}: {error}") from error
        if not folder.is_dir():
            folder = folder.parent
        if run_id:
            try:
                client.download_artifacts(run_id, CONFIG_FILE, str(folder))
            except (MlflowException, OSError):
                log.warning("%s: run %s has no config.yaml; using the export's own", source, run_id)
        model_file = _single_onnx(folder, source)
        # The session holds the model in memory: the downloaded files may go.
        return load_onnx(model_file, name or model_file.stem, source, threads)


def load_registered(
    client: Any, ref: str, name: str | None = None, threads: int = 1
) -> ServedModel:
    """Load registered model ``ref`` = ``<name>`` (its highest version), ``<name>/<version>``
    or ``<name>@<alias>`` from ``client``'s Model Registry; served as ``name`` or ``<name>``.

    Raises:
        ModelLoadError: no such model/version, or the version holds no ONNX file.
    """
    from mlflow.exceptions import MlflowException

    match = re.fullmatch(r"(.+?)(?:/(\d+)|@([\w.-]+))?", ref)
    registered, number, alias = match.groups() if match else (ref, None, None)
    try:
        if alias:
            version = client.get_model_version_by_alias(registered, alias)
        elif number:
            version = client.get_model_version(registered, number)
        else:
            escaped = registered.replace("'", "\\'")
            versions = client.search_model_versions(f"name = '{escaped}'")
            if not versions:
                raise ModelLoadError(f"no registered model {registered!r} in {client.tracking_uri}")
            version = max(versions, key=lambda v: int(v.version))
    except MlflowException as error:
        raise ModelLoadError(
            f"registered model {ref!r} not found in {client.tracking_uri}: {error.message}"
        ) from error
    source = f"models:/{registered}/{version.version}"
    return _load_export(client, version.run_id, version.source, name or registered, source, threads)


def load_run(client: Any, run_id: str, name: str | None = None, threads: int = 1) -> ServedModel:
    """Load the ONNX model that ``hwexp.export`` logged to run ``run_id`` (``export/``).

    Raises:
        ModelLoadError: no such run, or it has no exported ONNX model.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise ModelLoadError(f"run {run_id!r} not found in {client.tracking_uri}") from error
    uri = f"{run.info.artifact_uri.rstrip('/')}/{EXPORT_DIR}"
    return _load_export(client, run_id, uri, name, f"runs:/{run_id}/{EXPORT_DIR}", threads)


def load_all_registered(client: Any, threads: int = 1) -> list[ServedModel]:
    """The highest version of every registered model that holds an ONNX file (others are
    skipped with a warning)."""
    models = []
    for registered in client.search_registered_models():
        try:
            models.append(load_registered(client, registered.name, threads=threads))
        except ModelLoadError as error:
            log.warning("skipping registered model %s: %s", registered.name, error)
    return models
