"""Core ML export: ``formats=[coreml]`` writes ``<name>.mlpackage``, an ML Program for iOS 15+
(``coreml.weights=fp16``, the default) or iOS 16+ (``int8`` linear / ``palette8`` /
``palette4`` weight compression); ``formats=[coreml_nn]`` writes ``<name>.mlmodel``, the older
neural-network format (iOS 13+; fp16 or int8). Both are classifiers whose labels are the
characters (``classLabel``, ``classLabel_probs``). Specs are checked everywhere; predictions
run on macOS only.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hwexp.contract import INPUT_NAME, RUN_ID_KEY
from hwexp.errors import ConfigError, ExportError
from hwexp.export.base import Conversion, Exported, Format, Predict

if TYPE_CHECKING:
    import keras

COREML_WEIGHTS = ("fp16", "int8", "palette8", "palette4")
NN_WEIGHTS = ("fp16", "int8")  # what the neural-network format can store
CORE_ML_LABEL = "classLabel"
CORE_ML_PROBS = "classLabel_probs"
_AFFINE_PASS_THROUGH = frozenset(
    {"transpose", "cast", "reshape", "expand_dims", "squeeze", "identity"}
)
_NN_PASS_THROUGH = frozenset(
    {"transpose", "reshape", "reshapeStatic", "flatten", "squeeze", "expandDims"}
)


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
    if weights not in COREML_WEIGHTS or (neuralnetwork and weights not in NN_WEIGHTS):
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
                name=INPUT_NAME,
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
        if name == INPUT_NAME:
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


def coreml_predictor(path: Path, classes: Sequence[str]) -> Predict:
    """Run a Core ML classifier (macOS only): each image as a grayscale picture."""
    ct = _quiet_coremltools()
    from PIL import Image

    model = ct.models.MLModel(str(path))
    index_of = {char: i for i, char in enumerate(classes)}

    def predict(images: np.ndarray) -> np.ndarray:
        outputs = model.predict([{INPUT_NAME: Image.fromarray(im[..., 0])} for im in images])
        probs = np.zeros((len(images), len(classes)), np.float32)
        for row, out in enumerate(outputs):
            for char, p in out[CORE_ML_PROBS].items():
                probs[row, index_of[char]] = p
        return probs

    return predict


def _mil_input_affine(spec: Any, weights_dir: str | None) -> tuple[float, float, Any]:
    """``(scale, bias, program)``: the affine map an ML Program applies to input pixels before
    its first non-elementwise op, read from the saved program (image preprocessing included)."""
    from coremltools.converters.mil.frontend.milproto.load import load_mil_proto

    program = load_mil_proto(spec.mlProgram, spec.specificationVersion, weights_dir or "")
    function = program.functions["main"]
    var, scale, bias = function.inputs[INPUT_NAME], 1.0, 0.0
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
        if step.featureName == INPUT_NAME and step.WhichOneof("preprocessor") == "scaler":
            scale, bias = float(step.scaler.channelScale), float(step.scaler.grayBias)
    blob = INPUT_NAME
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
        and inputs[0].name == INPUT_NAME
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
    checks["run_id_in_metadata"] = spec.description.metadata.userDefined.get(RUN_ID_KEY) == run_id
    return checks


def check_options(cfg: Mapping[str, Any], formats: list[str]) -> None:
    """``coreml.weights`` is one of ``COREML_WEIGHTS`` (and fits ``coreml_nn`` if requested)."""
    weights = str(cfg["coreml"]["weights"])
    if weights not in COREML_WEIGHTS:
        raise ConfigError(f"coreml.weights={weights!r}: choose one of {list(COREML_WEIGHTS)}")
    if "coreml_nn" in formats and weights not in NN_WEIGHTS:
        raise ConfigError(f"coreml_nn takes coreml.weights fp16 or int8, not {weights!r}")


def _converter(neuralnetwork: bool) -> Callable[[Conversion], list[Exported]]:
    variant = "coreml_nn" if neuralnetwork else "coreml"

    def convert(cv: Conversion) -> list[Exported]:
        path = cv.staging / f"{cv.name}.{'mlmodel' if neuralnetwork else 'mlpackage'}"
        weights = str(cv.cfg["coreml"]["weights"])
        to_coreml(
            cv.model, cv.trained.classes, path, cv.metadata, cv.descriptions, weights, neuralnetwork
        )
        return [Exported(variant, variant, path)]

    return convert


def check(item: Exported, cv: Conversion) -> dict[str, Any]:
    """``check_coreml``; on other systems than macOS, says the predictions were not run."""
    checks = check_coreml(item.path, cv.trained.classes, cv.size, cv.trained.run_id)
    if sys.platform != "darwin":
        checks["predictions"] = "not run: Core ML predicts on macOS only"
    return checks


def predictor(item: Exported, cv: Conversion) -> Predict | None:
    """Core ML runs on macOS only (None elsewhere)."""
    return coreml_predictor(item.path, cv.trained.classes) if sys.platform == "darwin" else None


ML_PROGRAM = Format(_converter(False), check, predictor, check_options)
NEURAL_NETWORK = Format(_converter(True), check, predictor, check_options)
