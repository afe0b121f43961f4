"""Search-space parsing, override writing and outcome mapping of the hwexp Optuna sweeper."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

import hwexp  # noqa: E402
from hwexp.sweep.overrides import override_value
from hwexp.sweep.trial import SweepTrial
from hydra_plugins.hwexp_optuna_sweeper._impl import SweepSettings, outcome_of
from hydra_plugins.hwexp_optuna_sweeper._search_space import parse_search_space

CONF_DIR = Path(hwexp.CONF_DIR)


def parsed_value(override: str):
    """The value Hydra parses from ``override`` (quoted strings unwrapped)."""
    return OverridesParser.create().parse_override(override).value()


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("interval(0, 1)", FloatDistribution(0.0, 1.0)),
        ("interval(0.1, 0.5)", FloatDistribution(0.1, 0.5)),
        ("int(interval(16, 512))", IntDistribution(16, 512)),
        ("tag(log, interval(1e-4, 1e-2))", FloatDistribution(1e-4, 1e-2, log=True)),
        ("tag(log, int(interval(16, 1024)))", IntDistribution(16, 1024, log=True)),
        ("range(1, 5)", IntDistribution(1, 4)),  # stop excluded, as in Hydra and Python
        ("range(0, 10, 3)", IntDistribution(0, 9, step=3)),
        ("range(0.0, 0.5, 0.25)", FloatDistribution(0.0, 0.25, step=0.25)),
        ("choice(relu, tanh)", CategoricalDistribution(["relu", "tanh"])),
        ("choice(32, 64, 128)", CategoricalDistribution([32, 64, 128])),
        ("choice(true, false)", CategoricalDistribution([True, False])),
        ("relu,tanh", CategoricalDistribution(["relu", "tanh"])),
        ("choice('a b', c)", CategoricalDistribution(["a b", "c"])),
    ],
)
def test_every_expression_form_becomes_its_distribution(expression, expected) -> None:
    space = parse_search_space({"x.y": expression})
    assert space.distributions == {"x.y": expected}
    assert space.describe() == {"x.y": expression}
    assert space.fixed == ()


def test_list_choices_are_kept_as_override_text_and_written_back_verbatim() -> None:
    space = parse_search_space({"model.filters": "choice([32,64], [64, 128])"})
    (param,) = space.params
    assert param.verbatim
    assert param.distribution == CategoricalDistribution(["[32,64]", "[64,128]"])
    assert space.overrides({"model.filters": "[64,128]"}) == ["model.filters=[64,128]"]
    assert parsed_value("model.filters=[64,128]") == [64, 128]


def test_glob_choices_come_from_the_config_groups() -> None:
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    space = parse_search_space({"model": "glob(*)"}, config_loader=loader)
    assert space.distributions["model"] == CategoricalDistribution(
        ["article", "resnet_small", "vgg_bn"]
    )
    assert space.overrides({"model": "vgg_bn"}) == ["model=vgg_bn"]


def test_fixed_values_and_command_line_precedence() -> None:
    params = {
        "trainer.lr": "tag(log, interval(1e-4, 1e-2))",
        "trainer.epochs": 5,
        "model.filters": [8, 16],
        "model.activation": "choice(relu, tanh)",
    }
    arguments = ["trainer.lr=0.01", "+extra=1", "model.dense_units=choice(16,32)", "~foo"]
    space = parse_search_space(params, arguments)
    assert list(space.distributions) == ["model.activation", "model.dense_units"]
    assert space.fixed == (
        "trainer.epochs=5",
        "model.filters=[8,16]",
        "trainer.lr=0.01",
        "+extra=1",
        "~foo",
    )
    written = space.overrides({"model.activation": "tanh", "model.dense_units": 32})
    assert written[-2:] == ["model.activation=tanh", "model.dense_units=32"]


def test_prefixed_keys_keep_their_prefix_in_overrides() -> None:
    space = parse_search_space({}, ["+trainer.new_knob=interval(0, 1)"])
    (param,) = space.params
    assert param.name == "trainer.new_knob"
    assert param.override(0.25) == "+trainer.new_knob=0.25"


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("range(5, 1)", "empty"),
        ("tag(log, choice(1, 2))", "interval"),
        ("tag(fast, interval(0, 1))", "unknown tag"),
    ],
)
def test_unsearchable_expressions_are_refused(expression, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_search_space({"x": expression})


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        3,
        -2.5,
        1e-05,
        0.0026524963767594755,
        "relu",
        "on",
        "true",
        "1",
        "a b, c",
        "it's",
        "back\\slash",
        "trailing\\",
        "a\\'b",
        "${not.interpolated}",
        "sqlite:////tmp/x y/optuna.db",
        "postgresql://hwexp:p@ss@127.0.0.1:5432/optuna",
        [32, 64],
        {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2},
    ],
)
def test_override_values_parse_back_to_the_same_value(value) -> None:
    written = override_value(value)
    cfg = OmegaConf.create({"v": parsed_value(f"v={written}")})
    assert OmegaConf.to_container(cfg, resolve=True)["v"] == value


def test_sampled_values_round_trip_through_overrides() -> None:
    space = parse_search_space(
        {
            "trainer.lr": "tag(log, interval(1e-4, 1e-2))",
            "trainer.batch_size": "choice(32, 64)",
            "augment.enabled": "choice(true, false)",
            "model.activation": "choice(relu, tanh)",
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    trial = study.ask(space.distributions)
    parser = OverridesParser.create()
    parsed = {
        o.key_or_group: o.value() for o in parser.parse_overrides(space.overrides(trial.params))
    }
    assert parsed == trial.params


def test_sweep_trial_block_survives_the_command_line() -> None:
    ref = SweepTrial(
        storage="sqlite:////tmp/some dir/optuna.db",
        study_name="katakana",
        number=7,
        pruner={"_target_": "optuna.pruners.HyperbandPruner", "max_resource": 20},
        heartbeat_interval=30,
        parent_run_id="abc123",
    )
    override = ref.override()
    assert override.startswith("++sweep_trial=")
    block = OmegaConf.create({"sweep_trial": parsed_value(override)}).sweep_trial
    assert SweepTrial.from_config(block) == ref


def test_settings_validate_and_make_sqlite_paths_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = {
        "sampler": {"_target_": "optuna.samplers.RandomSampler"},
        "pruner": {"_target_": "optuna.pruners.NopPruner"},
        "direction": "maximize",
        "storage": "sqlite:///runs/optuna.db",
        "study_name": "s",
        "n_trials": 10,
        "n_jobs": 1,
        "max_failure_rate": 0.25,
        "monitor": "val_accuracy",
        "heartbeat_interval": 30,
        "grace_period": 120,
        "retry_interrupted": True,
        "poll_interval": 1.0,
        "params": None,
    }
    settings = SweepSettings(**base)
    assert settings.storage == f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    assert (tmp_path / "runs").is_dir()
    assert settings.failure_budget == 2
    assert SweepSettings(**{**base, "max_failure_rate": 0.0}).failure_budget == 0
    with pytest.raises(ValueError, match="direction"):
        SweepSettings(**{**base, "direction": "up"})
    with pytest.raises(ValueError, match="needs a database"):
        SweepSettings(**{**base, "storage": "sqlite:///:memory:"})


def job(status: JobStatus, value) -> JobReturn:
    result = JobReturn(status=status)
    result.return_value = value
    return result


def test_job_outcomes_map_to_trial_states() -> None:
    assert outcome_of(job(JobStatus.COMPLETED, 0.75)).state == TrialState.COMPLETE
    assert outcome_of(job(JobStatus.COMPLETED, 0.75)).value == 0.75
    nan = outcome_of(job(JobStatus.COMPLETED, math.nan))
    assert nan.state == TrialState.FAIL and "nan" in nan.error
    assert outcome_of(job(JobStatus.FAILED, optuna.TrialPruned("x"))).state == TrialState.PRUNED
    failed = outcome_of(job(JobStatus.FAILED, ValueError("unknown optimizer 'bogus'")))
    assert failed == outcome_of(ValueError("unknown optimizer 'bogus'"))
    assert failed.state == TrialState.FAIL
    assert failed.error == "ValueError: unknown optimizer 'bogus'"


def test_the_katakana_search_covers_what_the_article_tuned_by_hand() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", ["hparams_search=katakana"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("HwexpOptunaSweeper")
    assert cfg.dataset.source == "synthetic" and cfg.dataset.classes == "katakana48"
    assert cfg.optimized_metric == "val/best_accuracy"
    assert cfg.hydra.sweeper.pruner._target_ == "hwexp.sweep.pruners.TopFractionPruner"
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        hyperband = ["hparams_search=katakana", "hydra/sweeper/pruner=hyperband"]
        cfg_hb = compose("config", hyperband, return_hydra_config=True)
    assert cfg_hb.hydra.sweeper.pruner.max_resource == cfg_hb.trainer.epochs  # a full trial
    space = parse_search_space(cfg.hydra.sweeper.params)
    assert set(space.distributions) == {
        "model.activation",
        "model.filters",
        "model.dense_units",
        "model.conv_dropout",
        "model.dense_dropout",
        "augment.enabled",
        "augment.rotation",
        "augment.zoom",
        "augment.shift",
        "augment.shear",
        "trainer.lr",
        "trainer.batch_size",
    }
    assert space.distributions["model.activation"].choices == ("relu", "tanh")
    assert space.distributions["trainer.lr"].log

    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask(
        space.distributions
    )
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        job = compose("config", ["hparams_search=katakana", *space.overrides(trial.params)])
    assert job.model.filters == parsed_value(f"f={trial.params['model.filters']}")
    assert job.augment.enabled == trial.params["augment.enabled"]
    assert job.trainer.lr == trial.params["trainer.lr"]
