"""The persistent decode kernel against the torch reference.

On a CPU these run the real kernel in the Triton interpreter (one program takes the whole
topologically ordered table); on a GPU the same tests run compiled. The oracle is the
reference in fp32 on the kernel's own weights (rounded to its dtype first), so a bf16 kernel
is judged on its activation rounding only. The reference prefills; its cache is copied into
the kernel's cache, and from there each keeps its own cache.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from helpers import FAMILIES, HAS_CUDA, assert_close, build_hf_model

from flashformer_triton.config import ModelConfig
from flashformer_triton.plan import make_plan
from flashformer_triton.quantize import (
    QuantizedLinear,
    QuantScheme,
    dequantize_state,
    quantize_state,
)
from flashformer_triton.reference import ReferenceModel
from flashformer_triton.runtime import DecodeRuntime, KernelHangError, resident_programs_per_sm
from flashformer_triton.weights import pack_weights

DEVICE = "cuda" if HAS_CUDA else "cpu"
# Small tiles on the interpreter so every loop runs several chunks; real tiles on the GPU.
CPU_TILES = dict(block_k=32, qkv_block_k=32, block_s=16, kv_splits=3, lm_rows=64)
# bf16: the kernel rounds each GEMV's input (normed h, attention and SwiGLU outputs) to bf16,
# as transformers does, where the oracle keeps fp32 (measured up to 1.2e-2 on the tiny models).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


class Pair:
    """A reference model and a kernel runtime over the same weights and KV cache."""

    def __init__(self, config: ModelConfig, state: dict, *, batch: int, dtype: torch.dtype,
                 max_seq_len: int = 48, quant: QuantScheme | None = None, **tiles: int) -> None:
        self.config = config
        ref_config = config
        if quant is not None:
            # Oracle weights: what the kernel multiplies with. Batch 1 dequantizes in fp32;
            # on the GPU batch > 1 rounds the dequantized tile to the model dtype for tl.dot
            # (the interpreter keeps fp32: its fp32 -> bf16 conversion truncates).
            state = quantize_state(config.num_layers, state, quant,
                                   tied=config.tie_word_embeddings)
            exact = batch == 1 or DEVICE == "cpu"
            oracle = dequantize_state(state, torch.float32 if exact else dtype)
            if quant.lm_head:  # its own (quantized) copy even when the embeddings are tied
                ref_config = dataclasses.replace(config, tie_word_embeddings=False)
        else:
            oracle = state
        # Dequantized matrices are the kernel's weights already; the rest is rounded to dtype.
        quantized = {name for name, v in state.items() if isinstance(v, QuantizedLinear)}
        rounded = {name: t.float() if name in quantized else t.to(dtype).float()
                   for name, t in oracle.items()}
        self.ref = ReferenceModel(ref_config, rounded, max_batch_size=batch,
                                  max_seq_len=max_seq_len, dtype=torch.float32, device=DEVICE)
        self.weights = pack_weights(config, state, dtype=dtype, device=DEVICE)
        tiles = {**(CPU_TILES if DEVICE == "cpu" else {}), **tiles}
        self.plan = make_plan(config, batch=batch, max_seq_len=max_seq_len, dtype=dtype,
                              quant=self.weights.scheme, **tiles)
        cache = torch.empty_like(self.ref.cache.k, dtype=dtype)
        self.runtime = DecodeRuntime(config, self.weights, self.plan, cache, cache.clone())

    def prefill(self, lengths: list[int], seed: int = 0) -> torch.Tensor:
        """Prefill ragged prompts slot by slot; returns the next token ids [B]."""
        gen = torch.Generator().manual_seed(seed)
        last = []
        for slot, n in enumerate(lengths):
            ids = torch.randint(0, self.config.vocab_size, (1, n), generator=gen).to(DEVICE)
            logits = self.ref(ids, torch.zeros(1, dtype=torch.long, device=DEVICE),
                              batch_index=torch.tensor([slot], device=DEVICE))
            last.append(logits[0, -1].argmax())
        self.runtime.k_cache.copy_(self.ref.cache.k)
        self.runtime.v_cache.copy_(self.ref.cache.v)
        return torch.stack(last)

    def kernel_step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One kernel step with every workspace poisoned first (unwritten -> NaN)."""
        for buf in self.runtime.workspaces().values():
            buf.fill_(float("nan"))
        return self.runtime.step(ids, pos).clone()

    def reference_step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.ref(ids[:, None].long(), pos.long())[:, 0]


def _pair(family: str, *, batch: int, dtype: torch.dtype, **kw) -> Pair:
    overrides = kw.pop("overrides", {})
    hf = build_hf_model(family, seed=1, **overrides)
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    return Pair(config, hf.state_dict(), batch=batch, dtype=dtype, **kw)


def _run_and_compare(pair: Pair, lengths: list[int], steps: int, dtype: torch.dtype) -> None:
    ids = pair.prefill(lengths)
    pos = torch.tensor(lengths, device=DEVICE, dtype=torch.int32)
    for step in range(steps):
        out = pair.kernel_step(ids, pos)
        ref = pair.reference_step(ids, pos)
        assert_close(out, ref, rtol_norm=TOLERANCE[dtype], name=f"step {step} logits")
        ids, pos = ref.argmax(-1), pos + 1


BATCHES = {"b1": [5], "b3-ragged": [3, 9, 1]}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_matches_reference_fp32(family: str, batch: str) -> None:
    lengths = BATCHES[batch]
    pair = _pair(family, batch=len(lengths), dtype=torch.float32)
    _run_and_compare(pair, lengths, steps=3, dtype=torch.float32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_matches_reference_bf16(family: str) -> None:
    pair = _pair(family, batch=3, dtype=torch.bfloat16)
    _run_and_compare(pair, [4, 11, 2], steps=2, dtype=torch.bfloat16)


# GQA ratios 1, 2 and 4 on odd sizes (hidden not a multiple of the k-chunk, q_size != hidden).
SHAPES = {
    "gqa1-hidden100": dict(hidden_size=100, num_attention_heads=4, num_key_value_heads=4,
                           head_dim=16, intermediate_size=150),
    "gqa2-hidden72": dict(hidden_size=72, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=32, intermediate_size=200),
    "gqa4-hidden88": dict(hidden_size=88, num_attention_heads=8, num_key_value_heads=2,
                          head_dim=16, intermediate_size=96),
}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_decode_odd_shapes(shape: str, batch: str) -> None:
    lengths = BATCHES[batch]
    pair = _pair("llama", batch=len(lengths), dtype=torch.float32, overrides=SHAPES[shape])
    _run_and_compare(pair, lengths, steps=2, dtype=torch.float32)


def test_partial_rope_chunks_batch1() -> None:
    """A head split over several QKV tasks (4 rows = 2 rotary pairs each)."""
    pair = _pair("llama3_scaled", batch=1, dtype=torch.float32, qkv_rows=4)
    assert pair.plan.tiles.qkv_rows == 4
    _run_and_compare(pair, [6], steps=2, dtype=torch.float32)


@pytest.mark.parametrize(("batch", "qkv_rows"), [("b1", 2), ("b1", 8), ("b1", 32),
                                                  ("b3-ragged", 16), ("b3-ragged", 32)])
def test_qk_norm_heads_split_over_tasks(batch: str, qkv_rows: int) -> None:
    """Qwen3's qk-norm spans a head (head_dim 32 here): with fewer rows per QKV task the
    chunks of a query/key head leave raw rows and the last to arrive norms the head; 32 rows
    is the whole head in one task (tensor cores at batch 3: 16 rows at least)."""
    lengths = BATCHES[batch]
    pair = _pair("qwen3", batch=len(lengths), dtype=torch.float32, qkv_rows=qkv_rows)
    assert pair.config.qk_norm and pair.config.head_dim == 32
    _run_and_compare(pair, lengths, steps=2, dtype=torch.float32)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_down_projection_split_over_f(batch: str, dtype: torch.dtype) -> None:
    """down_splits=5: F=160 in five parts of one 32-column chunk; each part waits for its own
    gate/up tiles and the last part of a row tile to arrive adds them up and publishes h."""
    lengths = BATCHES[batch]
    pair = _pair("llama", batch=len(lengths), dtype=dtype, down_splits=5, block_k=32)
    assert pair.config.intermediate_size == 160
    _run_and_compare(pair, lengths, steps=2, dtype=dtype)


@pytest.mark.parametrize("kv_splits", [1, 2])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_attention_kv_splits(batch: str, kv_splits: int) -> None:
    """kv_splits=1: one task per (sequence, kv head) writes the attention output itself (no
    partials, no merge); 2: two partials merged by the split that arrives last."""
    lengths = BATCHES[batch]
    pair = _pair("llama", batch=len(lengths), dtype=torch.float32, kv_splits=kv_splits)
    assert pair.plan.constexprs()["NSPLIT"] == kv_splits
    _run_and_compare(pair, lengths, steps=2, dtype=torch.float32)


@pytest.mark.parametrize("lengths", [[40], [40, 3, 17]])
def test_attention_splits_past_the_context(lengths: list[int]) -> None:
    """Several live splits merged, next to splits past a sequence's context (a cache longer
    than it), whose empty partials the merge must weigh at zero: the partials start as NaN
    (kernel_step), so a split that stored nothing would show. Four splits of 16-position
    blocks: 40 positions leave three live, 3 leave one, 17 leave two."""
    pair = _pair("llama", batch=len(lengths), dtype=torch.float32, max_seq_len=96,
                 kv_splits=4, block_s=16)
    assert pair.plan.constexprs()["NSPLIT"] == 4
    _run_and_compare(pair, lengths, steps=2, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plain_dot", [0, 1])
def test_tensor_core_chunks_as_one_dot_or_column_blocks(plain_dot: int, dtype) -> None:
    """Batch > 1 on tensor cores: plain_dot=1 multiplies each chunk as one 2-D dot (KSPLIT 1),
    0 as a 3-D dot over column blocks, one per warp."""
    lengths = BATCHES["b3-ragged"]
    pair = _pair("llama", batch=len(lengths), dtype=dtype, plain_dot=plain_dot)
    ksplit = pair.plan.constexprs()["KSPLIT"], pair.plan.constexprs()["KSPLIT_QKV"]
    assert (ksplit == (1, 1)) == bool(plain_dot), ksplit
    _run_and_compare(pair, lengths, steps=2, dtype=dtype)


@pytest.mark.parametrize("static", [0, 1])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_static_schedule_and_queue_match(batch: str, static: int) -> None:
    """static_schedule=1: each program walks its fixed share of the table (no queue pops);
    0: programs pop task ids from the queue."""
    lengths = BATCHES[batch]
    pair = _pair("llama", batch=len(lengths), dtype=torch.float32, static_schedule=static)
    assert pair.plan.constexprs()["STATIC"] == bool(static)
    _run_and_compare(pair, lengths, steps=2, dtype=torch.float32)


@pytest.mark.parametrize("next_hint", [1, 2])
def test_signals_from_the_task_loop_match(next_hint: int) -> None:
    """next_hint: the task loop, not the task, makes each release increment (after hinting
    the next task's first chunk, a GPU-only step); the queue schedule ignores the tile."""
    lengths = BATCHES["b3-ragged"]
    pair = _pair("llama", batch=len(lengths), dtype=torch.float32, next_hint=next_hint)
    assert pair.plan.constexprs()["NEXT_HINT"] == next_hint
    _run_and_compare(pair, lengths, steps=2, dtype=torch.float32)
    queued = make_plan(pair.plan.config, batch=1, max_seq_len=64, gpu=pair.plan.gpu,
                       static_schedule=0, next_hint=next_hint)
    assert queued.constexprs()["NEXT_HINT"] == 0


def test_grid_is_cut_to_the_resident_programs() -> None:
    """32 programs per SM cannot all be resident (4 warps each: 16 fit by threads alone); a
    static schedule over the plan's grid would wait on programs that never start, so the
    runtime launches only as many as fit (the interpreter: one)."""
    pair = _pair("llama", batch=1, dtype=torch.float32, programs_per_sm=32)
    if DEVICE == "cuda":
        assert pair.runtime.grid <= 16 * torch.cuda.get_device_properties(0).multi_processor_count
        assert pair.runtime.grid < pair.plan.grid
    else:
        assert pair.runtime.grid == pair.plan.grid == 1
    _run_and_compare(pair, [4], steps=2, dtype=torch.float32)


@pytest.mark.parametrize(
    ("n_regs", "shared", "warps", "expected"),
    [
        (255, 80 * 1024, 4, 2),  # registers and shared memory both allow two
        (168, 0, 4, 3),  # 168 x 32 = 21 units of 256 per warp: 65536 // (4 x 5376)
        (64, 0, 4, 8),  # 65536 // (4 x 2048)
        (32, 0, 4, 16),  # threads: 2048 // 128
        (64, 120 * 1024, 4, 1),  # shared memory
        (255, 0, 8, 1),
    ],
)
def test_resident_programs_per_sm(n_regs: int, shared: int, warps: int, expected: int) -> None:
    h100 = SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                           shared_memory_per_multiprocessor=228 * 1024)
    assert resident_programs_per_sm(n_regs, shared, warps, h100) == expected


def test_two_runs_are_bitwise_equal() -> None:
    pair = _pair("qwen2", batch=3, dtype=torch.bfloat16)
    ids = pair.prefill([2, 5, 7])
    pos = torch.tensor([2, 5, 7], device=DEVICE, dtype=torch.int32)
    first = pair.kernel_step(ids, pos)
    second = pair.kernel_step(ids, pos)  # rewrites the same KV rows with the same values
    assert torch.equal(first, second)


def test_counters_are_left_at_zero() -> None:
    """No reset launch: the last program out zeroes the queue and every counter."""
    pair = _pair("mistral", batch=1, dtype=torch.float32)
    ids = pair.prefill([3])
    pair.kernel_step(ids, torch.tensor([3], device=DEVICE, dtype=torch.int32))
    assert int(pair.runtime.counters.abs().sum()) == 0
    assert pair.runtime.ctrl.tolist()[:3] == [0, 0, 0]


def test_impossible_dependency_raises_instead_of_hanging() -> None:
    pair = _pair("llama", batch=1, dtype=torch.float32)
    runtime = pair.runtime
    victim = next(i for i, t in enumerate(pair.plan.tasks) if t.op.name == "OPROJ")
    runtime.tasks[victim, 6] += 1  # wait for one signal more than its producers give
    # Far above any legitimate wait on a GPU (and instant in the interpreter), so the victim,
    # which starts spinning before everything downstream of it, is the first to give up.
    runtime.max_spin = 1 << 16 if HAS_CUDA else 50
    ids = pair.prefill([2])
    with pytest.raises(KernelHangError) as info:
        runtime.step(ids, torch.tensor([2], device=DEVICE, dtype=torch.int32))
    message = str(info.value)
    assert f"task {victim} (OPROJ, layer 0" in message
    assert "'L0.merge'" in message and "saw" in message
    # The runtime is usable again once the table is fixed.
    runtime.tasks[victim, 6] -= 1
    runtime.max_spin = 1 << 20
    out = pair.kernel_step(ids, torch.tensor([2], device=DEVICE, dtype=torch.int32))
    assert torch.isfinite(out).all()


def test_hand_double_buffered_gemv_loop_matches() -> None:
    """The hand double-buffered GEMV loop (the default is Triton's pipeliner) and 8-row
    tiles (allowed at batch 1) compute the same maths."""
    pair = _pair("qwen2", batch=1, dtype=torch.float32, pipeline_stages=0, o_rows=8,
                 down_rows=8, gate_up_rows=8)
    _run_and_compare(pair, [4], steps=2, dtype=torch.float32)
