import json
import re
import sys
from pathlib import Path

import coremltools as ct
import mlflow
import numpy as np
import onnx
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_config import data_config
from hwexp import CONF_DIR
from hwexp.__main__ import run_training
from hwexp.contract import (
    BEST_TRIAL_TAG,
    CLASSES_DIGEST_TAG,
    EXPORTED_TAG,
    MODEL_CARD_FILE,
    SWEEP_ID_TAG,
    classes_digest,
    model_name,
    write_classes,
)
from hwexp.data.charsets import CLASS_SETS
from hwexp.data.dataset import load_splits
from hwexp.errors import ConfigError, ExportError, RunNotFound
from hwexp.export.__main__ import main
from hwexp.export.after_sweep import ExportAfterSweep, sweep_export_config
from hwexp.export.coreml import check_coreml, to_coreml
from hwexp.export.onnx import onnx_predictor
from hwexp.export.run import export_run, inference_model, run_data_config
from hwexp.export.tflite import tflite_predictor
from hwexp.model import build_model
from hwexp.tracking.runs import client_for, find_run, load_trained_model
from hwexp.tracking.writer import Tracker

EXPERIMENT = "hwexp-debug"
NAME = "hiragana75-first5-synthetic"  # the debug run's model: 5 of the hiragana75, synthetic


def export_config(root, *overrides):
    return data_config(root, f"select.experiment={EXPERIMENT}", *overrides, config_name="export")


def _selection(cfg):
    """``find_run`` arguments of an export config."""
    select = cfg.select
    return {
        "ref": str(cfg.run),
        "experiment": select.experiment,
        "metric": select.metric,
        "parent_run_id": select.parent_run,
    }


def log_run(tracking_cfg, source, model=None, metrics=None, parent=None, name="copy"):
    """A new finished run holding ``model`` (default: the source's) with the source's config."""
    with Tracker.from_config(tracking_cfg, run_name=name, parent=parent) as tracker:
        tracker.log_config(OmegaConf.create(source.config))
        tracker.log_model(model if model is not None else source.model, source.classes)
        tracker.log_metrics(metrics or {})
    return tracker.run_id


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = data_config(root, "debug=default", "trainer.verbose=0", config_name="config")
    metrics = run_training(cfg)
    client = client_for(cfg.tracking)
    run_id = find_run(client, "best", EXPERIMENT)
    return root, cfg, metrics, load_trained_model(client, run_id)


@pytest.fixture(scope="module")
def exported(trained):
    root, _, _, model = trained
    cfg = export_config(root, "run=best", "formats=[coreml,coreml_nn,tflite,onnx]")
    return cfg, export_run(cfg)


@pytest.fixture(scope="module")
def test_images(trained):
    root, cfg, _, model = trained
    test = load_splits(run_data_config(export_config(root), model.config), progress=False).test
    return np.asarray(test.images)[..., np.newaxis], np.asarray(test.labels)


def test_exports_every_format_logs_and_registers(trained, exported):
    root, _, train_metrics, model = trained
    cfg, result = exported
    assert result.folder == Path(root, "outputs", "exports", model.run_id)
    assert set(result.files) == {"coreml", "coreml_nn", "tflite_fp32", "tflite_int8", "onnx"}
    assert all(path.exists() for path in result.files.values())
    assert result.files["coreml"].name == f"{NAME}.mlpackage"
    classes = (result.folder / "classes.txt").read_text("utf-8").splitlines()
    assert tuple(classes) == model.classes
    report = json.loads((result.folder / "export.json").read_text("utf-8"))
    assert report["run_id"] == model.run_id and report["ink"] == "white-on-black"
    # no staging folders left beside the export
    assert [p.name for p in result.folder.parent.iterdir()] == [model.run_id]
    m = result.metrics
    assert m["export/keras/accuracy"] == pytest.approx(train_metrics["test/accuracy"])
    for variant in ("tflite_fp32", "onnx"):
        assert m[f"export/{variant}/agreement"] >= 0.999
        assert m[f"export/{variant}/accuracy"] == pytest.approx(m["export/keras/accuracy"])
    assert 0.0 <= m["export/tflite_int8/accuracy"] <= 1.0
    assert m["export/tflite_int8/size_bytes"] < 0.5 * m["export/tflite_fp32/size_bytes"]
    assert m["export/coreml/size_bytes"] < 0.7 * m["export/tflite_fp32/size_bytes"]  # fp16

    client = client_for(cfg.tracking)
    run = client.get_run(model.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[EXPORTED_TAG] == "true"
    assert run.data.metrics["export/onnx/agreement"] == m["export/onnx/agreement"]
    logged = {a.path for a in client.list_artifacts(model.run_id, "export")}
    assert {f"export/{NAME}.mlpackage", f"export/{NAME}.onnx", "export/classes.txt"} <= logged
    assert {"export/MLmodel", "export/MODEL_CARD.md"} <= logged
    name, version = result.registered.split("/")
    assert name == NAME
    registered = client.get_model_version(name, version)
    assert registered.run_id == model.run_id
    assert registered.source.endswith("/export")
    assert registered.tags["coreml_package"] == f"{NAME}.mlpackage"
    assert registered.tags[CLASSES_DIGEST_TAG] == classes_digest(model.classes)


def test_coreml_specs_read_back(trained, exported):
    _, _, _, model = trained
    _, result = exported
    for variant in ("coreml", "coreml_nn"):
        checks = check_coreml(result.files[variant], model.classes, 48, model.run_id)
        failed = [k for k, ok in checks.items() if ok is False]
        assert not failed, (variant, checks)
        assert checks["input_scale"] == pytest.approx(1 / 255, rel=1e-3)
        assert checks["input_bias"] == 0.0
    package = ct.models.MLModel(str(result.files["coreml"]), skip_model_load=True)
    spec = package.get_spec()
    assert spec.WhichOneof("Type") == "mlProgram" and spec.specificationVersion == 6  # iOS 15
    assert package.author == "hwexp" and "licence" in package.license
    assert package.version.endswith(model.run_id[:8])
    meta = package.user_defined_metadata
    assert meta["hwexp.run_id"] == model.run_id
    assert meta["hwexp.test_accuracy"] == f"{model.metrics['test/accuracy']:.4f}"
    assert meta["hwexp.ink"] == "white-on-black"
    assert "WHITE (255) on BLACK (0)" in package.input_description["image"]
    old = ct.models.MLModel(str(result.files["coreml_nn"]), skip_model_load=True).get_spec()
    assert old.WhichOneof("Type") == "neuralNetworkClassifier" and old.specificationVersion <= 4


def test_coreml_check_catches_extra_scaling_wrong_labels_and_size(trained, tmp_path):
    _, _, _, model = trained
    doubly_scaled = ct.convert(
        inference_model(model.model),
        source="tensorflow",
        inputs=[
            ct.ImageType(
                name="image",
                shape=(1, 48, 48, 1),
                scale=1 / 255,
                color_layout=ct.colorlayout.GRAYSCALE,
            )
        ],
        classifier_config=ct.ClassifierConfig(list(model.classes)),
        minimum_deployment_target=ct.target.iOS15,
    )
    path = tmp_path / "bad.mlpackage"
    doubly_scaled.save(str(path))
    checks = check_coreml(path, model.classes, 48, model.run_id)
    # Scaled twice, or (coremltools casts the image scale to the uint8 model input's integer
    # type, so 1/255 becomes 0) not at all: either way not the model's 1/255, once.
    assert checks["scaling_once"] is False
    assert checks["input_scale"] != pytest.approx(1 / 255, rel=1e-2)
    assert checks["run_id_in_metadata"] is False
    assert checks["labels_match"] is True
    assert check_coreml(path, model.classes[::-1], 48, model.run_id)["labels_match"] is False
    assert check_coreml(path, model.classes, 64, model.run_id)["input_size"] is False


@pytest.mark.parametrize("weights", ["int8", "palette4"])
def test_compressed_coreml_weights_keep_the_contract(trained, tmp_path, weights):
    _, _, _, model = trained
    path = to_coreml(
        inference_model(model.model),
        model.classes,
        tmp_path / "small.mlpackage",
        {"hwexp.run_id": model.run_id},
        {},
        weights=weights,
    )
    checks = check_coreml(path, model.classes, 48, model.run_id)
    assert not [k for k, ok in checks.items() if ok is False], checks
    assert checks["specification_version"] >= 7  # iOS 16: compressed weights
    program = ct.models.MLModel(str(path), skip_model_load=True).get_spec().mlProgram
    op_types = {
        op.type
        for function in program.functions.values()
        for block in function.block_specializations.values()
        for op in block.operations
    }
    expected = "constexpr_affine_dequantize" if weights == "int8" else "constexpr_lut_to_dense"
    assert expected in op_types


def test_tflite_and_onnx_match_keras(trained, exported, test_images):
    _, _, _, model = trained
    _, result = exported
    images, _ = test_images
    reference = np.asarray(inference_model(model.model)(images, training=False))
    for variant, runner in (("tflite_fp32", tflite_predictor), ("onnx", onnx_predictor)):
        probs = runner(result.files[variant], threads=1)(images)
        np.testing.assert_allclose(probs, reference, atol=1e-4)
        single = runner(result.files[variant], threads=1)(images[:1])
        np.testing.assert_allclose(single, reference[:1], atol=1e-4)
    int8 = tflite_predictor(result.files["tflite_int8"])(images)
    assert int8.shape == reference.shape and np.all(np.isfinite(int8))
    graph = onnx.load(str(result.files["onnx"]))
    assert [i.name for i in graph.graph.input] == ["image"]
    assert [o.name for o in graph.graph.output] == ["probabilities"]
    props = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(props["hwexp.classes"]) == list(model.classes)


def test_model_with_augmentation_exports_without_randomness(trained, test_images, tmp_path):
    root, cfg, _, source = trained
    augmented = build_model(cfg.model, cfg.augment, len(source.classes), 48, seed=None)
    for layer in source.model.layers:
        if layer.weights:
            augmented.get_layer(layer.name).set_weights(layer.get_weights())
    assert any(layer.name.startswith("augment_") for layer in augmented.layers)
    run_id = log_run(cfg.tracking, source, augmented, name="augmented")
    images, _ = test_images
    reference = np.asarray(augmented(images, training=False))
    # (after the reference: training-mode calls also update batch-norm statistics)
    trained_mode = [np.asarray(augmented(images, training=True)) for _ in range(2)]
    assert not np.allclose(trained_mode[0], trained_mode[1])  # the layers really are random

    outputs = []
    for attempt in range(2):
        cfg_export = export_config(
            root,
            f"run={run_id}",
            "formats=[tflite,onnx]",
            "tflite.int8=false",
            f"output_dir={tmp_path}/out{attempt}",
            "log=false",
            "register=false",
        )
        result = export_run(cfg_export)
        assert result.registered is None
        outputs.append(
            {
                "tflite": tflite_predictor(result.files["tflite_fp32"])(images),
                "onnx": onnx_predictor(result.files["onnx"])(images),
            }
        )
    for runtime in ("tflite", "onnx"):
        np.testing.assert_array_equal(outputs[0][runtime], outputs[1][runtime])
        np.testing.assert_allclose(outputs[0][runtime], reference, atol=1e-4)
    stripped = inference_model(load_trained_model(client_for(cfg.tracking), run_id).model)
    assert not any(layer.name.startswith("augment_") for layer in stripped.layers)


def test_failed_check_fails_and_writes_nothing(trained, tmp_path):
    root, _, _, model = trained
    previous = tmp_path / model.run_id
    previous.mkdir()
    (previous / "old.txt").write_text("previous export")
    cfg = export_config(
        root,
        f"run={model.run_id}",
        "formats=[onnx]",
        "verify.min_agreement=1.01",  # unreachable: the check must fail
        f"output_dir={tmp_path}",
    )
    client = client_for(cfg.tracking)
    logged_before = len(client.get_metric_history(model.run_id, "export/onnx/agreement"))
    with pytest.raises(ExportError, match="failed its checks.*onnx: agreement"):
        export_run(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.run_id]
    assert sorted(p.name for p in previous.iterdir()) == ["old.txt"]
    logged_after = len(client.get_metric_history(model.run_id, "export/onnx/agreement"))
    assert logged_after == logged_before  # nothing logged for a failed export


# What converters print on their own (coremltools' bars, the TFLite converter's and runtime's
# C++ notes, a Keras FutureWarning on the way to ONNX): none of the user's business.
CONVERTER_CHATTER = (
    "Running MIL",
    "Converting TF Frontend",
    "fully_quantize",
    "XNNPACK",
    "FutureWarning",
    "Downloading artifacts",
)


def test_export_shows_its_own_progress_and_no_converter_chatter(trained, tmp_path, capfd):
    root, _, _, model = trained
    cfg = export_config(
        root,
        f"run={model.run_id}",
        "formats=[coreml,tflite,onnx]",
        "tflite.representative_samples=20",
        f"output_dir={tmp_path}",
        "log=false",
        "register=false",
    )
    export_run(cfg)
    out, err = capfd.readouterr()
    assert not [chatter for chatter in CONVERTER_CHATTER if chatter in out + err], out + err
    steps = [line.split(" …")[0] for line in err.splitlines()]
    assert steps == [
        f"loading the model of run {model.run_id}",
        "preparing the run's data",
        "converting to coreml",
        "converting to tflite",
        "converting to onnx",
        "checking 4 files against Keras on the test split",
        "logging to the run and registering",
    ], err
    assert all(re.search(r" … \d+\.\d s$", line) for line in err.splitlines()), err


def test_unknown_run_and_run_without_model_are_clear_errors(trained, monkeypatch, capsys):
    root, cfg, _, _ = trained
    with pytest.raises(RunNotFound, match="does not exist"):
        export_run(export_config(root, "run=0123456789abcdef0123456789abcdef"))
    with Tracker.from_config(cfg.tracking, run_name="no model") as empty:
        pass
    with pytest.raises(RunNotFound, match="has no model"):
        export_run(export_config(root, f"run={empty.run_id}"))
    with pytest.raises(ConfigError, match="formats"):
        export_run(export_config(root, "formats=[png]"))
    with pytest.raises(ConfigError, match="coreml.weights"):
        export_run(export_config(root, "coreml.weights=fp8"))
    with pytest.raises(ConfigError, match="coreml_nn"):
        export_run(export_config(root, "formats=[coreml_nn]", "coreml.weights=palette4"))
    monkeypatch.setattr(
        sys,
        "argv",
        ["hwexp.export", "run=0123456789abcdef0123456789abcdef", f"paths.root_dir={root}"],
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    assert "does not exist" in capsys.readouterr().err


def test_after_sweep_exports_best_child_by_optimized_metric(trained, tmp_path):
    root, cfg, _, source = trained
    sweep_dir = tmp_path / "multirun" / "sweep"
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        sweep_cfg = compose(
            "config",
            overrides=[
                f"paths.root_dir={root}",
                "debug=default",
                f"hydra.sweep.dir={sweep_dir}",
            ],
            return_hydra_config=True,
        )
    callback = ExportAfterSweep(overrides=["formats=[onnx]", "register=false"])
    with pytest.raises(RunNotFound, match=SWEEP_ID_TAG):
        callback.on_multirun_end(sweep_cfg)

    with Tracker.from_config(
        cfg.tracking, run_name="sweep", tags={SWEEP_ID_TAG: str(sweep_dir.resolve())}
    ) as parent:
        best_val = log_run(
            cfg.tracking,
            source,
            metrics={"val/best_accuracy": 0.9, "test/accuracy": 0.1},
            parent=parent,
        )
        best_test = log_run(
            cfg.tracking,
            source,
            metrics={"val/best_accuracy": 0.5, "test/accuracy": 0.9},
            parent=parent,
        )
    export_cfg = sweep_export_config(sweep_cfg, parent.run_id, ["formats=[onnx]"])
    assert export_cfg.select.metric == "val/best_accuracy"  # the sweep's optimized_metric
    legacy = sweep_cfg.copy()
    legacy.optimized_metric = "val/accuracy"  # its former name: the same best-epoch value
    renamed = sweep_export_config(legacy, parent.run_id, ["formats=[onnx]"])
    assert renamed.select.metric == "val/best_accuracy"
    assert export_cfg.select.parent_run == parent.run_id and export_cfg.run == "best"
    by_test = sweep_export_config(sweep_cfg, parent.run_id, ["select.metric=test/accuracy"])
    assert find_run(client_for(cfg.tracking), **_selection(by_test)) == best_test
    callback.on_multirun_end(sweep_cfg)
    assert callback.result.run_id == best_val
    assert set(callback.result.files) == {"onnx"}
    assert callback.result.files["onnx"].is_file()

    # The sweeper's best-trial tag (it knows the direction) wins over the metric ...
    client_for(cfg.tracking).set_tag(best_test, BEST_TRIAL_TAG, "true")
    assert sweep_export_config(sweep_cfg, parent.run_id, (), best_test).run == best_test
    callback.on_multirun_end(sweep_cfg)
    assert callback.result.run_id == best_test
    # ... unless select.metric is given explicitly.
    explicit = sweep_export_config(
        sweep_cfg, parent.run_id, ["select.metric=val/accuracy"], best_test
    )
    assert explicit.run == "best"
    disabled = ExportAfterSweep(enabled=False)
    disabled.on_multirun_end(sweep_cfg)
    assert disabled.result is None


# --------------------------------------------------------------------------- names, MLflow models


def test_names_say_what_a_model_reads():
    full = model_name({"classes": "hiragana75", "source": "synthetic"}, "あ" * 75)
    debug = {"classes": "hiragana75", "source": "synthetic", "limit_classes": 5}
    assert full == "hiragana75-synthetic"
    assert model_name(debug, "あいうえお") == NAME != full
    assert model_name({"classes": "katakana48", "source": "etl1c"}, "ア" * 48) == (
        "katakana48-etl1c"
    )
    mixed = {"classes": "kanji881", "source": ["synthetic", "etl8g"]}
    assert model_name(mixed, "亜" * 881) == "kanji881-etl8g+synthetic"
    assert model_name({"classes": "kmnist10", "source": "kmnist"}, "お" * 10) == "kmnist10"
    # explicit characters: named by count and content, so two subsets of 5 differ
    aiueo = model_name({"classes": "chars:あいうえお", "source": "etl8g"}, "あいうえお")
    kakiku = model_name({"classes": "chars:かきくけこ", "source": "etl8g"}, "かきくけこ")
    assert aiueo.startswith("chars5-") and aiueo.endswith("-etl8g") and aiueo != kakiku
    assert aiueo == model_name({"classes": list("あいうえお"), "source": "etl8g"}, "あいうえお")
    folder = model_name({"classes": "auto", "source": "folder"}, "あい")
    assert folder.startswith("folder2-") and folder.isascii()


def test_the_run_records_its_training_data(trained):
    root, cfg, _, model = trained
    (entry,) = [p for p in Path(cfg.paths.cache_dir).glob("synthetic-*") if p.is_dir()]
    (recorded,) = client_for(cfg.tracking).get_run(model.run_id).inputs.dataset_inputs
    assert recorded.dataset.name == "synthetic-hiragana75-first5-48px"
    assert recorded.dataset.digest == entry.name.rsplit("-", 1)[1]  # the cache fingerprint
    assert json.loads(recorded.dataset.source)["uri"] == entry.resolve().as_uri()
    tags = {t.key: t.value for t in recorded.tags}
    assert tags["mlflow.data.context"] == "training"
    assert tags["hwexp.class_set"] == "hiragana75-first5" and tags["hwexp.source"] == "synthetic"
    profile = json.loads(recorded.dataset.profile)
    assert profile["classes"] == 5 and profile["test_samples"] > 0


def test_pyfunc_of_the_run_reproduces_its_test_accuracy(trained, test_images, monkeypatch):
    root, cfg, train_metrics, model = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client_for(cfg.tracking).tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{model.run_id}/model")
    assert pyfunc.metadata.signature.inputs.inputs[0].shape == (-1, 48, 48)
    images, labels = test_images
    predicted = pyfunc.predict(images[..., 0])  # prepared images: (n, 48, 48) uint8
    truth = np.array(model.classes)[labels]
    accuracy = np.mean(predicted["character"].to_numpy() == truth)
    assert accuracy == pytest.approx(train_metrics["test/accuracy"])


def test_registered_version_is_an_mlflow_model_with_a_signature(exported, test_images, monkeypatch):
    cfg, result = exported
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client_for(cfg.tracking).tracking_uri)
    uri = f"models:/{result.registered}"
    info = mlflow.models.get_model_info(uri)
    assert "onnx" in info.flavors and "python_function" in info.flavors
    (image,) = info.signature.inputs.inputs
    assert (image.name, image.type, image.shape) == ("image", np.dtype(np.uint8), (-1, 48, 48, 1))
    (probs,) = info.signature.outputs.inputs
    assert probs.name == "probabilities" and probs.shape == (-1, 5)
    assert info.metadata["classes"] == list("あいうえお")
    images, labels = test_images
    probabilities = mlflow.pyfunc.load_model(uri).predict(images)["probabilities"]
    accuracy = np.mean(probabilities.argmax(axis=1) == labels)
    assert accuracy == pytest.approx(result.metrics["export/onnx/accuracy"])
    # one ONNX file in the folder: the flavour points at the export's own file
    assert [p.name for p in result.folder.glob("*.onnx")] == [f"{NAME}.onnx"]


def test_model_card_goes_with_the_export_and_the_version(trained, exported):
    _, _, _, model = trained
    cfg, result = exported
    card = (result.folder / MODEL_CARD_FILE).read_text("utf-8")
    assert card.startswith(f"# {NAME}\n") and model.run_id in card
    assert "あいうえお" in card and "hiragana75" in card  # the classes
    assert "`synthetic`" in card and "KanjiVG" in card  # the source
    assert "CC BY-SA 3.0" in card and "## Licence" in card  # the data's licence
    accuracy = result.metrics["export/keras/accuracy"]
    source_accuracy = result.metrics["export/keras/source/synthetic/accuracy"]
    samples = int(result.metrics["export/test_samples"])  # one source: all of them
    assert f"| all | {samples} | {accuracy:.2%} |" in card
    assert f"| `synthetic` | {samples} | {source_accuracy:.2%} |" in card
    assert "## Intended use" in card and "real handwriting" in card
    name, version = result.registered.split("/")
    description = client_for(cfg.tracking).get_model_version(name, version).description
    assert description.startswith(f"# {NAME}\n") and f"{accuracy:.2%}" in description
    assert MODEL_CARD_FILE in description and len(description) <= 5000


def test_a_model_of_other_classes_never_replaces_a_registered_one(trained, tmp_path):
    """A registered 48-class katakana model stays what its name says: exporting the 5-class
    debug run under its name is refused before anything is written, and by default the debug
    run gets its own name."""
    root, cfg, _, model = trained
    client = client_for(cfg.tracking)
    katakana = tmp_path / "katakana"
    katakana.mkdir()
    write_classes(katakana / "classes.txt", CLASS_SETS["katakana48"])
    with Tracker.from_config(cfg.tracking, run_name="katakana") as other:
        other.log_artifact(katakana / "classes.txt", "export")
    source = f"{client.get_run(other.run_id).info.artifact_uri}/export"
    client.create_registered_model("katakana48-etl1c")
    client.create_model_version("katakana48-etl1c", source, run_id=other.run_id)
    out = tmp_path / "out"
    refused = export_config(
        root,
        f"run={model.run_id}",
        "formats=[onnx]",
        "register_name=katakana48-etl1c",
        f"output_dir={out}",
    )
    with pytest.raises(ExportError, match="reads 48 classes.*reads 5"):
        export_run(refused)
    assert not out.exists() or not any(out.iterdir())
    assert [v.version for v in client.search_model_versions("name = 'katakana48-etl1c'")] == [1]

    allowed = export_config(root, f"run={model.run_id}", "formats=[onnx]", f"output_dir={out}")
    assert export_run(allowed).registered.split("/")[0] == NAME
    assert [v.version for v in client.search_model_versions("name = 'katakana48-etl1c'")] == [1]
