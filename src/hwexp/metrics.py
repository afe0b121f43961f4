"""Accuracy statistics of one model on one split (``EvaluationReport``): per class, writer
and source, top-k, the most confused pairs and the confident errors. NumPy only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class EvaluationReport:
    """Predictions on one split and the statistics derived from them.

    ``top_k[i]`` are the k most probable class indices of sample i, best first, with
    probabilities ``top_k_probs[i]``; ``true_probs[i]`` is the probability of its true class.
    ``images`` is the split's image array (not copied), for pictures of errors.
    """

    classes: tuple[str, ...]
    labels: np.ndarray  # (n,) int
    top_k: np.ndarray  # (n, k) int
    top_k_probs: np.ndarray  # (n, k) float32
    true_probs: np.ndarray  # (n,) float32
    writers: np.ndarray  # (n,) str
    sources: np.ndarray  # (n,) str
    images: np.ndarray = field(repr=False)  # (n, S, S) uint8

    @property
    def predicted(self) -> np.ndarray:
        return self.top_k[:, 0]

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.labels

    def per_class(self) -> list[dict[str, Any]]:
        """One row per class: ``char``, ``codepoint``, ``support``, ``correct``, ``accuracy``
        (recall; NaN without support), ``precision``, ``f1`` (0 when undefined)."""
        n_classes = len(self.classes)
        support = np.bincount(self.labels, minlength=n_classes)
        hits = np.bincount(self.labels[self.correct], minlength=n_classes)
        predicted = np.bincount(self.predicted, minlength=n_classes)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = hits / support
            precision = np.where(predicted > 0, hits / np.maximum(predicted, 1), 0.0)
            f1 = np.where(support + predicted > 0, 2 * hits / (support + predicted), 0.0)
        return [
            {
                "char": char,
                "codepoint": " ".join(f"U+{ord(c):04X}" for c in char),
                "support": int(support[i]),
                "correct": int(hits[i]),
                "accuracy": float(recall[i]),
                "precision": float(precision[i]),
                "f1": float(f1[i]),
            }
            for i, char in enumerate(self.classes)
        ]

    def _grouped(self, keys: np.ndarray, key_name: str) -> list[dict[str, Any]]:
        names, inverse = np.unique(keys, return_inverse=True)
        counts = np.bincount(inverse, minlength=len(names))
        hits = np.bincount(inverse[self.correct], minlength=len(names))
        rows = [
            {
                key_name: str(name),
                "samples": int(counts[i]),
                "correct": int(hits[i]),
                "accuracy": float(hits[i] / counts[i]),
            }
            for i, name in enumerate(names)
        ]
        return sorted(rows, key=lambda row: (row["accuracy"], row[key_name]))

    def per_writer(self) -> list[dict[str, Any]]:
        """One row per writer (``writer``, ``samples``, ``correct``, ``accuracy``), worst first."""
        return self._grouped(self.writers, "writer")

    def per_source(self) -> list[dict[str, Any]]:
        """One row per source (``source``, ``samples``, ``correct``, ``accuracy``), worst first."""
        return self._grouped(self.sources, "source")

    def confusion_pairs(self, limit: int = 20) -> list[tuple[str, str, int]]:
        """The ``limit`` most frequent (true char, predicted char, count) errors, most first
        (ties: by true then predicted class index)."""
        wrong = ~self.correct
        n_classes = len(self.classes)
        pair_ids, counts = np.unique(
            self.labels[wrong].astype(np.int64) * n_classes + self.predicted[wrong],
            return_counts=True,
        )
        order = np.lexsort((pair_ids, -counts))[:limit]
        return [
            (
                self.classes[pair_ids[i] // n_classes],
                self.classes[pair_ids[i] % n_classes],
                int(counts[i]),
            )
            for i in order
        ]

    def confusion_examples(self, pairs: list[tuple[str, str, int]]) -> list[tuple[int, int]]:
        """For each (true, predicted, count) pair: the index of its most confident error (a
        sample of ``true`` read as ``predicted``) and of the most confidently right sample of
        ``predicted`` (-1 when there is none), e.g. to show what the model mixed up."""
        index_of = {char: i for i, char in enumerate(self.classes)}
        confidence = self.top_k_probs[:, 0]

        def most_confident(rows: np.ndarray) -> int:
            return int(rows[np.argmax(confidence[rows])]) if len(rows) else -1

        examples = []
        for true, predicted, _ in pairs:
            t, p = index_of[true], index_of[predicted]
            wrong = np.flatnonzero((self.labels == t) & (self.predicted == p))
            right = np.flatnonzero((self.labels == p) & self.correct)
            examples.append((most_confident(wrong), most_confident(right)))
        return examples

    def misclassified(self, limit: int = 36) -> np.ndarray:
        """Indices of up to ``limit`` wrong predictions, the most confident mistakes first."""
        wrong = np.flatnonzero(~self.correct)
        return wrong[np.argsort(-self.top_k_probs[wrong, 0], kind="stable")[:limit]]

    def metrics(self, prefix: str = "test") -> dict[str, float]:
        """Scalar metrics: ``accuracy``, ``top5_accuracy`` (top-k, k = min(5, classes)),
        ``loss`` (mean NLL), ``macro_f1`` and ``balanced_accuracy`` (over classes present),
        ``class_accuracy_min``, ``writer_accuracy_{mean,min,p10}``,
        ``source/<name>/accuracy`` and ``samples``, all under ``<prefix>/``."""
        n = len(self.labels)
        if n == 0:
            return {f"{prefix}/samples": 0.0}
        per_class = self.per_class()
        present = [row for row in per_class if row["support"] > 0]
        writer_acc = np.array([row["accuracy"] for row in self.per_writer()])
        out = {
            "samples": float(n),
            "accuracy": float(np.mean(self.correct)),
            "top5_accuracy": float(np.mean(np.any(self.top_k == self.labels[:, None], axis=1))),
            "loss": float(np.mean(-np.log(np.clip(self.true_probs, 1e-7, 1.0)))),
            "macro_f1": float(np.mean([row["f1"] for row in present])),
            "balanced_accuracy": float(np.mean([row["accuracy"] for row in present])),
            "class_accuracy_min": float(min(row["accuracy"] for row in present)),
            "writer_accuracy_mean": float(writer_acc.mean()),
            "writer_accuracy_min": float(writer_acc.min()),
            "writer_accuracy_p10": float(np.percentile(writer_acc, 10)),
        }
        for row in self.per_source():
            out[f"source/{row['source']}/accuracy"] = row["accuracy"]
        return {f"{prefix}/{key}": value for key, value in out.items()}
