"""GPTQ / AWQ conversion: bit-exact codes, scales and zeros, and every error path.

The encoders below write the formats from their documented layouts (one nibble at a time,
independently of the decoder in quant_formats.py); the expected weights come from each
format's own formula evaluated on the source tensors.
"""

from __future__ import annotations

import pytest
import torch

from flashformer_triton.config import UnsupportedModelError
from flashformer_triton.loading import MissingTensorError, ShapeMismatchError
from flashformer_triton.quant_formats import (
    LINEAR_NAMES,
    convert_linear,
    layer_linear_prefixes,
    quantized_linear_prefixes,
    quantized_tensor_names,
    scheme_from_quantization_config,
)
from flashformer_triton.quantize import QuantScheme, quantize, unpack_int4

PREFIX = "model.layers.3.self_attn.q_proj"
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
# (out, in, group_size): odd-ish multiples of 8 / of the group size.
SHAPES = [(160, 96, 32), (40, 192, 64), (24, 256, 128), (8, 32, 32)]


# Encoders: integer values -> int32 words, nibble i at bits 4i..4i+3.
def to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_along_rows(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] -> [rows / 8, cols]: word r holds rows 8r..8r+7 (GPTQ qweight)."""
    words = torch.zeros(values.shape[0] // 8, values.shape[1], dtype=torch.int64)
    for i in range(8):
        words |= values[i::8].long() << (4 * i)
    return to_int32(words)


def pack_along_cols(values: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    """[rows, cols] -> [rows, cols / 8]: nibble i of word c holds column 8c + order[i]."""
    order = order or list(range(8))
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for i in range(8):
        words |= values[:, order[i]::8].long() << (4 * i)
    return to_int32(words)


def gptq_cfg(group_size=32, sym=False, fmt="gptq", desc_act=False, **extra):
    return {**dict(quant_method="gptq", bits=4, group_size=group_size, sym=sym,
                   desc_act=desc_act, checkpoint_format=fmt), **extra}


def awq_cfg(group_size=32, zero_point=True, **extra):
    return {**dict(quant_method="awq", bits=4, group_size=group_size, zero_point=zero_point,
                   version="gemm"), **extra}


def random_source(out, cols, group_size, symmetric, seed=0):
    """Codes q [out, in], and per format-group zeros and scales [groups, out]."""
    gen = torch.Generator().manual_seed(seed)
    groups = cols // group_size
    q = torch.randint(0, 16, (out, cols), generator=gen)
    if symmetric:
        zeros = torch.full((groups, out), 8)
    else:
        zeros = torch.randint(0, 16, (groups, out), generator=gen)
        zeros[0, :2] = torch.tensor([0, 15])  # the edges of the v1 (zero - 1) wrap
    scales = (torch.rand(groups, out, generator=gen) * 0.05 + 1e-3).to(torch.float16)
    return q, zeros, scales


def encode_gptq(q, zeros, scales, g_idx=None, fmt="gptq", prefix=PREFIX):
    stored_zeros = (zeros - 1) % 16 if fmt == "gptq" else zeros  # v1 stores zero - 1
    tensors = {
        f"{prefix}.qweight": pack_along_rows(q.T),  # [in, out] packed along inputs
        f"{prefix}.qzeros": pack_along_cols(stored_zeros),
        f"{prefix}.scales": scales.clone(),
    }
    if g_idx is not None:
        tensors[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
    return tensors


def encode_awq(q, zeros, scales, prefix=PREFIX):
    return {
        f"{prefix}.qweight": pack_along_cols(q.T, AWQ_PACK_ORDER),  # [in, out / 8]
        f"{prefix}.qzeros": pack_along_cols(zeros, AWQ_PACK_ORDER),
        f"{prefix}.scales": scales.clone(),
    }


def format_dequantize(q, zeros, scales, g_idx):
    """The formats' own formula: W[n, k] = (q[n, k] - zero[g(k), n]) * scale[g(k), n]."""
    z = zeros[g_idx].T.float()  # [out, in]
    s = scales[g_idx].T.float()
    return (q.float() - z) * s


def check_exact(ql, q, zeros, scales, g_idx, symmetric, group_size):
    rows = g_idx[::group_size]  # the format group of each of our groups
    assert unpack_int4(ql.qweight).tolist() == q.tolist()
    assert ql.qweight.dtype == torch.uint8 and ql.qweight.is_contiguous()
    assert ql.scales.dtype == torch.float16 and ql.scales.is_contiguous()
    assert torch.equal(ql.scales, scales[rows].T)
    if symmetric:
        assert ql.zeros is None
    else:
        assert ql.zeros.dtype == torch.uint8
        assert torch.equal(ql.zeros, zeros[rows].T.to(torch.uint8))
    assert ql.shape == tuple(q.shape)
    assert torch.equal(ql.dequantize(), format_dequantize(q, zeros, scales, g_idx))


# Exact conversion.
@pytest.mark.parametrize("out,cols,group_size", SHAPES)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("g_idx_kind", ["absent", "sequential", "act_order_permuted"])
def test_gptq_exact(out, cols, group_size, sym, fmt, g_idx_kind):
    q, zeros, scales = random_source(out, cols, group_size, sym)
    groups = cols // group_size
    sequential = torch.arange(cols) // group_size
    if g_idx_kind == "act_order_permuted":
        labels = torch.randperm(groups, generator=torch.Generator().manual_seed(1))
        if groups > 1:
            labels = labels.roll(1)  # never the identity
        g_idx = labels.repeat_interleave(group_size)
    else:
        g_idx = sequential
    stored_g_idx = None if g_idx_kind == "absent" else g_idx
    cfg = gptq_cfg(group_size, sym, fmt, desc_act=g_idx_kind == "act_order_permuted")
    tensors = encode_gptq(q, zeros, scales, stored_g_idx, fmt)
    ql = convert_linear(cfg, tensors, PREFIX, cols, out)
    assert ql.scheme == QuantScheme(4, group_size, symmetric=sym, lm_head=False)
    check_exact(ql, q, zeros, scales, g_idx, sym, group_size)


def test_gptq_act_order_repeated_labels_exact():
    # Runs may even share a label: each run still has one scale row, so it is exact.
    q, zeros, scales = random_source(16, 128, 32, False)
    g_idx = torch.tensor([2, 2, 0, 3]).repeat_interleave(32)
    ql = convert_linear(gptq_cfg(32, desc_act=True), encode_gptq(q, zeros, scales, g_idx),
                        PREFIX, 128, 16)
    check_exact(ql, q, zeros, scales, g_idx, False, 32)


def test_gptq_int64_g_idx_accepted():
    q, zeros, scales = random_source(16, 64, 32, True)
    tensors = encode_gptq(q, zeros, scales)
    tensors[f"{PREFIX}.g_idx"] = (torch.arange(64) // 32).long()
    ql = convert_linear(gptq_cfg(32, sym=True), tensors, PREFIX, 64, 16)
    check_exact(ql, q, zeros, scales, torch.arange(64) // 32, True, 32)


@pytest.mark.parametrize("out,cols,group_size", SHAPES)
@pytest.mark.parametrize("zero_point", [True, False], ids=["zero_point", "no_zero_point"])
def test_awq_exact(out, cols, group_size, zero_point):
    q, zeros, scales = random_source(out, cols, group_size, symmetric=not zero_point)
    ql = convert_linear(awq_cfg(group_size, zero_point), encode_awq(q, zeros, scales),
                        PREFIX, cols, out)
    assert ql.scheme == QuantScheme(4, group_size, symmetric=not zero_point, lm_head=False)
    check_exact(ql, q, zeros, scales, torch.arange(cols) // group_size, not zero_point,
                group_size)


def test_awq_interleave_is_not_sequential():
    # One distinct code per output column: a decoder ignoring AWQ's order would scramble it.
    out, cols = 8, 32
    q = torch.arange(out).repeat(cols, 1).T  # q[n, k] = n
    zeros = torch.full((1, out), 3)
    scales = torch.ones(1, out, dtype=torch.float16)
    tensors = encode_awq(q, zeros, scales)
    # Nibble i of each word holds column AWQ_PACK_ORDER[i], i.e. value AWQ_PACK_ORDER[i].
    word = int(tensors[f"{PREFIX}.qweight"][0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == AWQ_PACK_ORDER
    ql = convert_linear(awq_cfg(32), tensors, PREFIX, cols, out)
    assert unpack_int4(ql.qweight)[:, 0].tolist() == list(range(out))


def test_gptq_v1_zero_wrap():
    # v1 zero 0 is stored as nibble 15 and decoded (15 + 1) mod 16 = 0, like AutoGPTQ.
    q, _, scales = random_source(8, 32, 32, False)
    zeros = torch.tensor([[0, 15, 1, 8, 7, 14, 2, 0]])
    tensors = encode_gptq(q, zeros, scales, fmt="gptq")
    assert (int(tensors[f"{PREFIX}.qzeros"][0, 0]) & 0xF) == 15
    ql = convert_linear(gptq_cfg(32, fmt="gptq"), tensors, PREFIX, 32, 8)
    assert ql.zeros[:, 0].tolist() == zeros[0].tolist()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_round_trip_of_our_quantize(symmetric, method):
    """Our own quantized matrix, written in a format and converted back, is unchanged."""
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(2))
    ours = quantize(w, QuantScheme(4, 64, symmetric, lm_head=False))
    q = unpack_int4(ours.qweight)
    zeros = torch.full((2, 48), 8) if symmetric else ours.zeros.T.long()
    scales = ours.scales.T.contiguous()
    if method == "gptq":
        cfg, tensors = gptq_cfg(64, symmetric, "gptq"), encode_gptq(q, zeros, scales)
    else:
        cfg, tensors = awq_cfg(64, not symmetric), encode_awq(q, zeros, scales)
    ql = convert_linear(cfg, tensors, PREFIX, 128, 48)
    assert ql.scheme == ours.scheme
    assert torch.equal(ql.qweight, ours.qweight) and torch.equal(ql.scales, ours.scales)
    assert (ql.zeros is None) if symmetric else torch.equal(ql.zeros, ours.zeros)


def test_float32_scales_exactly_fp16_accepted():
    q, zeros, scales = random_source(16, 64, 32, False)
    tensors = encode_awq(q, zeros, scales)
    tensors[f"{PREFIX}.scales"] = scales.float()
    ql = convert_linear(awq_cfg(32), tensors, PREFIX, 64, 16)
    assert ql.scales.dtype == torch.float16 and torch.equal(ql.scales, scales.T)


# Config parsing.
def test_scheme_from_config():
    assert scheme_from_quantization_config(gptq_cfg(128, sym=True)) == QuantScheme(
        4, 128, True, lm_head=False)
    assert scheme_from_quantization_config(gptq_cfg(64, sym=False)) == QuantScheme(
        4, 64, False, lm_head=False)
    # Defaults: GPTQ sym true, v1; AWQ zero_point true, gemm. GPTQModel's lm_head flag kept.
    assert scheme_from_quantization_config(
        dict(quant_method="gptq", bits=4, group_size=32, lm_head=True)
    ) == QuantScheme(4, 32, True, lm_head=True)
    assert scheme_from_quantization_config(
        dict(quant_method="AWQ", bits=4, group_size=128, version="GEMM")
    ) == QuantScheme(4, 128, False, lm_head=False)
    # transformers' current spelling ("format") and both spellings agreeing.
    assert scheme_from_quantization_config(
        dict(quant_method="gptq", bits=4, group_size=32, format="gptq_v2",
             checkpoint_format="gptq_v2")
    ).group_size == 32
    assert scheme_from_quantization_config(
        dict(quant_method="awq", bits=4, group_size=32, format="gemm")
    ).symmetric is False


CONFIG_ERRORS = {
    "bits8": (gptq_cfg(bits=8), "bits"),
    "bits3_awq": (awq_cfg(bits=3), "bits"),
    "group_-1": (gptq_cfg(group_size=-1), "group_size"),
    "group_16": (awq_cfg(group_size=16), "group_size"),
    "group_256": (gptq_cfg(group_size=256), "group_size"),
    "method_unknown": (dict(quant_method="bitsandbytes", bits=4, group_size=32),
                       "'bitsandbytes'"),
    "method_missing": (dict(bits=4, group_size=32), "quant_method"),
    "gptq_marlin": (gptq_cfg(fmt="marlin"), "checkpoint_format"),
    "gptq_marlin_flag": (gptq_cfg(is_marlin_format=True), "is_marlin_format"),
    "gptq_format_key": (dict(quant_method="gptq", bits=4, group_size=32, format="bitblas"),
                        "format"),
    "gptq_format_conflict": (gptq_cfg(fmt="gptq", format="gptq_v2"), "disagree"),
    "gptq_sym_not_bool": (gptq_cfg(sym="yes"), "sym"),
    "awq_gemv": (dict(awq_cfg(), version="gemv"), "version"),
    "awq_exllama": (dict(awq_cfg(), version="exllama"), "version"),
    "awq_format_key": (dict(quant_method="awq", bits=4, group_size=32, format="gemv_fast"),
                       "format"),
    "awq_zero_point_not_bool": (awq_cfg(zero_point=None), "zero_point"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_errors(case):
    cfg, field = CONFIG_ERRORS[case]
    with pytest.raises(UnsupportedModelError, match=field) as err:
        scheme_from_quantization_config(cfg)
    if case == "method_unknown":
        assert "gptq" in str(err.value) and "awq" in str(err.value)
    q, zeros, scales = random_source(8, 32, 32, False)
    with pytest.raises(UnsupportedModelError, match=field):
        convert_linear(cfg, encode_gptq(q, zeros, scales), PREFIX, 32, 8)


# Tensor errors.
def test_gptq_mixed_g_idx_refused():
    # Classic act-order: input k belongs to group k % groups, so every run mixes groups.
    q, zeros, scales = random_source(16, 96, 32, False)
    g_idx = torch.arange(96) % 3
    with pytest.raises(UnsupportedModelError, match="g_idx") as err:
        convert_linear(gptq_cfg(32, desc_act=True), encode_gptq(q, zeros, scales, g_idx),
                       PREFIX, 96, 16)
    msg = str(err.value)
    assert f"{PREFIX}.g_idx" in msg and "desc_act" in msg and "static_groups" in msg


def test_gptq_one_stray_g_idx_refused():
    q, zeros, scales = random_source(16, 96, 32, False)
    g_idx = torch.arange(96) // 32
    g_idx[40] = 2
    with pytest.raises(UnsupportedModelError, match="inputs 32..63"):
        convert_linear(gptq_cfg(32), encode_gptq(q, zeros, scales, g_idx), PREFIX, 96, 16)


@pytest.mark.parametrize("bad", [-1, 3])
def test_gptq_g_idx_out_of_range(bad):
    q, zeros, scales = random_source(16, 96, 32, False)
    g_idx = torch.arange(96) // 32
    g_idx[5] = bad
    with pytest.raises(UnsupportedModelError, match=r"g_idx\[5\]"):
        convert_linear(gptq_cfg(32), encode_gptq(q, zeros, scales, g_idx), PREFIX, 96, 16)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_sym_with_other_zeros_refused(fmt):
    q, zeros, scales = random_source(16, 64, 32, False)
    with pytest.raises(UnsupportedModelError, match="qzeros") as err:
        convert_linear(gptq_cfg(32, sym=True, fmt=fmt), encode_gptq(q, zeros, scales, fmt=fmt),
                       PREFIX, 64, 16)
    assert "sym=true" in str(err.value)


def test_gptq_v1_sym_zeros_read_as_v2_refused():
    # A v1 symmetric checkpoint stores 7: claiming v2 must not silently use zero 7.
    q, zeros, scales = random_source(16, 64, 32, True)
    tensors = encode_gptq(q, zeros, scales, fmt="gptq")
    with pytest.raises(UnsupportedModelError, match="is 7"):
        convert_linear(gptq_cfg(32, sym=True, fmt="gptq_v2"), tensors, PREFIX, 64, 16)


def test_awq_no_zero_point_with_other_zeros_refused():
    q, zeros, scales = random_source(16, 64, 32, False)
    with pytest.raises(UnsupportedModelError, match="qzeros") as err:
        convert_linear(awq_cfg(32, zero_point=False), encode_awq(q, zeros, scales),
                       PREFIX, 64, 16)
    assert "zero_point=false" in str(err.value)


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("missing", ["qweight", "qzeros", "scales"])
def test_missing_tensor(method, missing):
    q, zeros, scales = random_source(16, 64, 32, False)
    tensors = encode_gptq(q, zeros, scales) if method == "gptq" else encode_awq(q, zeros, scales)
    cfg = gptq_cfg(32) if method == "gptq" else awq_cfg(32)
    del tensors[f"{PREFIX}.{missing}"]
    with pytest.raises(MissingTensorError, match=rf"{PREFIX}\.{missing}"):
        convert_linear(cfg, tensors, PREFIX, 64, 16)


@pytest.mark.parametrize("method,name", [
    *[("gptq", n) for n in ("qweight", "qzeros", "scales", "g_idx")],
    *[("awq", n) for n in ("qweight", "qzeros", "scales")],
])
def test_wrong_shape(method, name):
    q, zeros, scales = random_source(16, 64, 32, False)
    if method == "gptq":
        cfg, tensors = gptq_cfg(32), encode_gptq(q, zeros, scales, torch.arange(64) // 32)
    else:
        cfg, tensors = awq_cfg(32), encode_awq(q, zeros, scales)
    key = f"{PREFIX}.{name}"
    tensors[key] = tensors[key][:-1]
    with pytest.raises(ShapeMismatchError, match=rf"{PREFIX}\.{name}"):
        convert_linear(cfg, tensors, PREFIX, 64, 16)


def test_awq_transposed_qweight_is_a_shape_error():
    # A GPTQ-shaped qweight under an AWQ config (and vice versa) is caught by the shapes.
    q, zeros, scales = random_source(16, 64, 32, False)
    with pytest.raises(ShapeMismatchError, match="qweight"):
        convert_linear(awq_cfg(32), encode_gptq(q, zeros, scales, fmt="gptq_v2"), PREFIX, 64, 16)
    with pytest.raises(ShapeMismatchError, match="qweight"):
        convert_linear(gptq_cfg(32), encode_awq(q, zeros, scales), PREFIX, 64, 16)


def test_features_not_divisible():
    q, zeros, scales = random_source(16, 96, 32, False)
    with pytest.raises(UnsupportedModelError, match="group_size=64"):
        convert_linear(gptq_cfg(64), encode_gptq(q, zeros, scales), PREFIX, 96, 16)
    with pytest.raises(UnsupportedModelError, match="output features"):
        convert_linear(gptq_cfg(32), encode_gptq(q, zeros, scales), PREFIX, 96, 12)


def test_bad_dtypes():
    q, zeros, scales = random_source(16, 64, 32, False)
    tensors = encode_gptq(q, zeros, scales)
    bad = dict(tensors, **{f"{PREFIX}.qweight": tensors[f"{PREFIX}.qweight"].long()})
    with pytest.raises(UnsupportedModelError, match=rf"{PREFIX}\.qweight .*int32"):
        convert_linear(gptq_cfg(32), bad, PREFIX, 64, 16)
    # fp32 with more mantissa bits than fp16; bf16 below fp16's smallest subnormal.
    bf16_tiny = scales.to(torch.bfloat16)
    bf16_tiny[0, 0] = 1e-9
    for inexact in (scales.float() * (1 + 2**-13), bf16_tiny):
        bad = dict(tensors, **{f"{PREFIX}.scales": inexact})
        with pytest.raises(UnsupportedModelError, match=rf"{PREFIX}\.scales .*fp16"):
            convert_linear(gptq_cfg(32), bad, PREFIX, 64, 16)
    bad = dict(tensors, **{f"{PREFIX}.g_idx": torch.zeros(64)})
    with pytest.raises(UnsupportedModelError, match="g_idx must be integers"):
        convert_linear(gptq_cfg(32), bad, PREFIX, 64, 16)


# Which tensors to read.
def test_tensor_names():
    assert quantized_tensor_names(PREFIX) == [
        f"{PREFIX}.qweight", f"{PREFIX}.qzeros", f"{PREFIX}.scales"]
    assert quantized_tensor_names(PREFIX, awq_cfg()) == quantized_tensor_names(PREFIX)
    assert quantized_tensor_names(PREFIX, gptq_cfg()) == [
        *quantized_tensor_names(PREFIX), f"{PREFIX}.g_idx"]
    assert layer_linear_prefixes(3)[0] == PREFIX
    assert len(layer_linear_prefixes(0)) == len(LINEAR_NAMES) == 7
    names = {"model.embed_tokens.weight", "lm_head.weight"}
    prefixes = quantized_linear_prefixes(2, names)
    assert prefixes == layer_linear_prefixes(0) + layer_linear_prefixes(1)
    assert quantized_linear_prefixes(2, names | {"lm_head.qweight"}) == [*prefixes, "lm_head"]
