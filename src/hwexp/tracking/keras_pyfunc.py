"""The MLflow ``python_function`` of a trained hwexp model: the code of the ``model`` that every
training run logs (``Tracker.log_model``). MLflow copies this file into the model and runs it
when the model is loaded, so it imports no hwexp code: Keras, numpy and pandas only.

Input: prepared images, a uint8 array ``(n, S, S)``, ink WHITE (255) on BLACK (0), as
``hwexp.data.preprocess`` writes them (``S``: the model's input size, in the signature).
Output: a ``pandas.DataFrame``, one row per image, in input order:

* ``character`` (str): the most probable class;
* ``probability`` (float): its probability;
* ``top_characters`` / ``top_probabilities`` (lists): the ``top_k`` most probable classes and
  their probabilities, most probable first (param ``top_k``, default 5);
* ``probabilities`` (list of float): every class's probability, in the order of
  ``artifacts/classes.txt`` (the model's ``metadata.classes`` too).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

BATCH = 256  # images per Keras call


class CharacterClassifier(PythonModel):
    """A Keras character classifier with its classes (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        import keras

        self.model = keras.saving.load_model(context.artifacts["keras_model"], compile=False)
        with open(context.artifacts["classes"], encoding="utf-8") as lines:
            self.classes = np.array(lines.read().split("\n")[:-1], dtype=object)  # one per line
        self.top_k = int((context.model_config or {}).get("top_k", 5))

    # model_input: np.ndarray, a hint MLflow takes as "no schema from hints" (the logged
    # signature is the schema); other hints it would try to read as a schema, none it warns of.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict | None = None
    ) -> pd.DataFrame:
        """``model_input`` (prepared images) -> DataFrame; see the module docstring."""
        images = np.asarray(model_input)
        if images.ndim == 2:  # one image
            images = images[np.newaxis]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"expected prepared images, uint8 (n, S, S); got {images.dtype} {images.shape}"
            )
        probs = np.zeros((0, len(self.classes)), np.float32)
        if len(images):
            probs = np.concatenate(
                [
                    np.asarray(self.model.predict_on_batch(images[i : i + BATCH, ..., None]))
                    for i in range(0, len(images), BATCH)
                ]
            ).astype(np.float32)
        k = max(1, min(int((params or {}).get("top_k") or self.top_k), len(self.classes)))
        best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        best_probs = np.take_along_axis(probs, best, axis=1)
        return pd.DataFrame(
            {
                "character": self.classes[best[:, 0]],
                "probability": best_probs[:, 0],
                "top_characters": [list(row) for row in self.classes[best]],
                "top_probabilities": [row.tolist() for row in best_probs],
                "probabilities": [row.tolist() for row in probs],
            }
        )


mlflow.models.set_model(CharacterClassifier())
