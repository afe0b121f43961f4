"""MLflow models and datasets of hwexp runs (built with MLflow's own formats, written through an
explicit ``MlflowClient`` by ``Tracker`` and ``hwexp.export``):

* a training run's model (``Tracker.log_model``): an MLflow 3 logged model named ``model``
  (``runs:/<run id>/model``, ``models:/<model id>``), flavour ``python_function`` with the code
  of ``keras_pyfunc.py``: ``mlflow.pyfunc.load_model(...).predict(images)`` takes prepared
  images, uint8 ``(n, S, S)``, and returns a DataFrame (``character``, ``probability``,
  ``top_characters``, ``top_probabilities``, ``probabilities``); ``artifacts/model.keras`` and
  ``artifacts/classes.txt`` are the files hwexp itself loads;
* an export folder (``add_onnx_flavour``): the folder itself becomes an MLflow model with the
  ONNX flavour over its ``<name>.onnx`` (input ``image`` uint8 ``(n, S, S, 1)``, output
  ``probabilities`` float32 ``(n, classes)``), so the registered version has a signature and
  loads with ``mlflow.pyfunc.load_model`` (predict returns ``{"probabilities": array}``);
* the training data (``dataset_inputs``): one MLflow dataset per source, named after its cache
  entry, whose digest is the cache fingerprint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.schema import TensorDatasetSchema
from mlflow.entities import (
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
)
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.types.schema import Array
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

from hwexp.contract import (
    CLASSES_FILE,
    INPUT_NAME,
    MODEL_DIR,
    MODEL_FILE,
    MODEL_NAME_TAG,
    OUTPUT_NAME,
    TOP_K,
    write_classes,
)

if TYPE_CHECKING:
    import keras

    from hwexp.data.dataset import PreparedSplits

KERAS_PYFUNC_CODE = Path(__file__).with_name("keras_pyfunc.py")
KERAS_REQUIREMENTS = ("mlflow", "keras", "tensorflow", "numpy", "pandas", "h5py")
ONNX_REQUIREMENTS = ("mlflow", "onnx", "onnxruntime", "numpy")
EXAMPLE_IMAGES = 2  # prepared images stored as each model's input example
CLASS_SET_TAG = "hwexp.class_set"  # on a dataset input: the class set's short name
SOURCE_TAG = "hwexp.source"  # on a dataset input: the source it holds


def requirements(*packages: str) -> list[str]:
    """``name==version`` of each installed package (absent ones are left out): pinned, so MLflow
    need not infer them (which loads the model in a subprocess, seconds per run)."""
    pinned = []
    for package in packages:
        try:
            pinned.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return pinned


def keras_signature(size: int) -> ModelSignature:
    """Prepared images in, the ``keras_pyfunc`` DataFrame out, param ``top_k``."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size))]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "character"),
                ColSpec(DataType.float, "probability"),
                ColSpec(Array(DataType.string), "top_characters"),
                ColSpec(Array(DataType.float), "top_probabilities"),
                ColSpec(Array(DataType.float), "probabilities"),
            ]
        ),
        params=ParamSchema([ParamSpec("top_k", DataType.long, TOP_K)]),
    )


def example_images(images: Any, size: int) -> np.ndarray:
    """The first ``EXAMPLE_IMAGES`` of ``images`` (``(n, S, S)`` uint8), or black images when
    there are none."""
    chosen = np.asarray(images[:EXAMPLE_IMAGES], np.uint8) if len(images) else np.zeros(0)
    return chosen if len(chosen) else np.zeros((1, size, size), np.uint8)


def save_keras_pyfunc(
    model: keras.Model,
    classes: Sequence[str],
    path: Path,
    example: np.ndarray,
    description: Model | None = None,
) -> None:
    """Write ``model`` with ``classes`` to ``path`` (must not exist) as an MLflow pyfunc model
    (see the module docstring). ``example``: prepared images, the input example;
    ``description``: the ``MLmodel`` to fill (run and model ids, metadata), else a new one.

    Raises ``ValueError`` when a class contains a newline (before anything is written)."""
    import mlflow.pyfunc

    size = int(model.input_shape[1])
    description = description or Model()
    description.metadata = {**(description.metadata or {}), "classes": list(classes)}
    with tempfile.TemporaryDirectory(prefix="hwexp-keras-") as tmp:
        model_file, classes_file = Path(tmp, MODEL_FILE), Path(tmp, CLASSES_FILE)
        write_classes(classes_file, classes)
        model.save(model_file)
        mlflow.pyfunc.save_model(
            str(path),
            python_model=str(KERAS_PYFUNC_CODE),
            artifacts={"keras_model": str(model_file), "classes": str(classes_file)},
            model_config={"top_k": TOP_K},
            mlflow_model=description,
            signature=keras_signature(size),
            input_example=example,
            pip_requirements=requirements(*KERAS_REQUIREMENTS),
        )


def log_keras_model(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    model: keras.Model,
    classes: Sequence[str],
    name: str | None = None,
    example: np.ndarray | None = None,
) -> str:
    """Log ``model`` as run ``run_id``'s MLflow model ``model`` (an MLflow 3 logged model:
    ``save_keras_pyfunc``, then uploaded, linked to the run with the run's step-0 metrics, as
    ``mlflow.pyfunc.log_model`` would) through ``client``; tag ``hwexp.model_name=name``.
    Returns its model id; on an error it is marked FAILED.

    Raises ``ValueError`` when a class contains a newline."""
    tags = {MODEL_NAME_TAG: name} if name else {}
    logged = client.create_logged_model(
        experiment_id, MODEL_DIR, source_run_id=run_id, tags=tags, model_type="keras"
    )
    description = Model(
        run_id=run_id,
        model_id=logged.model_id,
        model_uuid=logged.model_id,
        artifact_path=logged.artifact_location,
        metadata=tags,
    )
    size = int(model.input_shape[1])
    try:
        with tempfile.TemporaryDirectory(prefix="hwexp-model-") as tmp:
            folder = Path(tmp) / MODEL_DIR
            examples = example_images([] if example is None else example, size)
            save_keras_pyfunc(model, classes, folder, examples, description)
            client.log_model_artifacts(logged.model_id, str(folder))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    _link_metrics(client, run_id, logged.model_id)
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return logged.model_id


def _link_metrics(client: MlflowClient, run_id: str, model_id: str, step: int = 0) -> None:
    """Run ``run_id``'s metrics at ``step`` also as the logged model's (same values and times,
    so the run's history gets no second point), as ``mlflow.pyfunc.log_model`` does."""
    entries = [
        Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=run_id)
        for key in client.get_run(run_id).data.metrics
        for m in client.get_metric_history(run_id, key)
        if m.step == step and m.model_id is None
    ]
    for start in range(0, len(entries), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=entries[start : start + MAX_METRICS_PER_BATCH])


def onnx_signature(size: int, num_classes: int) -> ModelSignature:
    """``image`` uint8 ``(-1, S, S, 1)`` in, ``probabilities`` float32 ``(-1, classes)`` out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 1), INPUT_NAME)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), OUTPUT_NAME)]),
    )


def add_onnx_flavour(
    folder: Path,
    onnx_file: Path,
    classes: Sequence[str],
    example: np.ndarray,
    model_metadata: Mapping[str, Any] | None = None,
) -> None:
    """Make ``folder`` (which holds ``onnx_file``) an MLflow model with the ONNX flavour over
    that file: ``MLmodel`` (signature, metadata with the classes), the input example and the
    environment files, written beside the export's own files; the ONNX file is not copied."""
    import mlflow.onnx
    import onnx

    size = int(example.shape[1])
    with tempfile.TemporaryDirectory(prefix="hwexp-onnx-") as tmp:
        saved = Path(tmp, "model")
        mlflow.onnx.save_model(
            onnx.load(str(onnx_file)),
            str(saved),
            signature=onnx_signature(size, len(classes)),
            input_example=example,
            pip_requirements=requirements(*ONNX_REQUIREMENTS),
            metadata={**(model_metadata or {}), "classes": list(classes)},
            save_as_external_data=False,
        )
        mlmodel = Model.load(str(saved / "MLmodel"))
        for flavour in ("onnx", "python_function"):
            mlmodel.flavors[flavour]["data"] = onnx_file.name
        (saved / "model.onnx").unlink()
        mlmodel.save(str(saved / "MLmodel"))
        for item in saved.iterdir():
            shutil.move(str(item), folder / item.name)


class PreparedData(MetaDataset):
    """A cache entry as an MLflow dataset: its description, not its arrays (``profile``: the
    samples per split; ``schema``: images and class indices)."""

    def __init__(
        self, source: Any, name: str, digest: str, profile: dict, schema: TensorDatasetSchema
    ) -> None:
        super().__init__(source, name=name, digest=digest)
        self._profile = profile
        self._tensor_schema = schema

    @property
    def profile(self) -> dict:
        return self._profile

    @property
    def schema(self) -> TensorDatasetSchema:
        return self._tensor_schema

    def to_dict(self) -> dict[str, str]:
        return {
            **super(MetaDataset, self).to_dict(),
            "schema": json.dumps(self._tensor_schema.to_dict()),
            "profile": json.dumps(self._profile),
        }


def dataset_inputs(splits: PreparedSplits) -> list[DatasetInput]:
    """One training-data input per source of ``splits`` that came from the cache (name: the
    entry's label, e.g. ``synthetic-hiragana75-48px``; digest: its fingerprint; source: the
    entry folder; tags: context ``training``, the class set, the source)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    from hwexp.data.cache import entry_identity

    size = splits.image_size
    schema = TensorDatasetSchema(
        features=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size), "images")]),
        targets=Schema([TensorSpec(np.dtype(np.int32), (-1,), "labels")]),
    )
    inputs = []
    for source, entry in splits.entries.items():
        label, digest = entry_identity(entry)
        profile = {"classes": len(splits.classes), "image_size": size}
        profile |= {f"{part}_samples": n for part, n in splits.samples_of(source).items()}
        with warnings.catch_warnings():  # two equivalent local-file sources are registered
            warnings.simplefilter("ignore", UserWarning)
            location = resolve_dataset_source(Path(entry).resolve().as_uri())
        dataset = PreparedData(location, label, digest, profile, schema)
        tags = {
            MLFLOW_DATASET_CONTEXT: "training",
            CLASS_SET_TAG: splits.class_set or f"{len(splits.classes)} classes",
            SOURCE_TAG: source,
        }
        inputs.append(
            DatasetInput(
                dataset._to_mlflow_entity(), [InputTag(k, str(v)) for k, v in tags.items()]
            )
        )
    return inputs
