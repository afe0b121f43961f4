"""What training, tracking, export and serving agree on about a model and its run (no Keras,
no MLflow): tensor names, top-k, the ``classes.txt`` format, a model's name, tags and metadata
keys, artifact paths and the default tracking store. Change a value here and every side follows.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Tensors of every trained and exported model: uint8 (n, S, S, 1) in, float32 (n, classes) out.
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
TOP_K = 5  # the k of top-k accuracy and of the served guesses
INK = "white-on-black"  # input polarity of every model (as hwexp.data.preprocess writes it)

# Artifacts of a training run.
MODEL_DIR = "model"  # runs:/<run id>/model, an MLflow model: see trained_model_files
MODEL_FILE = "model.keras"
CLASSES_FILE = "classes.txt"
PYFUNC_ARTIFACTS_DIR = "artifacts"  # where an MLflow pyfunc model keeps its files
CONFIG_FILE = "config.yaml"
EXPORT_DIR = "export"  # a verified export, logged to the run it was made from
MODEL_CARD_FILE = "MODEL_CARD.md"  # in every export folder

# Run tags.
HAS_MODEL_TAG = "hwexp.has_model"  # set once a run's model artifact is complete
EXPORTED_TAG = "hwexp.exported"  # "true" once a verified export is logged to a run
SWEEP_ID_TAG = "hwexp.sweep_id"  # on a sweep's parent run: the absolute hydra.sweep.dir
BEST_TRIAL_TAG = "hwexp.best_trial"  # "true" on the child run of a study's best trial
ERROR_TAG = "hwexp.error"  # why a run or trial failed
EVALUATED_RUN_TAG = "hwexp.evaluated_run"  # on an evaluation run: the run it evaluated
# On an evaluation run: how many of the evaluated writers wrote samples of the evaluated run's
# training split ("0": none; "unknown": the run's training data could not be rebuilt).
WRITER_OVERLAP_TAG = "hwexp.writer_overlap"
MODEL_NAME_TAG = "hwexp.model_name"  # on a training run and its model: model_name(...)
CLASSES_DIGEST_TAG = "hwexp.classes_digest"  # on a registered version: classes_digest(...)

# Metric names: one scheme, "<split>/<measure>". Per epoch (step = completed epochs), from the
# Keras logs: train/loss, train/accuracy, train/top5_accuracy, train/learning_rate,
# train/samples_per_second, val/loss, val/accuracy, val/top5_accuracy. Once, at the end: test/*
# (the kept model on the test split), val/best_accuracy, val/best_loss, val/best_top5_accuracy
# (at the best-accuracy epoch), train/epochs, train/seconds, train/steady_samples_per_second,
# train/stopped_early. Keras callbacks and pruners keep Keras' own keys (val_accuracy, ...).
RENAMED_METRICS = {  # end-of-run names before the per-epoch curves took them -> names now
    "val/accuracy": "val/best_accuracy",
    "val/loss": "val/best_loss",
    "val/top5_accuracy": "val/best_top5_accuracy",
    "train/samples_per_second": "train/steady_samples_per_second",
}


def epoch_metric_name(log_key: str) -> str:
    """The tracked name of a Keras epoch log key: ``val_accuracy`` -> ``val/accuracy``,
    ``loss`` -> ``train/loss``, ``learning_rate`` -> ``train/learning_rate``."""
    return f"val/{log_key[4:]}" if log_key.startswith("val_") else f"train/{log_key}"


def summary_metric_name(name: str) -> str:
    """``name`` as an end-of-run metric is called now (``RENAMED_METRICS``; others unchanged),
    for options written before the rename (``optimized_metric: val/accuracy``)."""
    return RENAMED_METRICS.get(name, name)


# Metadata keys of an exported model (ONNX metadata, Core ML user-defined metadata).
RUN_ID_KEY = "hwexp.run_id"
DATASET_KEY = "hwexp.dataset"  # the run's dataset config name
CLASS_SET_KEY = "hwexp.class_set"  # its class set (hiragana75, chars:あいう, ...)
SOURCE_KEY = "hwexp.source"  # where its training images came from (synthetic, etl8g, ...)
TEST_ACCURACY_KEY = "hwexp.test_accuracy"  # "0.9876", or "unknown"
PREPROCESS_KEY = "hwexp.preprocess"  # JSON of the preprocessing options
CLASSES_KEY = "hwexp.classes"  # JSON list of the classes (ONNX only)
MODEL_NAME_KEY = "hwexp.model_name"

_CHARS_PREFIX = "chars:"  # hwexp.data.charsets.CHARS_PREFIX (the data layer's spelling)
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9_.+-]")


def classes_digest(classes: Sequence[str]) -> str:
    """16 hex digits of the SHA-256 of ``classes`` in output order: equal digests, same classes
    in the same order."""
    text = "\n".join(classes)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def model_name(dataset: Mapping[str, Any], classes: Sequence[str]) -> str:
    """The name a model trained with run config block ``dataset`` on ``classes`` (its output
    order) is exported, registered and logged under: what it reads, then what it learnt from.

    ``<class set>-<sources>``:

    * class set: a named set as named (``hiragana75``, ``katakana48``, ``kanji881``,
      ``etl9_3036``); cut by ``limit_classes=K``: ``<set>-first<K>`` (``hiragana75-first5``);
      ``chars:…`` or a list: ``chars<N>-<8 hex digits of classes_digest>``; ``auto`` (a
      folder's names): ``folder<N>-<8 hex digits>``. So a subset never shares the full set's
      name, and two subsets share one only when they are the same characters in the same order.
    * sources: ``dataset.source``, sorted and joined by ``+`` (``hiragana75-etl8g``,
      ``hiragana75-etl8g+synthetic``); left out when the class set's name already says it
      (``kmnist10``, ``k49``, ``folder<N>-…`` from ``folder``).

    Only ASCII letters, digits and ``_ . + -`` appear (a file stem and a registered model name
    anywhere); ``dataset`` may be a plain mapping or an OmegaConf node.
    """
    spec = dataset.get("classes")
    limit = dataset.get("limit_classes")
    digest = classes_digest(classes)[:8]
    if isinstance(spec, str) and spec == "auto":
        class_set = f"folder{len(classes)}-{digest}"
    elif isinstance(spec, str) and spec and not spec.startswith(_CHARS_PREFIX):
        class_set = f"{spec}-first{int(limit)}" if limit else spec
    else:
        class_set = f"chars{len(classes)}-{digest}"
    source = dataset.get("source") or []
    sources = sorted([source] if isinstance(source, str) else [str(s) for s in source])
    if len(sources) == 1 and class_set.startswith(sources[0]):
        sources = []
    name = "-".join([class_set, "+".join(sources)] if sources else [class_set])
    return _UNSAFE_IN_NAME.sub("_", name)


def trained_model_files(model_dir: str | Path) -> tuple[Path, Path]:
    """``(model.keras, classes.txt)`` of a training run's downloaded ``model`` artifact: an
    MLflow pyfunc model keeps them under ``artifacts/``; runs logged before hwexp logged MLflow
    models hold them at the top of ``model/``."""
    folder = Path(model_dir)
    if not (folder / MODEL_FILE).is_file() and (folder / PYFUNC_ARTIFACTS_DIR).is_dir():
        folder = folder / PYFUNC_ARTIFACTS_DIR
    return folder / MODEL_FILE, folder / CLASSES_FILE


def write_classes(path: str | Path, classes: Sequence[str]) -> None:
    """Write ``classes`` to ``path``: UTF-8, one class per line, line i is output i.

    Raises ``ValueError`` when a class contains a newline (the file would be ambiguous)."""
    if any("\n" in c for c in classes):
        raise ValueError(f"a class name contains a newline; {CLASSES_FILE} would be ambiguous")
    Path(path).write_text("".join(f"{c}\n" for c in classes), "utf-8")


def read_classes(path: str | Path) -> tuple[str, ...]:
    """The classes of a file ``write_classes`` wrote (its final newline does not add one)."""
    lines = Path(path).read_text("utf-8").split("\n")
    return tuple(lines[:-1] if lines and lines[-1] == "" else lines)


def default_tracking_uri(mlruns_dir: str | Path, create: bool = True) -> str:
    """``sqlite:///<absolute mlruns_dir>/mlflow.db``; ``create`` makes ``mlruns_dir``."""
    root = Path(mlruns_dir).expanduser().resolve()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def default_mlruns_dir() -> Path:
    """``mlruns_dir`` of ``conf/paths/default.yaml`` (``<$HWEXP_ROOT or .>/mlruns``), absolute."""
    return _default_path("${paths.mlruns_dir}")


def default_exports_dir() -> Path:
    """``output_dir`` of ``conf/export.yaml`` (``<$HWEXP_ROOT or .>/outputs/exports``, where
    ``hwexp export`` writes ``<run id>/``), absolute."""
    from omegaconf import OmegaConf

    from hwexp import CONF_DIR

    export = OmegaConf.load(Path(CONF_DIR) / "export.yaml")
    return _default_path(OmegaConf.to_container(export)["output_dir"])


def _default_path(template: str) -> Path:
    """``template`` resolved against ``conf/paths/default.yaml``, absolute."""
    from omegaconf import OmegaConf

    from hwexp import CONF_DIR

    paths = OmegaConf.load(Path(CONF_DIR) / "paths" / "default.yaml")
    resolved = OmegaConf.create({"paths": paths, "value": template})
    return Path(str(resolved.value)).expanduser().resolve()
