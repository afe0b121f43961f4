"""``python -m hwexp.export run=best|<run id> formats=[coreml,tflite,onnx]``: ship a trained run.

The run's stored model is turned into an inference graph (``strip_augmentation``: no random
layers), converted to every requested format, checked against the Keras model on the run's own
test split (prepared with the run's config, under this command's ``paths``), and only then moved
into ``<output_dir>/<run id>/``. Conversions run in a temporary folder beside it, so a failed
conversion or check leaves the previous export (if any) untouched and no partial files.

Formats (``formats=``) and the files they write (stem ``name``, default: the dataset's name):

* ``coreml``: ``<name>.mlpackage``, ML Program for iOS 15+ (``coreml.weights=fp16``, the
  default) or iOS 16+ (``int8`` linear / ``palette8`` / ``palette4`` weight compression);
* ``coreml_nn``: ``<name>.mlmodel``, the older neural-network format (iOS 13+; fp16 or int8);
* ``tflite``: ``<name>.tflite`` (float32) and, unless ``tflite.int8=false``, ``<name>_int8.tflite``
  (full integer, calibrated on ``tflite.representative_samples`` training images);
* ``onnx``: ``<name>.onnx`` (via Keras' ``model.export(format="onnx")``, i.e. tf2onnx).

Every format has the model's contract: input ``image``, ``S x S`` grayscale (``uint8``
``(n, S, S, 1)`` tensors for TFLite / ONNX), **ink WHITE (255) on BLACK (0)**, the character
cropped to its ink and centred as ``hwexp.data.preprocess`` does; pixel scaling (1/255) happens
once, inside the model (Core ML: ``ImageType(scale=1)``). Outputs: class probabilities in
``classes.txt`` order (TFLite / ONNX ``probabilities``); Core ML is a classifier whose labels
are the characters (``classLabel``, ``classLabel_probs``; Vision's
``VNClassificationObservation.identifier`` is the character).

Checks (a failure raises ``ExportError``; the CLI exits 1): TFLite, ONNX Runtime (and Core ML
on macOS) agree with Keras on the top-1 class of at least ``verify.min_agreement`` of the test
images (int8 models: the accuracy drop is reported, not enforced); Core ML specs are read back
from disk: one grayscale image input of the model's size, labels = classes in order, input
scaling exactly once, no random ops, the run id in the metadata.

Then (``log=true``) files, sizes, checks and ``export/<variant>/{accuracy,agreement,...}``
metrics are logged to the source run, and (``register=true``) the export folder, Core ML package
included, becomes a new version of the registered model ``register_name`` (default: the
dataset's name) in the MLflow Model Registry.

After a sweep
-------------
``ExportAfterSweep`` is a Hydra callback exporting the best trial of a sweep when the sweep ends.
Convention shared with the sweeper: the sweep's MLflow *parent* run carries the tag
``hwexp.sweep_id`` = the absolute path of ``hydra.sweep.dir`` and every trial is a child run of
it; the callback exports the child with the highest ``select.metric`` when that is among its
overrides, else the child the sweeper tagged ``hwexp.best_trial=true`` (direction-aware), else
the child with the highest ``optimized_metric`` of the sweep. ``conf/config.yaml`` wires it;
``export.after_sweep=true`` switches it on and ``export.overrides`` (overrides of
``conf/export.yaml``) shape the export::

    python -m hwexp -m hparams_search=katakana export.after_sweep=true \
        'export.overrides=["formats=[coreml,onnx]"]'
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from hwexp import CONF_DIR, __version__
from hwexp.data.errors import ConfigError, DataError
from hwexp.model import INPUT_LAYER_NAME, OUTPUT_LAYER_NAME

if TYPE_CHECKING:
    import keras

    from hwexp.data.dataset import SplitArrays
    from hwexp.track import TrainedModel

log = logging.getLogger(__name__)

FORMATS = ("coreml", "coreml_nn", "tflite", "onnx")
COREML_WEIGHTS = ("fp16", "int8", "palette8", "palette4")
QUANTIZED_VARIANTS = frozenset({"tflite_int8"})  # accuracy drop reported, agreement not enforced
INK = "white-on-black"  # input polarity of every exported model (as hwexp.data.preprocess)
CORE_ML_LABEL = "classLabel"
CORE_ML_PROBS = "classLabel_probs"
EXPORT_RUN_TAG = "hwexp.export_folder"
_AFFINE_PASS_THROUGH = frozenset(
    {"transpose", "cast", "reshape", "expand_dims", "squeeze", "identity"}
)
_NN_PASS_THROUGH = frozenset(
    {"transpose", "reshape", "reshapeStatic", "flatten", "squeeze", "expandDims"}
)

Predict = Callable[[np.ndarray], np.ndarray]
"""``(n, S, S, 1)`` uint8 images -> ``(n, classes)`` float32 probabilities."""


class ExportError(RuntimeError):
    """A conversion or a check failed; nothing was written to the output folder."""


@dataclass
class Exported:
    """One exported file (or package folder) and what was checked about it."""

    variant: str  # coreml | coreml_nn | tflite_fp32 | tflite_int8 | onnx
    path: Path
    checks: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def failed_checks(self) -> list[str]:
        return [name for name, ok in self.checks.items() if ok is False]


@dataclass(frozen=True)
class ExportResult:
    """Where ``export_run`` put the files, what it measured, and how it was registered."""

    run_id: str
    folder: Path
    files: dict[str, Path]  # variant -> file in ``folder``
    metrics: dict[str, float]  # export/<variant>/<metric>, export/keras/accuracy, ...
    report: dict[str, Any]  # the content of export.json
    registered: str | None  # "<registered model name>/<version>"


# --------------------------------------------------------------------------- model and data


def inference_model(model: keras.Model) -> keras.Model:
    """``model`` without augmentation/dropout layers (``strip_augmentation``: same weights,
    same inference function), checked to have one ``(S, S, 1)`` uint8 image input.

    Raises:
        ExportError: the model does not follow the ``hwexp.model`` contract.
    """
    from hwexp.model import is_training_only, strip_augmentation

    stripped = strip_augmentation(model)
    left = [layer.name for layer in stripped.layers if is_training_only(layer)]
    if left:
        raise ExportError(f"training-only layers survived strip_augmentation: {left}")
    shape = tuple(stripped.input_shape)
    if len(stripped.inputs) != 1 or len(shape) != 4 or shape[1] != shape[2] or shape[3] != 1:
        raise ExportError(f"expected one (S, S, 1) image input, got input shape {shape}")
    if stripped.inputs[0].dtype != "uint8":
        raise ExportError(f"expected a uint8 image input, got {stripped.inputs[0].dtype}")
    return stripped


def run_data_config(cfg: Mapping[str, Any], trained_config: Mapping[str, Any]) -> DictConfig:
    """The trained run's data config (dataset, preprocess, split, synthetic, seed) with this
    command's ``paths`` and ``workers``: the run's test split, read from this machine's cache."""
    merged = OmegaConf.create(dict(trained_config))
    with open_dict(merged):
        merged.paths = OmegaConf.to_container(cfg["paths"], resolve=True)
        merged.workers = cfg.get("workers", "auto")
    return merged


def _evenly_spread(count: int, limit: int | None) -> np.ndarray:
    """``min(count, limit)`` indices spread over ``range(count)`` (all when ``limit`` is None)."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, int(limit)).round().astype(np.int64))


def representative_images(
    train: SplitArrays, samples: int, seed: int
) -> Callable[[], Iterator[list[np.ndarray]]]:
    """A TFLite ``representative_dataset``: ``samples`` random training images (seeded), one
    ``(1, S, S, 1)`` uint8 batch at a time."""
    rows = np.random.default_rng(seed).permutation(len(train))[:samples]
    images = train.images[np.sort(rows)]

    def batches() -> Iterator[list[np.ndarray]]:
        for image in images:
            yield [image[np.newaxis, :, :, np.newaxis]]

    return batches


# --------------------------------------------------------------------------- converters


def _quiet_coremltools() -> Any:
    """Import coremltools with its import-time chatter (untested sklearn/TF versions, missing
    native bindings off macOS) reduced to errors."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import coremltools

    return coremltools


def to_coreml(
    model: keras.Model,
    classes: Sequence[str],
    path: Path,
    metadata: Mapping[str, str],
    descriptions: Mapping[str, str],
    weights: str = "fp16",
    neuralnetwork: bool = False,
) -> Path:
    """Convert to a Core ML classifier at ``path`` (``.mlpackage`` ML Program, or ``.mlmodel``
    neural network when ``neuralnetwork``); ``metadata`` keys ``short_description``,
    ``author``, ``license``, ``version`` fill the standard fields, the rest go to the
    user-defined metadata; ``descriptions`` maps feature names to their descriptions."""
    ct = _quiet_coremltools()
    if weights not in COREML_WEIGHTS or (neuralnetwork and weights not in ("fp16", "int8")):
        raise ConfigError(
            f"Core ML weights {weights!r} unsupported (neural network: {neuralnetwork})"
        )
    size = int(model.input_shape[1])
    if neuralnetwork:
        target, convert_to = ct.target.iOS13, "neuralnetwork"
    else:
        target = ct.target.iOS15 if weights == "fp16" else ct.target.iOS16
        convert_to = "mlprogram"
    mlmodel = ct.convert(
        model,
        source="tensorflow",
        inputs=[
            ct.ImageType(
                name=INPUT_LAYER_NAME,
                shape=(1, size, size, 1),
                scale=1.0,  # the model's own Rescaling(1/255) scales, once
                bias=0.0,
                color_layout=ct.colorlayout.GRAYSCALE,
            )
        ],
        classifier_config=ct.ClassifierConfig(list(classes)),
        convert_to=convert_to,
        minimum_deployment_target=target,
    )
    mlmodel = _compress_coreml(ct, mlmodel, weights, neuralnetwork)
    spec = mlmodel.get_spec()
    if spec.description.predictedProbabilitiesName != CORE_ML_PROBS:  # neural networks
        old_name = spec.description.predictedProbabilitiesName
        ct.utils.rename_feature(spec, old_name, CORE_ML_PROBS)
        mlmodel = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)
    standard = ("short_description", "author", "license", "version")
    for key in standard:
        if metadata.get(key):
            setattr(mlmodel, key, metadata[key])
    for key, value in metadata.items():
        if key not in standard:
            mlmodel.user_defined_metadata[key] = str(value)
    for name, text in descriptions.items():
        if name == INPUT_LAYER_NAME:
            mlmodel.input_description[name] = text
        else:
            mlmodel.output_description[name] = text
    mlmodel.save(str(path))
    return path


def _compress_coreml(ct: Any, mlmodel: Any, weights: str, neuralnetwork: bool) -> Any:
    """Apply the weight option: fp16 is the converter's default for ML Programs."""
    if neuralnetwork:
        from coremltools.models.neural_network import quantization_utils

        with contextlib.redirect_stdout(sys.stderr):  # it prints one line per layer
            return quantization_utils.quantize_weights(
                mlmodel, nbits=16 if weights == "fp16" else 8
            )
    if weights == "fp16":
        return mlmodel
    from coremltools.optimize import coreml as optimize

    if weights == "int8":
        op_config = optimize.OpLinearQuantizerConfig(mode="linear_symmetric")
        return optimize.linear_quantize_weights(
            mlmodel, optimize.OptimizationConfig(global_config=op_config)
        )
    op_config = optimize.OpPalettizerConfig(nbits=int(weights.removeprefix("palette")))
    return optimize.palettize_weights(mlmodel, optimize.OptimizationConfig(global_config=op_config))


def _input_signature(model: keras.Model) -> list[Any]:
    import tensorflow as tf

    size = int(model.input_shape[1])
    return [tf.TensorSpec((None, size, size, 1), tf.uint8, name=INPUT_LAYER_NAME)]


def to_tflite(
    model: keras.Model,
    path: Path,
    representative: Callable[[], Iterator[list[np.ndarray]]] | None = None,
) -> Path:
    """Convert to TFLite builtin ops only (no Flex delegate needed) at ``path``: float32, or,
    with a ``representative`` dataset, full-integer int8 (uint8 image input, float32
    probabilities out)."""
    import tensorflow as tf

    options: dict[str, Any] = {"target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}}
    if representative is not None:
        options = {
            "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
            "optimizations": [tf.lite.Optimize.DEFAULT],
            "representative_dataset": representative,
            "inference_input_type": tf.uint8,
        }
    model.export(
        str(path),
        format="litert",
        verbose=False,
        input_signature=_input_signature(model),
        **options,
    )
    return path


def to_onnx(model: keras.Model, path: Path, opset: int, metadata: Mapping[str, str]) -> Path:
    """Convert to ONNX at ``path`` (Keras' exporter, i.e. tf2onnx, with its numpy-2 patches);
    the output is renamed ``probabilities`` and ``metadata`` is stored as metadata_props."""
    import onnx

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    model.export(
        str(path),
        format="onnx",
        verbose=False,
        input_signature=_input_signature(model),
        opset_version=int(opset),
    )
    proto = onnx.load(str(path))
    graph = proto.graph
    old = graph.output[0].name
    for node in graph.node:
        node.output[:] = [OUTPUT_LAYER_NAME if name == old else name for name in node.output]
        node.input[:] = [OUTPUT_LAYER_NAME if name == old else name for name in node.input]
    graph.output[0].name = OUTPUT_LAYER_NAME
    onnx.helper.set_model_props(proto, {key: str(value) for key, value in metadata.items()})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


# --------------------------------------------------------------------------- runtimes


def _tflite_interpreter(path: Path, threads: int | None) -> Any:
    """LiteRT's interpreter (``ai-edge-litert``), else TensorFlow's own."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - ai-edge-litert is a dependency
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    return Interpreter(model_path=str(path), num_threads=threads)


def tflite_predictor(path: Path, threads: int | None = None) -> Predict:
    """Run a ``.tflite`` model (any batch size; quantized outputs are dequantized)."""
    interpreter = _tflite_interpreter(path, threads)
    input_index = interpreter.get_input_details()[0]["index"]
    output = interpreter.get_output_details()[0]
    scale, zero_point = output["quantization"]
    state = {"shape": None}

    def predict(images: np.ndarray) -> np.ndarray:
        if state["shape"] != images.shape:
            interpreter.resize_tensor_input(input_index, images.shape)
            interpreter.allocate_tensors()
            state["shape"] = images.shape
        interpreter.set_tensor(input_index, np.ascontiguousarray(images, np.uint8))
        interpreter.invoke()
        probs = interpreter.get_tensor(output["index"])
        if scale:
            return (probs.astype(np.float32) - zero_point) * scale
        return np.array(probs, np.float32)

    return predict


def onnx_predictor(path: Path, threads: int | None = None) -> Predict:
    """Run an ``.onnx`` model with ONNX Runtime on the CPU (``threads`` intra-op threads)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def predict(images: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_LAYER_NAME], {INPUT_LAYER_NAME: images})[0]

    return predict


def coreml_predictor(path: Path, classes: Sequence[str]) -> Predict:
    """Run a Core ML classifier (macOS only): each image as a grayscale picture."""
    ct = _quiet_coremltools()
    from PIL import Image

    model = ct.models.MLModel(str(path))
    index_of = {char: i for i, char in enumerate(classes)}

    def predict(images: np.ndarray) -> np.ndarray:
        outputs = model.predict([{INPUT_LAYER_NAME: Image.fromarray(im[..., 0])} for im in images])
        probs = np.zeros((len(images), len(classes)), np.float32)
        for row, out in enumerate(outputs):
            for char, p in out[CORE_ML_PROBS].items():
                probs[row, index_of[char]] = p
        return probs

    return predict


# --------------------------------------------------------------------------- static checks


def _mil_input_affine(spec: Any, weights_dir: str | None) -> tuple[float, float, Any]:
    """``(scale, bias, program)``: the affine map an ML Program applies to input pixels before
    its first non-elementwise op, read from the saved program (image preprocessing included)."""
    from coremltools.converters.mil.frontend.milproto.load import load_mil_proto

    program = load_mil_proto(spec.mlProgram, spec.specificationVersion, weights_dir or "")
    function = program.functions["main"]
    var, scale, bias = function.inputs[INPUT_LAYER_NAME], 1.0, 0.0
    while len(var.child_ops) == 1:
        op = var.child_ops[0]
        if op.op_type not in _AFFINE_PASS_THROUGH:
            if op.op_type not in ("mul", "add", "sub", "real_div"):
                break
            is_x = op.inputs["x"] is var
            const = op.inputs["y" if is_x else "x"].val
            if const is None or np.size(const) != 1 or (op.op_type == "real_div" and not is_x):
                break
            c = float(np.asarray(const, np.float64).ravel()[0])
            if op.op_type == "mul":
                scale, bias = scale * c, bias * c
            elif op.op_type == "real_div":
                scale, bias = scale / c, bias / c
            elif op.op_type == "add":
                bias += c
            elif is_x:  # v - c
                bias -= c
            else:  # c - v
                scale, bias = -scale, c - bias
        var = op.outputs[0]
    return scale, bias, program


def _nn_input_affine(network: Any) -> tuple[float, float]:
    """The affine map a neural-network spec applies to input pixels: its image scaler, then the
    chain of linear layers before the first other layer."""
    scale, bias = 1.0, 0.0
    for step in network.preprocessing:
        if step.featureName == INPUT_LAYER_NAME and step.WhichOneof("preprocessor") == "scaler":
            scale, bias = float(step.scaler.channelScale), float(step.scaler.grayBias)
    blob = INPUT_LAYER_NAME
    for layer in network.layers:
        if blob not in layer.input:
            continue
        kind = layer.WhichOneof("layer")
        if len(layer.input) != 1:
            break
        if kind == "activation" and layer.activation.WhichOneof("NonlinearityType") == "linear":
            alpha, beta = layer.activation.linear.alpha, layer.activation.linear.beta
            scale, bias = scale * alpha, bias * alpha + beta
        elif kind == "multiply":
            scale, bias = scale * layer.multiply.alpha, bias * layer.multiply.alpha
        elif kind == "add":
            bias += layer.add.alpha
        elif kind not in _NN_PASS_THROUGH:
            break
        blob = layer.output[0]
    return scale, bias


def check_coreml(path: Path, classes: Sequence[str], size: int, run_id: str) -> dict[str, Any]:
    """Read a saved Core ML model back and check it (values False are failures): one
    grayscale image input ``image`` of ``size`` x ``size``; a classifier whose labels are
    ``classes`` in order; input scaling applied exactly once (0 -> 0, 255 -> 1); no random
    ops; ``hwexp.run_id`` in its metadata."""
    ct = _quiet_coremltools()
    from coremltools.proto import FeatureTypes_pb2

    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    kind = spec.WhichOneof("Type")
    inputs = list(spec.description.input)
    image = inputs[0].type.imageType if inputs else None
    checks: dict[str, Any] = {
        "model_type": kind,
        "specification_version": int(spec.specificationVersion),
        "single_image_input": len(inputs) == 1
        and inputs[0].name == INPUT_LAYER_NAME
        and inputs[0].type.WhichOneof("Type") == "imageType",
    }
    checks["input_grayscale"] = bool(
        image is not None and image.colorSpace == FeatureTypes_pb2.ImageFeatureType.GRAYSCALE
    )
    checks["input_size"] = bool(image is not None and (image.width, image.height) == (size, size))
    checks["predicted_feature"] = (
        spec.description.predictedFeatureName == CORE_ML_LABEL
        and spec.description.predictedProbabilitiesName == CORE_ML_PROBS
    )
    if kind == "mlProgram":
        scale, bias, program = _mil_input_affine(spec, mlmodel.weights_dir)
        operations = list(program.functions["main"].operations)
        labels = [list(op.inputs["classes"].val) for op in operations if op.op_type == "classify"]
        op_types = {op.op_type for op in operations}
    elif kind == "neuralNetworkClassifier":
        network = spec.neuralNetworkClassifier
        scale, bias = _nn_input_affine(network)
        labels = [list(network.stringClassLabels.vector)]
        op_types = {layer.WhichOneof("layer") for layer in network.layers}
    else:
        raise ExportError(f"{path.name}: not a Core ML classifier (model type {kind})")
    checks["labels_match"] = len(labels) == 1 and tuple(labels[0]) == tuple(classes)
    checks["input_scale"] = scale
    checks["input_bias"] = bias
    checks["scaling_once"] = abs(scale * 255.0 + bias - 1.0) < 1e-2 and abs(bias) < 1e-2
    checks["no_random_ops"] = not any(t.lower().startswith("random") for t in op_types)
    checks["run_id_in_metadata"] = (
        spec.description.metadata.userDefined.get("hwexp.run_id") == run_id
    )
    return checks


def check_tensor_io(predictor_path: Path, variant: str, size: int, classes: int) -> dict[str, Any]:
    """Input ``image`` uint8 ``(n, S, S, 1)`` and ``(n, classes)`` output, for TFLite / ONNX."""
    if variant.startswith("tflite"):
        interpreter = _tflite_interpreter(predictor_path, 1)
        given, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        in_shape, out_shape = list(given["shape_signature"]), list(out["shape_signature"])
        dtype = np.dtype(given["dtype"])
        ops_details = getattr(interpreter, "_get_ops_details", list)  # absent: parity shows it
        op_names = {str(op.get("op_name", "")) for op in ops_details()}
        random_ops = any("RANDOM" in name or name == "MULTINOMIAL" for name in op_names)
    else:
        import onnx
        import onnxruntime

        session = onnxruntime.InferenceSession(
            str(predictor_path), providers=["CPUExecutionProvider"]
        )
        given, out = session.get_inputs()[0], session.get_outputs()[0]
        in_shape = [d if isinstance(d, int) else -1 for d in given.shape]
        out_shape = [d if isinstance(d, int) else -1 for d in out.shape]
        dtype = np.dtype(np.uint8) if given.type == "tensor(uint8)" else np.dtype(np.float32)
        graph = onnx.load(str(predictor_path)).graph
        random_ops = any(node.op_type.startswith("Random") for node in graph.node)
        if given.name != INPUT_LAYER_NAME or out.name != OUTPUT_LAYER_NAME:
            return {"io_names": False}
    return {
        "input_uint8": dtype == np.uint8,
        "input_shape": in_shape[1:] == [size, size, 1],
        "output_shape": out_shape[1:] == [classes],
        "no_random_ops": not random_ops,
    }


# --------------------------------------------------------------------------- verification


def compare_on_split(
    model: keras.Model,
    split: SplitArrays,
    predictors: Mapping[str, Predict],
    batch_size: int = 256,
    rows: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Top-1 parity of each predictor with ``model`` (inference mode) on ``split``'s ``rows``.

    Returns ``{"keras": {"accuracy"}, <variant>: {"accuracy", "agreement", "max_abs_diff",
    "accuracy_drop"}}`` (accuracy drop = Keras accuracy - variant accuracy), streaming the
    split batch by batch (never the full probability matrix).
    """
    rows = np.arange(len(split)) if rows is None else rows
    if not len(rows):
        raise ExportError("the run's test split is empty: nothing to verify the export on")
    keras_correct = 0
    totals = {name: {"agree": 0, "correct": 0, "max_abs_diff": 0.0} for name in predictors}
    for start in range(0, len(rows), batch_size):
        chosen = rows[start : start + batch_size]
        images = np.asarray(split.images[chosen], np.uint8)[..., np.newaxis]
        labels = np.asarray(split.labels[chosen])
        reference = np.asarray(model.predict_on_batch(images), np.float32)
        top = reference.argmax(axis=1)
        keras_correct += int((top == labels).sum())
        for name, predict in predictors.items():
            probs = predict(images)
            totals[name]["agree"] += int((probs.argmax(axis=1) == top).sum())
            totals[name]["correct"] += int((probs.argmax(axis=1) == labels).sum())
            diff = float(np.abs(probs - reference).max())
            totals[name]["max_abs_diff"] = max(totals[name]["max_abs_diff"], diff)
    n = float(len(rows))
    result = {"keras": {"accuracy": keras_correct / n}}
    for name, total in totals.items():
        result[name] = {
            "accuracy": total["correct"] / n,
            "agreement": total["agree"] / n,
            "max_abs_diff": total["max_abs_diff"],
            "accuracy_drop": (keras_correct - total["correct"]) / n,
        }
    return result


# --------------------------------------------------------------------------- the export


def _requested_formats(cfg: Mapping[str, Any]) -> list[str]:
    formats = cfg["formats"]
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"formats={formats}: choose one or more of {list(FORMATS)}")
    weights = str(cfg["coreml"]["weights"])
    if weights not in COREML_WEIGHTS:
        raise ConfigError(f"coreml.weights={weights!r}: choose one of {list(COREML_WEIGHTS)}")
    if "coreml_nn" in formats and weights not in ("fp16", "int8"):
        raise ConfigError(f"coreml_nn takes coreml.weights fp16 or int8, not {weights!r}")
    return list(dict.fromkeys(formats))


def _describe(
    cfg: Mapping[str, Any], trained: TrainedModel, size: int
) -> tuple[str, dict[str, str], dict[str, str]]:
    """``(file stem, metadata, feature descriptions)`` for the exported files."""
    dataset = trained.config.get("dataset", {})
    dataset_name = str(dataset.get("name", "model"))
    name = str(cfg.get("name") or dataset_name)
    preprocess = trained.config.get("preprocess", {})
    margin = float(preprocess.get("margin", 0.08))
    fitted = (
        f"centre the ink's centre of mass, {preprocess.get('moment_span')} standard deviations "
        "of the ink across"
        if preprocess.get("fit") == "moments"
        else "crop the strokes to their bounding box"
    )
    test_accuracy = trained.metrics.get("test/accuracy")
    meta = cfg.get("metadata") or {}
    metadata = {
        "short_description": (
            f"Handwritten character classifier: {len(trained.classes)} characters of "
            f"{dataset_name} ({dataset.get('classes')}), hwexp run {trained.run_id}"
        ),
        "author": str(meta.get("author") or "hwexp"),
        "license": str(
            meta.get("license")
            or f"weights trained on the {dataset_name} data ({dataset.get('source')}); "
            "that data's licence applies to them"
        ),
        "version": str(meta.get("version") or f"{__version__}+{trained.run_id[:8]}"),
        "hwexp.run_id": trained.run_id,
        "hwexp.dataset": dataset_name,
        "hwexp.source": str(dataset.get("source")),
        "hwexp.class_set": str(dataset.get("classes")),
        "hwexp.num_classes": str(len(trained.classes)),
        "hwexp.model": str(trained.config.get("model", {}).get("name")),
        "hwexp.test_accuracy": "unknown" if test_accuracy is None else f"{test_accuracy:.4f}",
        "hwexp.image_size": str(size),
        "hwexp.ink": INK,
        "hwexp.preprocess": json.dumps(preprocess, sort_keys=True, default=str),
    }
    descriptions = {
        INPUT_LAYER_NAME: (
            f"{size}x{size} grayscale character, ink WHITE (255) on BLACK (0): {fitted}, "
            f"pad to a square with a {margin:.0%} margin "
            "(hwexp.data.preprocess); pixel scaling is inside the model"
        ),
        CORE_ML_LABEL: "the most probable character",
        CORE_ML_PROBS: "probability of each character",
    }
    return name, metadata, descriptions


def _convert_all(
    cfg: Mapping[str, Any],
    model: keras.Model,
    trained: TrainedModel,
    train: SplitArrays,
    staging: Path,
) -> list[Exported]:
    """Write every requested format into ``staging``."""
    formats = _requested_formats(cfg)
    size = int(model.input_shape[1])
    name, metadata, descriptions = _describe(cfg, trained, size)
    weights = str(cfg["coreml"]["weights"])
    done: list[Exported] = []
    for fmt in formats:
        log.info("exporting %s", fmt)
        if fmt in ("coreml", "coreml_nn"):
            nn = fmt == "coreml_nn"
            path = staging / f"{name}.{'mlmodel' if nn else 'mlpackage'}"
            to_coreml(model, trained.classes, path, metadata, descriptions, weights, nn)
            done.append(Exported(fmt, path))
        elif fmt == "tflite":
            done.append(Exported("tflite_fp32", to_tflite(model, staging / f"{name}.tflite")))
            if cfg["tflite"]["int8"]:
                data = representative_images(
                    train, int(cfg["tflite"]["representative_samples"]), int(cfg["seed"])
                )
                path = to_tflite(model, staging / f"{name}_int8.tflite", data)
                done.append(Exported("tflite_int8", path))
        else:
            onnx_meta = {**metadata, "hwexp.classes": json.dumps(list(trained.classes))}
            path = to_onnx(model, staging / f"{name}.onnx", cfg["onnx"]["opset"], onnx_meta)
            done.append(Exported("onnx", path))
    return done


def _size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _verify(
    cfg: Mapping[str, Any],
    model: keras.Model,
    trained: TrainedModel,
    test: SplitArrays,
    exported: list[Exported],
) -> dict[str, float]:
    """Fill each ``Exported``'s checks and metrics; returns the Keras-side metrics."""
    size, n_classes = int(model.input_shape[1]), len(trained.classes)
    predictors: dict[str, Predict] = {}
    for item in exported:
        item.metrics["size_bytes"] = float(_size_bytes(item.path))
        if item.variant.startswith("coreml"):
            item.checks.update(check_coreml(item.path, trained.classes, size, trained.run_id))
            if sys.platform == "darwin":
                predictors[item.variant] = coreml_predictor(item.path, trained.classes)
            else:
                item.checks["predictions"] = "not run: Core ML predicts on macOS only"
        else:
            item.checks.update(check_tensor_io(item.path, item.variant, size, n_classes))
            runner = tflite_predictor if item.variant.startswith("tflite") else onnx_predictor
            predictors[item.variant] = runner(item.path)
    verify = cfg["verify"]
    rows = _evenly_spread(len(test), verify.get("max_samples"))
    parity = compare_on_split(model, test, predictors, int(verify["batch_size"]), rows)
    minimum = float(verify["min_agreement"])
    for item in exported:
        if item.variant not in parity:
            continue
        item.metrics.update(parity[item.variant])
        agreement = parity[item.variant]["agreement"]
        if item.variant in QUANTIZED_VARIANTS:
            item.checks["agreement"] = f"{agreement:.4f} (quantized: reported, not enforced)"
        else:
            item.checks["agreement"] = agreement >= minimum
    keras_accuracy = parity["keras"]["accuracy"]
    metrics = {"keras/accuracy": keras_accuracy, "test_samples": float(len(rows))}
    logged = trained.metrics.get("test/accuracy")
    if logged is not None and len(rows) == len(test) and abs(logged - keras_accuracy) > 1e-6:
        log.warning(
            "Keras accuracy on the test split (%.4f) differs from the run's test/accuracy "
            "(%.4f): the data prepared here is not exactly what the run was tested on",
            keras_accuracy,
            logged,
        )
    return metrics


def _replace_folder(staging: Path, final: Path) -> None:
    """Move ``staging`` to ``final``, replacing an older export (renames on one filesystem)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    try:
        staging.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_run(cfg: DictConfig) -> ExportResult:
    """Export ``cfg.run`` as ``conf/export.yaml`` says; see the module docstring.

    Raises:
        RunNotFound: no such run, or it has no model.
        ConfigError: an invalid option (format, weights) or unpreparable data.
        ExportError: a conversion or a check failed (nothing was written).
    """
    from hwexp.data.dataset import load_splits
    from hwexp.track import client_for, find_run, load_trained_model

    formats = _requested_formats(cfg)
    client = client_for(cfg.tracking)
    select = cfg.select
    run_id = find_run(client, str(cfg.run), select.experiment, select.metric, select.parent_run)
    trained = load_trained_model(client, run_id)
    model = inference_model(trained.model)
    splits = load_splits(run_data_config(cfg, trained.config), progress=False)
    if tuple(splits.classes) != tuple(trained.classes):
        raise ExportError(
            f"run {run_id}: its classes.txt and its dataset config disagree on the classes "
            f"({''.join(trained.classes[:10])}… vs {''.join(splits.classes[:10])}…)"
        )
    out_root = Path(str(cfg.output_dir)).expanduser().resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    final = out_root / run_id
    staging = Path(tempfile.mkdtemp(prefix=f".{run_id}-", dir=out_root))
    staging.chmod(0o755)  # mkdtemp's 0700 would stay on the final folder
    try:
        try:
            exported = _convert_all(cfg, model, trained, splits.train, staging)
        except (ConfigError, ExportError):
            raise
        except Exception as error:  # a converter's own failure, with its message
            raise ExportError(f"conversion failed: {type(error).__name__}: {error}") from error
        keras_metrics = _verify(cfg, model, trained, splits.test, exported)
        failed = {e.variant: e.failed_checks for e in exported if e.failed_checks}
        metrics = {f"export/{k}": v for k, v in keras_metrics.items()}
        for item in exported:
            metrics.update({f"export/{item.variant}/{k}": v for k, v in item.metrics.items()})
        report = {
            "run_id": run_id,
            "formats": formats,
            "dataset": trained.config.get("dataset", {}).get("name"),
            "classes": len(trained.classes),
            "image_size": int(model.input_shape[1]),
            "ink": INK,
            "hwexp_version": __version__,
            "metrics": metrics,
            "files": {
                e.variant: {"file": e.path.name, "checks": e.checks, **e.metrics} for e in exported
            },
        }
        if failed:
            details = "; ".join(f"{v}: {', '.join(c)}" for v, c in failed.items())
            raise ExportError(
                f"export of run {run_id} failed its checks ({details}); nothing was written. "
                f"Details: {json.dumps(report['files'], default=str)}"
            )
        (staging / "classes.txt").write_text("".join(f"{c}\n" for c in trained.classes), "utf-8")
        (staging / "export.json").write_text(json.dumps(report, indent=2, default=str), "utf-8")
        _replace_folder(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = {e.variant: final / e.path.name for e in exported}
    registered = _log_and_register(cfg, client, trained, final, metrics, files)
    return ExportResult(run_id, final, files, metrics, report, registered)


def _log_and_register(
    cfg: Mapping[str, Any],
    client: Any,
    trained: TrainedModel,
    folder: Path,
    metrics: Mapping[str, float],
    files: Mapping[str, Path],
) -> str | None:
    """Log the export to its run and register it, as ``cfg.log`` / ``cfg.register`` say."""
    from hwexp.track import log_export, register_model

    if not cfg.get("log", True):
        return None
    source = log_export(client, trained.run_id, folder, metrics, {EXPORT_RUN_TAG: str(folder)})
    if not cfg.get("register", True):
        return None
    name = str(cfg.get("register_name") or trained.config.get("dataset", {}).get("name"))
    coreml = files.get("coreml") or files.get("coreml_nn")
    tags = {
        "run_id": trained.run_id,
        "formats": ",".join(sorted(files)),
        "coreml_package": coreml.name if coreml else "",
        "coreml_weights": str(cfg["coreml"]["weights"]),
        "ink": INK,
        **{
            k.removeprefix("export/"): f"{v:.4f}"
            for k, v in metrics.items()
            if k.endswith(("/accuracy", "/agreement"))
        },
    }
    description = f"hwexp export of run {trained.run_id} ({', '.join(sorted(files))})"
    version = register_model(client, name, trained.run_id, source, tags, description)
    return f"{name}/{version}"


# --------------------------------------------------------------------------- after a sweep


def sweep_export_config(
    sweep_cfg: DictConfig,
    parent_run_id: str,
    overrides: Sequence[str] = (),
    best_child: str | None = None,
) -> DictConfig:
    """``conf/export.yaml`` with ``overrides`` and the sweep's ``paths`` and ``tracking``,
    exporting among the children of ``parent_run_id``: ``select.metric`` when overridden;
    else ``best_child`` (the trial the sweeper tagged best, which knows the direction) when
    given; else ``run=best`` by the sweep's ``optimized_metric`` (highest)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        cfg = compose("export", overrides=list(overrides))
    else:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose("export", overrides=list(overrides))
    metric_given = any(o.lstrip("+~").startswith("select.metric=") for o in overrides)
    with open_dict(cfg):
        cfg.paths = OmegaConf.to_container(sweep_cfg.paths, resolve=True)
        cfg.tracking = OmegaConf.to_container(sweep_cfg.tracking, resolve=True)
        cfg.run = best_child if best_child and not metric_given else "best"
        cfg.select.parent_run = parent_run_id
        cfg.select.experiment = None  # the parent's experiment
        if not metric_given and sweep_cfg.get("optimized_metric"):
            cfg.select.metric = str(sweep_cfg.optimized_metric)
    return cfg


class ExportAfterSweep(Callback):
    """Hydra callback: when a multirun ends, export its best trial (see the module docstring).

    ``overrides``: overrides of ``conf/export.yaml`` (formats, coreml.weights, ...);
    ``enabled``: false makes the callback do nothing (for a config switch).
    """

    def __init__(self, overrides: Sequence[str] = (), enabled: bool = True) -> None:
        self.overrides = [str(o) for o in overrides]
        self.enabled = bool(enabled)
        self.result: ExportResult | None = None

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.enabled:
            log.warning(
                "export.after_sweep applies to sweeps (python -m hwexp -m ...); export this run "
                "with: python -m hwexp.export run=<run id>"
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from hwexp.track import BEST_TRIAL_TAG, client_for, find_sweep_parent, tagged_child

        if not self.enabled:
            return
        if not config.tracking.get("enabled", True):
            log.warning("tracking is disabled: no MLflow runs to export after this sweep")
            return
        client = client_for(config.tracking)
        sweep_id = str(Path(str(config.hydra.sweep.dir)).expanduser().resolve())
        parent = find_sweep_parent(client, sweep_id)
        best = tagged_child(client, parent, BEST_TRIAL_TAG)
        self.result = export_run(sweep_export_config(config, parent, self.overrides, best))
        print(summary(self.result))


# --------------------------------------------------------------------------- command line


def summary(result: ExportResult) -> str:
    """A few lines: one per exported file (size, test accuracy, agreement with Keras)."""
    m = result.metrics
    lines = [
        f"exported run {result.run_id} to {result.folder} "
        f"(Keras test accuracy {m['export/keras/accuracy']:.4f} on "
        f"{int(m['export/test_samples'])} images)"
    ]
    for variant, path in result.files.items():
        size = m[f"export/{variant}/size_bytes"] / 1e6
        accuracy = m.get(f"export/{variant}/accuracy")
        parity = (
            "checked (spec only)"
            if accuracy is None
            else f"accuracy {accuracy:.4f}, agreement {m[f'export/{variant}/agreement']:.4f}"
        )
        lines.append(f"  {variant:<12} {path.name:<28} {size:7.2f} MB  {parity}")
    if result.registered:
        lines.append(f"registered as {result.registered} in the MLflow Model Registry")
    return "\n".join(lines)


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra task: export one run and print what was written."""
    from hwexp.track import RunNotFound

    try:
        result = export_run(cfg)
    except (DataError, RunNotFound, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(summary(result))


if __name__ == "__main__":
    main()
