"""esdllm: serve diffusion LLMs fast. Subpackages: runtime (model, cache, loop), plugins (ops), build (ONNX/TensorRT)."""
__version__ = "0.1.0"
