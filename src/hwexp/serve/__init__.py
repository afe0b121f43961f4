"""``python -m hwexp.serve``: a drawing pad in the browser for any exported model.

The server (``hwexp.serve.app``, standard library ``http.server``) runs exported ONNX models
with ONNX Runtime and never imports TensorFlow; ``hwexp.serve.models`` loads them (files, MLflow
Model Registry, runs) and turns strokes or pictures into model inputs with the training
preprocessing (``hwexp.data.preprocess.normalise_characters``).
"""
