"""Plain-torch model of the forward pass: the oracle every kernel test compares against.

The maths follows Hugging Face ``transformers`` (Llama, Mistral, Qwen2, Qwen3) step by step,
so in fp32 the two agree to rounding:

* RMSNorm in fp32, cast back to the activation dtype, then times the weight;
* q/k/v projections (plus bias for Qwen2), optional per-head RMSNorm on q and k (Qwen3),
  RoPE with the rotate-half convention (cos/sin computed in fp32, cast to the activation dtype);
* attention with grouped KV heads over a static KV cache, scale ``1/sqrt(head_dim)``,
  softmax in fp32;
* SwiGLU MLP ``down(silu(gate(x)) * up(x))``, residual adds, final norm, LM head.

It is also the peer we benchmark (the gpt-fast recipe): the decode path has static shapes and
no data-dependent Python control flow, so ``torch.compile(mode="reduce-overhead")`` can capture a
decode step (``T == 1``) in one CUDA graph. The only host sync, the position range check, is
skipped while compiling and can be switched off with ``check_positions=False``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from flashformer_triton.config import ModelConfig

__all__ = ["KVCache", "ReferenceModel", "apply_rope", "rms_norm", "rope_cos_sin"]


# Small ops (reused by other modules and tests).


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim: ``weight * (x * rsqrt(mean(x^2) + eps))``, statistics in fp32.

    The normalised value is cast back to ``x.dtype`` before the weight multiply, as in
    transformers.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of ``positions * inv_freq`` in fp32, shape ``positions.shape + (head_dim,)``.

    ``inv_freq`` has ``head_dim // 2`` entries; the angles are repeated for the two halves
    (rotate-half convention).
    """
    freqs = positions.float().unsqueeze(-1) * inv_freq.float()
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (last dim = head_dim) by RoPE: ``x * cos + rotate_half(x) * sin``.

    ``cos``/``sin`` (from :func:`rope_cos_sin`) must broadcast against ``x``, e.g.
    ``[B, T, 1, head_dim]`` for ``x`` of shape ``[B, T, heads, head_dim]``. They are cast to
    ``x.dtype`` first, as transformers does.
    """
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return False


# KV cache.


class KVCache(torch.nn.Module):
    """Static KV cache: buffers ``k`` and ``v`` of shape
    ``[num_layers, max_batch_size, num_kv_heads, max_seq_len, head_dim]``.

    K is stored after RoPE. The buffers are not part of ``state_dict`` (``persistent=False``).
    """

    def __init__(
        self,
        config: ModelConfig,
        max_batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError(
                f"KVCache needs max_batch_size >= 1 and max_seq_len >= 1, "
                f"got {max_batch_size} and {max_seq_len}"
            )
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        shape = (
            config.num_layers,
            max_batch_size,
            config.num_kv_heads,
            max_seq_len,
            config.head_dim,
        )
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def reset(self) -> None:
        """Fill both buffers with zeros."""
        self.k.zero_()
        self.v.zero_()

    def update(
        self,
        layer: int,
        batch_index: Tensor | None,
        positions: Tensor,
        k: Tensor,
        v: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Write ``k``/``v`` ``[B, T, num_kv_heads, head_dim]`` at ``positions`` ``[B, T]`` of
        cache slots ``batch_index`` ``[B]`` (``None``: slots ``0..B-1``) in layer ``layer``.

        Returns this layer's keys and values for the B rows, ``[B, num_kv_heads, max_seq_len,
        head_dim]`` (a view when ``batch_index`` is ``None``, a gathered copy otherwise).
        """
        batch = k.shape[0]
        k_layer, v_layer = self.k[layer], self.v[layer]
        if batch_index is None:
            slots = torch.arange(batch, device=positions.device)
        else:
            slots = batch_index
        # Advanced indices around a slice: the indexed view has shape [B, T, kv_heads, head_dim].
        k_layer[slots[:, None], :, positions] = k.to(k_layer.dtype)
        v_layer[slots[:, None], :, positions] = v.to(v_layer.dtype)
        if batch_index is None:
            return k_layer[:batch], v_layer[:batch]
        return k_layer[batch_index], v_layer[batch_index]


# The model.


class _Layer(torch.nn.Module):
    """Weights of one decoder layer; q/k/v and gate/up are fused row-wise (one GEMM each)."""

    def __init__(self, config: ModelConfig, sd: dict[str, Tensor], prefix: str, cast) -> None:
        super().__init__()

        def get(name: str) -> torch.nn.Parameter:
            return torch.nn.Parameter(cast(_take(sd, prefix + name)), requires_grad=False)

        self.input_norm = get("input_layernorm.weight")
        self.post_attention_norm = get("post_attention_layernorm.weight")
        attn = "self_attn."
        self.wqkv = torch.nn.Parameter(
            torch.cat([cast(_take(sd, f"{prefix}{attn}{p}_proj.weight")) for p in "qkv"]),
            requires_grad=False,
        )
        if config.qkv_bias:
            self.bqkv = torch.nn.Parameter(
                torch.cat([cast(_take(sd, f"{prefix}{attn}{p}_proj.bias")) for p in "qkv"]),
                requires_grad=False,
            )
        else:
            self.bqkv = None
        self.wo = get(attn + "o_proj.weight")
        if config.qk_norm:
            self.q_norm = get(attn + "q_norm.weight")
            self.k_norm = get(attn + "k_norm.weight")
        else:
            self.q_norm = self.k_norm = None
        self.w_gate_up = torch.nn.Parameter(
            torch.cat([cast(_take(sd, f"{prefix}mlp.{p}_proj.weight")) for p in ("gate", "up")]),
            requires_grad=False,
        )
        self.w_down = get("mlp.down_proj.weight")


def _take(sd: dict[str, Tensor], name: str) -> Tensor:
    try:
        return sd[name]
    except KeyError:
        raise KeyError(f"state_dict has no {name!r} (Hugging Face naming expected)") from None


class ReferenceModel(torch.nn.Module):
    """Plain-torch decoder with a static KV cache; see the module docstring for the maths.

    ``state_dict`` uses Hugging Face names (``model.layers.{i}.self_attn.q_proj.weight``, ...).
    Weights are cast to ``dtype`` on ``device``; logits are always returned in fp32.
    """

    def __init__(
        self,
        config: ModelConfig,
        state_dict: dict[str, Tensor],
        *,
        max_batch_size: int = 1,
        max_seq_len: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        check_positions: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.check_positions = check_positions

        def cast(t: Tensor) -> Tensor:
            return t.detach().to(device=device, dtype=dtype)

        self.embed = torch.nn.Parameter(
            cast(_take(state_dict, "model.embed_tokens.weight")), requires_grad=False
        )
        self.layers = torch.nn.ModuleList(
            _Layer(config, state_dict, f"model.layers.{i}.", cast) for i in range(config.num_layers)
        )
        self.norm = torch.nn.Parameter(
            cast(_take(state_dict, "model.norm.weight")), requires_grad=False
        )
        if config.tie_word_embeddings:
            self.lm_head = None  # use self.embed
        else:
            self.lm_head = torch.nn.Parameter(
                cast(_take(state_dict, "lm_head.weight")), requires_grad=False
            )
        self.register_buffer(
            "inv_freq",
            config.rope_inv_freq().to(device=device, dtype=torch.float32),
            persistent=False,
        )
        self.cache = KVCache(config, max_batch_size, max_seq_len, dtype, device)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        **kw,
    ) -> ReferenceModel:
        """Load a Hugging Face checkpoint (local dir or hub id) with ``loading.load_checkpoint``."""
        from flashformer_triton.loading import load_checkpoint

        config, state_dict = load_checkpoint(path, dtype=dtype, device=device)
        return cls(config, state_dict, dtype=dtype, device=device, **kw)

    # Checks (host side; skipped while compiling).

    def _check_inputs(self, input_ids: Tensor, input_pos: Tensor, batch_index: Tensor | None):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        if seq < 1:
            raise ValueError("input_ids must hold at least one token per row (T >= 1)")
        if tuple(input_pos.shape) != (batch,):
            raise ValueError(
                f"input_pos must be [B]={batch} (position of input_ids[b, 0]), "
                f"got shape {tuple(input_pos.shape)}"
            )
        if batch_index is None:
            if batch > self.max_batch_size:
                raise ValueError(
                    f"batch of {batch} rows exceeds max_batch_size={self.max_batch_size}"
                )
        elif tuple(batch_index.shape) != (batch,):
            raise ValueError(
                f"batch_index must be [B]={batch}, got shape {tuple(batch_index.shape)}"
            )
        if not self.check_positions or _is_compiling():
            return
        # One host sync: fine for tests and eager use, skipped under torch.compile.
        lo, hi = int(input_pos.min()), int(input_pos.max())
        if lo < 0:
            raise ValueError(f"input_pos must be >= 0, got a minimum of {lo}")
        if hi + seq > self.max_seq_len:
            raise ValueError(
                f"positions up to {hi + seq - 1} (input_pos max {hi} + {seq} tokens) do not fit "
                f"in the KV cache of max_seq_len={self.max_seq_len}; build the model with a "
                f"larger max_seq_len"
            )
        if batch_index is not None:
            bl, bh = int(batch_index.min()), int(batch_index.max())
            if bl < 0 or bh >= self.max_batch_size:
                raise ValueError(
                    f"batch_index must lie in [0, {self.max_batch_size}), got {bl}..{bh}"
                )

    # Forward.

    def _attention(
        self,
        layer_idx: int,
        layer: _Layer,
        x: Tensor,
        positions: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        batch_index: Tensor | None,
    ) -> Tensor:
        cfg = self.config
        batch, seq, _ = x.shape
        heads, kv_heads, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        qkv = self._linear(x, layer, "wqkv", layer.bqkv)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(batch, seq, heads, hd)
        k = k.view(batch, seq, kv_heads, hd)
        v = v.view(batch, seq, kv_heads, hd)
        if layer.q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
            q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        keys, values = self.cache.update(layer_idx, batch_index, positions, k, v)
        # keys/values: [B, kv_heads, S, hd]. Query head h reads KV head h // group (the same
        # pairing as transformers' repeat_kv), so group the query heads instead of copying K/V.
        group = cfg.group_size
        q = q.transpose(1, 2).reshape(batch, kv_heads, group * seq, hd)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
        scores = scores.view(batch, kv_heads, group, seq, -1)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        probs = probs.view(batch, kv_heads, group * seq, -1)
        out = torch.matmul(probs, values)  # [B, kv_heads, group * T, hd]
        out = out.view(batch, heads, seq, hd).transpose(1, 2).reshape(batch, seq, heads * hd)
        return self._linear(out, layer, "wo")

    def _mlp(self, layer: _Layer, x: Tensor) -> Tensor:
        gate, up = self._linear(x, layer, "w_gate_up").chunk(2, dim=-1)
        return self._linear(F.silu(gate) * up, layer, "w_down")

    def _linear(
        self, x: Tensor, owner: torch.nn.Module, name: str, bias: Tensor | None = None
    ) -> Tensor:
        """x @ owner.<name>^T (+ bias). Every projection goes through here, so a variant that
        stores its weights differently (bench/: the int8 weight-only peer) overrides one
        method."""
        return F.linear(x, getattr(owner, name), bias)

    def forward(
        self,
        input_ids: Tensor,
        input_pos: Tensor,
        batch_index: Tensor | None = None,
    ) -> Tensor:
        """Logits ``[B, T, vocab]`` (fp32) for ``input_ids`` ``[B, T]``.

        ``input_pos[b]`` is the position of ``input_ids[b, 0]``; token ``t`` of row ``b`` sits at
        ``input_pos[b] + t``. ``batch_index[b]`` is the KV-cache slot of row ``b`` (default
        ``arange(B)``), so sequences of different lengths can be prefilled one at a time and
        then decoded together. K/V of the new tokens are written into the cache, then each
        token attends causally to cache positions ``0 .. input_pos[b] + t`` of its slot
        (and only to the last ``sliding_window`` of them when the config sets one).
        """
        self._check_inputs(input_ids, input_pos, batch_index)
        cfg = self.config
        seq = input_ids.shape[1]
        device = input_ids.device

        positions = input_pos.to(device=device, dtype=torch.long)[:, None] + torch.arange(
            seq, device=device
        )  # [B, T]
        cos, sin = rope_cos_sin(self.inv_freq, positions)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads

        # mask[b, t, s]: may token t of row b see cache position s?
        key_pos = torch.arange(self.max_seq_len, device=device)
        mask = key_pos <= positions[:, :, None]
        if cfg.sliding_window is not None:
            mask = mask & (key_pos > positions[:, :, None] - cfg.sliding_window)
        mask = mask[:, None, None]  # [B, 1, 1, T, S] against scores [B, kv_heads, group, T, S]

        x = F.embedding(input_ids, self.embed)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
            x = x + self._attention(i, layer, h, positions, cos, sin, mask, batch_index)
            h = rms_norm(x, layer.post_attention_norm, cfg.rms_norm_eps)
            x = x + self._mlp(layer, h)
        x = rms_norm(x, self.norm, cfg.rms_norm_eps)
        return self._linear(x, self, "embed" if self.lm_head is None else "lm_head").float()
