"""Shared fixtures: tiny float32 LLaDA and Dream checkpoints in the exact Hugging Face layout
(2 layers, hidden 64, 4 heads; Dream 2 KV heads), written once per session, and `tiny_args`
for tests that need a model shape without a checkpoint. Treat the checkpoints as read-only."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, shared by the test modules

try:  # Triton's mode is fixed at its first import: pick the CPU interpreter before anyone imports it.
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

from esdllm.runtime.config import ModelArgs
from esdllm.runtime.weights import make_tiny_checkpoint


@pytest.fixture(scope="session")
def llada_ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llada", tmp_path_factory.mktemp("llada-tiny"))


@pytest.fixture(scope="session")
def dream_ckpt(tmp_path_factory):
    return make_tiny_checkpoint("dream", tmp_path_factory.mktemp("dream-tiny"))


def _tiny_args(family: str, **overrides) -> ModelArgs:
    """The tiny checkpoints' shape with made-up special ids (vocab 128, mask 127, eos/pad 126)."""
    dream = family == "dream"
    base = dict(family=family, vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2 if dream else 4,
                intermediate_size=128, rope_theta=1e6 if dream else 5e5, norm_eps=1e-6 if dream else 1e-5,
                qkv_bias=dream, logits_shift=int(dream), mask_id=127, eos_id=126, pad_id=126, eot_id=125,
                bos_id=124, rope_full_precision=not dream)
    return ModelArgs(**{**base, **overrides})


@pytest.fixture
def tiny_args():
    """tiny_args(family, **overrides) -> ModelArgs."""
    return _tiny_args


def pytest_collection_modifyitems(items):
    """Tests that start a tritonserver are slow too: `pytest -m "not slow"` is the quick loop."""
    for item in items:
        if item.get_closest_marker("serve"):
            item.add_marker(pytest.mark.slow)
