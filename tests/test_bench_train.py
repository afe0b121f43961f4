"""scripts/bench_train.py's own logic: model variants given on the command line."""

from scripts_loader import load_script


def test_a_model_variant_changes_only_the_named_options(monkeypatch):
    bench = load_script("bench_train", monkeypatch)
    plain = bench.bench_config("vgg_bn", "on", 64, 2, False)
    variant = bench.bench_config("vgg_bn:pool_first=false,widths=[8,16]", "on", 64, 2, False)
    assert plain.model.pool_first is True  # the default
    assert variant.model.pool_first is False and list(variant.model.widths) == [8, 16]
    assert {k: v for k, v in variant.model.items() if k not in ("pool_first", "widths")} == {
        k: v for k, v in plain.model.items() if k not in ("pool_first", "widths")
    }
    assert variant.trainer.batch_size == 64 and variant.callbacks.early_stopping.enabled is False
