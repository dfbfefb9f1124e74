"""Weight-only int8/int4: the scheme, the kernel's dequantization, the module and checkpoints.

The kernel is judged against the reference model run on the dequantized weights (what it
multiplies with), so only activation rounding separates them; against the unquantized model
the test reports and bounds the quantization error itself.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAMILIES, HAS_CUDA, assert_close, build_hf_model
from safetensors.torch import save_file
from test_kernel import BATCHES, _pair, _run_and_compare
from test_quant_formats import encode_awq, encode_gptq

from flashformer_triton import FlashFormer, UnsupportedModelError
from flashformer_triton.config import ModelConfig, preset
from flashformer_triton.loading import random_state_dict
from flashformer_triton.plan import make_plan
from flashformer_triton.quantize import (
    INT4_LAYOUT,
    LAYER_LINEARS,
    QuantizedLinear,
    QuantScheme,
    dequantize,
    pack_int4,
    quantize,
    quantize_state,
    unpack_int4,
)
from flashformer_triton.runtime import DecodeRuntime
from flashformer_triton.weights import pack_weights

DEVICE = "cuda" if HAS_CUDA else "cpu"
INT8 = QuantScheme(8)
INT4 = QuantScheme(4, 32)
INT4_ASYM = QuantScheme(4, 32, symmetric=False)
SCHEMES = {"int8": INT8, "int4": INT4, "int4-asym": INT4_ASYM}
# (out, in): odd row counts, inputs a multiple of every group size tested.
MATRICES = [(7, 128), (33, 256), (1, 384)]
pytestmark = pytest.mark.filterwarnings("ignore::flashformer_triton.InterpreterWarning")


# ---------------------------------------------------------------- the scheme (plain torch)


def reference_round_trip(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The scheme written out group by group, independently of quantize.py's vectorisation."""
    w = w.float()
    out = torch.empty_like(w)
    g = scheme.group_size or w.shape[1]
    for n in range(w.shape[0]):
        for k0 in range(0, w.shape[1], g):
            part = w[n, k0 : k0 + g]
            tiny = torch.finfo(torch.float16).tiny
            if scheme.bits == 8:
                s = max(float(part.abs().max()) / 127.0, tiny)
                s = float(torch.tensor(s).to(torch.float16))
                q, zero = torch.clamp(torch.round(part / s), -127, 127), 0.0
            elif scheme.symmetric:
                s = float(torch.tensor(max(float(part.abs().max()) / 7.0, tiny)).half())
                q, zero = torch.clamp(torch.round(part / s) + 8, 0, 15), 8.0
            else:
                lo, hi = min(float(part.min()), 0.0), max(float(part.max()), 0.0)
                s = float(torch.tensor(max((hi - lo) / 15.0, tiny)).half())
                zero = float(min(max(round(-lo / s), 0), 15))
                q = torch.clamp(torch.round(part / s) + zero, 0, 15)
            out[n, k0 : k0 + g] = (q - zero) * s
    return out


@pytest.mark.parametrize("scheme", list(SCHEMES) + ["int4-g64", "int4-g128-asym"])
@pytest.mark.parametrize("shape", MATRICES)
def test_round_trip_matches_the_scheme_exactly(scheme: str, shape: tuple[int, int]) -> None:
    s = SCHEMES.get(scheme) or {
        "int4-g64": QuantScheme(4, 64),
        "int4-g128-asym": QuantScheme(4, 128, symmetric=False),
    }[scheme]
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])) * 0.05
    w[0, :5] = 0.0  # exact zeros, and (row 0 of a 1-row matrix) a partly empty group
    ql = quantize(w.to(torch.bfloat16), s)
    expected = reference_round_trip(w.to(torch.bfloat16), s)
    assert torch.equal(dequantize(ql), expected)
    # Each weight is off by at most half a step of its group (a whole step for asymmetric
    # int4: the rounded zero point shifts the grid, and the top code clamps); 1% for the
    # rounding of the scale to fp16.
    step = ql.scales.float().repeat_interleave(s.group_size or shape[1], dim=1)
    bound = step * (0.5 if s.symmetric else 1.0) * 1.01
    assert ((dequantize(ql) - w.to(torch.bfloat16).float()).abs() <= bound).all()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantizing_dequantized_weights_is_idempotent(scheme: str) -> None:
    w = torch.randn(9, 128, generator=torch.Generator().manual_seed(1))
    ql = quantize(w, SCHEMES[scheme])
    again = quantize(dequantize(ql), SCHEMES[scheme])
    assert torch.equal(again.qweight, ql.qweight) and torch.equal(again.scales, ql.scales)


@pytest.mark.parametrize("position,block,pair", [(0, 0, 0), (1, 0, 2), (2, 0, 1), (7, 0, 7),
                                                 (9, 1, 10), (14, 1, 13)])
def test_int4_packing_pairs_columns_i_and_16_plus_i(position: int, block: int,
                                                     pair: int) -> None:
    """pack_int4's layout: in each block of 32 columns (16 bytes), pair i holds column i and
    16 + i; each word's pairs are stored in the order 0, 2, 1, 3."""
    q = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(2),
                      dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 32)
    byte = packed[:, 16 * block + position]
    assert torch.equal(byte & 0xF, q[:, 32 * block + pair])
    assert torch.equal(byte >> 4, q[:, 32 * block + 16 + pair])
    assert torch.equal(unpack_int4(packed), q)


def test_int4_packing_needs_whole_blocks() -> None:
    with pytest.raises(ValueError, match="whole blocks of 32 columns"):
        pack_int4(torch.zeros(2, 48, dtype=torch.uint8))


def test_all_zero_rows_quantize_to_zero() -> None:
    for scheme in SCHEMES.values():
        assert torch.equal(dequantize(quantize(torch.zeros(3, 64), scheme)), torch.zeros(3, 64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(quantize="int3"), "quantize='int3' is not supported"),
        (dict(quantize="int4", group_size=48), "group_size=48 is not supported"),
        (dict(quantize="int8", group_size=64), "int8 is per output channel"),
        (dict(quantize="int8", symmetric=False), "int8 is symmetric only"),
    ],
)
def test_bad_schemes_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantScheme.parse(kwargs.pop("quantize"), **kwargs)


def test_group_size_that_does_not_divide_the_model_is_refused() -> None:
    match = r"hidden_size has 96 input features.*group_size in \[32\]"
    with pytest.raises(ValueError, match=match):
        FlashFormer.from_pretrained("tiny", device="cpu", quantize="int4")  # group 128


# ---------------------------------------------------------------- packing and the plan


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_packing_quantizes_like_quantize_state(scheme: str) -> None:
    """pack_weights(quant=...) and packing a pre-quantized state dict give the same bytes,
    and the plan's byte count is exactly what the arenas hold."""
    config = preset("tiny")
    state = random_state_dict(config, dtype=torch.bfloat16)
    q = SCHEMES[scheme]
    a = pack_weights(config, state, quant=q)
    b = pack_weights(config, quantize_state(config.num_layers, state, q,
                                            tied=config.tie_word_embeddings))
    for name in ("arena", "scales", "zeros", "lm_head", "lm_scales", "lm_zeros"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    plan = make_plan(config, batch=1, max_seq_len=64, quant=a.scheme)
    split = make_plan(config, batch=1, max_seq_len=64, quant=a.scheme, down_splits=5,
                      block_k=32)  # F = 160 in five parts: per-row scales counted once
    assert split.weight_bytes() == plan.weight_bytes()
    held = sum(t.numel() * t.element_size() for t in (a.arena, a.lm_head, a.lm_scales)
               ) + a.scales.numel() * 2
    if not q.symmetric:
        held += a.zeros.numel() + a.lm_zeros.numel()
    assert plan.weight_bytes() == held
    bf16 = make_plan(config, batch=1, max_seq_len=64).weight_bytes()
    assert plan.weight_bytes() < bf16 * (0.6 if q.bits == 8 else 0.35)


def test_runtime_refuses_a_plan_for_other_weights() -> None:
    """A plan must be built for the weights' own quantization: the kernel would otherwise
    read int8 codes as bf16 (or the reverse) and return wrong logits without an error."""
    config = preset("tiny")
    state = random_state_dict(config, dtype=torch.float32)
    int8 = pack_weights(config, state, dtype=torch.float32, quant=QuantScheme(8))
    plain = pack_weights(config, state, dtype=torch.float32)
    shape = (config.num_layers, 1, config.num_kv_heads, 64, config.head_dim)
    cache = torch.zeros(shape)
    for weights, plan_quant, match in ((int8, None, "plan is for unquantized weights"),
                                       (plain, QuantScheme(8), "packed weights are unquant")):
        plan = make_plan(config, batch=1, max_seq_len=64, dtype=torch.float32, quant=plan_quant)
        with pytest.raises(ValueError, match=match):
            DecodeRuntime(config, weights, plan, cache, cache.clone())


def test_plan_byte_count_for_8b_int4() -> None:
    """Llama-3.1-8B int4 (group 128, symmetric): codes at half a byte plus an fp16 scale per
    128 weights, counted from the table (no weights materialised)."""
    config = preset("llama-3.1-8b")
    plan = make_plan(config, batch=1, max_seq_len=256, quant=QuantScheme(4, 128))
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    weights = config.num_layers * (config.qkv_size * d + config.q_size * d + 3 * d * f) + v * d
    assert plan.weight_bytes() == weights // 2 + weights // 128 * 2


@pytest.mark.parametrize(("scheme", "batch", "tensor_cores"), [
    (QuantScheme(8), 1, 1), (QuantScheme(4, 128), 1, 1), (QuantScheme(4, 32), 1, 0),
    (QuantScheme(4, 64, symmetric=False), 1, 0), (QuantScheme(4, 32), 2, 1), (None, 1, 0)])
def test_plan_puts_quantized_gemvs_on_tensor_cores(scheme, batch: int, tensor_cores: int) -> None:
    """Quantized batch 1 runs on tensor cores (fp16 converters), except int4 groups under 128,
    which are refused there (wrong results with triton 3.6). There a bf16 model stores its
    GEMV inputs in fp16, the operand dtype of the codes; elsewhere in the model dtype."""
    config = preset("llama-3.2-1b")
    plan = make_plan(config, batch=batch, max_seq_len=256, quant=scheme)
    assert plan.use_dot == bool(tensor_cores or batch > 1)
    assert plan.activation_dtype == (torch.float16 if tensor_cores else torch.bfloat16)
    fp32 = make_plan(config, batch=batch, max_seq_len=256, quant=scheme, dtype=torch.float32)
    assert fp32.activation_dtype == torch.float32
    if not tensor_cores:
        with pytest.raises(ValueError, match="fp16_activations=1"):
            make_plan(config, batch=batch, max_seq_len=256, quant=scheme, fp16_activations=1)
    if scheme and scheme.bits == 4 and batch == 1 and not tensor_cores:
        with pytest.raises(ValueError, match="tensor_cores=1 is not supported"):
            make_plan(config, batch=1, max_seq_len=256, quant=scheme, tensor_cores=1)


# ---------------------------------------------------------------- the kernel


@pytest.mark.skipif(not HAS_CUDA, reason="inline PTX: GPU only")
@pytest.mark.parametrize("signed", [False, True])
def test_ptx_code_converters_are_exact_for_every_byte(signed: bool) -> None:
    """The tensor-core paths' int8 -> fp16 and packed int4 -> fp16 converters, on all 256
    byte values, against torch."""
    import triton
    import triton.language as tl
    from flashformer_triton.kernels import decode

    @triton.jit
    def convert(src, lo_out, hi_out, i8_out, raw_lo_out, raw_hi_out, SIGNED: tl.constexpr):
        idx = tl.arange(0, 256)
        byte = tl.load(src + idx)
        lo, hi = decode._int4_to_f16(byte, SIGNED)
        tl.store(lo_out + idx, lo)
        tl.store(hi_out + idx, hi)
        tl.store(i8_out + idx, decode._int8_to_f16(byte.to(tl.int8, bitcast=True)))
        raw_lo, raw_hi = decode._int4_raw_to_f16(byte)
        tl.store(raw_lo_out + idx, raw_lo)
        tl.store(raw_hi_out + idx, raw_hi)

    codes = torch.arange(256, dtype=torch.uint8, device="cuda")
    lo, hi, i8, raw_lo, raw_hi = (torch.empty(256, dtype=torch.float16, device="cuda")
                                  for _ in range(5))
    # One warp: eight bytes a thread, so each packed run of four is four adjacent bytes, as in
    # the kernel's chunks.
    convert[(1,)](codes, lo, hi, i8, raw_lo, raw_hi, SIGNED=signed, num_warps=1)
    assert torch.equal(i8, codes.view(torch.int8).half())
    # The int4 converters take each word's bytes in the order 0, 2, 1, 3 (the order
    # pack_int4 stores a word's pairs in), minus the zero point or plus the offset-sum
    # converter's 1024 (low nibbles) and 64 (high).
    order = (torch.arange(256, device="cuda").view(-1, 4)[:, [0, 2, 1, 3]]).reshape(-1)
    offset = 8 if signed else 0
    assert torch.equal(lo, ((codes[order] & 15).float() - offset).half())
    assert torch.equal(hi, ((codes[order] >> 4).float() - offset).half())
    assert torch.equal(raw_lo, ((codes[order] & 15).float() + 1024).half())
    assert torch.equal(raw_hi, ((codes[order] >> 4).float() + 64).half())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kernel_int4_asymmetric_every_family(family: str) -> None:
    ffn = FAMILIES[family].kwargs["intermediate_size"]
    overrides = {"intermediate_size": 192} if ffn % 32 else {}  # whole groups of 32
    pair = _pair(family, batch=1, dtype=torch.bfloat16, quant=INT4_ASYM, overrides=overrides)
    _run_and_compare(pair, [5], steps=2, dtype=torch.bfloat16)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_kernel_matches_reference_on_dequantized_weights(scheme: str, batch: str) -> None:
    lengths = BATCHES[batch]
    pair = _pair("qwen2", batch=len(lengths), dtype=torch.bfloat16, quant=SCHEMES[scheme])
    _run_and_compare(pair, lengths, steps=2, dtype=torch.bfloat16)


@pytest.mark.parametrize("scheme", ["int8", "int4-asym"])
def test_kernel_with_activations_in_the_model_dtype(scheme: str) -> None:
    """fp16_activations=0: the tensor-core loops convert bf16 x to the codes' operand dtype
    per chunk (the default stores x in fp16 and is covered above)."""
    lengths = BATCHES["b3-ragged"]
    pair = _pair("llama", batch=len(lengths), dtype=torch.bfloat16, quant=SCHEMES[scheme],
                 fp16_activations=0)
    assert pair.plan.activation_dtype == torch.bfloat16
    _run_and_compare(pair, lengths, steps=2, dtype=torch.bfloat16)


def test_kernel_int8_chunks_as_one_dot() -> None:
    """plain_dot=1 with int8 codes (the plan's rule sets it for model-dtype weights only)."""
    lengths = BATCHES["b3-ragged"]
    pair = _pair("llama", batch=len(lengths), dtype=torch.bfloat16, quant=SCHEMES["int8"],
                 plain_dot=1)
    assert pair.plan.constexprs()["KSPLIT"] == 1
    _run_and_compare(pair, lengths, steps=2, dtype=torch.bfloat16)


@pytest.mark.parametrize("scheme", ["int8", "int4-asym"])
def test_kernel_quantized_down_projection_split_over_f(scheme: str) -> None:
    """down_splits=5 (parts of 32 columns: whole int4 groups) with quantized weights."""
    lengths = BATCHES["b3-ragged"]
    pair = _pair("llama", batch=len(lengths), dtype=torch.bfloat16, quant=SCHEMES[scheme],
                 down_splits=5, block_k=32)
    _run_and_compare(pair, lengths, steps=2, dtype=torch.bfloat16)


# Offset-sum GEMVs: every producer of a GEMV input publishes its offset sums (embed, the
# attention's one-split store and its merge, O-proj, gate/up, down whole or split over F).
OFFSET_SUM_CASES = {
    "llama": ("llama", {}),
    "qwen3": ("qwen3", {}),
    "llama3-one-kv-split": ("llama3_scaled", dict(kv_splits=1)),
    "llama-down-split": ("llama", dict(down_splits=5, block_k=32)),
    "llama-part-empty-tiles": ("llama", dict(o_rows=64, down_rows=64, gate_up_rows=32)),
}


@pytest.mark.parametrize("case", list(OFFSET_SUM_CASES))
def test_kernel_int4_offset_sums(case: str) -> None:
    """offset_sums=1: symmetric int4 codes enter the dot with their operand offsets, which
    come off through the sums x's producers publish (a missing or misplaced sum is off by
    about a thousand times x)."""
    family, tiles = OFFSET_SUM_CASES[case]
    lengths = BATCHES["b3-ragged"]
    pair = _pair(family, batch=len(lengths), dtype=torch.bfloat16, quant=INT4, offset_sums=1,
                 **tiles)
    assert pair.plan.constexprs()["ZERO_POINTS"] == 2
    _run_and_compare(pair, lengths, steps=2, dtype=torch.bfloat16)


def test_kernel_int4_offset_sums_batch_1() -> None:
    """Batch 1 on tensor cores (groups of 128), as the plan runs 8B int4."""
    quant = QuantScheme(4, 128)
    shape = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32)
    pair = _pair("llama", batch=1, dtype=torch.bfloat16, quant=quant, overrides=shape,
                 block_k=128, qkv_block_k=128, tensor_cores=1, offset_sums=1)
    _run_and_compare(pair, [4], steps=2, dtype=torch.bfloat16)


# scale_words=1: symmetric int4 chunks of two or more groups load their scales as 4-byte
# words of two groups each (kernels/decode.py _scale_words) where a row has an even number
# of groups; other rows keep the 2-byte loads. Groups of 128 (what batch 1 on tensor cores takes):
# (hidden size, query heads, intermediate size, block_k).
SCALE_WORD_CASES = {
    "words": (256, 4, 512, 256),  # 2 and 4 groups a row, 2 a chunk
    "words-partial-last-chunk": (768, 12, 512, 512),  # 6 groups: the 2nd chunk's 2nd pair masked
    "odd-groups": (384, 6, 512, 256),  # 3 groups a row on QKV/gate-up: 2-byte loads there
}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", list(SCALE_WORD_CASES))
def test_kernel_int4_scales_as_words(case: str, batch: int) -> None:
    hidden, heads, ffn, block_k = SCALE_WORD_CASES[case]
    shape = dict(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                 num_key_value_heads=2, head_dim=64)
    pair = _pair("llama", batch=batch, dtype=torch.bfloat16, quant=QuantScheme(4, 128),
                 overrides=shape, block_k=block_k, qkv_block_k=block_k, tensor_cores=1,
                 scale_words=1)
    assert pair.plan.use_dot and pair.plan.constexprs()["ZERO_POINTS"] == 0
    _run_and_compare(pair, [4, 9, 2][:batch], steps=2, dtype=torch.bfloat16)


@pytest.mark.parametrize(("quant", "batch", "tiles", "match"), [
    (QuantScheme(8), 3, {}, "symmetric int4 weights on tensor cores"),
    (INT4_ASYM, 3, {}, "symmetric int4 weights on tensor cores"),
    (INT4, 1, {}, "batch 1 with tensor_cores=0"),
    (None, 3, {}, "offset_sums=1 is for symmetric int4 weights"),
    (INT4, 3, dict(dtype=torch.float32), "offset_sums=1 is for bf16/fp16 models"),
])
def test_offset_sums_are_refused_where_they_do_not_apply(quant, batch, tiles, match) -> None:
    config = preset("llama-3.2-1b")
    with pytest.raises(ValueError, match=match):
        make_plan(config, batch=batch, max_seq_len=256, quant=quant, offset_sums=1, **tiles)


@pytest.mark.parametrize("group", [64, 128])
def test_kernel_larger_groups_and_bf16_lm_head(group: int) -> None:
    """Groups of 64/128 (a k-chunk of several groups on the GPU, one on the CPU) with the
    LM head left in bf16; fp32 model so the check is tight."""
    quant = QuantScheme(4, group, symmetric=False, lm_head=False)
    shape = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32)
    tiles = dict(block_k=128, qkv_block_k=128) if DEVICE == "cpu" else {}
    pair = _pair("llama", batch=1, dtype=torch.float32, quant=quant, overrides=shape, **tiles)
    assert pair.weights.scheme.lm_head is False and pair.weights.lm_head.dtype == torch.float32
    _run_and_compare(pair, [4], steps=2, dtype=torch.float32)


def test_quantized_kernel_is_deterministic() -> None:
    pair = _pair("llama", batch=3, dtype=torch.bfloat16, quant=INT4)
    ids = pair.prefill([2, 5, 7])
    pos = torch.tensor([2, 5, 7], device=DEVICE, dtype=torch.int32)
    assert torch.equal(pair.kernel_step(ids, pos), pair.kernel_step(ids, pos))


# ---------------------------------------------------------------- the module


def _teacher_forced_logits(model: FlashFormer, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Prefill `prompt` tokens, then decode the rest one kernel step at a time."""
    model.reset()
    model(ids[:, :prompt], torch.tensor([0], device=ids.device))
    steps = [model(ids[:, t : t + 1], torch.tensor([t], device=ids.device))[0, 0].clone()
             for t in range(prompt, ids.shape[1])]
    return torch.stack(steps)


# Measured on these tiny random models (relative error of the logits, max over 10 steps;
# greedy agreement): int8 ~1.5e-2 and 100%; int4 group 32 ~0.22 and 56-75% (their logits are
# nearly flat, so argmax flips easily). Bounds with margin:
QUALITY = {"int8": (3e-2, 0.9), "int4": (0.35, 0.4)}


@pytest.mark.parametrize("scheme", list(QUALITY))
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_quantized_model_against_the_unquantized_one(family: str, scheme: str) -> None:
    hf = build_hf_model(family, seed=3)
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    ids = torch.randint(0, config.vocab_size, (1, 18), generator=torch.Generator().manual_seed(0))
    ids = ids.to(DEVICE)
    opts = dict(device=DEVICE, max_seq_len=32)
    full = _teacher_forced_logits(FlashFormer(config, hf.state_dict(), **opts), ids, 8)
    model = FlashFormer(config, hf.state_dict(), quantize=scheme,
                        group_size=32 if scheme == "int4" else None, **opts)
    quant = _teacher_forced_logits(model, ids, 8)
    rel = float(((quant - full).norm(dim=-1) / full.norm(dim=-1)).max())
    agree = float((quant.argmax(-1) == full.argmax(-1)).float().mean())
    max_rel, min_agree = QUALITY[scheme]
    print(f"{family} {scheme}: max relative logit error {rel:.3g}, greedy agreement {agree:.0%}")
    assert 0 < rel <= max_rel and agree >= min_agree


def test_prefill_and_decode_use_the_same_dequantized_weights() -> None:
    """Prefill (torch, dequantized copies) and decode (kernel) of a quantized model agree:
    logits of token t from a T-token prefill equal those of decoding token t."""
    model = FlashFormer.from_pretrained("tiny", device=DEVICE, quantize="int4", group_size=32,
                                        symmetric=False, max_seq_len=32)
    ids = torch.randint(0, 263, (1, 9), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    prefilled = model(ids, torch.tensor([0], device=DEVICE))[0, -1]
    model.reset()
    model(ids[:, :8], torch.tensor([0], device=DEVICE))
    decoded = model(ids[:, 8:], torch.tensor([8], device=DEVICE))[0, 0]
    assert_close(decoded, prefilled, rtol_norm=1e-2, name="decode vs prefill")


def test_quantized_state_dict_round_trip() -> None:
    kw = dict(device=DEVICE, quantize="int4", group_size=32, symmetric=False, max_seq_len=32)
    a = FlashFormer.from_preset("tiny", seed=1, **kw)
    b = FlashFormer.from_preset("tiny", seed=2, **kw)
    sd = a.state_dict()
    assert sd["arena"].dtype == torch.uint8 and sd["zeros"].dtype == torch.uint8
    assert sd["scales"].dtype == torch.float16 and "lm_scales" in sd
    b.load_state_dict(sd)
    ids = torch.tensor([[3, 1, 4, 1, 5]], device=DEVICE)
    assert torch.equal(a.generate(ids, max_new_tokens=3), b.generate(ids, max_new_tokens=3))
    assert "int4 (group 32, asymmetric)" in repr(a)
    # Hugging Face names give the dequantized weights.
    hf = a.hf_state_dict()
    assert hf["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("layout", [None, 1, 3])
def test_int4_state_dict_of_another_layout_is_refused(layout: int | None) -> None:
    """An int4 arena packed in another layout (None: by a version before the key) would
    decode to wrong weights: load_state_dict refuses it."""
    kw = dict(device=DEVICE, quantize="int4", group_size=32, max_seq_len=32)
    model = FlashFormer.from_preset("tiny", seed=1, **kw)
    sd = model.state_dict()
    assert int(sd["int4_layout"]) == INT4_LAYOUT
    if layout is None:
        del sd["int4_layout"]
    else:
        sd["int4_layout"] = torch.tensor(layout)
    with pytest.raises(ValueError, match=f"packed in layout {layout or 1}.*reads layout 2"):
        model.load_state_dict(sd)


def test_quantize_on_a_prequantized_state_with_another_scheme_is_refused() -> None:
    config = preset("tiny")
    state = quantize_state(config.num_layers, random_state_dict(config), INT8)
    with pytest.raises(ValueError, match="already quantized as int8"):
        FlashFormer(config, state, device=DEVICE, quantize="int4", group_size=32)


# ---------------------------------------------------------------- GPTQ / AWQ checkpoints


def _write_prequantized(tmp_path, family: str, method: str, symmetric: bool):
    """A tiny checkpoint in GPTQ or AWQ format, packed by the test's own encoders from codes
    our quantize() produced; returns (directory, the same weights as QuantizedLinears)."""
    hf = build_hf_model(family, seed=5)
    hf_cfg = hf.config.to_dict()
    config = ModelConfig.from_hf_dict(hf_cfg)
    state = {k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()}
    scheme = QuantScheme(4, 32, symmetric=symmetric, lm_head=False)
    ours = quantize_state(config.num_layers, state, scheme)
    tensors = {k: v.contiguous() for k, v in state.items()
               if not any(k.endswith(f"{m}.weight") for m in LAYER_LINEARS)}
    for name, ql in ours.items():
        if not isinstance(ql, QuantizedLinear):
            continue
        prefix = name[: -len(".weight")]
        q = unpack_int4(ql.qweight).long()
        zeros = (torch.full_like(ql.scales, 8, dtype=torch.long) if ql.zeros is None
                 else ql.zeros.long()).T.contiguous()
        scales = ql.scales.T.contiguous()
        if method == "gptq":
            g_idx = torch.arange(q.shape[1]) // 32
            tensors.update(encode_gptq(q, zeros, scales, g_idx, prefix=prefix))
        else:
            tensors.update(encode_awq(q, zeros, scales, prefix=prefix))
    if method == "gptq":
        qcfg = dict(quant_method="gptq", bits=4, group_size=32, sym=symmetric, desc_act=False,
                    checkpoint_format="gptq")
    else:
        qcfg = dict(quant_method="awq", bits=4, group_size=32, zero_point=True, version="gemm")
    hf_cfg["quantization_config"] = qcfg
    hf_cfg["torch_dtype"] = "bfloat16"
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg, default=str))
    return tmp_path, config, ours


@pytest.mark.parametrize(
    "method, symmetric, family",
    [("gptq", True, "llama"), ("gptq", False, "qwen2"), ("awq", False, "llama3_scaled")],
)
def test_prequantized_checkpoint_loads_exactly(tmp_path, method, symmetric, family) -> None:
    path, config, ours = _write_prequantized(tmp_path, family, method, symmetric)
    model = FlashFormer.from_pretrained(path, device=DEVICE, max_seq_len=32)
    assert model.quant == QuantScheme(4, 32, symmetric=symmetric)
    assert model.quant.lm_head is False  # the format leaves the LM head in bf16
    direct = FlashFormer(config, ours, device=DEVICE, max_seq_len=32)
    for name in ("arena", "scales", "zeros", "embed"):
        assert torch.equal(getattr(model, name), getattr(direct, name)), name
    ids = torch.tensor([[7, 8, 9, 10]], device=DEVICE)
    assert torch.equal(model.generate(ids, max_new_tokens=3),
                       direct.generate(ids, max_new_tokens=3))


def test_prequantized_checkpoint_errors(tmp_path) -> None:
    path, _, _ = _write_prequantized(tmp_path, "llama", "gptq", True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 8
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="bits"):
        FlashFormer.from_pretrained(path, device=DEVICE)
