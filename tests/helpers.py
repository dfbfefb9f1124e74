"""Shared test helpers: the family table, tiny Hugging Face models, ``assert_close``.

Import from tests as ``from helpers import FAMILIES, assert_close`` (pytest puts tests/ on
``sys.path``). The ``hf_checkpoint`` fixture in conftest.py builds on ``build_hf_model``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# The oracle of the real-shape GPU tests: (reference dtype, relative bound). 1B: the reference
# in fp32 on the same bf16 weights; the kernel differs by rounding each GEMV's input (normed h,
# attention output, SwiGLU output) to bf16 as transformers does, 5 roundings per layer: about
# 2^-9 * sqrt(80) over 16 layers (measured 1.7e-2 at batch 1). 8B does not fit in fp32 next to
# a 32k cache, so it is checked against the bf16 reference, which also rounds the residual
# stream to bf16, hence the looser bound.
GPU_ORACLE = {"llama-3.2-1b": (torch.float32, 3e-2), "llama-3.1-8b": (torch.bfloat16, 6e-2)}

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


# Tiny model families: 2 layers, hidden 64-256, GQA ratio > 1, odd vocab sizes, head_dim
# 16 or 32 (qwen3 with head_dim * heads != hidden). Parametrize with
# ``@pytest.mark.parametrize("family", list(FAMILIES))``.
@dataclass(frozen=True)
class Family:
    model_class: str  # transformers class name
    config_class: str
    ours: str  # ModelConfig.family
    kwargs: dict[str, Any] = field(default_factory=dict)


_COMMON = dict(num_hidden_layers=2, rms_norm_eps=1e-5, max_position_embeddings=512)

FAMILIES: dict[str, Family] = {
    "llama": Family(
        "LlamaForCausalLM",
        "LlamaConfig",
        "llama",
        dict(
            vocab_size=263,
            hidden_size=96,
            intermediate_size=160,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=16,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            **_COMMON,
        ),
    ),
    # Llama 3.1/3.2 style: llama3 RoPE scaling (original context 64 so that all three
    # frequency bands occur with head_dim 32) and tied embeddings.
    "llama3_scaled": Family(
        "LlamaForCausalLM",
        "LlamaConfig",
        "llama",
        dict(
            vocab_size=317,
            hidden_size=128,
            intermediate_size=224,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=True,
            **_COMMON,
        ),
    ),
    "mistral": Family(
        "MistralForCausalLM",
        "MistralConfig",
        "mistral",
        dict(
            vocab_size=263,
            hidden_size=64,
            intermediate_size=176,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_theta=1000000.0,
            sliding_window=None,
            tie_word_embeddings=False,
            **_COMMON,
        ),
    ),
    "qwen2": Family(
        "Qwen2ForCausalLM",
        "Qwen2Config",
        "qwen2",
        dict(
            vocab_size=317,
            hidden_size=96,
            intermediate_size=160,
            num_attention_heads=6,
            num_key_value_heads=2,
            rope_theta=1000000.0,
            use_sliding_window=False,
            tie_word_embeddings=False,
            **_COMMON,
        ),
    ),
    "qwen3": Family(
        "Qwen3ForCausalLM",
        "Qwen3Config",
        "qwen3",
        dict(
            vocab_size=317,
            hidden_size=64,
            intermediate_size=160,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rope_theta=1000000.0,
            use_sliding_window=False,
            tie_word_embeddings=False,
            **_COMMON,
        ),
    ),
}


def hf_config(family: str, **overrides: Any):
    """The transformers config object of a tiny family member."""
    import transformers

    fam = FAMILIES[family]
    cls = getattr(transformers, fam.config_class)
    # deep copy: transformers edits nested dicts (rope_scaling) in place
    kwargs = copy.deepcopy({**fam.kwargs, **overrides})
    return cls(**kwargs, architectures=[fam.model_class])


def build_hf_model(family: str, *, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny transformers model (fp32, eval, eager attention) with well-spread weights.

    The default transformers init (std 0.02, unit norms) gives almost uniform logits and
    hides norm-weight bugs, so every parameter is redrawn: matrices N(0, 1/fan_in),
    embeddings N(0, 1) (N(0, 1/hidden) when tied to the LM head), norm weights
    1 + 0.1 N(0, 1), biases 0.1 N(0, 1).
    """
    import transformers

    fam = FAMILIES[family]
    config = hf_config(family, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, fam.model_class)(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters appear once
            t = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                t = 1.0 + 0.1 * t
            elif name.endswith(".bias"):
                t = 0.1 * t
            elif name.endswith("embed_tokens.weight"):
                if config.tie_word_embeddings:
                    t = t / math.sqrt(config.hidden_size)
            else:
                t = t / math.sqrt(p.shape[1])
            p.copy_(t)
    return model


def _first_indices(mask: torch.Tensor, limit: int = 5) -> list[tuple[int, ...]]:
    return [tuple(int(i) for i in idx) for idx in mask.nonzero()[:limit]]


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol_norm: float, name: str = ""
) -> float:
    """Fail unless ||actual - expected|| / ||expected|| <= rtol_norm (computed in float64).

    Any NaN or inf in ``actual`` fails, with their count and first indices. On failure the
    message gives the relative error, the largest absolute difference and where it is.
    Returns the relative error.
    """
    label = f"{name}: " if name else ""
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(
            f"{label}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
        )
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(a)
    if bad.any():
        raise AssertionError(
            f"{label}{int(bad.sum())} of {a.numel()} elements are NaN/inf "
            f"({int(torch.isnan(a).sum())} NaN), first at {_first_indices(bad)}"
        )
    bad_e = ~torch.isfinite(e)
    if bad_e.any():
        raise AssertionError(
            f"{label}the expected tensor has {int(bad_e.sum())} NaN/inf elements, "
            f"first at {_first_indices(bad_e)}"
        )
    diff = a - e
    ref_norm = float(e.norm())
    err_norm = float(diff.norm())
    rel = err_norm / ref_norm if ref_norm > 0 else (0.0 if err_norm == 0 else math.inf)
    if not rel <= rtol_norm:
        flat = int(diff.abs().argmax()) if diff.numel() else 0
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
        raise AssertionError(
            f"{label}relative error {rel:.3e} > {rtol_norm:.1e} "
            f"(||diff|| {err_norm:.3e}, ||expected|| {ref_norm:.3e}); max abs diff "
            f"{float(diff.abs().max()):.3e} at index {where}: actual {float(a[where]):.6g}, "
            f"expected {float(e[where]):.6g}"
        )
    return rel
