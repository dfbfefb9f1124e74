"""Real model shapes on the GPU (random bf16 weights): logits match the reference, and one
decode step is exactly one kernel launch. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers import GPU_ORACLE, HAS_CUDA, assert_close

from flashformer_triton.config import preset
from flashformer_triton.loading import random_state_dict
from flashformer_triton.plan import make_plan
from flashformer_triton.reference import ReferenceModel
from flashformer_triton.runtime import DecodeRuntime
from flashformer_triton.weights import pack_weights

pytestmark = pytest.mark.gpu

MAX_SEQ = 32064  # room for position 32000


def random_model(shape: str, *, max_batch: int, max_seq: int, ref_dtype: torch.dtype,
                 **ref_options):
    """Random bf16 weights of a preset shape, packed for the kernel, and the reference model
    on the same weights (GPU only)."""
    if not HAS_CUDA:
        pytest.skip("needs CUDA")
    config = preset(shape)
    state = random_state_dict(config, seed=0, dtype=torch.bfloat16, device="cuda")
    weights = pack_weights(config, state, dtype=torch.bfloat16, device="cuda")
    ref = ReferenceModel(config, state, max_batch_size=max_batch, max_seq_len=max_seq,
                         dtype=ref_dtype, device="cuda", **ref_options)
    del state
    torch.cuda.empty_cache()
    return config, weights, ref


@pytest.fixture(scope="module", params=list(GPU_ORACLE))
def model(request):
    ref_dtype, tolerance = GPU_ORACLE[request.param]
    config, weights, ref = random_model(request.param, max_batch=8, max_seq=MAX_SEQ,
                                        ref_dtype=ref_dtype, check_positions=False)
    yield config, weights, ref, tolerance
    del weights, ref
    torch.cuda.empty_cache()


@pytest.mark.parametrize("pos", [512, 32000])
@pytest.mark.parametrize("batch", [1, 8])
def test_real_shape_matches_reference(model, batch: int, pos: int) -> None:
    check_step(model, batch, pos, MAX_SEQ)


def test_batch16_one_attention_split() -> None:
    """Batch 16 on a 1024-position cache, where the plan takes one attention task per
    (sequence, kv head) on an H100 and that task writes the output itself (no merge), and
    multiplies each weight chunk as one 2-D dot (plain_dot); ragged positions up to 1000, so
    a task runs up to 16 cache blocks."""
    ref_dtype, tolerance = GPU_ORACLE["llama-3.2-1b"]
    config, weights, ref = random_model("llama-3.2-1b", max_batch=16, max_seq=1024,
                                        ref_dtype=ref_dtype, check_positions=False)
    check_step((config, weights, ref, tolerance), 16, 1000, 1024, kv_splits=1)


def check_step(model, batch: int, pos: int, max_seq: int, **tiles: int) -> None:
    config, weights, ref, tolerance = model
    plan = make_plan(config, batch=batch, max_seq_len=max_seq, dtype=torch.bfloat16, **tiles)
    gen = torch.Generator(device="cuda").manual_seed(pos + batch)
    # Ragged positions around `pos`; the same random (bf16) history below each in both caches.
    positions = torch.tensor([max(0, pos - 37 * i) for i in range(batch)], device="cuda")
    if ref.cache.k.dtype == torch.bfloat16 and batch == ref.max_batch_size:
        # 8B at batch 8 only fits with one shared cache: the kernel writes the new position
        # first, then the reference overwrites it with its own values before reading.
        k, v = ref.cache.k, ref.cache.v
    else:
        k, v = (torch.empty(ref.cache.k[:, :batch].shape, dtype=torch.bfloat16, device="cuda")
                for _ in range(2))
    for mine, theirs in ((k, ref.cache.k), (v, ref.cache.v)):
        mine[:, :, :, : pos + 1].normal_(generator=gen)
        if mine is not theirs:
            theirs[:, :batch, :, : pos + 1].copy_(mine[:, :, :, : pos + 1])
    runtime = DecodeRuntime(config, weights, plan, k, v)
    ids = torch.randint(0, config.vocab_size, (batch,), device="cuda", generator=gen)
    for buf in runtime.workspaces().values():
        buf.fill_(float("nan"))
    out = runtime.step(ids.int(), positions.int()).clone()
    want = ref(ids[:, None], positions)[:, 0]
    assert_close(out, want, rtol_norm=tolerance, name=f"{plan.config.family} b{batch} p{pos}")
    # The kernel's top token is one of the reference's best, to within the error just checked:
    # random weights give near-flat logits, and the bf16 reference has exact ties at its top
    # (8B batch 8: a 0.0 margin), so "the reference's argmax is in our top 5" was chance.
    rms_error = (out - want).float().norm(dim=-1) / out.shape[-1] ** 0.5
    picked = want.gather(-1, out.argmax(-1, keepdim=True))[:, 0]
    shortfall = want.max(-1).values - picked
    assert (shortfall <= 6 * rms_error).all(), (
        f"kernel's top token is {shortfall.tolist()} below the reference's best "
        f"(rms logit error {rms_error.tolist()})")


def test_one_kernel_per_step(model) -> None:
    config, weights, _, _ = model
    plan = make_plan(config, batch=1, max_seq_len=1024, dtype=torch.bfloat16)
    cache = torch.zeros(config.num_layers, 1, config.num_kv_heads, 1024, config.head_dim,
                        dtype=torch.bfloat16, device="cuda")
    runtime = DecodeRuntime(config, weights, plan, cache, cache.clone())
    runtime.pos.fill_(100)
    runtime.launch()  # compile outside the trace
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        runtime.launch()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert kernels == ["decode_step_kernel"], kernels
