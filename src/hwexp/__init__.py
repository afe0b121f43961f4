"""hwexp: config-driven experiments for recognising handwritten Japanese characters.

Read characters with an exported model: ``from hwexp import Recognizer`` (hwexp.recognition).
"""

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hwexp.recognition import ModelInfo, Prediction, Recognizer, Strokes  # noqa: F401

# Quiet TensorFlow's C++ start-up chatter (set the variable yourself to see it again).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns its oneDNN CPU kernels on by itself only on CPUs with AVX-512-class features;
# on others (AMD EPYC with AVX2 here) they train the default model 2x faster than the Eigen
# kernels (scripts/bench_train.py: 105 -> 208 samples/s). Set the variable to 0 to opt out.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# MLflow: no "Downloading artifacts" bars for a local store, no INFO lines (database set-up).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

# TensorFlow's absl start-up lines ignore TF_CPP_MIN_LOG_LEVEL: filter them (hwexp/quiet.py).
from hwexp.quiet import quiet_tensorflow_import  # noqa: E402

quiet_tensorflow_import()

__version__ = "0.1.0"

# The Hydra configs ship inside the package (hwexp/conf), so an installed wheel has them. Add
# your own config folder with --config-dir DIR (its files override and extend these).
CONF_DIR = str(Path(__file__).resolve().parent / "conf")

# ``from hwexp import Recognizer`` loads hwexp.recognition on first use, so ``import hwexp`` (every
# command) stays light; neither imports TensorFlow.
_LAZY = {"Recognizer", "Prediction", "Strokes", "ModelInfo"}
__all__ = ["CONF_DIR", "__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import hwexp.recognition

        return getattr(hwexp.recognition, name)
    raise AttributeError(f"module 'hwexp' has no attribute {name!r}")
