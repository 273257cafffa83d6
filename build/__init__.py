"""Offline compilation: checkpoint -> ONNX graph variants with esdllm plugin nodes (graphs.py,
export_onnx.py, onnx_ops.py) -> TensorRT / TensorRT-RTX engines (engine.py), plus the engine.json
sidecar whose schema lives in runtime/artifacts.py (the runtime reads it; it never imports build)."""
