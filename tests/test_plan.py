"""The metaprogram: task table shape, order, counters and byte accounting (no kernel runs)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from flashformer_triton.config import PRESETS, UnsupportedModelError, preset
from flashformer_triton.loading import random_state_dict
from flashformer_triton.plan import (
    NO_COUNTER,
    TASK_FIELDS,
    GpuSpec,
    Op,
    default_tiles,
    make_plan,
    triton_ptx_version,
)
from flashformer_triton.weights import pack_weights

# An H100 under triton 3.6, whose ptxas (CUDA 12.8) takes PTX 8.7.
H100 = GpuSpec("NVIDIA H100 80GB HBM3", 132, arch=90, ptx_version=87)
CASES = {
    "tiny-b1": ("tiny", 1, {}),
    "tiny-b3": ("tiny", 3, {}),
    "1b-b1": ("llama-3.2-1b", 1, {}),
    "1b-b1-down4": ("llama-3.2-1b", 1, {"down_splits": 4}),
    "8b-b8": ("llama-3.1-8b", 8, {}),
    "3b-b16-kv1": ("llama-3.2-3b", 16, {"kv_splits": 1}),
    "8b-b1-down2": ("llama-3.1-8b", 1, {"down_splits": 2}),
    "qwen3-8b-b4": ("qwen3-8b", 4, {}),
}


@pytest.fixture(params=list(CASES))
def plan(request):
    name, batch, tiles = CASES[request.param]
    return make_plan(preset(name), batch=batch, max_seq_len=4096, gpu=H100, **tiles)


def test_table_is_topological_and_targets_count_producers(plan) -> None:
    """Every wait is for a counter whose producers all come earlier in the table, and its
    target is exactly their number: one program running the table in order never blocks."""
    signalled: Counter[int] = Counter()
    for i, t in enumerate(plan.tasks):
        if t.wait_counter != NO_COUNTER:
            assert signalled[t.wait_counter] >= t.wait_target, (
                f"task {i} {t} waits on {plan.counter_names[t.wait_counter]} before its "
                f"producers ({signalled[t.wait_counter]} of {t.wait_target})"
            )
            assert t.wait_target == plan.counter_targets[t.wait_counter]
        if t.aux_counter != NO_COUNTER:
            # Tasks arrive on their own counter; the last one signals for all of them.
            signalled[t.aux_counter] += 1
            if signalled[t.aux_counter] == plan.counter_targets[t.aux_counter]:
                signalled[t.signal_counter] += 1
        elif t.signal_counter != NO_COUNTER:
            signalled[t.signal_counter] += 1
    for counter, target in enumerate(plan.counter_targets):
        name = plan.counter_names[counter]
        assert signalled[counter] == target, name
        if ".attn[" in name and name.endswith(".arrive"):  # splits of one (sequence, kv head)
            assert target == plan.tiles.kv_splits
        elif ".down[" in name and name.endswith(".arrive"):  # parts of one row tile
            assert target == plan.tiles.down_splits > 1
        elif name.endswith(".arrive"):  # chunks of one qk-norm head
            assert plan.config.qk_norm and target == plan.config.head_dim // plan.tiles.qkv_rows


def test_every_signalled_counter_has_a_waiter(plan) -> None:
    """A release costs a task a round trip: no task signals a counter that nothing waits on
    (the LM head, whose logits the host reads after the launch, signals none)."""
    waited = {t.wait_counter for t in plan.tasks}
    arrivals = {t.aux_counter for t in plan.tasks} - {NO_COUNTER}
    signalled = {t.signal_counter for t in plan.tasks} - {NO_COUNTER}
    assert signalled <= waited, [plan.counter_names[c] for c in signalled - waited]
    assert set(range(plan.num_counters)) == signalled | arrivals
    assert all(t.signal_counter == NO_COUNTER for t in plan.tasks if t.op == Op.LMHEAD)


def test_tasks_per_op_match_the_shapes(plan) -> None:
    c, t, B = plan.config, plan.tiles, plan.batch
    per_op = Counter(task.op for task in plan.tasks)
    L = c.num_layers
    assert per_op[Op.EMBED] == -(-c.hidden_size // t.down_rows)
    heads = c.num_heads + 2 * c.num_kv_heads
    assert per_op[Op.QKV] == L * heads * (c.head_dim // t.qkv_rows)
    assert per_op[Op.ATTN] == L * B * c.num_kv_heads * t.kv_splits
    assert per_op[Op.OPROJ] == L * -(-c.hidden_size // t.o_rows)
    assert per_op[Op.GATEUP] == L * -(-c.intermediate_size // t.gate_up_rows)
    assert per_op[Op.DOWN] == L * -(-c.hidden_size // t.down_rows) * t.down_splits
    assert per_op[Op.LMHEAD] == -(-c.vocab_size // t.lm_rows)
    table = plan.table()
    assert table.dtype == torch.int32 and tuple(table.shape) == (plan.num_tasks, len(TASK_FIELDS))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("name", ["tiny", "llama-3.2-1b"])
def test_weight_bytes_equal_what_the_arena_holds(name: str, split: bool) -> None:
    """The tasks' tiles cover every matrix element exactly once (bytes counted from the
    table) and nothing else: they equal the packed arena plus the LM head (also with the
    down projection split over F)."""
    config = preset(name)
    parts = {"tiny": 5, "llama-3.2-1b": 4}[name]  # tiny: F = 160
    tiles = {"down_splits": parts, "block_k": 32} if split else {}
    plan = make_plan(config, batch=1, max_seq_len=256, gpu=H100, **tiles)
    if name == "tiny":
        weights = pack_weights(config, random_state_dict(config), dtype=torch.bfloat16)
        streamed = (weights.arena.numel() + weights.lm_head.numel()) * 2
    else:  # do not materialise 2.5 GB here: the same count from the config
        d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
        per_layer = config.qkv_size * d + config.q_size * d + 3 * d * f
        streamed = (config.num_layers * per_layer + v * d) * 2
    assert plan.weight_bytes() == streamed


def test_kv_bytes_and_floor() -> None:
    config = preset("llama-3.1-8b")
    plan = make_plan(config, batch=2, max_seq_len=4096, gpu=H100)
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2  # k+v, bf16
    assert plan.kv_bytes([511, 99]) == (512 + 100) * per_token
    floor = plan.floor_ms([511, 99], 3.0e12)
    assert floor == pytest.approx((plan.weight_bytes() + plan.kv_bytes([511, 99])) / 3.0e9)


def test_summary_is_one_screen(plan) -> None:
    text = plan.summary()
    assert len(text.splitlines()) <= 12
    assert f"{plan.num_tasks} tasks" in text and "GB" in text


@pytest.mark.parametrize(
    ("shape", "batch", "weights", "cache", "expected"),
    [
        # Down projection in halves of F with about one task per program, where the FMA path
        # keeps 16 rows or fewer; L2 hints of a quarter of the hidden size (512..1024);
        # O-proj on at most one task per program; batch 1: an attention split per 64 cache
        # positions, up to one task per program (264 / 8 kv heads -> 32). Pipeline stages:
        # about 1024 columns in flight, one stage fewer from batch 8, not below 3.
        ("llama-3.2-1b", 1, None, 4096, dict(down_splits=2, down_rows=16, l2_prefetch_k=512,
                                             o_rows=16, kv_splits=32, pipeline_stages=5)),
        ("llama-3.1-8b", 1, None, 4096, dict(down_splits=1, down_rows=16, l2_prefetch_k=1024,
                                             o_rows=16, kv_splits=32, early_probe=0,
                                             next_hint=0)),
        # The early counter probe on 8B's quantized tensor-core GEMVs at batch 1 (int8: with
        # the bare acquire fence, test_acquire_fence_needs_ptx_8_6_on_sm_90); int8 there
        # also hints each program's next first chunk before signalling.
        ("llama-3.1-8b", 1, "int8", 4096, dict(down_splits=2, down_rows=32, tensor_cores=1,
                                               qkv_rows=16, qkv_block_k=512, gate_up_rows=16,
                                               lm_rows=16, early_probe=1, next_hint=1)),
        # int4 at batch 1 on tensor cores: 32-row QKV, gate/up and LM-head tiles; QKV chunks
        # of about 16 KB of weights, as in the model dtype (not 8K elements); 32-row O-proj
        # tiles, 64-row LM-head tiles, the early counter probe and the scales as words where
        # that still gives a task per SM (8B, not 1B).
        ("llama-3.1-8b", 1, "int4", 4096, dict(tensor_cores=1, qkv_rows=32, qkv_block_k=512,
                                               gate_up_rows=32, lm_rows=64, o_rows=32,
                                               down_rows=32, early_probe=1, next_hint=0,
                                               scale_words=1)),
        ("llama-3.2-1b", 1, "int4", 4096, dict(tensor_cores=1, qkv_rows=32, gate_up_rows=32,
                                               lm_rows=32, o_rows=16, early_probe=0,
                                               scale_words=0)),
        ("llama-3.1-8b", 4, "int4", 4096, dict(early_probe=0, next_hint=0, scale_words=0)),
        ("llama-3.1-8b", 4, None, 4096, dict(down_splits=2, down_rows=32, kv_splits=8)),
        # Chunks as one 2-D dot at batch > 8 up to 3072 hidden (1B, 3B; not 8B, batch 8, int8),
        # and with it down halves of at least 32 rows.
        ("llama-3.1-8b", 16, None, 4096, dict(down_splits=2, down_rows=32, o_rows=32, kv_splits=2,
                                              pipeline_stages=3, plain_dot=0)),
        ("llama-3.2-1b", 8, None, 4096, dict(pipeline_stages=4, plain_dot=0)),
        ("llama-3.2-1b", 16, None, 4096, dict(down_splits=2, down_rows=32, o_rows=16,
                                              pipeline_stages=4, plain_dot=1)),
        ("llama-3.2-1b", 16, "int8", 4096, dict(plain_dot=0)),
        # A hidden size that is no power of two: hints of 512 columns (768 rounded down);
        # at batch 16 its 96 O-proj tiles of 32 rows.
        ("llama-3.2-3b", 4, None, 4096, dict(l2_prefetch_k=512, o_rows=16)),
        ("llama-3.2-3b", 16, None, 4096, dict(l2_prefetch_k=512, o_rows=32, kv_splits=2,
                                              plain_dot=1)),
        # A short cache at batch 16: one attention task per (sequence, kv head), no merge.
        ("llama-3.2-1b", 16, None, 1024, dict(kv_splits=1)),
        ("llama-3.1-8b", 16, None, 1024, dict(kv_splits=1, o_rows=32)),
        ("llama-3.1-8b", 8, None, 1024, dict(kv_splits=4)),
        # Batch 1: one 64-position block a split at every position of the cache, a power of
        # two rounded up while it leaves a split a program (8 kv heads, 264 programs: 32).
        ("llama-3.1-8b", 1, "int4", 576, dict(kv_splits=16)),
        ("llama-3.1-8b", 1, None, 1024, dict(kv_splits=16)),
        ("llama-3.1-8b", 1, None, 1100, dict(kv_splits=32)),
        ("llama-3.1-8b", 1, None, 32064, dict(kv_splits=32)),
        ("llama-3.2-1b", 1, None, 100, dict(kv_splits=2)),
        # Batch > 1 rounds down, as before (256 positions a split at least).
        ("llama-3.1-8b", 4, None, 576, dict(kv_splits=2)),
    ],
)
def test_default_tiles_on_an_h100(shape: str, batch: int, weights: str | None, cache: int,
                                  expected: dict) -> None:
    from flashformer_triton.quantize import QuantScheme

    quant = {"int8": QuantScheme(bits=8), "int4": QuantScheme(bits=4, group_size=128),
             None: None}[weights]
    tiles = default_tiles(preset(shape), batch, cache, H100, quant)
    assert tiles.static_schedule == 1
    assert {name: getattr(tiles, name) for name in expected} == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(block_k=100), "block_k=100 must be a power of two"),
        (dict(qkv_rows=3), "qkv_rows=3 must be a power of two"),
        (dict(kv_splits=0), "kv_splits=0 must be >= 1"),
        (dict(attention_stages=0), "attention_stages=0 must be >= 1"),
        (dict(o_rows=8), "o_rows=8 must be a power of two >= 16"),  # batch 3 uses tl.dot
        (dict(down_splits=3), "down_splits=3 must be 1..8 .* and, above 1, cut"),  # F=160
        (dict(down_splits=0), "down_splits=0 must be 1..8"),
        (dict(down_splits=10, block_k=16), "down_splits=10 must be 1..8"),  # F=160: it cuts
    ],
)
def test_bad_tiles_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_plan(PRESETS["tiny"], batch=3, max_seq_len=64, gpu=H100, **overrides)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(batch=17), ValueError, "batch=17 is outside the supported range 1..16"),
        (dict(batch=0), ValueError, "batch=0 is outside"),
        (dict(max_seq_len=0), ValueError, "max_seq_len=0 must be positive"),
    ],
)
def test_bad_plan_arguments(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        make_plan(PRESETS["tiny"], **kwargs)


def test_head_dim_not_power_of_two_is_unsupported() -> None:
    import dataclasses

    config = dataclasses.replace(PRESETS["tiny"], head_dim=24)
    with pytest.raises(UnsupportedModelError, match="head_dim=24 must be a power of two"):
        make_plan(config)


@pytest.mark.parametrize(("gpu", "tile", "expected"),
                         [(H100, 1, 1), (H100, 2, 2), (H100, 0, 0), (GpuSpec.current("cpu"), 1, 0),
                          (GpuSpec.current("cpu"), 2, 0)])
def test_early_probe_reaches_the_kernel_on_a_gpu_only(gpu: GpuSpec, tile: int,
                                                      expected: int) -> None:
    # The probe and its fence are inline PTX: the interpreter keeps polling as before.
    plan = make_plan(preset("llama-3.2-1b"), batch=1, max_seq_len=256, gpu=gpu, early_probe=tile)
    assert plan.constexprs()["EARLY_PROBE"] == expected


@pytest.mark.parametrize(
    ("gpu", "fence", "int8_probe"),
    [(H100, True, 1),
     (GpuSpec("NVIDIA H100 80GB HBM3", 132, arch=90, ptx_version=85), False, 0),  # CUDA 12.5
     (GpuSpec("NVIDIA A100-SXM4-80GB", 108, arch=80, ptx_version=87), False, 0),
     (GpuSpec("NVIDIA H100 80GB HBM3", 132), False, 0),  # compiler not known
     (GpuSpec.current("cpu"), False, 0)])
def test_acquire_fence_needs_ptx_8_6_on_sm_90(gpu: GpuSpec, fence: bool, int8_probe: int) -> None:
    # fence.acquire is PTX 8.6 and sm_90; elsewhere the probe's fence stays fence.acq_rel,
    # with which 8B int8 was faster without the probe.
    from flashformer_triton.quantize import QuantScheme

    plan = make_plan(preset("llama-3.1-8b"), batch=1, max_seq_len=1024, gpu=gpu,
                     quant=QuantScheme(bits=8))
    assert plan.constexprs()["ACQUIRE_FENCE"] is fence
    assert plan.tiles.early_probe == int8_probe


def test_triton_ptx_version_is_a_version_or_zero() -> None:
    version = triton_ptx_version()
    assert isinstance(version, int)
    assert version == 0 or 60 <= version < 200


@pytest.mark.parametrize("name", ["early_probe", "next_hint", "scale_words"])
@pytest.mark.parametrize("tile", [-1, 3])
def test_probe_and_hint_tiles_out_of_range_are_refused(name: str, tile: int) -> None:
    with pytest.raises(ValueError, match=f"{name}={tile} must be 0"):
        make_plan(preset("llama-3.2-1b"), batch=1, max_seq_len=256, gpu=H100, **{name: tile})
