"""Default profile: onnxruntime on the model.onnx beside this file, inside Triton's Python backend."""

from isekai.serving.onnx_model import TritonPythonModel  # noqa: F401
