"""``python -m hwexp.serve``: a drawing pad in the browser for any exported model.

The server (``hwexp.serve.app``, standard library ``http.server``) reads strokes and pictures
with ``hwexp.recognition.Recognizer`` (ONNX Runtime, the model's own training preprocessing;
loaded from files, the MLflow Model Registry or runs), the object ``hwexp predict`` and Python
code use, and never imports TensorFlow.
"""
