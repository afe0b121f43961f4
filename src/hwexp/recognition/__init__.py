"""Reading characters with an exported model: ``Recognizer`` (``from hwexp import Recognizer``).

``recognizer`` (the class, ``Prediction``, ``ModelInfo``), ``inputs`` (strokes and pictures as
grey rasters), ``loading`` (files, Model Registry, runs). ONNX Runtime runs the models; nothing
here imports TensorFlow (a run without an ONNX export is exported in a subprocess).
"""

from hwexp.recognition.inputs import Strokes
from hwexp.recognition.recognizer import ModelInfo, Prediction, Recognizer

__all__ = ["ModelInfo", "Prediction", "Recognizer", "Strokes"]
