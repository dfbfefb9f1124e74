"""Weight-only quantization: the schemes the decode kernel dequantizes in registers.

A quantized linear layer ``W [out, in]`` is stored as integers ``q`` with a scale per group of
``group_size`` consecutive input columns of each output row (per-channel: one group spanning
the whole row), and for asymmetric schemes a zero point per group:

    W[n, k] = (q[n, k] - zero[n, k // G]) * scale[n, k // G]

* int8: symmetric, per output channel. ``q`` int8 in [-127, 127], zero 0.
* int4: group-wise (G = 32, 64 or 128), ``q`` in [0, 15] with zero 8 (symmetric) or a per-group
  zero point in [0, 15] (asymmetric). Two values per byte, in blocks of 32 columns (16 bytes)
  that the kernel streams like any run of a row: pair ``i`` of a block holds its column ``i``
  in the low nibble and column ``16 + i`` in the high nibble, and the four pairs of each
  4-byte word are stored in the order 0, 2, 1, 3 (``pack_int4``). Why: the kernel's
  converter spreads a word's nibbles with one shift, which yields its bytes in that order
  (so they come out in column order), and a word's low and high nibbles then meet two
  contiguous runs of x (kernels/decode.py ``_int4_lo_cols``).

Scales are fp16 (as in GPTQ/AWQ checkpoints, so theirs convert exactly), zero points uint8.
This module is the plain-torch statement of that maths: ``dequantize`` is what the kernel
computes after each load, and tests compare the kernel with the reference model run on
``dequantize``d weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128
INT4_SYMMETRIC_ZERO = 8


@dataclass(frozen=True)
class QuantScheme:
    """How a model's linear layers are quantized.

    bits: 8 or 4. group_size: input columns per scale (int4 only; int8 is per channel).
    symmetric: int4 with the fixed zero point 8 (no zero points stored); int8 is always
    symmetric. lm_head: quantize the LM head too (the embedding table always stays in the
    model dtype)."""

    bits: int
    group_size: int | None = None
    symmetric: bool = True
    # Not part of the scheme's identity: matrices quantized alike compare equal either way.
    lm_head: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        if self.bits == 8:
            if self.group_size is not None:
                raise ValueError(
                    "int8 is per output channel: leave group_size unset (group-wise scales "
                    "are for int4)"
                )
            if not self.symmetric:
                raise ValueError("int8 is symmetric only (one scale per output channel)")
        elif self.bits == 4:
            if self.group_size not in GROUP_SIZES:
                raise ValueError(
                    f"int4 group_size={self.group_size!r} is not supported; use one of "
                    f"{GROUP_SIZES}"
                )
        else:
            raise ValueError(f"bits={self.bits!r}: only 8 (int8) and 4 (int4) are supported")

    @classmethod
    def parse(
        cls,
        quantize: str | QuantScheme | None,
        *,
        group_size: int | None = None,
        symmetric: bool = True,
        lm_head: bool = True,
    ) -> QuantScheme | None:
        """``"int8"`` / ``"int4"`` (+ options) / a QuantScheme / None (no quantization)."""
        if quantize is None or isinstance(quantize, QuantScheme):
            return quantize
        if quantize == "int8":
            return cls(8, group_size, symmetric, lm_head)
        if quantize == "int4":
            return cls(4, DEFAULT_GROUP_SIZE if group_size is None else group_size, symmetric,
                       lm_head)
        raise ValueError(f"quantize={quantize!r} is not supported; use 'int8', 'int4' or None")

    def groups(self, in_features: int) -> int:
        """Scale columns of a matrix with ``in_features`` inputs."""
        return 1 if self.group_size is None else in_features // self.group_size

    def check_features(self, name: str, in_features: int) -> None:
        if self.group_size is not None and in_features % self.group_size:
            fits = [g for g in GROUP_SIZES if in_features % g == 0]
            hint = f"use group_size in {fits}" if fits else "this shape cannot use int4"
            raise ValueError(
                f"{name} has {in_features} input features, not a multiple of int4 "
                f"group_size={self.group_size}; {hint}"
            )

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 else torch.uint8

    @property
    def values_per_byte(self) -> int:
        return 2 if self.bits == 4 else 1

    def describe(self) -> str:
        if self.bits == 8:
            return "int8 (per channel)"
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"int4 (group {self.group_size}, {kind})"


@dataclass
class QuantizedLinear:
    """One quantized ``[out, in]`` matrix in the kernel's format (see the module docstring).

    qweight: int8 [out, in] (int8) or uint8 [out, in // 2] (int4, two columns per byte).
    scales: fp16 [out, groups]. zeros: uint8 [out, groups] (asymmetric int4) or None."""

    qweight: Tensor
    scales: Tensor
    zeros: Tensor | None
    scheme: QuantScheme

    @property
    def shape(self) -> tuple[int, int]:
        out, cols = self.qweight.shape
        return out, cols * self.scheme.values_per_byte

    def rows(self, index: Tensor) -> QuantizedLinear:
        """The output rows ``index`` (a permutation or a selection), still quantized."""
        zeros = None if self.zeros is None else self.zeros[index]
        return QuantizedLinear(self.qweight[index], self.scales[index], zeros, self.scheme)

    def to(self, device: torch.device | str) -> QuantizedLinear:
        zeros = None if self.zeros is None else self.zeros.to(device)
        return QuantizedLinear(self.qweight.to(device), self.scales.to(device), zeros,
                               self.scheme)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self, dtype)


INT4_BLOCK = 32  # columns per packed block (16 bytes)
# pack_int4's layout, as stored in a FlashFormer state_dict ("int4_layout"): 1 was columns
# 2j and 2j + 1 in byte j (before session 22), 2 is the layout below.
INT4_LAYOUT = 2


def _stored_pairs() -> Tensor:
    """For each of a block's 16 byte positions, the pair it holds: each word's pairs in the
    order 0, 2, 1, 3 (a swap of the index's two low bits, so its own inverse)."""
    p = torch.arange(INT4_BLOCK // 2)
    return (p & ~3) | ((p & 1) << 1) | ((p >> 1) & 1)


def pack_int4(q: Tensor) -> Tensor:
    """uint8 [out, in] values 0..15 -> [out, in // 2] in blocks of 32 columns: pair i holds
    column i (low nibble) and 16 + i (high), the pairs of each word stored 0, 2, 1, 3."""
    if q.shape[-1] % INT4_BLOCK:
        raise ValueError(f"int4 packing needs whole blocks of {INT4_BLOCK} columns, got "
                         f"{q.shape[-1]} (int4 group sizes are multiples of {INT4_BLOCK})")
    q = q.to(torch.uint8).reshape(*q.shape[:-1], -1, 2, INT4_BLOCK // 2)
    pairs = q[..., 0, :] | (q[..., 1, :] << 4)
    return pairs[..., _stored_pairs()].reshape(*q.shape[:-3], -1)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of ``pack_int4``: uint8 [out, in // 2] -> uint8 [out, in]."""
    blocks = packed.reshape(*packed.shape[:-1], -1, INT4_BLOCK // 2)[..., _stored_pairs()]
    return torch.cat([blocks & 0xF, blocks >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


def _fp16_scale(scale: Tensor) -> Tensor:
    # All-zero rows/groups would give scale 0 (and 0/0 below): any positive scale is exact
    # for them. fp16 keeps the stored scale bit-identical to what the kernel reads.
    tiny = torch.finfo(torch.float16).tiny
    return scale.clamp(min=tiny).to(torch.float16)


def quantize(weight: Tensor, scheme: QuantScheme, *, name: str = "weight") -> QuantizedLinear:
    """Round-to-nearest quantization of ``weight [out, in]`` (any float dtype) to ``scheme``."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{name}: expected a 2-D float matrix, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    out, cols = weight.shape
    scheme.check_features(name, cols)
    w = weight.float()
    if scheme.bits == 8:
        scale = _fp16_scale(w.abs().amax(dim=1, keepdim=True) / 127.0)
        q = torch.round(w / scale.float()).clamp(-127, 127).to(torch.int8)
        return QuantizedLinear(q, scale, None, scheme)
    g = scheme.group_size
    wg = w.reshape(out, cols // g, g)
    if scheme.symmetric:
        # Largest magnitude -> +-7 (the code range is -8..7 around the zero point 8).
        scale = _fp16_scale(wg.abs().amax(dim=2) / 7.0)
        zero = torch.full_like(scale, INT4_SYMMETRIC_ZERO, dtype=torch.float32)
        zeros = None
    else:
        low = wg.amin(dim=2).clamp(max=0.0)
        high = wg.amax(dim=2).clamp(min=0.0)
        scale = _fp16_scale((high - low) / 15.0)
        zero = torch.round(-low / scale.float()).clamp(0, 15)
        zeros = zero.to(torch.uint8)
    q = torch.round(wg / scale.float()[..., None]) + zero[..., None]
    q = q.clamp(0, 15).to(torch.uint8).reshape(out, cols)
    return QuantizedLinear(pack_int4(q), scale, zeros, scheme)


def dequantize(ql: QuantizedLinear, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(q - zero) * scale`` in fp32 (the kernel's arithmetic), then cast to ``dtype``."""
    scheme = ql.scheme
    if scheme.bits == 8:
        return (ql.qweight.float() * ql.scales.float()).to(dtype)
    q = unpack_int4(ql.qweight).float()
    out, cols = q.shape
    g = scheme.group_size
    zero = (
        torch.full_like(ql.scales, INT4_SYMMETRIC_ZERO, dtype=torch.float32)
        if ql.zeros is None
        else ql.zeros.float()
    )
    w = (q.reshape(out, cols // g, g) - zero[..., None]) * ql.scales.float()[..., None]
    return w.reshape(out, cols).to(dtype)


def cat_rows(parts: list[QuantizedLinear]) -> QuantizedLinear:
    """Stack matrices with the same input features and scheme along the output rows."""
    schemes = {p.scheme for p in parts}
    if len(schemes) != 1:
        raise ValueError(f"cannot stack matrices quantized differently: {schemes}")
    zeros = [p.zeros for p in parts]
    if any(z is None for z in zeros) != all(z is None for z in zeros):
        raise ValueError("cannot stack symmetric and asymmetric int4 matrices")
    return QuantizedLinear(
        torch.cat([p.qweight for p in parts]),
        torch.cat([p.scales for p in parts]),
        None if zeros[0] is None else torch.cat(zeros),
        parts[0].scheme,
    )


# The projection matrices of a decoder layer (Hugging Face names, without ".weight").
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def quantize_state(
    num_layers: int, state: dict[str, Tensor], scheme: QuantScheme, *, tied: bool = False
) -> dict[str, Tensor | QuantizedLinear]:
    """A copy of a Hugging Face-named state dict with every projection matrix quantized and,
    with ``scheme.lm_head``, the LM head as ``lm_head.weight`` (quantized from the embedding
    table when ``tied``). Other tensors are shared, not copied."""
    out: dict[str, Tensor | QuantizedLinear] = dict(state)
    names = [f"model.layers.{i}.{m}.weight" for i in range(num_layers) for m in LAYER_LINEARS]
    if scheme.lm_head:
        out["lm_head.weight"] = state["model.embed_tokens.weight" if tied else "lm_head.weight"]
        names.append("lm_head.weight")
    for name in names:
        if not isinstance(out[name], QuantizedLinear):
            out[name] = quantize(out[name], scheme, name=name)
    return out


def dequantize_state(
    state: dict[str, Tensor | QuantizedLinear], dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Every QuantizedLinear of a state dict dequantized to ``dtype`` (other tensors as they
    are): the weights a reference model needs to compute what the quantized kernel does."""
    return {name: v.dequantize(dtype) if isinstance(v, QuantizedLinear) else v
            for name, v in state.items()}
