"""Every profile: onnxruntime on the model.onnx beside this file, loading (and refusing requests) without
it."""

from isekai.serving.optional_onnx_model import TritonPythonModel  # noqa: F401
