"""scripts/ab_synth.py: its bookkeeping (the runs themselves train models: see the script)."""

import json

import pytest

from scripts_loader import load_script


def _result(test: float, plain: float, distorted: float) -> dict:
    return {
        "test_accuracy": test,
        "fonts": {"plain": plain, "distorted": distorted},
        "groups": {  # handwriting fonts read better than brush fonts
            "handwriting": {"plain": 1.0, "distorted": distorted + 0.1},
            "brush": {"plain": plain - 0.1, "distorted": distorted - 0.1},
        },
        "errors": {"distorted": {"voicing mark": 3, "small/full size": 2, "other": 5}},
        "train_seconds": 300.0,
    }


def test_summary_gives_means_and_paired_differences_to_the_first_arm(monkeypatch):
    ab = load_script("ab_synth", monkeypatch)
    base, new = ab.Arm("base", ()), ab.Arm("new", ("synthetic.font_ratio=0.3",))
    results = {
        ("base", 1): _result(0.96, 0.84, 0.78),
        ("base", 2): _result(0.98, 0.86, 0.80),
        ("new", 1): _result(0.97, 0.87, 0.79),
        ("new", 2): _result(0.95, 0.87, 0.84),
    }
    lines = ab.summary_rows([base, new], [1, 2], results)
    assert "| base | 1 | 96.0 | 84.0 | 78.0 | 88.0 | 68.0 | 3 / 2 / 5 | 300 |" in lines
    means = {line.split(" | ")[0]: line for line in lines if line.count("|") == 7}
    assert means["| base"] == "| base | 97.0 | 85.0 | 79.0 | 89.0 | 69.0 |"
    # test: +1, -3; plain: +3, +1; distorted (and both groups): +1, +4
    assert means["| new"] == (
        "| new | 96.0 (-1.0, -3.0..+1.0) | 87.0 (+2.0, +1.0..+3.0) | 81.5 (+2.5, +1.0..+4.0) "
        "| 91.5 (+2.5, +1.0..+4.0) | 71.5 (+2.5, +1.0..+4.0) |"
    )


def test_a_finished_run_is_reused_and_other_overrides_are_refused(tmp_path, monkeypatch):
    ab = load_script("ab_synth", monkeypatch)
    arm = ab.Arm("a", ("synthetic.font_ratio=0.3",))
    root = tmp_path / "a-s1"
    root.mkdir()
    spec = {"arm": "a", "seed": 1, "overrides": ["trainer.epochs=1", "synthetic.font_ratio=0.3"]}
    (root / "arm.json").write_text(json.dumps(spec))
    (root / "result.json").write_text(json.dumps(_result(0.9, 0.8, 0.7)))
    # nothing is trained: the finished result comes back as it was written
    assert ab.run_arm_seed(arm, 1, ("trainer.epochs=1",), tmp_path)["fonts"]["plain"] == 0.8
    with pytest.raises(SystemExit, match="other overrides"):
        ab.run_arm_seed(arm, 1, ("trainer.epochs=2",), tmp_path)
    assert json.loads((root / "arm.json").read_text()) == spec  # left as it was


def test_proxy_figures_join_the_summary_when_every_run_has_them(monkeypatch):
    ab = load_script("ab_synth", monkeypatch)
    base = ab.Arm("base", ())

    def with_proxy(accuracy: float, full_to_small: int) -> dict:
        one = {"accuracy": accuracy, "full_to_small": full_to_small, "small_to_full": 1}
        return _result(0.96, 0.84, 0.78) | {"proxy": {s: one for s in ab.PROXY_SETS}}

    results = {("base", 1): with_proxy(0.9, 4), ("base", 2): with_proxy(0.8, 2)}
    lines = ab.summary_rows([base], [1, 2], results)
    assert "proxy etl9g" in lines[0] and "full→small" in lines[0]
    assert (
        "| base | 1 | 96.0 | 84.0 | 78.0 | 88.0 | 68.0 | 90.0 | 90.0 | 90.0 "
        "| 3 / 2 / 5 | 12 / 3 | 300 |"
        in lines
    )
    assert lines[-1].endswith("| 85.0 | 85.0 | 85.0 |")
    del results["base", 2]["proxy"]  # one run without the proxy: fonts only
    assert "proxy" not in ab.summary_rows([base], [1, 2], results)[0]


def test_held_out_writers_join_the_summary_to_a_hundredth(monkeypatch):
    ab = load_script("ab_synth", monkeypatch)
    base, new = ab.Arm("base", ()), ab.Arm("new", ("model.pool_first=true",))

    def with_held_out(accuracy: float) -> dict:
        return _result(0.96, 0.84, 0.78) | {"held_out": {"writers": 320, "accuracy": accuracy}}

    results = {
        ("base", 1): with_held_out(0.9832),
        ("base", 2): with_held_out(0.9852),
        ("new", 1): with_held_out(0.9817),
        ("new", 2): with_held_out(0.9831),
    }
    lines = ab.summary_rows([base, new], [1, 2], results)
    assert lines[0].startswith("| arm | seed | synthetic test | held-out synthetic | fonts plain")
    assert "| base | 1 | 96.0 | 98.32 | 84.0 |" in "\n".join(lines)
    assert lines[-1].startswith("| new | 96.0 (+0.0, +0.0..+0.0) | 98.24 (-0.18, -0.21..-0.15) |")
    del results["new", 2]["held_out"]  # one run without it: the column goes
    assert "held-out" not in ab.summary_rows([base, new], [1, 2], results)[0]


def test_the_evaluation_headline_is_parsed_and_its_absence_refused(monkeypatch):
    ab = load_script("ab_synth", monkeypatch)
    output = (
        "prepare synthetic: 24000 images in 37.9 s\n"
        "run cf1bd72f on synthetic (all, 24000 samples): accuracy 0.9832, top-5 0.9989, "
        "macro F1 0.9831\nlogged as MLflow run 7e268a32\n"
    )
    assert ab.parse_evaluation(output) == 0.9832
    with pytest.raises(SystemExit, match="no accuracy line"):
        ab.parse_evaluation("error: experiment 'hwexp' does not exist\n")


def test_held_out_writers_that_an_arm_trains_on_are_refused(tmp_path, monkeypatch):
    ab = load_script("ab_synth", monkeypatch)
    with pytest.raises(SystemExit, match="held-out writers from 1000"):
        ab._read_held_out(tmp_path / "big-s1", ["synthetic.writers=1200"], tmp_path, 320)
    assert not (tmp_path / "big-s1").exists()  # refused before anything ran
