"""Export official SAM, LaMa and Stable Diffusion checkpoints to ONNX (and TensorRT plans)."""
