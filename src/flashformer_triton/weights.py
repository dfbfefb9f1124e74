"""Pack a Hugging Face state dict into the arenas the decode kernel streams.

Per layer, one contiguous slab of the matrix arena, in the order the kernel reads it:

    [ Wqkv (qkv_size x D) | Wo (D x q_size) | Wgate;Wup (2F x D) | Wdown (D x F) ]

Wqkv rows are permuted inside every head so that each rotary pair (i, i + head_dim/2) sits in
two adjacent rows: a task that owns a run of pairs reads one contiguous block of rows, and
RoPE becomes a split of the accumulator into its even and odd rows. The small vectors (norm
weights, biases) live in fp32 side arenas.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from flashformer_triton.config import ModelConfig
from flashformer_triton.quantize import QuantizedLinear, QuantScheme, cat_rows, quantize


def rotary_pair_order(head_dim: int) -> torch.Tensor:
    """Row order inside a head: 0, hd/2, 1, hd/2+1, ... (each rotary pair adjacent)."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


def arena_matrices(config: ModelConfig) -> tuple[tuple[str, int, int], ...]:
    """(name, rows, input features) of each matrix in one layer's slab, in arena order."""
    d, f = config.hidden_size, config.intermediate_size
    return (("qkv", config.qkv_size, d), ("o", d, config.q_size), ("gate_up", 2 * f, d),
            ("down", d, f))


@dataclass(frozen=True)
class _Slab:
    """Offsets of the four matrices inside one layer's slab, and the slab's length."""

    qkv: int
    o: int
    gate_up: int
    down: int
    layer_stride: int


class ArenaLayout(_Slab):
    """Offsets inside one layer's slab of the matrix arena, in storage units: elements for
    bf16/fp16/fp32/int8 arenas, bytes (two int4 values each) for int4 ones."""

    @classmethod
    def of(cls, config: ModelConfig, scheme: QuantScheme | None = None) -> ArenaLayout:
        per_unit = scheme.values_per_byte if scheme else 1
        return cls(*_cumulative([rows * k // per_unit for _, rows, k in arena_matrices(config)]))


class ScaleLayout(_Slab):
    """Offsets inside one layer's slab of the scale (and zero-point) arena of a quantized
    model: the matrices in arena order, each [rows, groups] row-major."""

    @classmethod
    def of(cls, config: ModelConfig, scheme: QuantScheme) -> ScaleLayout:
        return cls(*_cumulative([rows * scheme.groups(k) for _, rows, k in arena_matrices(config)]))


def check_quantizable(config: ModelConfig, scheme: QuantScheme) -> None:
    """Every matrix input size (hidden, q and intermediate size) holds whole groups."""
    for name, k in (("hidden_size", config.hidden_size), ("q_size", config.q_size),
                    ("intermediate_size", config.intermediate_size)):
        scheme.check_features(name, k)


def _cumulative(sizes: list[int]) -> list[int]:
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return offsets


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
    """Device tensors the kernel reads; `lm_head` is `embed` itself when embeddings are tied
    (and the LM head is not quantized).

    Quantized models (``scheme`` set): ``arena`` holds the integer codes (int8, or uint8 with
    two int4 values per byte), ``scales``/``zeros`` the per-row or per-group fp16 scales and
    uint8 zero points (ScaleLayout); ``scheme.lm_head`` says whether the LM head is quantized
    too (else it is kept in the model dtype). Unused quantization tensors are one-element
    placeholders: the kernel takes a pointer either way."""

    arena: torch.Tensor  # [num_layers * layer_stride]
    norms: torch.Tensor  # [num_layers * norm stride + hidden], fp32
    qkv_bias: torch.Tensor  # [num_layers, qkv_size] fp32 (pair-ordered), or [1] when unused
    embed: torch.Tensor  # [vocab, hidden], model dtype
    lm_head: torch.Tensor  # [vocab, hidden] or its codes [vocab, hidden / values per byte]
    inv_freq: torch.Tensor  # [head_dim // 2] fp32
    scales: torch.Tensor | None = None  # [num_layers * scale stride] fp16
    zeros: torch.Tensor | None = None  # [num_layers * scale stride] uint8 (asymmetric int4)
    lm_scales: torch.Tensor | None = None  # [vocab, groups] fp16
    lm_zeros: torch.Tensor | None = None  # [vocab, groups] uint8
    scheme: QuantScheme | None = None  # scheme.lm_head: whether the LM head is quantized

    def __post_init__(self) -> None:
        placeholder = {"scales": torch.float16, "zeros": torch.uint8,
                       "lm_scales": torch.float16, "lm_zeros": torch.uint8}
        for name, dtype in placeholder.items():
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(1, dtype=dtype, device=self.arena.device))

    @property
    def dtype(self) -> torch.dtype:
        """The model (compute) dtype: activations, KV cache, embeddings."""
        return self.embed.dtype


def _as_quantized(
    value: torch.Tensor | QuantizedLinear, scheme: QuantScheme, name: str, shape: tuple[int, int]
) -> QuantizedLinear:
    """A state-dict entry as a QuantizedLinear of `scheme` (quantizing plain tensors)."""
    if isinstance(value, QuantizedLinear):
        if value.scheme != scheme:
            raise ValueError(
                f"{name} is quantized as {value.scheme.describe()} but the model uses "
                f"{scheme.describe()}; every matrix must use the same scheme"
            )
        ql = value
    else:
        ql = quantize(value, scheme, name=name)
    if ql.shape != shape:
        raise ValueError(f"{name} has shape {ql.shape}; the config implies {shape}")
    return ql


def _scheme_of(state: dict[str, torch.Tensor | QuantizedLinear],
               quant: QuantScheme | None) -> QuantScheme | None:
    """`quant` when given, else the scheme of the pre-quantized matrices in `state`."""
    found = {v.scheme for v in state.values() if isinstance(v, QuantizedLinear)}
    if len(found) > 1:
        raise ValueError(f"the state dict mixes quantization schemes: {sorted(map(str, found))}")
    if quant is not None:
        if found and found != {quant}:
            (other,) = found
            raise ValueError(
                f"quantize={quant.describe()} was asked for but the state dict is already "
                f"quantized as {other.describe()}; load it without quantize="
            )
        return quant
    return found.pop() if found else None


def pack_weights(
    config: ModelConfig,
    state: dict[str, torch.Tensor | QuantizedLinear],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    quant: QuantScheme | None = None,
) -> PackedWeights:
    """Build the arenas from Hugging Face-named tensors (as `loading.load_checkpoint` returns).

    With `quant`, every projection matrix (and the LM head when ``quant.lm_head``) is
    quantized here, on `device`. Entries that already are `QuantizedLinear`s (converted GPTQ
    or AWQ checkpoints) are packed as they are; their LM head stays in `dtype` unless it is
    quantized too."""
    scheme = _scheme_of(state, quant)
    if scheme:  # one model-level message before any matrix is touched
        check_quantizable(config, scheme)
    layout, norms_layout = ArenaLayout.of(config, scheme), NormLayout.of(config)
    hd, L = config.head_dim, config.num_layers
    heads = config.num_heads + 2 * config.num_kv_heads
    order = rotary_pair_order(hd)
    row_order = (torch.arange(heads)[:, None] * hd + order[None, :]).reshape(-1).to(device)

    arena_dtype = scheme.storage_dtype if scheme else dtype
    arena = torch.empty(L * layout.layer_stride, dtype=arena_dtype, device=device)
    norms = torch.ones(L * norms_layout.layer_stride + config.hidden_size, device=device)
    qkv_bias = torch.zeros(L if config.qkv_bias else 1, config.qkv_size, device=device)
    scales = zeros = None
    if scheme:
        scale_layout = ScaleLayout.of(config, scheme)
        scales = torch.empty(L * scale_layout.layer_stride, dtype=torch.float16, device=device)
        if not scheme.symmetric:
            zeros = torch.empty(L * scale_layout.layer_stride, dtype=torch.uint8, device=device)

    def get(name: str) -> torch.Tensor | QuantizedLinear:
        if name not in state:
            raise KeyError(f"state dict has no tensor {name!r} needed by the kernel")
        return state[name].to(device)

    nl = norms_layout
    norm_slots = [(nl.attn, nl.mlp, "input_layernorm.weight"),
                  (nl.mlp, nl.q, "post_attention_layernorm.weight")]
    if config.qk_norm:
        norm_slots += [(nl.q, nl.k, "self_attn.q_norm.weight"),
                       (nl.k, nl.layer_stride, "self_attn.k_norm.weight")]

    def matrix(names: list[str], k: int) -> torch.Tensor | QuantizedLinear:
        """The named matrices stacked along the rows: a tensor, or a QuantizedLinear."""
        if scheme is None:
            return torch.cat([get(n) for n in names], dim=0)
        return cat_rows([_as_quantized(v, scheme, n, (v.shape[0], k))
                         for n in names for v in (get(n),)])

    for i in range(L):
        p = f"model.layers.{i}."
        slab = arena[i * layout.layer_stride : (i + 1) * layout.layer_stride]
        names = {
            "qkv": [p + f"self_attn.{n}_proj.weight" for n in ("q", "k", "v")],
            "o": [p + "self_attn.o_proj.weight"],
            "gate_up": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
            "down": [p + "mlp.down_proj.weight"],
        }
        for name, rows, k in arena_matrices(config):
            m = matrix(names[name], k)
            if name == "qkv":
                m = m.rows(row_order) if scheme else m[row_order]
            if tuple(m.shape) != (rows, k):
                raise ValueError(f"{' + '.join(names[name])} stack to {tuple(m.shape)}; the "
                                 f"config implies {(rows, k)}")
            offset = getattr(layout, name)
            codes = m.qweight if scheme else m
            slab[offset : offset + codes.numel()].copy_(codes.reshape(-1))
            if scheme:
                s0 = i * scale_layout.layer_stride + getattr(scale_layout, name)
                scales[s0 : s0 + m.scales.numel()].copy_(m.scales.reshape(-1))
                if zeros is not None:
                    zeros[s0 : s0 + m.zeros.numel()].copy_(m.zeros.reshape(-1))
        nbase = i * norms_layout.layer_stride
        for start, end, name in norm_slots:
            norms[nbase + start : nbase + end] = get(p + name).float()
        if config.qkv_bias:
            bias = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in ("q", "k", "v")])
            qkv_bias[i] = bias.float()[row_order]
    norms[L * norms_layout.layer_stride :] = get("model.norm.weight").float()

    embed = get("model.embed_tokens.weight").to(dtype).contiguous()
    # A quantized LM head is its own copy even when the embeddings are tied (the gather of
    # embedding rows stays in the model dtype).
    given = state.get("lm_head.weight")
    head_name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    quantized_head = isinstance(given, QuantizedLinear) or bool(quant and quant.lm_head)
    head = embed if config.tie_word_embeddings else get(head_name)
    if not quantized_head:
        lm = dict(lm_head=head if head is embed else head.to(dtype).contiguous())
    else:
        if isinstance(given, QuantizedLinear):
            head, head_name = given.to(device), "lm_head.weight"
        q_head = _as_quantized(head, scheme, head_name, (config.vocab_size, config.hidden_size))
        lm = dict(lm_head=q_head.qweight.contiguous(), lm_scales=q_head.scales.contiguous(),
                  lm_zeros=q_head.zeros)
    return PackedWeights(
        arena=arena,
        norms=norms,
        qkv_bias=qkv_bias,
        embed=embed,
        inv_freq=config.rope_inv_freq().to(device),
        scales=scales,
        zeros=zeros,
        scheme=replace(scheme, lm_head=quantized_head) if scheme else None,
        **lm,
    )
