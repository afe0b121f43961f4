"""Every config group choice composes with every other, and the recipes say what they claim."""

import itertools
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data_config import data_config
from hwexp import CONF_DIR
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
    if cfg.dataset.classes != "auto":
        assert len(class_set_of(cfg.dataset)[0]) >= 10


def test_default_is_offline_synthetic(tmp_path):
    cfg = data_config(tmp_path, config_name="config")
    assert cfg.dataset.source == "synthetic"
    assert cfg.split.method == "writer"


def test_real_dataset_keeps_its_source_on_the_default_config(tmp_path):
    cfg = data_config(tmp_path, "dataset=kanji3036", config_name="config")
    assert cfg.dataset.source == "etl9g" and cfg.dataset.classes == "etl9_3036"


@pytest.mark.parametrize("experiment", GROUPS["experiment"])
def test_article_recipes(tmp_path, experiment):
    cfg = data_config(tmp_path, f"experiment={experiment}", config_name="config")
    assert cfg.model.name == "article"
    assert cfg.preprocess.size == 48
    assert cfg.trainer.optimizer == "adam"
    assert cfg.callbacks.early_stopping.patience == 8
    assert cfg.callbacks.reduce_lr.factor == 0.5 and cfg.callbacks.reduce_lr.patience == 3
    if experiment == "article_kmnist":
        assert cfg.augment.enabled is False and cfg.split.method == "official"
    else:
        assert cfg.augment.enabled is True and cfg.split.method == "random"
    if experiment == "article_kanji3036":
        assert cfg.model.activation == "tanh" and cfg.model.dense_units > 512


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
