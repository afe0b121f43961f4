"""hwexp: config-driven experiments for recognising handwritten Japanese characters."""

import os
from pathlib import Path

# Quiet TensorFlow's C++ start-up chatter (set the variable yourself to see it again).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

# The Hydra configs live in the repository's conf/ (the package is installed editable).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
