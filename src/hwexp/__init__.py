"""hwexp: config-driven experiments for recognising handwritten Japanese characters."""

import os
from pathlib import Path

# Quiet TensorFlow's C++ start-up chatter (set the variable yourself to see it again).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns its oneDNN CPU kernels on by itself only on CPUs with AVX-512-class features;
# on others (AMD EPYC with AVX2 here) they train the default model 2x faster than the Eigen
# kernels (scripts/bench_train.py: 105 -> 208 samples/s). Set the variable to 0 to opt out.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"

# The Hydra configs ship inside the package (hwexp/conf), so an installed wheel has them. Add
# your own config folder with --config-dir DIR (its files override and extend these).
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
