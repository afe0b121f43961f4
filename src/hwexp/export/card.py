"""The model card of an export (``MODEL_CARD.md`` beside the exported files, and the registered
version's description): what the model reads, its input and preprocessing, the data it learnt
from and on what terms, its accuracy per source, and what it is for."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hwexp.contract import (
    CLASSES_FILE,
    INPUT_NAME,
    MODEL_CARD_FILE,
    OUTPUT_NAME,
    TOP_K,
)
from hwexp.data.sources import SOURCE_TABLE

if TYPE_CHECKING:
    from hwexp.data.dataset import PreparedSplits
    from hwexp.export.base import Conversion, Exported

DESCRIPTION_LIMIT = 5000  # characters of a registered version's description (MLflow's column)
SHOWN_CLASSES = 100  # characters listed in the short card (the registry description)


def _sources(dataset: Mapping[str, Any]) -> list[str]:
    source = dataset.get("source") or []
    return [source] if isinstance(source, str) else [str(s) for s in source]


def _class_list(classes: Sequence[str], limit: int | None) -> str:
    shown = "".join(classes if limit is None else classes[:limit])
    more = len(classes) - len(shown)
    return shown + (f" … (+{more} more, in {CLASSES_FILE})" if more > 0 else "")


def _data_section(splits: PreparedSplits, dataset: Mapping[str, Any], config: Mapping) -> str:
    rows = ["| source | from | train | val | test | weight |", "|---|---|---|---|---|---|"]
    for source in _sources(dataset):
        counts = splits.samples_of(source).values()
        origin = SOURCE_TABLE[source].origin if source in SOURCE_TABLE else ""
        weight = splits.source_weights.get(source, 1.0)
        rows.append(f"| `{source}` | {origin} | {' | '.join(map(str, counts))} | {weight:g} |")
    split = config.get("split", {})
    return "\n".join(
        [
            "## Training data",
            "",
            *rows,
            "",
            f"Split: `{split.get('method')}` (seed {config.get('seed')}); with `writer` no "
            "writer of the test split was seen in training.",
        ]
    )


def _accuracy_section(
    metrics: Mapping[str, float], splits: PreparedSplits, exported: Sequence[Exported]
) -> str:
    rows = ["| source | test images | accuracy |", "|---|---|---|"]
    rows.append(
        f"| all | {int(metrics['export/test_samples'])} | {metrics['export/keras/accuracy']:.2%} |"
    )
    for key, value in sorted(metrics.items()):
        if key.startswith("export/keras/source/"):
            source = key.removeprefix("export/keras/source/").removesuffix("/accuracy")
            count = splits.samples_of(source)["test"]
            rows.append(f"| `{source}` | {count} | {value:.2%} |")
    formats = [
        f"`{item.path.name}`: {item.metrics['accuracy']:.2%} "
        f"(agrees with Keras on {item.metrics['agreement']:.2%})"
        for item in exported
        if "accuracy" in item.metrics
    ]
    return "\n".join(
        [
            "## Accuracy",
            "",
            "Top-1 accuracy of the Keras model on the run's test split, measured at export:",
            "",
            *rows,
            "",
            *([f"Exported files on the same images: {'; '.join(formats)}."] if formats else []),
        ]
    )


def _licence_section(cv: Conversion, sources: Sequence[str]) -> str:
    lines = [
        "## Licence",
        "",
        f"Weights: {cv.metadata['license']}.",
        "",
        "Training data:",
        "",
    ]
    for source in sources:
        terms = SOURCE_TABLE[source].licence if source in SOURCE_TABLE else "unknown"
        lines.append(f"* `{source}`: {terms}.")
    return "\n".join(lines)


def _use_section(classes: Sequence[str], sources: Sequence[str]) -> str:
    lines = [
        "## Intended use",
        "",
        f"Reading one handwritten character at a time, among the {len(classes)} above: "
        "experiments, teaching, demos and drawing or note-taking apps (the hwexp drawing pad, "
        "an iOS app with the Core ML package), on images prepared as described.",
        "",
        "Not for: lines or pages of text (segment them into characters first); characters "
        "outside the class set (the model always answers one of its classes: check the "
        "probability); decisions about people (who wrote something, grading handwriting).",
        "",
        "Accuracy elsewhere can be much lower than above: other pens, paper, scanners, ages "
        "and writing styles than the training data's.",
    ]
    if "synthetic" in sources:
        lines.append(
            "Trained on synthetic handwriting: its synthetic test accuracy overstates its "
            "accuracy on real handwriting (hwexp's docs/real-proxy.md measures the gap)."
        )
    return "\n".join(lines)


def model_card(
    cv: Conversion,
    splits: PreparedSplits,
    metrics: Mapping[str, float],
    exported: Sequence[Exported],
    shown_classes: int | None = None,
) -> str:
    """The Markdown model card of an export (see the module docstring). ``metrics``: the
    export's (``export/keras/accuracy``, ``export/keras/source/<source>/accuracy``, ...);
    ``shown_classes``: list at most this many characters (None: all)."""
    trained, size = cv.trained, cv.size
    dataset = trained.config.get("dataset", {})
    sources = _sources(dataset)
    preprocess = trained.config.get("preprocess", {})
    limit = dataset.get("limit_classes")
    class_set = f"`{dataset.get('classes')}`" + (f", its first {limit}" if limit else "")
    head = [
        f"# {cv.name}",
        "",
        f"Handwritten character classifier, version {cv.metadata['version']}, exported by hwexp "
        f"from run `{trained.run_id}` (dataset `{dataset.get('name')}`, model "
        f"`{trained.config.get('model', {}).get('name')}`).",
        "",
        "## What it reads",
        "",
        f"{len(cv.trained.classes)} characters (class set {class_set}), in output order:",
        "",
        _class_list(trained.classes, shown_classes),
        "",
        "## Input, preprocessing and output",
        "",
        f"* Input `{INPUT_NAME}`: uint8 `(n, {size}, {size}, 1)` (Core ML: a grayscale image): "
        f"{cv.descriptions[INPUT_NAME]}.",
        "* Preprocessing: `hwexp.data.preprocess.normalise_characters` with the run's options "
        "(also in the ONNX metadata `hwexp.preprocess`):",
        "",
        "```json",
        json.dumps(preprocess, sort_keys=True, default=str),
        "```",
        "",
        f"* Output `{OUTPUT_NAME}`: float32 `(n, {len(trained.classes)})`, one probability per "
        f"character in the order above ({CLASSES_FILE}); Core ML: `classLabel` and the "
        f"probabilities. The drawing pad shows the top {TOP_K}.",
    ]
    sections = [
        "\n".join(head),
        _data_section(splits, dataset, trained.config),
        _accuracy_section(metrics, splits, exported),
        _licence_section(cv, sources),
        _use_section(trained.classes, sources),
    ]
    return "\n\n".join(sections) + "\n"


def registry_description(card: str) -> str:
    """``card`` (a short one, ``shown_classes=SHOWN_CLASSES``) cut to MLflow's description
    limit, pointing to the full card."""
    pointer = f"\n\n(Full card: {MODEL_CARD_FILE} in this version's files.)\n"
    if len(card) + len(pointer) <= DESCRIPTION_LIMIT:
        return card + pointer
    return card[: DESCRIPTION_LIMIT - len(pointer) - 1] + "…" + pointer
