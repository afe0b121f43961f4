"""Train a model on ``PreparedSplits`` and evaluate it on the test split.

Configuration (a ``DictConfig`` or nested mapping) is read from these groups:
``model`` and ``augment`` (see ``hwexp.model``), ``trainer`` (``conf/trainer/default.yaml``)
and ``callbacks`` (``conf/callbacks/default.yaml``). Tracking is optional: pass a
``hwexp.tracking.writer.Tracker`` and everything (config, per-epoch metrics, test metrics, model,
plots) is logged to its run; this module imports ``hwexp.tracking`` (hence mlflow) only to load
the run that ``trainer.init_from`` names, whose weights training then starts from.

Epochs are counted from 1 (``epoch`` = number of completed epochs) in tracked metrics and in
the per-epoch hook.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import ops

from hwexp.config_check import LR_SCHEDULES, OPTIMIZERS, STRATEGIES
from hwexp.contract import MODEL_NAME_TAG, TOP_K, model_name
from hwexp.errors import ConfigError, RunNotFound
from hwexp.metrics import EvaluationReport
from hwexp.model import (
    IncompatibleWeights,
    build_model,
    copy_weights,
    shared_outputs,
    strip_augmentation,
)
from hwexp.pipeline import evaluation_batches, training_batches

if TYPE_CHECKING:
    from hwexp.data.dataset import PreparedSplits, SplitArrays
    from hwexp.tracking.runs import TrainedModel
    from hwexp.tracking.writer import Tracker

log = logging.getLogger(__name__)

EpochHook = Callable[[int, dict[str, float]], None]
"""Called after every epoch with (completed epochs, Keras logs incl. ``learning_rate``).
Raising stops training: the exception propagates out of ``fit``/``train_and_evaluate``."""

ONECYCLE_WARMUP_FRACTION = 0.3  # share of all steps spent warming up
ONECYCLE_START_DIVISOR = 25.0  # warm-up starts at lr / 25 (also cosine warm-up)
ONECYCLE_END_FRACTION = 1e-4  # anneals to lr * 1e-4
INIT_FROM_TAG = "hwexp.init_from"  # on a run started from another run's weights: that run's id


# --------------------------------------------------------------------------- compile


@keras.saving.register_keras_serializable(package="hwexp")
class SparseSmoothedCrossentropy(keras.losses.Loss):
    """Cross-entropy of probability outputs against integer labels with label smoothing.

    Equals ``CategoricalCrossentropy(label_smoothing=s)`` on one-hot labels:
    ``(1 - s) * -log p[y] + s * mean_c(-log p[c])``, without materialising one-hot labels
    (which ``SparseCategoricalCrossentropy`` cannot smooth).
    """

    def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_crossentropy", **kw):
        super().__init__(name=name, **kw)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        epsilon = keras.config.epsilon()
        log_probs = ops.log(ops.clip(ops.cast(y_pred, "float32"), epsilon, 1.0))
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        true_nll = -ops.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
        uniform_nll = -ops.mean(log_probs, axis=-1)
        return (1.0 - self.label_smoothing) * true_nll + self.label_smoothing * uniform_nll

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def learning_rate(
    trainer_cfg: Mapping[str, Any], steps_per_epoch: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate (per optimizer step) of ``trainer_cfg.lr_schedule``.

    ``constant``: ``lr``. ``cosine``: optional linear warm-up over ``warmup_epochs`` from
    ``lr / 25``, then cosine decay to 0 at the last step of ``epochs``. ``onecycle``: linear
    warm-up from ``lr / 25`` over the first 30 % of all steps, then cosine annealing to
    ``lr * 1e-4`` (no momentum cycling).
    """
    lr = float(trainer_cfg["lr"])
    schedule = trainer_cfg["lr_schedule"]
    total_steps = max(1, int(trainer_cfg["epochs"]) * steps_per_epoch)
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        warmup = min(total_steps - 1, int(trainer_cfg["warmup_epochs"]) * steps_per_epoch)
    elif schedule == "onecycle":
        warmup = int(ONECYCLE_WARMUP_FRACTION * total_steps)
    else:
        raise ValueError(f"unknown lr_schedule {schedule!r}: {' | '.join(LR_SCHEDULES)}")
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(lr, total_steps)
    return keras.optimizers.schedules.CosineDecay(
        lr / ONECYCLE_START_DIVISOR,
        decay_steps=total_steps - warmup,
        warmup_target=lr,
        warmup_steps=warmup,
        alpha=ONECYCLE_END_FRACTION if schedule == "onecycle" else 0.0,
    )


def make_optimizer(
    trainer_cfg: Mapping[str, Any], steps_per_epoch: int
) -> keras.optimizers.Optimizer:
    """``adam`` | ``adamw`` | ``sgd`` (Nesterov, ``momentum``) with ``learning_rate(...)``.

    ``weight_decay`` > 0 is decoupled weight decay (any optimizer; AdamW's default is 0.004 when
    unset, here it is what the config says) and spares biases and batch-norm parameters.
    """
    name = trainer_cfg["optimizer"]
    lr = learning_rate(trainer_cfg, steps_per_epoch)
    weight_decay = float(trainer_cfg["weight_decay"]) or None
    if name == "adam":
        optimizer = keras.optimizers.Adam(lr, weight_decay=weight_decay)
    elif name == "adamw":
        optimizer = keras.optimizers.AdamW(lr, weight_decay=weight_decay or 0.0)
    elif name == "sgd":
        momentum = float(trainer_cfg["momentum"])
        optimizer = keras.optimizers.SGD(
            lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
        )
    else:
        raise ValueError(f"unknown optimizer {name!r}: {' | '.join(OPTIMIZERS)}")
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def compile_model(model: keras.Model, trainer_cfg: Mapping[str, Any], steps_per_epoch: int) -> None:
    """Compile with the configured optimizer, (smoothed) sparse cross-entropy, accuracy and
    top-5 accuracy (log keys ``accuracy``, ``top5_accuracy``)."""
    smoothing = float(trainer_cfg["label_smoothing"])
    loss = (
        SparseSmoothedCrossentropy(smoothing)
        if smoothing > 0
        else keras.losses.SparseCategoricalCrossentropy()
    )
    num_classes = model.output_shape[-1]
    model.compile(
        jit_compile=bool(trainer_cfg["jit_compile"]),
        optimizer=make_optimizer(trainer_cfg, steps_per_epoch),
        loss=loss,
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(
                k=min(TOP_K, num_classes), name="top5_accuracy"
            ),
        ],
    )


# --------------------------------------------------------------------------- callbacks


class EpochRecorder(keras.callbacks.Callback):
    """Adds ``learning_rate`` (at the end of the epoch, after any reduction) and
    ``samples_per_second`` (training batches only, validation excluded) to each epoch's logs,
    and keeps each epoch's training seconds and samples."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self._epoch_start = 0.0
        self._train_end: float | None = None
        self._batches = 0
        self.epoch_seconds: list[float] = []
        self.epoch_samples: list[int] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start, self._train_end, self._batches = time.perf_counter(), None, 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._batches += 1

    def on_test_begin(self, logs: dict | None = None) -> None:
        if self._train_end is None:  # the first evaluation of an epoch is its validation
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        seconds = (self._train_end or time.perf_counter()) - self._epoch_start
        samples = self._batches * self.batch_size
        self.epoch_seconds.append(seconds)
        self.epoch_samples.append(samples)
        logs["samples_per_second"] = samples / seconds if seconds > 0 else 0.0
        logs["learning_rate"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def steady_samples_per_second(self) -> float:
        """Training throughput over all epochs but the first (which includes graph tracing),
        or over the first when it is the only one."""
        seconds = sum(self.epoch_seconds[1:]) or sum(self.epoch_seconds)
        samples = sum(self.epoch_samples[1:]) or sum(self.epoch_samples)
        return samples / seconds if seconds > 0 else 0.0


class EpochHookCallback(keras.callbacks.Callback):
    """Calls ``hook(completed epochs, logs)`` after every epoch; see ``EpochHook``."""

    def __init__(self, hook: EpochHook) -> None:
        super().__init__()
        self.hook = hook

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.hook(epoch + 1, dict(logs or {}))


def make_callbacks(
    callbacks_cfg: Mapping[str, Any], lr_schedule: str = "constant", verbose: int = 1
) -> list[keras.callbacks.Callback]:
    """EarlyStopping, ReduceLROnPlateau and ModelCheckpoint from their config blocks
    (each has ``enabled``). ReduceLROnPlateau needs a constant schedule: its ``enabled: auto``
    means with a constant schedule only; ``true`` with another is skipped with a warning.
    ``verbose`` 0 silences their messages."""
    chosen: list[keras.callbacks.Callback] = []
    reduce_cfg = callbacks_cfg["reduce_lr"]
    reduce_lr = reduce_cfg["enabled"]
    if reduce_lr == "auto":
        reduce_lr = lr_schedule == "constant"
    if reduce_lr and lr_schedule != "constant":
        log.warning("callbacks.reduce_lr ignored: it cannot change a %s lr schedule", lr_schedule)
    elif reduce_lr:
        chosen.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=reduce_cfg["monitor"],
                factor=float(reduce_cfg["factor"]),
                patience=int(reduce_cfg["patience"]),
                min_delta=float(reduce_cfg["min_delta"]),
                min_lr=float(reduce_cfg["min_lr"]),
                verbose=verbose,
            )
        )
    stop_cfg = callbacks_cfg["early_stopping"]
    if stop_cfg["enabled"]:
        chosen.append(
            keras.callbacks.EarlyStopping(
                monitor=stop_cfg["monitor"],
                mode=stop_cfg["mode"],
                patience=int(stop_cfg["patience"]),
                min_delta=float(stop_cfg["min_delta"]),
                restore_best_weights=bool(stop_cfg["restore_best_weights"]),
                verbose=verbose,
            )
        )
    checkpoint_cfg = callbacks_cfg["checkpoint"]
    if checkpoint_cfg["enabled"]:
        chosen.append(
            keras.callbacks.ModelCheckpoint(
                str(checkpoint_cfg["path"]),
                monitor=checkpoint_cfg["monitor"],
                mode=checkpoint_cfg["mode"],
                save_best_only=bool(checkpoint_cfg["save_best_only"]),
            )
        )
    return chosen


# --------------------------------------------------------------------------- precision


def mixed_precision_supported() -> bool:
    """True when a visible GPU has compute capability >= 7.0 (tensor cores for float16)."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability and capability >= (7, 0):
            return True
    return False


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of ``/proc/cpuinfo`` (or of the text ``cpuinfo``); empty when absent."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return flags


def cpu_has_bfloat16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16 in its flags,
    ``cpu_flags``); oneDNN then runs bfloat16 convolutions fast."""
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Set Keras' global dtype policy for the duration of the block, then restore it."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def chosen_dtype_policy(trainer_cfg: Mapping[str, Any]) -> str:
    """With ``trainer.mixed_precision`` true: ``mixed_float16`` on a GPU with compute
    capability >= 7.0, else ``mixed_bfloat16`` on a CPU with native bfloat16, else
    ``float32`` (with a warning). ``float32`` when it is false."""
    if not trainer_cfg["mixed_precision"]:
        return "float32"
    if mixed_precision_supported():
        return "mixed_float16"
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU") and cpu_has_bfloat16():
        return "mixed_bfloat16"
    log.warning(
        "trainer.mixed_precision ignored: no GPU with compute capability >= 7.0 and no CPU "
        "with native bfloat16 (AVX512-BF16 or AMX)"
    )
    return "float32"


# --------------------------------------------------------------------------- devices


def split_cpu(count: int) -> list[str]:
    """Split the CPU into ``count`` logical devices (names returned), which must happen before
    TensorFlow sets its devices up: once per process, or again with the same count.

    Raises:
        ConfigError: TensorFlow's devices were set up already with another split.
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if len(current or [None]) != count:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
            )
        except RuntimeError as error:
            raise ConfigError(
                f"trainer.cpu_replicas={count}: TensorFlow set its devices up before the CPU "
                f"could be split ({error}); split it in a fresh process"
            ) from error
    return [device.name for device in tf.config.list_logical_devices("CPU")]


def prepare_devices(trainer_cfg: Mapping[str, Any]) -> None:
    """Split the CPU as ``trainer.cpu_replicas`` asks, now: call it before anything starts
    TensorFlow's runtime (loading a model does, e.g. ``trainer.init_from``)."""
    if trainer_cfg.get("strategy") == "mirrored" and trainer_cfg.get("cpu_replicas"):
        split_cpu(int(trainer_cfg["cpu_replicas"]))


def distribution_strategy(trainer_cfg: Mapping[str, Any]) -> Any | None:
    """The ``tf.distribute`` strategy of ``trainer.strategy``, or None (``null``: one device).

    ``mirrored``: a ``MirroredStrategy`` over every visible GPU, or, with
    ``trainer.cpu_replicas`` > 0, over that many logical devices split from the CPU (a
    multi-device run on any machine; not faster). Call it before TensorFlow runs anything.
    """
    name = trainer_cfg.get("strategy")
    if name is None:
        return None
    if name not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={name}: one of {' | '.join(STRATEGIES)}, or null")
    import tensorflow as tf

    cpu_replicas = int(trainer_cfg.get("cpu_replicas") or 0)
    if cpu_replicas:
        return tf.distribute.MirroredStrategy(split_cpu(cpu_replicas))
    if not tf.config.list_physical_devices("GPU"):
        log.warning(
            "trainer.strategy=mirrored: no GPU visible, so one replica on the CPU "
            "(trainer.cpu_replicas splits the CPU into several)"
        )
    return tf.distribute.MirroredStrategy()


# --------------------------------------------------------------------------- start from a run


def load_init_source(cfg: Mapping[str, Any]) -> TrainedModel | None:
    """The run that ``trainer.init_from`` names, loaded from ``cfg.tracking``'s store, or None
    when it is null. A run id, or ``best``: the finished run with a model and the highest
    ``test/accuracy`` in ``tracking.experiment`` (resolved now, to that run's id).

    Raises:
        ConfigError: no such run, or it has no model; the message names the option.
    """
    ref = cfg["trainer"].get("init_from")
    if ref is None:
        return None
    from hwexp.tracking.runs import client_for, load_selected_model

    tracking_cfg = cfg["tracking"]
    client = client_for(tracking_cfg)
    try:
        return load_selected_model(
            client, str(ref), tracking_cfg["experiment"], option="trainer.init_from"
        )
    except RunNotFound as error:
        raise ConfigError(f"trainer.init_from={ref}: {error}") from error


def initial_model(
    splits: PreparedSplits,
    cfg: Mapping[str, Any],
    init: TrainedModel | None = None,
    policy: str = "float32",
) -> keras.Model:
    """``cfg.model`` built for ``splits`` under dtype ``policy``, with fresh weights, or with
    ``init``'s (see ``load_init_source``): every layer copied, the classifier by character,
    classes that ``init`` lacks left fresh (see ``hwexp.model.copy_weights``).

    Raises:
        ConfigError: ``init``'s weights do not fit this model (another ``model`` config, or
            another ``preprocess.size`` before a flatten head); names the option, run and layer.
    """
    with dtype_policy(policy):
        model = build_model(
            cfg["model"],
            cfg["augment"],
            len(splits.classes),
            splits.image_size,
            seed=int(cfg["trainer"]["seed"]),
        )
    if init is None:
        return model
    try:
        shared = copy_weights(model, init.model, splits.classes, init.classes)
    except IncompatibleWeights as error:
        raise ConfigError(
            f"trainer.init_from: the model of run {init.run_id} does not fit this one ({error}); "
            "start from a run with the same model config and preprocess.size"
        ) from error
    if init.model.input_shape != model.input_shape:
        log.warning(
            "trainer.init_from: run %s was trained on %s inputs, this model takes %s",
            init.run_id,
            init.model.input_shape[1:],
            model.input_shape[1:],
        )
    log.info(
        "started from the weights of run %s: %d classes matched by character, %d new (fresh "
        "weights), %d of its classes unused",
        init.run_id,
        len(shared),
        len(splits.classes) - len(shared),
        len(init.classes) - len(shared),
    )
    return model


def init_from_params(classes: Sequence[str], init: TrainedModel) -> dict[str, str]:
    """Params recording a start from ``init``: its run id, and how many of ``classes`` took
    their classifier weights from it (matched by character) or started fresh (new)."""
    matched = len(shared_outputs(classes, init.classes))
    return {
        "trainer.init_from_run": init.run_id,
        "trainer.init_from_matched_classes": str(matched),
        "trainer.init_from_new_classes": str(len(classes) - matched),
    }


# --------------------------------------------------------------------------- fit


@dataclass
class FitResult:
    """A trained model (with its augmentation layers) and how training went."""

    model: keras.Model
    history: dict[str, list[float]]  # Keras log key -> one value per completed epoch
    epochs_run: int
    stopped_early: bool  # an EarlyStopping callback ended training before trainer.epochs
    train_seconds: float  # wall time in training batches (validation excluded)
    samples_per_second: float  # training throughput, first (tracing) epoch excluded if possible
    dtype_policy: str
    replicas: int = 1  # devices trained on in sync; each batch is batch_size x replicas


def fit(
    splits: PreparedSplits,
    cfg: Mapping[str, Any],
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
    epoch_hook: EpochHook | None = None,
    init: TrainedModel | None = None,
) -> FitResult:
    """Build and train ``cfg.model`` on ``splits.train``, validating on ``splits.val``.

    Seeds Python, numpy and TF from ``trainer.seed``. Starts from the weights of ``init``, or,
    when None, of the run ``trainer.init_from`` names (see ``initial_model``).
    ``extra_callbacks`` run after the configured ones and see
    ``learning_rate``/``samples_per_second`` in their logs; ``epoch_hook`` runs after them.
    Under ``trainer.strategy`` (see ``distribution_strategy``) the model is built and compiled
    in the strategy's scope, ``batch_size`` is per replica and each step takes ``batch_size``
    x replicas samples (the learning rate is not scaled); metrics are the same.
    Returns the model as trained (best weights restored when early stopping says so).
    """
    trainer_cfg = cfg["trainer"]
    strategy = distribution_strategy(trainer_cfg)  # before TF runs anything: it may split the CPU
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    seed, batch_size = int(trainer_cfg["seed"]), int(trainer_cfg["batch_size"]) * replicas
    keras.utils.set_random_seed(seed)
    for name in ("train", "val"):
        if len(getattr(splits, name)) < replicas:
            raise ConfigError(
                f"the {name} split has {len(getattr(splits, name))} sample(s), fewer than the "
                f"{replicas} replicas of trainer.strategy=mirrored; use more data or fewer devices"
            )
    train = training_batches(splits.train, batch_size, seed, splits.source_weights, replicas)
    val = evaluation_batches(splits.val, batch_size, replicas)
    policy = chosen_dtype_policy(trainer_cfg)
    init = init or load_init_source(cfg)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = initial_model(splits, cfg, init, policy)
        compile_model(model, trainer_cfg, train.steps_per_epoch)
    configured = make_callbacks(
        cfg["callbacks"], trainer_cfg["lr_schedule"], verbose=min(1, int(trainer_cfg["verbose"]))
    )
    recorder = EpochRecorder(train.batch_size)
    # Order matters: the recorder runs after ReduceLROnPlateau (so it logs the reduced rate)
    # and before the extra callbacks (so a tracker sees learning_rate); the hook runs last, so
    # an epoch is tracked before the hook can abort training.
    callbacks = [*configured, recorder, *(extra_callbacks or [])]
    if epoch_hook is not None:
        callbacks.append(EpochHookCallback(epoch_hook))
    history = model.fit(
        train.dataset,
        epochs=int(trainer_cfg["epochs"]),
        steps_per_epoch=train.steps_per_epoch if train.infinite else None,
        validation_data=val.dataset,
        callbacks=callbacks,
        shuffle=False,  # the dataset shuffles itself
        verbose=trainer_cfg["verbose"],
    )
    epochs_run = len(history.epoch)
    stopped = any(
        isinstance(c, keras.callbacks.EarlyStopping) and c.stopped_epoch > 0 for c in configured
    )
    return FitResult(
        model=model,
        history={k: [float(v) for v in vs] for k, vs in history.history.items()},
        epochs_run=epochs_run,
        stopped_early=stopped,
        train_seconds=sum(recorder.epoch_seconds),
        samples_per_second=recorder.steady_samples_per_second(),
        dtype_policy=policy,
        replicas=replicas,
    )


# --------------------------------------------------------------------------- evaluate


def evaluate(
    model: keras.Model, split: SplitArrays, classes: tuple[str, ...], batch_size: int = 256
) -> EvaluationReport:
    """Predict every sample of ``split`` in inference mode and keep the top-k per sample
    (never the full (n, classes) probability matrix, which is GBs for kanji)."""
    k = min(TOP_K, len(classes))
    top_k, top_k_probs, true_probs = [], [], []
    for images, labels in evaluation_batches(split, batch_size).dataset.as_numpy_iterator():
        probs = np.asarray(model.predict_on_batch(images), dtype=np.float32)
        best = np.argpartition(-probs, k - 1, axis=1)[:, :k]
        best_probs = np.take_along_axis(probs, best, axis=1)
        order = np.argsort(-best_probs, axis=1, kind="stable")
        top_k.append(np.take_along_axis(best, order, axis=1))
        top_k_probs.append(np.take_along_axis(best_probs, order, axis=1))
        true_probs.append(probs[np.arange(len(labels)), labels])
    # evaluation_batches gathers each batch in index order, so rows match the split's order.
    return EvaluationReport(
        classes=tuple(classes),
        labels=np.asarray(split.labels, dtype=np.int64),
        top_k=np.concatenate(top_k).astype(np.int64) if top_k else np.zeros((0, k), np.int64),
        top_k_probs=np.concatenate(top_k_probs) if top_k else np.zeros((0, k), np.float32),
        true_probs=np.concatenate(true_probs) if top_k else np.zeros(0, np.float32),
        writers=np.asarray(split.writers),
        sources=np.asarray(split.sources),
        images=split.images,
    )


# --------------------------------------------------------------------------- together


def run_tags(splits: PreparedSplits, cfg: Mapping[str, Any]) -> dict[str, str]:
    """Tags describing what a run trained on: dataset, sources, class count, image size, model."""
    sources = sorted(set(np.unique(splits.train.sources).tolist()) | set(splits.source_weights))
    return {
        "dataset": splits.name,
        "source": ",".join(sources),
        "num_classes": str(len(splits.classes)),
        "image_size": str(splits.image_size),
        "model": str(cfg["model"]["name"]),
    }


def train_and_evaluate(
    splits: PreparedSplits,
    cfg: Mapping[str, Any],
    tracker: Tracker | None = None,
    epoch_hook: EpochHook | None = None,
    init: TrainedModel | None = None,
) -> dict[str, float]:
    """Train ``cfg.model`` on ``splits`` and evaluate the result on the test split.

    Returns flat metrics: ``test/*`` (see ``EvaluationReport.metrics``),
    ``val/best_accuracy``, ``val/best_loss``, ``val/best_top5_accuracy`` (at the
    best-accuracy epoch), ``train/epochs``, ``train/seconds``,
    ``train/steady_samples_per_second``, ``train/stopped_early`` (0/1): the end-of-run names of
    ``hwexp.contract``. With a ``tracker``, also logs config, tags, the training data (dataset
    inputs), per-epoch metrics (``train/loss``, ``val/accuracy``, ...: ``epoch_metric_name``),
    these metrics, report files and, last (it tags the run ``hwexp.has_model=true``), the
    inference model as the MLflow model ``model``, named by ``hwexp.contract.model_name``.
    Raises ``ConfigError`` when no epoch was trained.
    ``epoch_hook`` (see ``EpochHook``) may raise to abort, e.g. an Optuna pruner.
    ``init``: the run ``trainer.init_from`` names, if the caller loaded it already
    (``load_init_source``, e.g. before starting its MLflow run); else it is loaded here. A run
    started from it is tagged ``hwexp.init_from=<its run id>`` (see ``init_from_params``).
    """
    prepare_devices(cfg["trainer"])
    init = init or load_init_source(cfg)
    extra = []
    name = model_name(cfg.get("dataset") or {}, splits.classes)
    if tracker is not None:
        tracker.log_config(cfg)
        tracker.set_tags({**run_tags(splits, cfg), MODEL_NAME_TAG: name})
        tracker.log_training_data(splits)
        if init is not None:
            tracker.set_tags({INIT_FROM_TAG: init.run_id})
            tracker.log_params(init_from_params(splits.classes, init))
        extra.append(tracker.keras_callback())
    result = fit(splits, cfg, extra_callbacks=extra, epoch_hook=epoch_hook, init=init)
    if result.epochs_run < 1:
        raise ConfigError(
            f"trainer.epochs={cfg['trainer']['epochs']}: no epoch was trained, so there is no "
            "model to evaluate or save; train at least 1 epoch"
        )
    inference_model = strip_augmentation(result.model)
    report = evaluate(
        inference_model, splits.test, splits.classes, int(cfg["trainer"]["batch_size"])
    )
    metrics = {**report.metrics("test"), **_fit_metrics(result)}
    if tracker is not None:
        tracker.set_tags({"dtype_policy": result.dtype_policy})
        tracker.log_params(
            {
                "trainer.replicas": result.replicas,
                "trainer.global_batch_size": result.replicas * int(cfg["trainer"]["batch_size"]),
            }
        )
        tracker.log_metrics(metrics)
        tracker.log_evaluation(report)
        tracker.log_history(result.history)
        example = np.asarray(splits.test.images[:2])  # the model's input example
        tracker.log_model(inference_model, splits.classes, name, example)  # last: has_model
    return metrics


def _fit_metrics(result: FitResult) -> dict[str, float]:
    history = result.history
    out = {
        "train/epochs": float(result.epochs_run),
        "train/seconds": result.train_seconds,
        "train/steady_samples_per_second": result.samples_per_second,
        "train/stopped_early": float(result.stopped_early),
    }
    if history.get("val_accuracy"):
        best = int(np.nanargmax(history["val_accuracy"]))
        out["val/best_accuracy"] = history["val_accuracy"][best]
        if "val_top5_accuracy" in history:
            out["val/best_top5_accuracy"] = history["val_top5_accuracy"][best]
    if history.get("val_loss"):
        out["val/best_loss"] = float(np.nanmin(history["val_loss"]))
    return {k: v for k, v in out.items() if math.isfinite(v)}
