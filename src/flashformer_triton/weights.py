"""Pack a Hugging Face state dict into the arenas the decode kernel streams.

Per layer, one contiguous slab of the matrix arena, in the order the kernel reads it:

    [ Wqkv (qkv_size x D) | Wo (D x q_size) | Wgate;Wup (2F x D) | Wdown (D x F) ]

Wqkv rows are permuted inside every head so that each rotary pair (i, i + head_dim/2) sits in
two adjacent rows: a task that owns a run of pairs reads one contiguous block of rows, and
RoPE becomes a split of the accumulator into its even and odd rows. The small vectors (norm
weights, biases) live in fp32 side arenas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashformer_triton.config import ModelConfig


def rotary_pair_order(head_dim: int) -> torch.Tensor:
    """Row order inside a head: 0, hd/2, 1, hd/2+1, ... (each rotary pair adjacent)."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


@dataclass(frozen=True)
class ArenaLayout:
    """Element offsets inside one layer's slab of the matrix arena."""

    qkv: int
    o: int
    gate_up: int
    down: int
    layer_stride: int

    @classmethod
    def of(cls, config: ModelConfig) -> ArenaLayout:
        d, f = config.hidden_size, config.intermediate_size
        o = config.qkv_size * d
        gate_up = o + d * config.q_size
        down = gate_up + 2 * f * d
        return cls(qkv=0, o=o, gate_up=gate_up, down=down, layer_stride=down + d * f)


@dataclass(frozen=True)
class NormLayout:
    """Element offsets inside one layer's slab of the fp32 norm arena; final norm at the end."""

    attn: int
    mlp: int
    q: int
    k: int
    layer_stride: int

    @classmethod
    def of(cls, config: ModelConfig) -> NormLayout:
        d, hd = config.hidden_size, config.head_dim
        return cls(attn=0, mlp=d, q=2 * d, k=2 * d + hd, layer_stride=2 * d + 2 * hd)


@dataclass
class PackedWeights:
    """Device tensors the kernel reads; `lm_head` is `embed` itself when embeddings are tied."""

    arena: torch.Tensor  # [num_layers * layer_stride], model dtype
    norms: torch.Tensor  # [num_layers * norm stride + hidden], fp32
    qkv_bias: torch.Tensor  # [num_layers, qkv_size] fp32 (pair-ordered), or [1] when unused
    embed: torch.Tensor  # [vocab, hidden]
    lm_head: torch.Tensor  # [vocab, hidden]
    inv_freq: torch.Tensor  # [head_dim // 2] fp32

    @property
    def dtype(self) -> torch.dtype:
        return self.arena.dtype


def pack_weights(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> PackedWeights:
    """Build the arenas from Hugging Face-named tensors (as `loading.load_checkpoint` returns)."""
    layout, norms_layout = ArenaLayout.of(config), NormLayout.of(config)
    hd, L = config.head_dim, config.num_layers
    heads = config.num_heads + 2 * config.num_kv_heads
    order = rotary_pair_order(hd)
    row_order = (torch.arange(heads)[:, None] * hd + order[None, :]).reshape(-1)

    arena = torch.empty(L * layout.layer_stride, dtype=dtype, device=device)
    norms = torch.ones(L * norms_layout.layer_stride + config.hidden_size, device=device)
    qkv_bias = torch.zeros(L if config.qkv_bias else 1, config.qkv_size, device=device)

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise KeyError(f"state dict has no tensor {name!r} needed by the kernel")
        return state[name].to(device)

    for i in range(L):
        p = f"model.layers.{i}."
        slab = arena[i * layout.layer_stride : (i + 1) * layout.layer_stride]
        wqkv = torch.cat(
            [get(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")], dim=0
        )[row_order.to(device)]
        parts = [
            (layout.qkv, wqkv),
            (layout.o, get(p + "self_attn.o_proj.weight")),
            (layout.gate_up, get(p + "mlp.gate_proj.weight")),
            (layout.gate_up + config.intermediate_size * config.hidden_size,
             get(p + "mlp.up_proj.weight")),
            (layout.down, get(p + "mlp.down_proj.weight")),
        ]
        for offset, tensor in parts:
            slab[offset : offset + tensor.numel()].copy_(tensor.reshape(-1))
        nbase = i * norms_layout.layer_stride
        norms[nbase + norms_layout.attn : nbase + norms_layout.mlp] = get(
            p + "input_layernorm.weight"
        ).float()
        norms[nbase + norms_layout.mlp : nbase + norms_layout.q] = get(
            p + "post_attention_layernorm.weight"
        ).float()
        if config.qk_norm:
            norms[nbase + norms_layout.q : nbase + norms_layout.k] = get(
                p + "self_attn.q_norm.weight"
            ).float()
            norms[nbase + norms_layout.k : nbase + norms_layout.layer_stride] = get(
                p + "self_attn.k_norm.weight"
            ).float()
        if config.qkv_bias:
            bias = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in ("q", "k", "v")])
            qkv_bias[i] = bias.float()[row_order.to(device)]
    norms[L * norms_layout.layer_stride :] = get("model.norm.weight").float()

    embed = get("model.embed_tokens.weight").to(dtype).contiguous()
    if config.tie_word_embeddings:
        lm_head = embed
    else:
        lm_head = get("lm_head.weight").to(dtype).contiguous()
    return PackedWeights(
        arena=arena,
        norms=norms,
        qkv_bias=qkv_bias,
        embed=embed,
        lm_head=lm_head,
        inv_freq=config.rope_inv_freq().to(device),
    )
