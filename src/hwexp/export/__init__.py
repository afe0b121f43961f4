"""``python -m hwexp.export run=best|<run id> formats=[coreml,tflite,onnx]``: ship a trained run.

The run's stored model is turned into an inference graph (``strip_augmentation``: no random
layers), converted to every requested format, checked against the Keras model on the run's own
test split (prepared with the run's config, under this command's ``paths``), and only then moved
into ``<output_dir>/<run id>/``. Conversions run in a temporary folder beside it, so a failed
conversion or check leaves the previous export (if any) untouched and no partial files.

Formats (``formats=``) and the files they write (stem ``name``, default:
``hwexp.contract.model_name``, what the model reads and learnt from, e.g.
``hiragana75-etl8g``, ``hiragana75-first5-synthetic``):

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

Beside the files: ``classes.txt``, ``export.json``, ``MODEL_CARD.md`` (``card``: classes,
input and preprocessing, data and licences, accuracy per source, intended use) and, with
``onnx``, ``MLmodel`` and its environment files: the folder is an MLflow model with the ONNX
flavour over ``<name>.onnx`` (signature, input example; ``hwexp.tracking.mlmodels``).

Then (``log=true``) files, sizes, checks and ``export/<variant>/{accuracy,agreement,...}``
metrics are logged to the source run, and (``register=true``) the export folder, Core ML package
included, becomes a new version of the registered model ``register_name`` (default: the same
``model_name``) in the MLflow Model Registry, with the model card as its description. A
version that reads other classes than the registered model's newest is refused before
anything is written.

Modules: ``base`` (the ``Format`` interface), ``formats`` (the table of formats), one module
per format (``coreml``, ``tflite``, ``onnx``), ``verify`` (checks and parity), ``card`` (the
model card), ``run`` (``export_run``), ``after_sweep`` (the Hydra callback) and ``__main__``
(the command).
"""
