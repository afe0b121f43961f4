"""Every config group choice composes with every other, and the recipes say what they claim."""

import itertools
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data_config import data_config
from hwexp import CONF_DIR
from hwexp.config_check import MODEL_OPTIONS, OPTIONS, InvalidOptions, check_config
from hwexp.data.dataset import class_set_of, dataset_sources
from hwexp.data.preprocess import PreprocessOptions

GROUPS = {
    group: sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))
    for group in ("dataset", "model", "augment", "experiment")
}
NEEDS_PATH = {"folder": ["dataset.path=/nonexistent"]}


@pytest.mark.parametrize(
    "dataset, model, augment",
    list(itertools.product(GROUPS["dataset"], GROUPS["model"], GROUPS["augment"])),
)
def test_every_dataset_model_augment_combination_composes(tmp_path, dataset, model, augment):
    cfg = data_config(
        tmp_path,
        f"dataset={dataset}",
        f"model={model}",
        f"augment={augment}",
        *NEEDS_PATH.get(dataset, []),
        config_name="config",
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["name"] == model
    assert resolved["augment"]["enabled"] is (augment == "on")
    assert dataset_sources(cfg.dataset)
    PreprocessOptions.from_config(resolved["preprocess"])
    check_config(cfg)  # every shipped combination passes the option table
    if cfg.dataset.classes != "auto":
        assert len(class_set_of(cfg.dataset)[0]) >= 10


def test_default_is_offline_synthetic(tmp_path):
    cfg = data_config(tmp_path, config_name="config")
    assert cfg.dataset.source == "synthetic"
    assert cfg.split.method == "writer"


def test_real_dataset_keeps_its_source_on_the_default_config(tmp_path):
    cfg = data_config(tmp_path, "dataset=kanji3036", config_name="config")
    assert cfg.dataset.source == "etl9g" and cfg.dataset.classes == "etl9_3036"


@pytest.mark.parametrize("experiment", [e for e in GROUPS["experiment"] if "article" in e])
def test_article_recipes(tmp_path, experiment):
    cfg = data_config(tmp_path, f"experiment={experiment}", config_name="config")
    check_config(cfg)
    assert cfg.model.name == "article"
    assert cfg.preprocess.size == 48
    assert cfg.trainer.optimizer == "adam"
    assert cfg.callbacks.early_stopping.patience == 8
    assert cfg.callbacks.reduce_lr.factor == 0.5 and cfg.callbacks.reduce_lr.patience == 3
    assert cfg.callbacks.reduce_lr.enabled is True
    # the article's plain training, whatever the default schedule
    assert cfg.trainer.lr == 0.001 and cfg.trainer.lr_schedule == "constant"
    assert cfg.trainer.label_smoothing == 0.0
    if experiment == "article_kmnist":
        assert cfg.augment.enabled is False and cfg.split.method == "official"
    else:
        assert cfg.augment.enabled is True and cfg.split.method == "random"
    if experiment == "article_kanji3036":
        assert cfg.model.activation == "tanh" and cfg.model.dense_units > 512


def test_gpu_recipe_is_the_default_model_at_64_px_in_mixed_precision(tmp_path):
    default = data_config(tmp_path, "dataset=kanji3036", config_name="config")
    cfg = data_config(tmp_path, "experiment=kanji3036_gpu", config_name="config")
    check_config(cfg)
    assert cfg.dataset.source == "etl9g" and cfg.dataset.classes == "etl9_3036"
    assert cfg.model == default.model and cfg.model.name == "vgg_bn"
    assert cfg.preprocess.size == 64 and cfg.trainer.mixed_precision is True
    assert cfg.trainer.batch_size >= 4 * default.trainer.batch_size
    assert cfg.trainer.strategy is None  # one GPU; trainer.strategy=mirrored for several
    mirrored = data_config(
        tmp_path, "experiment=kanji3036_gpu", "trainer.strategy=mirrored", config_name="config"
    )
    check_config(mirrored)


def test_quick_recipe_is_the_default_data_and_model_in_fewer_one_cycle_epochs(tmp_path):
    default = data_config(tmp_path, config_name="config")
    cfg = data_config(tmp_path, "experiment=quick", config_name="config")
    check_config(cfg)
    assert cfg.dataset == default.dataset and cfg.synthetic == default.synthetic
    assert cfg.preprocess == default.preprocess and cfg.augment == default.augment
    assert cfg.model.widths == default.model.widths and cfg.model.pool_first is True
    assert cfg.trainer.epochs < default.trainer.epochs
    assert cfg.trainer.lr_schedule == "onecycle"


def test_debug_run_is_tiny(tmp_path):
    cfg = data_config(tmp_path, "debug=default", config_name="config")
    assert cfg.trainer.epochs <= 2 and cfg.dataset.limit_classes <= 5
    assert cfg.synthetic.writers <= 12
    assert cfg.workers == 1  # the debug recipe wins over config.yaml's own values


def _synthetic(tmp_path: Path, *overrides: str) -> dict:
    """The composed main config's ``synthetic`` block."""
    cfg = data_config(tmp_path, *overrides, config_name="config")
    return OmegaConf.to_container(cfg.synthetic, resolve=True)


def test_debian_fonts_recipe_changes_only_the_font_writers(tmp_path):
    from hwexp.data.sources import renderer_settings
    from hwexp.synth.fonts import is_held_out
    from hwexp.synth.options import SynthOptions

    default, debian = _synthetic(tmp_path), _synthetic(tmp_path, "synthetic=debian_fonts")
    changed = {k for k in default if default[k] != debian[k]}
    assert changed == {"fonts", "font_ratio"}
    assert len(debian["fonts"]) == len(set(debian["fonts"])) == 18
    assert not any(is_held_out(f) for f in debian["fonts"])  # never train on evaluation fonts
    assert SynthOptions.from_config(renderer_settings(debian)).font_ratio == 0.3


def test_large_synthetic_recipe_changes_only_the_writer_count(tmp_path):
    default, large = _synthetic(tmp_path), _synthetic(tmp_path, "synthetic=large")
    assert {k for k in default if default[k] != large[k]} == {"writers"}
    assert large["writers"] > 5 * default["writers"]


def test_preprocess_yaml_defaults_match_the_dataclass():
    cfg = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "preprocess" / "default.yaml"))
    assert PreprocessOptions.from_config(cfg) == PreprocessOptions()


def test_a_run_prepared_before_the_size_reference_keeps_its_preprocessing():
    old = PreprocessOptions().as_dict()
    for key in ("fit", "moment_span", "size_reference", "reference_fill", "reference_min_images"):
        old.pop(key)
    old.pop("stroke_width")
    old["min_crop"] = 0.55
    legacy = PreprocessOptions.from_config(old)
    assert (legacy.size_reference, legacy.reference_fill, legacy.min_crop) == ("cell", 1.0, 0.55)


@pytest.mark.parametrize(
    "recipe", ["debug=default", "hparams_search=debug", "synthetic=debian_fonts"]
)
def test_recipes_pass_the_option_table(tmp_path, recipe):
    check_config(data_config(tmp_path, recipe, config_name="config"))


def test_the_option_table_knows_every_key_of_the_config_files_and_no_other():
    """The table and conf/ agree: every key of a group's YAML has a rule (so nothing shipped is
    refused as unknown), and every rule is for a key of some YAML or one the code reads."""
    from hwexp.data.sources import SYNTHETIC_DATA_KEYS

    groups = ("trainer", "augment", "callbacks", "tracking", "split", "paths", "dataset")
    in_files = set()
    for group in groups:
        for path in (Path(CONF_DIR) / group).glob("*.yaml"):
            body = OmegaConf.to_container(OmegaConf.load(path))
            body = body.get(group, body)  # @package _global_ files nest their group
            in_files |= {f"{group}.{key}" for key in _dotted(body, group == "callbacks")}
    assert in_files <= set(OPTIONS)
    read_by_code = {"dataset.limit_classes"}  # set by recipes and the command line
    assert {k for k in OPTIONS if k.split(".")[0] in groups} - in_files == read_by_code
    synthetic = {k.split(".", 1)[1] for k in OPTIONS if k.startswith("synthetic.")}
    assert synthetic == set(SYNTHETIC_DATA_KEYS)
    for path in (Path(CONF_DIR) / "model").glob("*.yaml"):
        body = OmegaConf.to_container(OmegaConf.load(path))
        assert set(body) - {"name"} == set(MODEL_OPTIONS[body["name"]]), path.name


def _dotted(body: dict, nested: bool, prefix: str = "") -> list[str]:
    """The keys of a YAML body (``nested``: its blocks' keys, ``block.key``), not defaults."""
    keys = []
    for key, value in body.items():
        if isinstance(value, dict) and nested and not prefix:
            keys += _dotted(value, nested, f"{key}.")
        elif key != "defaults":
            keys.append(f"{prefix}{key}")
    return keys


BAD_OPTIONS = {  # override -> the one error line's start
    "model.activation=foo": "model.activation=foo: one of celu | elu",
    "trainer.batch_size=0": "trainer.batch_size=0: an integer >= 1",
    "trainer.optimizer=foo": "trainer.optimizer=foo: one of adam | adamw | sgd",
    "seed=abc": "seed=abc: an integer >= 0",
    "+synthetic.foo=1": "synthetic.foo=1: unknown option; known: aspect, background",
    "trainer.lr=-1": "trainer.lr=-1: a number > 0",
    "+dataset.limt_classes=5": (
        "dataset.limt_classes=5: unknown option (did you mean limit_classes?); known: classes, "
        "limit_classes, name, path, source, weights, writer_from_name"
    ),
    "trainer.epochs=0": "trainer.epochs=0: an integer >= 1",
    "trainer.strategy=foo": "trainer.strategy=foo: one of mirrored, or null",
    "trainer.cpu_replicas=-1": "trainer.cpu_replicas=-1: an integer >= 0",
    "trainer.cpu_replicas=2": "trainer.cpu_replicas=2: needs trainer.strategy=mirrored",
    "trainer.strategy=mirrored": None,  # valid
    "callbacks.reduce_lr.enabled=yes": "callbacks.reduce_lr.enabled=yes: auto, true or false",
    "callbacks.reduce_lr.enabled=true": None,
    "synthetic.canvas_size=8": "synthetic.canvas_size=8: choose between 16 and 1024",
    "preprocess.size=abc": "preprocess.size=abc: an integer",
    "dataset.source=foo": "dataset.source=foo: one of etl1c",
    "optimized_metric=val/acc": "optimized_metric=val/acc: one of val/best_accuracy",
    "optimized_metric=val/accuracy": None,  # the former name of val/best_accuracy
    "model=article": None,  # valid
}


@pytest.mark.parametrize("override, expected", BAD_OPTIONS.items(), ids=list(BAD_OPTIONS))
def test_bad_options_are_refused_one_line_each_before_any_work(
    tmp_path, monkeypatch, override, expected
):
    """``run_training`` checks every option first: one problem naming the option, the value and
    what is allowed, before any data is prepared or an MLflow store is touched (the command
    line's ``error:`` line and exit status: test_main.py)."""
    from hwexp.__main__ import run_training

    monkeypatch.setattr("hwexp.data.dataset.load_splits", _stop_here)
    cfg = data_config(tmp_path, override, config_name="config")
    if expected is None:  # a valid option passes the check and reaches the data layer
        with pytest.raises(_Reached):
            run_training(cfg)
        return
    with pytest.raises(InvalidOptions) as refused:
        run_training(cfg)
    (problem,) = refused.value.problems
    assert problem.startswith(expected), problem
    assert str(refused.value) == problem
    assert list(tmp_path.iterdir()) == []  # no data, no mlruns


def test_every_problem_is_one_error_line_also_after_pickling():
    import pickle

    error = InvalidOptions(["trainer.lr=-1: a number > 0", "seed=abc: an integer >= 0"])
    for sent in (error, pickle.loads(pickle.dumps(error))):  # trials in joblib workers
        assert f"error: {sent}".splitlines() == [
            "error: trainer.lr=-1: a number > 0",
            "error: seed=abc: an integer >= 0",
        ]


class _Reached(Exception):
    pass


def _stop_here(*args, **kwargs):
    raise _Reached
