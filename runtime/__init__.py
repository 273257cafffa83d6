"""esdllm runtime: the model (model.py), the explicit cache, policies and the one diffusion loop
(generate.py), samplers, executors, and the Pipeline that ties a checkpoint to them."""
from .config import DecodeConfig, ModelArgs, Stats

__all__ = ["DecodeConfig", "ModelArgs", "Stats", "generate", "load_model", "Pipeline"]


def __getattr__(name):  # lazy: keep `import esdllm.runtime` light
    if name == "generate":
        from .generate import generate
        return generate
    if name == "load_model":
        from .weights import load_model
        return load_model
    if name == "Pipeline":
        from .pipeline import Pipeline
        return Pipeline
    raise AttributeError(name)
