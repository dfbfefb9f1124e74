"""int8 / int4 weights at real shapes on the GPU: the kernel against the reference model run
on the dequantized weights. Skipped without CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import GPU_ORACLE as ORACLE
from helpers import HAS_CUDA, assert_close

from flashformer_triton.config import preset
from flashformer_triton.loading import random_state_dict
from flashformer_triton.plan import make_plan
from flashformer_triton.quantize import QuantScheme, dequantize_state, quantize_state
from flashformer_triton.reference import ReferenceModel
from flashformer_triton.runtime import DecodeRuntime
from flashformer_triton.weights import pack_weights

pytestmark = pytest.mark.gpu

MAX_SEQ = 1024
# Batch > 1 runs the GEMVs as 3-D dots over the batch (other operand layouts, other loops).
BATCH_POSITIONS = (100, 311, 512, 700)
SCHEMES = {"int8": QuantScheme(8), "int4-g128": QuantScheme(4, 128),
           "int4-g64-asym": QuantScheme(4, 64, symmetric=False)}
# The plans each scheme is checked with: symmetric int4 in both forms of its GEMV, and with
# the publishing fence probing the next task's counter (early_probe 2), and with each task
# hinting its next task's first chunk before signalling (next_hint).
PLANS = {"int4-g128": [dict(offset_sums=0), dict(offset_sums=1), dict(early_probe=2),
                      dict(next_hint=2)],
         "int8": [{}, dict(next_hint=1)]}


@pytest.fixture(scope="module", params=[(s, q) for s in ORACLE for q in SCHEMES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def quantized(request):
    if not HAS_CUDA:
        pytest.skip("needs CUDA")
    shape, scheme = request.param
    config = preset(shape)
    state = random_state_dict(config, seed=0, dtype=torch.bfloat16, device="cuda")
    state = quantize_state(config.num_layers, state, SCHEMES[scheme],
                           tied=config.tie_word_embeddings)
    weights = pack_weights(config, state, dtype=torch.bfloat16, device="cuda")
    ref_dtype, tolerance = ORACLE[shape]
    ref_config = dataclasses.replace(config, tie_word_embeddings=False)  # own (quantized) head
    ref = ReferenceModel(ref_config, dequantize_state(state, torch.float32),
                         max_batch_size=len(BATCH_POSITIONS), max_seq_len=MAX_SEQ,
                         dtype=ref_dtype, device="cuda")
    del state
    torch.cuda.empty_cache()
    yield config, weights, ref, tolerance, PLANS.get(scheme, [{}])
    del weights, ref
    torch.cuda.empty_cache()


def _check_step(config, weights, ref, tolerance, positions: tuple[int, ...], plans) -> None:
    """One decode step of len(positions) sequences (random caches up to each position) in
    each plan, against the reference model's step on the same caches."""
    batch = len(positions)
    gen = torch.Generator(device="cuda").manual_seed(sum(positions))
    shape = (config.num_layers, batch, *ref.cache.k.shape[2:])
    k, v = (torch.empty(shape, dtype=torch.bfloat16, device="cuda") for _ in "kv")
    for mine, theirs in ((k, ref.cache.k), (v, ref.cache.v)):
        for b, pos in enumerate(positions):
            mine[:, b, :, : pos + 1].normal_(generator=gen)
            theirs[:, b, :, : pos + 1].copy_(mine[:, b, :, : pos + 1])
    ids = torch.randint(0, config.vocab_size, (batch,), device="cuda", generator=gen)
    pos = torch.tensor(positions, device="cuda", dtype=torch.int32)
    want = ref(ids[:, None], pos.long())[:, 0]
    for tiles in plans:
        plan = make_plan(config, batch=batch, max_seq_len=MAX_SEQ, quant=weights.scheme,
                         **tiles)
        runtime = DecodeRuntime(config, weights, plan, k, v)
        for buf in runtime.workspaces().values():
            buf.fill_(float("nan"))
        out = runtime.step(ids.int(), pos)
        assert_close(out, want, rtol_norm=tolerance,
                     name=f"{config.family} batch {batch} {plan.quant.describe()} {tiles}")
        del runtime


def test_quantized_real_shape_matches_reference(quantized) -> None:
    config, weights, ref, tolerance, plans = quantized
    _check_step(config, weights, ref, tolerance, (512,), plans)


def test_quantized_batch_matches_reference(quantized) -> None:
    config, weights, ref, tolerance, plans = quantized
    # (next_hint is a batch-1 tile: no default turns it on for batch > 1.)
    _check_step(config, weights, ref, tolerance, BATCH_POSITIONS,
                [tiles for tiles in plans if "next_hint" not in tiles])
