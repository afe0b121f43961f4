"""Same config and seed give the same result (CPU); a different seed gives another."""

from data_config import data_config
from hwexp.__main__ import run_training


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    overrides = ("debug=default", "trainer.verbose=0", "tracking.enabled=false")
    first = run_training(data_config(tmp_path / "a", *overrides, config_name="config"))
    again = run_training(data_config(tmp_path / "b", *overrides, config_name="config"))
    other = run_training(data_config(tmp_path / "c", *overrides, "seed=7", config_name="config"))
    for key in ("test/accuracy", "test/loss", "val/best_loss"):
        assert abs(first[key] - again[key]) <= 1e-6, key
    assert first["test/loss"] != other["test/loss"]
