"""Offline compilation: checkpoint -> ONNX graph variants with esdllm plugin nodes -> TensorRT
engines, plus the engine.json sidecar (config.py). Never imported at serve time except
build.config, which executors use to read engine.json."""
