"""Pre-quantized Hugging Face checkpoints (GPTQ, AWQ) converted exactly to ``QuantizedLinear``.

Both formats store a linear layer ``W [out, in]`` as 4-bit codes ``q``, a fp16 scale and a
4-bit zero point per group of ``G`` input channels, and dequantize as

    W[n, k] = (q[n, k] - zero[group(k), n]) * scale[group(k), n]

which is our int4 formula (see ``quantize.py``) once the integers are unpacked and the
matrices transposed. Conversion is therefore exact: the integer codes are copied bit for bit,
the scales stay the same fp16 numbers and the zero points become uint8; nothing is rounded.
Only the packing differs. Each int32 holds eight nibbles, nibble ``i`` at bits ``4i..4i+3``:

* GPTQ (AutoGPTQ / GPTQModel / optimum). ``qweight`` int32 ``[in / 8, out]``: packed along
  the *input* dim, row ``r`` nibble ``i`` is input ``8r + i``. ``qzeros`` int32
  ``[groups, out / 8]`` and packed along the *output* dim, nibble ``i`` of column ``c`` is
  output ``8c + i``. ``scales`` fp16 ``[groups, out]``. ``g_idx`` int32 ``[in]``: the group
  (row of ``scales``/``qzeros``) of each input channel, ``k // G`` unless act-order
  (``desc_act``) reordered it; older checkpoints omit it. ``checkpoint_format`` "gptq" (v1)
  stores ``zero - 1`` in each nibble, decoded as ``(nibble + 1) mod 16`` like AutoGPTQ does;
  "gptq_v2" stores the zero itself.
* AWQ (AutoAWQ "gemm"). ``qweight`` int32 ``[in, out / 8]`` and ``qzeros`` int32
  ``[groups, out / 8]``, both packed along the *output* dim with an interleave: nibble ``i``
  of column ``c`` is output ``8c + AWQ_ORDER[i]``. ``scales`` fp16 ``[groups, out]``. Groups
  are always ``k // G``. Zero points are stored as they are.

Our format has one group per run of ``G`` consecutive inputs. An act-order GPTQ checkpoint
converts exactly only when each run has one ``g_idx`` value (the runs' labels may be in any
order, as with ``static_groups``): our group ``i`` then takes the rows ``g_idx[i * G]``.
Anything else is refused rather than approximated.

Biases (Qwen2's q/k/v) are plain ``<prefix>.bias`` tensors in both formats and are not
touched here. Everything is plain torch on whatever device the tensors are on (CPU for
loading), vectorised over elements.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flashformer_triton.config import UnsupportedModelError
from flashformer_triton.loading import MissingTensorError, ShapeMismatchError
from flashformer_triton.quantize import (
    GROUP_SIZES,
    INT4_SYMMETRIC_ZERO,
    QuantizedLinear,
    QuantScheme,
    pack_int4,
)

__all__ = [
    "AWQ_ORDER",
    "LINEAR_NAMES",
    "LM_HEAD",
    "SUPPORTED_QUANT_METHODS",
    "convert_linear",
    "layer_linear_prefixes",
    "quantized_linear_prefixes",
    "quantized_tensor_names",
    "scheme_from_quantization_config",
]

SUPPORTED_QUANT_METHODS = ("gptq", "awq")
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_VERSIONS = ("gemm",)
# AutoAWQ "gemm" packing: nibble i of an int32 holds output column 8c + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

# The quantized linears of one Llama / Mistral / Qwen2 / Qwen3 decoder layer, relative to
# ``model.layers.{i}``. The LM head is quantized only in some checkpoints (see LM_HEAD).
LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LM_HEAD = "lm_head"

_NIBBLES = 8  # 4-bit values per int32
_NIBBLE_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


@dataclass(frozen=True)
class _Format:
    """What ``quantization_config`` says, validated: enough to decode one linear."""

    method: str  # "gptq" or "awq"
    layout: str  # GPTQ: "gptq" (v1, zero - 1 stored) or "gptq_v2"; AWQ: "gemm"
    scheme: QuantScheme


# Reading quantization_config.
def _field(qcfg: Mapping[str, Any], legacy: str, current: str, default: str) -> tuple[str, str]:
    """``(field name, lower-cased value)`` of a setting transformers spells two ways (the
    legacy name and the current one); both present must agree."""
    present = [k for k in (legacy, current) if qcfg.get(k) is not None]
    values = {str(qcfg[k]).lower() for k in present}
    if len(values) > 1:
        raise UnsupportedModelError(
            f"quantization_config has {legacy}={qcfg[legacy]!r} and {current}={qcfg[current]!r}, "
            "which disagree; fix config.json"
        )
    if not present:
        return legacy, default
    return present[0], values.pop()


def _parse(qcfg: Mapping[str, Any]) -> _Format:
    method = str(qcfg.get("quant_method", "")).lower()
    if method not in SUPPORTED_QUANT_METHODS:
        raise UnsupportedModelError(
            f"quantization_config.quant_method={qcfg.get('quant_method')!r} is not supported; "
            f"pre-quantized checkpoints must be one of {SUPPORTED_QUANT_METHODS} "
            "(or load the unquantized model and pass quantize='int4')"
        )
    bits = qcfg.get("bits")
    if bits != 4:
        raise UnsupportedModelError(
            f"quantization_config.bits={bits!r} is not supported for {method} checkpoints; "
            "only 4-bit GPTQ/AWQ converts to our int4 format"
        )
    group_size = qcfg.get("group_size")
    if group_size not in GROUP_SIZES:
        why = " (-1 means one group per row, i.e. per channel)" if group_size == -1 else ""
        raise UnsupportedModelError(
            f"quantization_config.group_size={group_size!r}{why} is not supported; "
            f"int4 needs one of {GROUP_SIZES}"
        )
    group_size = int(group_size)  # JSON may give 128.0
    lm_head = bool(qcfg.get("lm_head", False))  # GPTQModel's flag; AWQ never sets it

    if method == "gptq":
        if qcfg.get("is_marlin_format"):
            raise UnsupportedModelError(
                "quantization_config.is_marlin_format=true: Marlin-repacked GPTQ weights are "
                "not supported; use the checkpoint in the plain 'gptq' format"
            )
        name, layout = _field(qcfg, "checkpoint_format", "format", "gptq")
        if layout not in GPTQ_FORMATS:
            raise UnsupportedModelError(
                f"quantization_config.{name}={layout!r} is not supported; GPTQ checkpoints "
                f"must be in one of {GPTQ_FORMATS}"
            )
        sym = qcfg.get("sym", True)
        if not isinstance(sym, bool):
            raise UnsupportedModelError(f"quantization_config.sym={sym!r} must be true or false")
        symmetric = sym
    else:
        name, layout = _field(qcfg, "version", "format", "gemm")
        if layout not in AWQ_VERSIONS:
            raise UnsupportedModelError(
                f"quantization_config.{name}={layout!r} is not supported; AWQ checkpoints "
                f"must use the AutoAWQ {AWQ_VERSIONS} packing (gemv, gemv_fast, marlin and "
                "exllama repack the weights differently)"
            )
        zero_point = qcfg.get("zero_point", True)
        if not isinstance(zero_point, bool):
            raise UnsupportedModelError(
                f"quantization_config.zero_point={zero_point!r} must be true or false"
            )
        # zero_point false: the stored zeros must all be 8 (checked per tensor), i.e. ours.
        symmetric = not zero_point
    return _Format(method, layout, QuantScheme(4, group_size, symmetric, lm_head))


def scheme_from_quantization_config(qcfg: Mapping[str, Any]) -> QuantScheme:
    """Our int4 scheme for a ``config.json`` ``quantization_config`` (validated).

    GPTQ: symmetric when ``sym`` (default true). AWQ: asymmetric when ``zero_point``
    (default true). ``lm_head`` mirrors the config's ``lm_head`` flag (default false); the
    LM head is converted when the checkpoint has ``lm_head.qweight`` either way.
    Raises UnsupportedModelError naming the offending field."""
    return _parse(qcfg).scheme


# Which tensors to read.
def quantized_tensor_names(prefix: str, qcfg: Mapping[str, Any] | None = None) -> list[str]:
    """The stored tensors of the quantized linear ``prefix`` (e.g.
    ``"model.layers.0.self_attn.q_proj"``): ``qweight``, ``qzeros``, ``scales``, all required,
    and with a GPTQ ``qcfg`` also ``g_idx``, which older GPTQ checkpoints omit (read it when
    present). ``<prefix>.bias``, where the model has one, is an ordinary tensor."""
    names = [f"{prefix}.qweight", f"{prefix}.qzeros", f"{prefix}.scales"]
    if qcfg is not None and _parse(qcfg).method == "gptq":
        names.append(f"{prefix}.g_idx")
    return names


def layer_linear_prefixes(layer: int) -> list[str]:
    """``model.layers.{layer}.<name>`` for every name in LINEAR_NAMES."""
    return [f"model.layers.{layer}.{name}" for name in LINEAR_NAMES]


def quantized_linear_prefixes(num_layers: int, names: Collection[str]) -> list[str]:
    """Every linear of a ``num_layers``-layer checkpoint stored quantized: all layer
    projections, and the LM head when ``names`` (the checkpoint's tensor names) has
    ``lm_head.qweight``; otherwise ``lm_head.weight`` (or the tied embedding) stays a plain
    tensor."""
    prefixes = [p for i in range(num_layers) for p in layer_linear_prefixes(i)]
    if f"{LM_HEAD}.qweight" in names:
        prefixes.append(LM_HEAD)
    return prefixes


# Decoding.
def _nibbles(packed: Tensor) -> Tensor:
    """int32 [..., c] -> uint8 [..., c, 8]: nibble i (bits 4i..4i+3) at index i."""
    # Arithmetic shift of negative int32s only fills bits above 31 - 4i; the mask drops them.
    shifts = _NIBBLE_SHIFTS.to(packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)


def _unpack_columns(packed: Tensor, order: tuple[int, ...] | None = None) -> Tensor:
    """int32 [rows, cols / 8] packed along the last dim -> uint8 [rows, cols]. With ``order``,
    nibble i holds column 8c + order[i] (AWQ); else column 8c + i (GPTQ qzeros)."""
    nib = _nibbles(packed)
    if order is not None:
        # Column 8c + j sits in nibble i with order[i] == j: gather by the inverse order.
        inverse = sorted(range(_NIBBLES), key=order.__getitem__)
        nib = nib[..., inverse]
    return nib.reshape(packed.shape[0], -1)


def _unpack_gptq_qweight(qweight: Tensor) -> Tensor:
    """GPTQ int32 [in / 8, out] (packed along inputs) -> uint8 codes [out, in]."""
    nib = _nibbles(qweight)  # [in / 8, out, 8]: input 8r + i at [r, :, i]
    return nib.permute(1, 0, 2).reshape(qweight.shape[1], -1)


def _tensor(tensors: Mapping[str, Tensor], name: str) -> Tensor:
    if name not in tensors:
        raise MissingTensorError(f"the checkpoint has no tensor {name!r}")
    return tensors[name]


def _check(name: str, t: Tensor, shape: tuple[int, ...], context: str) -> None:
    if tuple(t.shape) != shape:
        raise ShapeMismatchError(
            f"{name} has shape {tuple(t.shape)}; {context} implies {shape}"
        )


def _check_int32(name: str, t: Tensor) -> None:
    if t.dtype != torch.int32:
        raise UnsupportedModelError(
            f"{name} is {t.dtype}; packed 4-bit tensors must be int32 (8 values per element)"
        )


def _fp16_scales(name: str, scales: Tensor) -> Tensor:
    """The scales as fp16, refusing a cast that would change a value (conversion is exact)."""
    if not scales.is_floating_point():
        raise UnsupportedModelError(f"{name} is {scales.dtype}; scales must be floating point")
    half = scales.to(torch.float16)
    if scales.dtype != torch.float16 and not torch.equal(half.to(scales.dtype), scales):
        raise UnsupportedModelError(
            f"{name} is {scales.dtype} with values fp16 cannot hold exactly; our int4 format "
            "keeps fp16 scales"
        )
    return half


def _group_rows(g_idx: Tensor, name: str, groups: int, group_size: int) -> Tensor | None:
    """The format's group (row of scales/qzeros) of each of our groups, or None when it is
    already ``i``. Each run of ``group_size`` inputs must share one g_idx value."""
    if g_idx.is_floating_point() or g_idx.is_complex() or g_idx.dtype == torch.bool:
        raise UnsupportedModelError(f"{name} is {g_idx.dtype}; g_idx must be integers")
    g_idx = g_idx.long()
    bad = (g_idx < 0) | (g_idx >= groups)
    if bad.any():
        k = int(bad.nonzero()[0])
        raise UnsupportedModelError(
            f"{name}[{k}] = {int(g_idx[k])} is not a group index in [0, {groups})"
        )
    runs = g_idx.reshape(groups, group_size)
    mixed = (runs != runs[:, :1]).any(dim=1)
    if mixed.any():
        i = int(mixed.nonzero()[0])
        labels = sorted(set(runs[i].tolist()))
        raise UnsupportedModelError(
            f"{name}: g_idx puts inputs {i * group_size}..{(i + 1) * group_size - 1} in "
            f"several groups {labels[:8]}: act-order (desc_act) GPTQ that reorders channels "
            f"across groups has no exact equivalent with {group_size} consecutive inputs per "
            "group; re-quantize without act-order (desc_act=false) or with static_groups=true"
        )
    rows = runs[:, 0]
    if torch.equal(rows, torch.arange(groups, device=rows.device)):
        return None
    return rows


def convert_linear(
    qcfg: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    prefix: str,
    in_features: int,
    out_features: int,
) -> QuantizedLinear:
    """The GPTQ/AWQ linear ``prefix`` of ``tensors`` (full names -> tensors) as our
    ``QuantizedLinear`` of ``scheme_from_quantization_config(qcfg)``, bit-exact.

    Raises UnsupportedModelError (config, dtype or content we cannot represent exactly),
    MissingTensorError (a tensor is absent) or ShapeMismatchError (a tensor's shape does not
    match ``in_features`` x ``out_features``)."""
    fmt = _parse(qcfg)
    scheme = fmt.scheme
    g = scheme.group_size
    if in_features % g:
        raise UnsupportedModelError(
            f"{prefix} has {in_features} input features, not a multiple of "
            f"quantization_config.group_size={g}"
        )
    if out_features % _NIBBLES:
        raise UnsupportedModelError(
            f"{prefix} has {out_features} output features; packed 4-bit checkpoints need a "
            f"multiple of {_NIBBLES}"
        )
    groups = in_features // g
    names = {s: f"{prefix}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")}
    qweight = _tensor(tensors, names["qweight"])
    qzeros = _tensor(tensors, names["qzeros"])
    scales = _tensor(tensors, names["scales"])
    context = (
        f"a {fmt.method.upper()} linear with in_features={in_features}, "
        f"out_features={out_features}, group_size={g}"
    )
    if fmt.method == "gptq":
        _check(names["qweight"], qweight, (in_features // _NIBBLES, out_features), context)
    else:
        _check(names["qweight"], qweight, (in_features, out_features // _NIBBLES), context)
    _check(names["qzeros"], qzeros, (groups, out_features // _NIBBLES), context)
    _check(names["scales"], scales, (groups, out_features), context)
    _check_int32(names["qweight"], qweight)
    _check_int32(names["qzeros"], qzeros)

    # Format-side tensors, rows indexed by the format's group label: [groups, out].
    group_scales = _fp16_scales(names["scales"], scales)
    if fmt.method == "gptq":
        codes = _unpack_gptq_qweight(qweight)
        group_zeros = _unpack_columns(qzeros)
        if fmt.layout == "gptq":  # v1 stores zero - 1, wrapped to 4 bits
            group_zeros = (group_zeros + 1) & 0xF
        g_idx = tensors.get(names["g_idx"])
        if g_idx is not None:
            _check(names["g_idx"], g_idx, (in_features,), context)
            rows = _group_rows(g_idx, names["g_idx"], groups, g)
            if rows is not None:  # act-order with whole groups permuted
                group_scales, group_zeros = group_scales[rows], group_zeros[rows]
    else:
        codes = _unpack_columns(qweight, AWQ_ORDER).T
        group_zeros = _unpack_columns(qzeros, AWQ_ORDER)

    if scheme.symmetric:
        off = group_zeros != INT4_SYMMETRIC_ZERO
        if off.any():
            grp, col = (int(i) for i in off.nonzero()[0])
            field = "sym=true" if fmt.method == "gptq" else "zero_point=false"
            raise UnsupportedModelError(
                f"{names['qzeros']}: quantization_config.{field} but the zero point of output "
                f"{col}, group {grp} is {int(group_zeros[grp, col])}, not "
                f"{INT4_SYMMETRIC_ZERO}; the qzeros do not match a symmetric checkpoint"
            )
        zeros = None
    else:
        zeros = group_zeros.T.contiguous()
    # Unpacking leaves transposed views: make every stored tensor row-major like quantize().
    qcodes = pack_int4(codes.contiguous()).contiguous()
    return QuantizedLinear(qcodes, group_scales.T.contiguous(), zeros, scheme)
