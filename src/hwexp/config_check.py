"""Check a composed ``python -m hwexp`` config before any work is done.

One table (:data:`OPTIONS`, and :data:`MODEL_OPTIONS` per model) says what every option
accepts; ``check_config`` compares the config with it and raises :class:`InvalidOptions`, one
line per problem, ``<option>=<value>: <what is allowed>``: a value of the wrong type or out of
range, or a key the table does not know (a typo added with ``+``, which Hydra accepts). The
``preprocess`` and ``synthetic`` groups are known by their option classes' fields
(``PreprocessOptions``, ``SynthOptions``), which then check ranges and combinations themselves.
Only the config is read: no data, no TensorFlow, no MLflow. An interpolated value
(``trainer.seed: ${seed}``) is checked where it points; ``sweep_trial`` (the sweeper's) and
``hydra`` are not checked.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hwexp.contract import RENAMED_METRICS
from hwexp.data.sources import SOURCES
from hwexp.data.split import METHODS
from hwexp.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "onecycle")
STRATEGIES = ("mirrored",)  # tf.distribute strategies of trainer.strategy (null: none)
HEADS = ("flatten", "gap")
# Keras activations that act element-wise (softmax and the like would not make a hidden layer).
ACTIVATIONS = (
    "celu", "elu", "exponential", "gelu", "hard_shrink", "hard_sigmoid", "hard_silu",
    "hard_swish", "hard_tanh", "leaky_relu", "linear", "log_sigmoid", "mish", "relu", "relu6",
    "selu", "sigmoid", "silu", "soft_shrink", "softplus", "softsign", "sparse_plus",
    "sparse_sigmoid", "squareplus", "swish", "tanh", "tanh_shrink",
)  # fmt: skip
LOG_KEYS = ("loss", "accuracy", "top5_accuracy", "val_loss", "val_accuracy", "val_top5_accuracy")
OPAQUE = ("sweep_trial", "hydra")  # root keys written by Hydra and the sweeper: not checked


class InvalidOptions(ConfigError):
    """Options the table refuses; ``problems`` holds one ``<option>=<value>: <allowed>`` each.
    ``str()`` joins them with ``"\\nerror: "``, so ``print(f"error: {e}")`` gives one
    ``error:`` line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__(tuple(problems))  # the args: pickles (joblib workers) and compares
        self.problems = tuple(problems)

    def __str__(self) -> str:
        return "\nerror: ".join(self.problems)


# --------------------------------------------------------------------------- rules


def _shown(value: Any) -> str:
    """``value`` as an override would write it: null, true/false, text as is, JSON otherwise
    (cut to 80 characters)."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, str | int | float):
        text = str(value)
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Rule:
    """What one option accepts: ``accepts(value)`` is True for a valid value; ``allowed`` says
    in words what is valid (the end of the error line)."""

    allowed: str
    accepts: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int | None = None) -> Rule:
    """An integer (not a bool), at least ``low`` if given."""
    if low is None:
        return Rule("an integer", _is_int)
    return Rule(f"an integer >= {low}", lambda v: _is_int(v) and v >= low)


def number(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Rule:
    """A finite int or float within ``[low, high]`` (an open end excludes its bound)."""

    def accepts(value: Any) -> bool:
        if not _is_number(value):
            return False
        above = low is None or (value > low if low_open else value >= low)
        below = high is None or (value < high if high_open else value <= high)
        return above and below

    if low is not None and high is not None:
        allowed = (
            f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        )
    elif low is not None:
        allowed = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        allowed = "a number"
    return Rule(allowed, accepts)


def choice(*values: Any) -> Rule:
    """One of ``values`` (compared with ``==``; a bool never equals an int here)."""
    return Rule(
        "one of " + " | ".join(_shown(v) for v in values),
        lambda v: any(v == c and type(v) is type(c) for c in values),
    )


def optional(rule: Rule) -> Rule:
    """``rule``, or null."""
    return Rule(f"{rule.allowed}, or null", lambda v: v is None or rule.accepts(v))


FLAG = Rule("true or false", lambda v: isinstance(v, bool))
TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
ANY = Rule("anything", lambda v: True)
SIZES = Rule(
    "a non-empty list of integers >= 1",
    lambda v: isinstance(v, list) and bool(v) and all(_is_int(x) and x >= 1 for x in v),
)
FRACTION = number(0, 1, high_open=True)
WEIGHTS = Rule(
    "a mapping of source name to a weight >= 0",
    lambda v: isinstance(v, Mapping) and all(_is_number(w) and w >= 0 for w in v.values()),
)
WORKERS = Rule(
    "auto, or an integer >= 1 (0: auto)", lambda v: v == "auto" or (_is_int(v) and v >= 0)
)
METRICS = (
    "val/best_accuracy", "val/best_loss", "val/best_top5_accuracy", "test/accuracy",
    "test/top5_accuracy", "test/loss", "test/macro_f1", "test/balanced_accuracy",
    "test/class_accuracy_min", "test/writer_accuracy_mean", "test/writer_accuracy_min",
    "test/writer_accuracy_p10", "train/epochs", "train/seconds",
    "train/steady_samples_per_second",
)  # fmt: skip
OPTIMIZED_METRIC = Rule(
    f"one of {' | '.join(METRICS)}, or test/source/<source>/accuracy",
    lambda v: (
        v in METRICS
        or v in RENAMED_METRICS  # their former names still mean the same
        or (isinstance(v, str) and v.startswith("test/source/") and v.endswith("/accuracy"))
    ),
)


def _callback(**extra: Rule) -> dict[str, Rule]:
    """The options every Keras callback block has, and ``extra``."""
    return {"enabled": FLAG, "monitor": choice(*LOG_KEYS), **extra}


OPTIONS: dict[str, Rule] = {
    "seed": integer(0),
    "workers": WORKERS,
    "optimized_metric": OPTIMIZED_METRIC,
    **{f"paths.{key}": TEXT for key in ("root_dir", "data_dir", "cache_dir", "mlruns_dir")},
    "split.method": choice(*METHODS),
    "split.val": FRACTION,
    "split.test": optional(FRACTION),
    "dataset.name": TEXT,
    "dataset.classes": ANY,  # a class set name, 'chars:...', auto or a list: the data layer
    "dataset.source": Rule(
        f"one of {' | '.join(SOURCES)}, or a list of different ones",
        lambda v: (
            (isinstance(v, str) and v in SOURCES)
            or (
                isinstance(v, list) and bool(v) and set(v) <= set(SOURCES) and len(set(v)) == len(v)
            )
        ),
    ),
    "dataset.weights": WEIGHTS,
    "dataset.path": optional(TEXT),
    "dataset.writer_from_name": FLAG,
    "dataset.limit_classes": optional(integer(2)),
    "model.name": ANY,  # checked against MODEL_OPTIONS
    "synthetic.writers": integer(3),  # the data layer's keys; the rest are SynthOptions'
    "synthetic.first_writer": integer(0),
    "synthetic.chunk_writers": integer(1),
    "augment.enabled": FLAG,
    "augment.rotation": number(0, 180),
    "augment.zoom": FRACTION,
    "augment.shift": FRACTION,
    "augment.shear": number(0, 90, high_open=True),
    "augment.stroke_width": number(0, 1),
    **{
        f"callbacks.early_stopping.{key}": rule
        for key, rule in _callback(
            mode=choice("auto", "min", "max"),
            patience=integer(0),
            min_delta=number(0),
            restore_best_weights=FLAG,
        ).items()
    },
    **{
        f"callbacks.reduce_lr.{key}": rule
        for key, rule in _callback(
            enabled=Rule("auto, true or false", lambda v: v == "auto" or isinstance(v, bool)),
            factor=number(0, 1, low_open=True, high_open=True),
            patience=integer(0),
            min_delta=number(0),
            min_lr=number(0),
        ).items()
    },
    **{
        f"callbacks.checkpoint.{key}": rule
        for key, rule in _callback(
            mode=choice("auto", "min", "max"), save_best_only=FLAG, path=TEXT
        ).items()
    },
    "trainer.epochs": integer(1),
    "trainer.batch_size": integer(1),
    "trainer.optimizer": choice(*OPTIMIZERS),
    "trainer.lr": number(0, low_open=True),
    "trainer.momentum": FRACTION,
    "trainer.weight_decay": number(0),
    "trainer.label_smoothing": FRACTION,
    "trainer.lr_schedule": choice(*LR_SCHEDULES),
    "trainer.warmup_epochs": integer(0),
    "trainer.mixed_precision": FLAG,
    "trainer.jit_compile": FLAG,
    "trainer.strategy": optional(choice(*STRATEGIES)),
    "trainer.cpu_replicas": integer(0),
    "trainer.verbose": choice(0, 1, 2),
    "trainer.seed": integer(0),
    "trainer.init_from": ANY,  # a run id or best: checked when it is loaded
    "tracking.enabled": FLAG,
    "tracking.uri": optional(TEXT),
    "tracking.mlruns_dir": TEXT,
    "tracking.experiment": TEXT,
    "tracking.run_name": optional(TEXT),
    "export.after_sweep": FLAG,
    "export.overrides": Rule("a list of overrides", lambda v: isinstance(v, list)),
}

_DROPOUT = FRACTION
_BN_MOMENTUM = FRACTION
MODEL_OPTIONS: dict[str, dict[str, Rule]] = {  # model.name -> its other options
    "article": {
        "activation": choice(*ACTIVATIONS),
        "filters": SIZES,
        "conv_dropout": _DROPOUT,
        "dense_units": integer(1),
        "dense_dropout": _DROPOUT,
    },
    "vgg_bn": {
        "activation": choice(*ACTIVATIONS),
        "bn_momentum": _BN_MOMENTUM,
        "widths": SIZES,
        "convs_per_block": integer(1),
        "pool_first": FLAG,
        "conv_dropout": _DROPOUT,
        "head": choice(*HEADS),
        "dense_units": integer(0),
        "dense_dropout": _DROPOUT,
    },
    "resnet_small": {
        "activation": choice(*ACTIVATIONS),
        "bn_momentum": _BN_MOMENTUM,
        "widths": SIZES,
        "blocks_per_stage": integer(1),
        "dense_dropout": _DROPOUT,
    },
}


# --------------------------------------------------------------------------- checking

_FIELD_RULES = {  # a delegated option class's field annotation -> the type check of its values
    "int": integer(),
    "float": number(),
    "bool": FLAG,
    "str": Rule("a string", lambda v: isinstance(v, str)),
    "Range": Rule(
        "a range [low, high] of two numbers",
        lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v),
    ),
}


def check_config(cfg: Mapping[str, Any] | DictConfig) -> None:
    """Check every option of a composed training config against the table.

    Raises:
        InvalidOptions: one problem per bad value or unknown key (see the module docstring).
    """
    problems = config_problems(cfg)
    if problems:
        raise InvalidOptions(problems)


def config_problems(cfg: Mapping[str, Any] | DictConfig) -> list[str]:
    """The lines ``check_config`` would raise, in config order (empty when all is well)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key not in OPAQUE])
    raw = OmegaConf.to_container(cfg, resolve=False)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    model = resolved.get("model")
    name = model.get("name") if isinstance(model, Mapping) else None
    model_options = MODEL_OPTIONS.get(name, {}) if isinstance(name, str) else {}
    problems = []
    if isinstance(model, Mapping) and not model_options:
        problems.append(_line("model.name", name, choice(*MODEL_OPTIONS).allowed))
    table = {**OPTIONS, **{f"model.{k}": r for k, r in model_options.items()}}
    for group, (option_class, _) in _delegated().items():
        for f in fields(option_class):
            table.setdefault(f"{group}.{f.name}", _FIELD_RULES.get(str(f.type), ANY))
    groups = {key[:i] for key in table for i, c in enumerate(key) if c == "."}
    for path, value, original in _leaves(raw, resolved, groups):
        rule = table.get(path)
        group = path.rpartition(".")[0]
        if rule is None and not (group == "model" and not model_options):
            problems.append(_unknown(path, value, _keys_of(table, group)))
        elif rule is not None and not _is_reference(original) and not rule.accepts(value):
            problems.append(_line(path, value, rule.allowed))
    if not problems:  # the option classes' own checks need values of the right types
        problems = _class_problems(resolved) + _combination_problems(resolved)
    return problems


def _combination_problems(resolved: Mapping[str, Any]) -> list[str]:
    """Options that are valid alone but not together."""
    trainer = resolved.get("trainer")
    if not isinstance(trainer, Mapping):
        return []
    if trainer.get("cpu_replicas") and trainer.get("strategy") is None:
        return [
            _line(
                "trainer.cpu_replicas",
                trainer["cpu_replicas"],
                "needs trainer.strategy=mirrored (the CPU is split for a mirrored run only)",
            )
        ]
    return []


def _keys_of(table: Mapping[str, Rule], group: str) -> set[str]:
    """The keys the table knows directly under ``group`` ("" for the top level)."""
    prefix = f"{group}." if group else ""
    return {key[len(prefix) :].split(".", 1)[0] for key in table if key.startswith(prefix)}


def _leaves(
    raw: Mapping[str, Any], resolved: Mapping[str, Any], groups: set[str], prefix: str = ""
) -> Iterator[tuple[str, Any, Any]]:
    """``(dotted path, resolved value, value as written)`` of every option: mappings at a
    group's path are descended into, other values are options (a mapping too, e.g. weights)."""
    for key, original in raw.items():
        path = f"{prefix}{key}"
        value = resolved.get(key)
        if path in groups and isinstance(original, Mapping) and isinstance(value, Mapping):
            yield from _leaves(original, value, groups, f"{path}.")
        else:
            yield path, value, original


def _is_reference(original: Any) -> bool:
    """True for an interpolation (``${...}``: checked where it points) or a mandatory value
    left unset (``???``: the code that needs it says so)."""
    return isinstance(original, str) and ("${" in original or original == "???")


def _delegated() -> dict[str, tuple[type, Callable[[Mapping[str, Any]], object]]]:
    """Groups whose option class checks them: group -> (class, check of the group's values)."""
    from hwexp.data.preprocess import PreprocessOptions

    out: dict[str, tuple[type, Callable[[Mapping[str, Any]], object]]] = {
        "preprocess": (PreprocessOptions, PreprocessOptions.from_config)
    }
    try:
        from hwexp.data.sources import renderer_settings
        from hwexp.synth.options import SynthOptions
    except ImportError:  # no renderer installed: the data layer says so if it is needed
        return out
    out["synthetic"] = (SynthOptions, lambda v: SynthOptions.from_config(renderer_settings(v)))
    return out


def _class_problems(resolved: Mapping[str, Any]) -> list[str]:
    """What the option classes refuse (ranges, combinations), once the values' types are
    right. ``SynthOptions`` names the bare option in its messages: its group is put before."""
    problems = []
    for group, (_, check) in _delegated().items():
        if isinstance(resolved.get(group), Mapping):
            try:
                check(resolved[group])
            except (ConfigError, ValueError, TypeError) as error:
                text = str(error)
                problems.append(text if text.startswith(f"{group}.") else f"{group}.{text}")
    return problems


def _unknown(path: str, value: Any, known: set[str]) -> str:
    key = path.rpartition(".")[2]
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return _line(path, value, f"unknown option{hint}; known: {', '.join(sorted(known))}")


def _line(path: str, value: Any, allowed: str) -> str:
    return f"{path}={_shown(value)}: {allowed}"
