"""Model configuration: one dataclass read from a Hugging Face ``config.json``.

Everything downstream (loading, the plan, the kernel, the reference) reads shapes from
``ModelConfig`` only, so this is the one place that knows about Hugging Face field names
and the one place that refuses what we do not support.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


class UnsupportedModelError(ValueError):
    """The checkpoint uses an architecture or a feature the kernel does not implement."""


# Hugging Face architecture name -> our family name.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and maths switches of one decoder-only model of the Llama family."""

    family: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3" | "linear", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (bias on q/k/v only; o_proj never has one)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # only set when the model really uses one
    torch_dtype: str = "bfloat16"
    eos_token_id: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim={self.head_dim} must be even for RoPE")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_scaling.rope_type={rope_type!r} is not supported "
                f"(supported: {', '.join(ROPE_TYPES)})"
            )

    # Derived sizes used by every stage.
    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    def num_parameters(self) -> int:
        """Parameter count, embedding and (untied) LM head included."""
        d, f = self.hidden_size, self.intermediate_size
        per_layer = d * self.qkv_size + self.q_size * d + 3 * d * f + 2 * d
        per_layer += self.qkv_size if self.qkv_bias else 0
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.num_layers * per_layer + self.vocab_size * d + head + d

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse frequencies [head_dim // 2] in fp32, with llama3/linear scaling applied."""
        half = self.head_dim // 2
        # fp32 like transformers, so fp32 references agree to the last bits.
        exponent = torch.arange(0, half, dtype=torch.int64).float() / half
        inv = 1.0 / (self.rope_theta**exponent)
        scaling = self.rope_scaling or {}
        rope_type = scaling.get("rope_type", "default")
        if rope_type == "linear":
            inv = inv / float(scaling["factor"])
        elif rope_type == "llama3":
            factor = float(scaling["factor"])
            low = float(scaling.get("low_freq_factor", 1.0))
            high = float(scaling.get("high_freq_factor", 4.0))
            old_ctx = float(scaling["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            # Long wavelengths are slowed by `factor`, short ones kept, the band between
            # blended smoothly (Llama 3.1 recipe).
            smooth = (old_ctx / wavelen - low) / (high - low)
            blended = (1 - smooth) * inv / factor + smooth * inv
            inv = torch.where(wavelen > old_ctx / low, inv / factor, inv)
            mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
            inv = torch.where(mid, blended, inv)
        return inv.to(torch.float32)

    # Construction.
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from the parsed contents of a Hugging Face ``config.json``."""
        family = _family_of(cfg)
        for needed in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads"):
            if needed not in cfg:
                raise UnsupportedModelError(f"config.json has no {needed!r} field")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only 'silu')")
        if cfg.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=true is not supported")
        if cfg.get("attention_bias") and family in ("llama", "qwen3"):
            # transformers puts that bias on o_proj too, which the kernel does not add.
            raise UnsupportedModelError(
                "attention_bias=true is not supported (it adds a bias to o_proj as well as q/k/v)"
            )
        if cfg.get("pretraining_tp", 1) not in (1, None):
            raise UnsupportedModelError(f"pretraining_tp={cfg['pretraining_tp']} is not supported")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // heads
        rope_theta, rope_scaling = _rope_of(cfg)
        return cls(
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2",  # Mistral and Qwen2 ignore attention_bias
            qk_norm=family == "qwen3",
            sliding_window=_sliding_window_of(family, cfg),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            eos_token_id=_as_list(cfg.get("eos_token_id")),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_hf_dict(json.loads(path.read_text()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.family}: {self.num_layers} layers, hidden {self.hidden_size}, "
            f"ffn {self.intermediate_size}, heads {self.num_heads}/{self.num_kv_heads} kv "
            f"x {self.head_dim}, vocab {self.vocab_size}, "
            f"{self.num_parameters() / 1e9:.2f}B params"
        )


def _family_of(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if archs:
        raise UnsupportedModelError(
            f"architectures={archs} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    model_type = cfg.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise UnsupportedModelError(
        f"model_type={model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})"
    )


def _rope_of(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Read RoPE settings from either the transformers-4 or the transformers-5 layout."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = dict(cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    merged = {**legacy, **params}
    rope_type = merged.pop("rope_type", merged.pop("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_scaling.rope_type={rope_type!r} is not supported "
            f"(supported: {', '.join(ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, None
    needed = ["factor"] + (["original_max_position_embeddings"] if rope_type == "llama3" else [])
    for key in needed:
        if key not in merged:
            raise UnsupportedModelError(f"rope_scaling of type {rope_type!r} has no {key!r}")
    return theta, {"rope_type": rope_type, **merged}


def _sliding_window_of(family: str, cfg: dict[str, Any]) -> int | None:
    window = cfg.get("sliding_window")
    if window is None:
        return None
    if family in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        return None
    layer_types = cfg.get("layer_types")
    if layer_types and all(t == "full_attention" for t in layer_types):
        return None
    if layer_types and len(set(layer_types)) > 1:
        # Qwen's max_window_layers: the window applies to some layers only.
        raise UnsupportedModelError(
            f"layer_types={layer_types} mixes full and sliding attention; only a window on "
            "every layer (or none) is supported"
        )
    return int(window)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


# Named shapes: the built-in tiny default (no download) and real model shapes for
# benchmarks with random weights.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        family="llama", vocab_size=263, hidden_size=96, intermediate_size=160, num_layers=2,
        num_heads=6, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=512, eos_token_id=[2],
    ),
    "llama-3.2-1b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    "llama-3.2-3b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
        num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    "llama-3.1-8b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    "qwen3-8b": ModelConfig(
        family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=40960, qk_norm=True,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"no built-in model named {name!r} (built-in: {', '.join(PRESETS)})"
        ) from None
