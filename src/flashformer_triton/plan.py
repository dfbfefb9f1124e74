"""The metaprogram: model config + batch + cache length + GPU -> the kernel's task table.

Pure Python, no GPU. The table lists every task of one decode step in a topological order,
each with the counter it waits on (and the count it waits for) and the counter it signals.
Because the order is topological, one program alone can run the whole table front to back:
that is how the Triton interpreter runs it on a CPU.

Per layer the stages are (each a run of independent tasks):

    QKV    rmsnorm + fused QKV rows of one head (+bias, +qk-norm, RoPE, KV-cache append)
    ATTN   flash-decoding partial over one KV split of one (sequence, kv head); the last
           split of a (sequence, kv head) to finish merges all of them, in a fixed order
    OPROJ  O-projection rows + residual
    GATEUP rmsnorm + gate/up rows + SiLU*mul
    DOWN   down-projection rows + residual

framed by EMBED before the first layer and LMHEAD (final norm + logits rows) after the last.
Attention of kv head g starts as soon as the QKV tasks of its group are done (one counter per
group); every other stage waits for the whole previous stage of its layer.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from enum import IntEnum

import torch

from flashformer_triton.config import ModelConfig, UnsupportedModelError
from flashformer_triton.quantize import QuantScheme
from flashformer_triton.weights import ArenaLayout, NormLayout, ScaleLayout, check_quantizable


class Op(IntEnum):
    EMBED = 0
    QKV = 1
    ATTN = 2
    OPROJ = 3
    GATEUP = 4
    DOWN = 5
    LMHEAD = 6


TASK_FIELDS = (
    "op", "layer", "a", "b", "c", "wait_counter", "wait_target", "signal_counter", "aux_counter"
)
NO_COUNTER = -1


@dataclass(frozen=True)
class Task:
    """One row of the table. a/b/c are the tile coordinates, their meaning depends on op:
    QKV (head, pair chunk, -), ATTN (sequence, kv head, split), DOWN (row tile, part of F, -),
    OPROJ/GATEUP/LMHEAD (row tile, -, -). aux_counter: an arrival counter (ATTN: of its
    sequence and kv head; QKV of a qk-norm model's query/key head: of the head; DOWN split
    over F: of its row tile). The task that brings it to its target finishes the work of all
    arrivals and alone signals signal_counter."""

    op: Op
    layer: int = 0
    a: int = 0
    b: int = 0
    c: int = 0
    wait_counter: int = NO_COUNTER
    wait_target: int = 0
    signal_counter: int = NO_COUNTER
    aux_counter: int = NO_COUNTER

    def serialize(self) -> list[int]:
        return [int(getattr(self, name)) for name in TASK_FIELDS]


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch shape: the knobs the autotuner turns."""

    qkv_rows: int = 16  # rows of Wqkv per QKV task (a run of rotary pairs, 2 rows each)
    o_rows: int = 16
    gate_up_rows: int = 16  # gate rows (and as many up rows) per GATEUP task
    down_rows: int = 16
    lm_rows: int = 32
    block_k: int = 512  # columns per streamed chunk of a weight tile
    qkv_block_k: int = 512
    block_s: int = 64  # KV positions per attention block
    kv_splits: int = 8  # flash-decoding splits per (sequence, kv head)
    # Down projection split over F: part j's tasks wait only for the gate/up tiles of F-range
    # j (not the whole stage), and the last part of a row tile to arrive publishes it.
    down_splits: int = 1
    programs_per_sm: int = 2
    num_warps: int = 4
    l2_prefetch_k: int = 0  # columns of a tile hinted into L2 before its wait (0: off)
    max_registers: int = 0  # per-thread register cap (0: compiler's choice); allows more programs
    pipeline_stages: int = 3  # 0: hand double-buffering; >= 2: Triton's pipeliner, that deep
    attention_stages: int = 3  # cache blocks in flight in the attention loop (Triton's pipeliner)
    ignore_deps: int = 0  # benchmark diagnostic ONLY: skip every wait (results are garbage)
    profile: int = 0  # record a per-task timeline (GPU only; see flashformer_triton.profile)
    tensor_cores: int = 0  # 1: GEMVs on tensor cores at batch 1 too (batch > 1 always is)
    # 1: a quantized bf16 model stores its GEMV inputs (normed h, attention, SwiGLU) in fp16,
    # the tensor-core operand dtype of the codes, so the loops need not convert x per chunk.
    fp16_activations: int = 0
    # 1: program p runs tasks p, p + grid, p + 2 grid, ... instead of popping the queue (no
    # pop round trip; every program must be resident at once).
    static_schedule: int = 0
    # 1: the tensor-core GEMVs (model dtype, int8) multiply each chunk as one 2-D dot rather
    # than as one column block per warp (dot_ksplit).
    plain_dot: int = 0
    # 1: symmetric int4 codes enter the tensor-core dot with the offsets of their fp16
    # operands left on (five instructions per 8 codes instead of ten), and the producers of
    # every GEMV input publish its sums per 16 columns times those offsets, which the GEMVs
    # take off per group (kernels/decode.py INT4_RAW_ASM).
    offset_sums: int = 0
    # 1: each task reads its counter (relaxed) before requesting its first chunk, and an
    # acquire fence replaces the first poll where that read already meets the target
    # (kernels/decode.py _probe). 2 (with the static schedule): a task that signals reads the
    # next task's counter in the fence that publishes its own, so that the next task needs
    # no fence of its own (_publish). GPU only (inline PTX); the interpreter polls as before.
    early_probe: int = 0
    # 1 (with the static schedule): before a task's release, the task loop hints its
    # program's next task's first chunk into L2 (kernels/decode.py _hint_first); 2: and the
    # int4 scales' line of its rows. The hints are GPU only; the interpreter runs the rest.
    next_hint: int = 0
    # 1: symmetric int4 chunks on tensor cores load their scales as 4-byte words of two
    # groups' fp16 scales, through Triton's pipeliner with the codes (kernels/decode.py
    # _scale_words; rows of an odd number of groups keep the 2-byte loads).
    scale_words: int = 0


@dataclass(frozen=True)
class GpuSpec:
    """What the plan needs to know about the chip (and the compiler that targets it)."""

    name: str
    num_sms: int
    arch: int = 0  # compute capability, major * 10 + minor (90: Hopper); 0: not known
    ptx_version: int = 0  # the PTX ISA that Triton's ptxas takes (87: CUDA 12.8); 0: not known

    @classmethod
    def current(cls, device: torch.device | str | None = None) -> GpuSpec:
        """The chip of `device`; with no device, the current CUDA device if there is one."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.device(device).type != "cuda":
            return cls(name="cpu (triton interpreter)", num_sms=1)
        props = torch.cuda.get_device_properties(device)
        return cls(name=props.name, num_sms=props.multi_processor_count,
                   arch=10 * props.major + props.minor, ptx_version=triton_ptx_version())

    @property
    def acquire_fence(self) -> bool:
        """Whether the kernel's inline PTX may use `fence.acquire` (PTX 8.6, sm_90)."""
        return self.arch >= 90 and self.ptx_version >= 86


@functools.cache
def triton_ptx_version() -> int:
    """The PTX ISA version Triton emits for Hopper, from its ptxas (0 where that cannot be
    told: no ptxas, or a Triton whose internals moved; the kernel then keeps to older PTX)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

        return int(ptx_get_version(get_ptxas(90).version))
    except Exception:  # any failure means "not known", never an error
        return 0


def _on_tensor_cores(batch: int, tensor_cores: int) -> bool:
    """Batch > 1 always runs the GEMVs on tensor cores (tl.dot, row tiles of 16 or more);
    batch 1 does with the `tensor_cores` tile."""
    return batch > 1 or bool(tensor_cores)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _floor_pow2(n: int) -> int:
    """The largest power of two <= n (1 for n <= 1)."""
    return 1 << int(math.log2(max(1, n)))


def default_tiles(config: ModelConfig, batch: int, max_seq_len: int, gpu: GpuSpec,
                  quant: QuantScheme | None = None) -> Tiles:
    """A reasonable starting point per shape; bench/ tunes from here."""
    hd = config.head_dim
    programs = gpu.num_sms * 2
    # Flash-decoding splits: at most one attention task per program, and at least 256 cache
    # positions per split (1B on an H100: 4 splits best at a 1024-position cache, 16-32 at 8k,
    # 32 at 32k; the old 64 cost 20% at 8k and 32k, bench/NOTES.md row 23). At batch 1 there
    # are only kv heads x splits tasks and the attention is a latency chain between QKV and
    # O-proj: one cache block (block_s positions) per split (1B, 1024 cache: 4 -> 16 splits,
    # 1.083 -> 1.048 ms; batch 4 stays best at 4 splits, bench/NOTES.md row 42).
    per_program = programs // (batch * config.num_kv_heads)
    cap = max(1, min(per_program, 64))
    if batch == 1:
        # A power of two rounded up where that still fits the cap, so that a split holds one
        # block at every position of the cache: a cache between two powers of two gets the
        # splits of the larger (8B int4 at a 576-position cache, position 512: 8 -> 16
        # splits, 2.033 -> 1.995 ms; bench/NOTES.md Q41).
        splits = min(cap, -(-max_seq_len // Tiles.block_s))
        splits = _pow2(splits) if _pow2(splits) <= cap else _floor_pow2(splits)
    else:
        splits = _floor_pow2(max(1, min(cap, max_seq_len // 256)))
    # Where that leaves at most two splits (batch 16 with 8 kv heads) and the cache is short,
    # one task per (sequence, kv head) writing its output itself beats two and their merge
    # (batch 16 at KV 512, 1024 cache: 1B 1.319 -> 1.304 ms, 3B 3.461 -> 3.332, 8B 6.587 ->
    # 6.415); over longer caches the serial blocks cost more (1B at KV 2000: 1.577 -> 1.655;
    # bench/NOTES.md row 55).
    if per_program <= 2 and max_seq_len <= 1024:
        splits = 1

    # Quantized weights on tensor cores at batch 1 too: their fp16 operands take int8 codes in
    # 1.25 instructions each and int4 in 2 (kernels/decode.py _int8_to_f16, _int4_to_f16)
    # where the FMA path needs about 4 and 8 (8B: int8 3.72 -> 3.62 ms, int4 4.45 -> 3.10).
    tensor_cores = int(quant is not None and _tensor_cores_ok(quant, batch))
    use_dot = _on_tensor_cores(batch, tensor_cores)

    def rows_for(n: int, choices: tuple[int, ...] = (16, 8)) -> int:
        # A stage's last round of tasks leaves programs idle until the next stage may start:
        # take the row count whose last round is fullest. Batch > 1 needs 16 rows (tl.dot).
        # On an H100 this picked the faster of 16/8 rows in all 6 stage shapes measured
        # (1B O-proj/down and QKV, 8B QKV, gate/up and O-proj/down; bench/NOTES.md).
        if use_dot:
            return 16

        def idle(rows: int) -> float:
            rounds = math.ceil(n / rows) / programs
            return math.ceil(rounds) - rounds

        return min(choices, key=idle)

    d, f = config.hidden_size, config.intermediate_size
    heads = config.num_heads + 2 * config.num_kv_heads
    # int4 codes on tensor cores at batch 1: a 16-row tile is 16 KB of codes on 1B and 32 KB
    # on 8B, so each task's fixed costs (its wait, first chunk, reduction and signal) weigh;
    # 32-row QKV, gate/up and LM-head tiles halve the tasks (8B 2.645 -> 2.318 ms, 1B 0.673
    # -> 0.634; int8's 32-row gate/up tiles spill on 8B; bench/NOTES.md Q23).
    wide_int4 = bool(tensor_cores and batch == 1 and quant.bits == 4)
    qkv_rows = (min(hd, 32) if wide_int4
                else rows_for(heads * hd, (min(hd, 16), min(hd, 8))))
    # Model-dtype weights: at least 8 streamed chunks per task (the shortest tiles are
    # [rows, hidden]), since long chunks cost more in the ramp after each barrier (1B: 256
    # columns, 1.29 -> 1.21 ms), with about 1024 columns of a tile in flight. Quantized chunks
    # are 2-4x fewer bytes already: 512 columns (1B int8: 1.28 ms at 256, 1.04 at 512).
    # (bench/NOTES.md rows 20-22, Q9-Q11.)
    block_k = 512 if quant else max(256, min(512, _floor_pow2(d // 8)))
    stages = 1 + 1024 // block_k
    # From batch 8, x's chunk ([batch, k-chunk]) goes through the pipeline's shared memory
    # next to the weights' and is as big: one stage fewer, not below 3 (1B batch 16 1.372 ->
    # 1.324 ms, 3 stages 1.346; batch 8 1.194 -> 1.187; 8B batch 16 at 2 stages: 6.58 ->
    # 6.74; bench/NOTES.md row 45).
    if batch >= 8:
        stages = max(3, stages - 1)
    # A QKV chunk keeps about 16 KB of weights (8K bf16 elements), in at most block_k columns.
    # int4 codes take four times the elements: 512 columns of 32 rows (8 KB) where 8K gave 256
    # (4 KB a chunk, and each QKV task streamed ~6 GB/s; 8B int4 2.460 -> 2.320 ms, 1B 0.580
    # -> 0.563, bench/NOTES.md Q26).
    per_chunk = 8192 * 16 // quant.bits if quant else 8192
    qkv_block_k = max(32, min(block_k, per_chunk // qkv_rows))
    if quant and quant.group_size:  # a chunk holds whole groups
        qkv_block_k = max(qkv_block_k, quant.group_size)
    # Batch > 8: every task reads all of x (batch x k) next to its rows x k weights, so wider
    # O/down tiles halve that traffic where the stage still has a task per SM (8B and
    # Qwen3-8B at batch 16: 7.41 -> 6.71 and 9.09 -> 8.55 ms; 1B and batch 4-8: slower).
    wide = d // 32 >= gpu.num_sms * 0.9  # 32-row tiles still give a task per SM
    # Batch 1 on the FMA path accumulates a whole [rows, k-chunk] tile in registers
    # (kernels/decode.py _chunk_fma): 32 LM-head rows of 512 columns spilled, 16 do not.
    # 8B int4 takes 64: the LM head keeps every program streaming, so half the tasks is half
    # the start-ups (H100, same process: 2.008 -> 1.994 ms, and 1.993 -> 1.982 in another
    # call; it spilled before the int4 layout of bench/NOTES.md Q38, now 246 registers and
    # none; Q39).
    lm_rows = 64 if wide_int4 and wide else 32 if batch > 1 or wide_int4 else 16
    # At batch > 8, 3B's 96 tasks of 32 rows for 132 SMs are still faster than 192 of 16
    # (with one kv split and 512-column hints: 3.393 -> 3.274 ms, bench/NOTES.md row 55);
    # 1B's 64 are not.
    wide_batched = batch > 8 and d // 32 >= gpu.num_sms * 0.7
    # O-proj ends the attention chain, and the gate/up tasks after it start when it ends. On
    # at most one task per program (16 rows), the programs left over start their gate/up tasks
    # early and have their first chunks in flight by then; with every program on O-proj (1B, 8
    # rows) all switched at once and that burst of loads held up the counter polls ~2 us (1B
    # 1.058 -> 1.042 ms, KV 32000 1.443 -> 1.423; bench/NOTES.md row 42).
    # int4 at batch 1 takes 32 rows there too: its 16-row O-proj tasks (4 KB chunks) streamed
    # ~7 GB/s each (8B int4 2.338 -> 2.271 ms over two runs; 1B, 64 tasks: 0.577 -> 0.641;
    # bench/NOTES.md Q26).
    o_rows = (32 if wide_batched or (wide_int4 and wide) else 16 if math.ceil(d / 16) <= programs
              else rows_for(d))
    # The down projection in two halves of F, with rows for about one task per program (1B:
    # 16, 8B: 32): a half starts as soon as its gate/up tiles are done, which fills the
    # gate/up stage's last round (8B int8 3.55 -> 3.45 ms, int4 2.97 -> 2.88, batch 4 int8
    # 3.77 -> 3.63; 1B bf16 1.120 -> 1.087, int8 0.850 -> 0.826; 1B batch 16 1.427 -> 1.413,
    # 8B batch 16 the same). Not where that needs more than 16 rows on the FMA path: 8B bf16
    # batch 1 spills (5.72 -> 5.85 ms). (bench/NOTES.md rows 30, 36, 42.)
    gate_up_rows = 32 if wide_int4 else rows_for(f)
    # At batch > 8, hidden sizes up to 3072 stream faster with each chunk as one 2-D dot than
    # with a column block per warp (1B batch 16 1.301 / 1.288 -> 1.261 / 1.270 ms, 3B 3.272 ->
    # 3.238); 8B spills (6.394 -> 6.766) and batch 4 is slower (1B 1.094 -> 1.130). With it,
    # 1B's down halves take 32 rows, half a task per program (three times, same run: 1.274 /
    # 1.279 / 1.285 -> 1.248 / 1.257 / 1.244 ms); 3B's 64 would be slower (bench/NOTES.md
    # row 56).
    plain_dot = int(batch > 8 and quant is None and d <= 3072)
    down_rows, down_splits = o_rows, 1
    half_f = f // 2
    min_split_rows = 32 if plain_dot else 16 if use_dot else 2
    split_rows = max(min_split_rows, _pow2(math.ceil(2 * d / programs)))
    if (half_f % block_k == 0 and half_f % gate_up_rows == 0
            and split_rows <= (32 if use_dot else 16)):
        down_rows, down_splits = split_rows, 2
    # Before its wait a task hints the next columns of its tile into L2, so the chunks after
    # the first come from L2 once the wait ends: about a quarter of the hidden size (rounded
    # down to a power of two), 512..1024 columns (1B bf16 1.140 -> 1.118 ms, 8B 5.72 -> 5.59,
    # 8B int8 3.45 -> 3.34; a whole tile: slower, bench/NOTES.md rows 34-35; 3B at 512
    # rather than 1024: batch 4 2.788 -> 2.739 ms, batch 1 the same, row 55).
    l2_prefetch_k = max(512, min(1024, _floor_pow2(d // 4)))
    # The early counter probe pays off where a task's start-up is mostly round trips in
    # series: 8B int4 at batch 1 (H100, same run: 2.117 / 2.101 -> 2.052 / 2.048 ms), and 8B
    # int8 where its fence is a bare acquire (GpuSpec.acquire_fence; 3.191 -> 3.153; with
    # the full fence 3.208 -> 3.241). It costs ~1% on 8B bf16 (5.371 -> 5.433) and 3% on 1B
    # int4 (0.531 -> 0.546): bench/NOTES.md Q33, Q35.
    early_probe = int(bool(tensor_cores) and batch == 1 and wide
                      and (wide_int4 or gpu.acquire_fence))
    # Each task hints its program's next task's first chunk into L2 before its release: 8B
    # int8 at batch 1 3.205 / 3.198 -> 3.142 / 3.150 ms (H100, same run); 8B int4 the same
    # within the noise, with 2 more bytes of spills (2.048 median of three -> 2.045-2.065):
    # bench/NOTES.md Q35.
    next_hint = int(bool(tensor_cores) and batch == 1 and wide and not wide_int4)
    # int4 scales as words: 8B int4 at batch 1 2.044 -> 2.018 ms (H100, same process); 1B
    # int4 0.538 -> 0.546, where the kernel spills 64 bytes with them (bench/NOTES.md Q37).
    scale_words = int(wide_int4 and wide)
    # Static schedule (each program a fixed share of the table, no queue pops, next row
    # prefetched): 1B int8 0.826 -> 0.780 ms, batch 16 1.413 -> 1.378 (bench/NOTES.md row 36).
    return Tiles(qkv_rows=qkv_rows, qkv_block_k=qkv_block_k, kv_splits=splits,
                 l2_prefetch_k=l2_prefetch_k, static_schedule=1,
                 tensor_cores=tensor_cores, fp16_activations=tensor_cores,
                 o_rows=o_rows, down_rows=down_rows, down_splits=down_splits,
                 gate_up_rows=gate_up_rows, lm_rows=lm_rows, block_k=block_k,
                 pipeline_stages=stages, plain_dot=plain_dot, early_probe=early_probe,
                 next_hint=next_hint, scale_words=scale_words)


@dataclass
class Plan:
    """The task table and everything the kernel is specialised on."""

    config: ModelConfig
    batch: int
    max_seq_len: int
    dtype: torch.dtype
    tiles: Tiles
    gpu: GpuSpec
    tasks: list[Task]
    counter_names: list[str]
    counter_targets: list[int]
    grid: int
    quant: QuantScheme | None = None  # weight-only quantization (quant.lm_head: LM head too)
    weight_bytes_by_op: dict[Op, int] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_counters(self) -> int:
        return len(self.counter_names)

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        rows = [t.serialize() for t in self.tasks]
        return torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, len(TASK_FIELDS))

    @property
    def use_dot(self) -> bool:
        """Batch > 1, and batch 1 with the `tensor_cores` tile, runs the GEMVs as small matmuls
        on tensor cores (weights as the M operand, the batch padded to a power of two as N)."""
        return _on_tensor_cores(self.batch, self.tiles.tensor_cores)

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype of the GEMV inputs the kernel stores (xn, attention and SwiGLU outputs):
        the model dtype, or fp16 for a quantized bf16 model with the `fp16_activations` tile
        (values must stay under fp16's 65504; set the tile to 0 for a model whose don't)."""
        if self.tiles.fp16_activations and self.dtype == torch.bfloat16:
            return torch.float16
        return self.dtype

    @property
    def batch_pad(self) -> int:
        return _pow2(self.batch)

    def dot_ksplit(self, rows: int, block_k: int) -> int:
        """Column blocks per streamed chunk on tensor cores: one per warp (each at least one
        16-deep MMA step) while a tile has fewer rows than the warps' 16-row MMA tiles; from
        there, and with the plain_dot tile, one: a single 2-D dot (Triton lays the warps out)."""
        warps = self.tiles.num_warps
        if self.tiles.plain_dot or rows >= 16 * warps:
            return 1  # one 2-D dot a chunk
        return max(1, min(warps, block_k // 16))

    def norm_parts(self) -> tuple[int, int]:
        """Sums of squares per sequence that the producers of h write: (O-proj tiles, down
        tiles); the readers of the post-attention and the input norms add them up."""
        d, t = self.config.hidden_size, self.tiles
        return -(-d // t.o_rows), -(-d // t.down_rows)

    def constexprs(self) -> dict[str, object]:
        """Compile-time specialisation of the kernel for this model and plan."""
        c, t, quant = self.config, self.tiles, self.quant
        parts_o, parts_down = self.norm_parts()
        ptx = self.gpu.num_sms > 1  # inline PTX runs on a GPU, not in the interpreter
        arena, norms = ArenaLayout.of(c, quant), NormLayout.of(c)
        scales = ScaleLayout.of(c, quant) if quant else ArenaLayout(0, 0, 0, 0, 0)
        return {
            "B": self.batch,
            "BP": self.batch_pad,
            "D": c.hidden_size,
            "F": c.intermediate_size,
            "H": c.num_heads,
            "KVH": c.num_kv_heads,
            "HD": c.head_dim,
            "V": c.vocab_size,
            "L": c.num_layers,
            "S_MAX": self.max_seq_len,
            "GP": max(16, _pow2(c.group_size)),
            "NSPLIT": t.kv_splits,
            "NSPLIT_P": _pow2(t.kv_splits),
            "EPS": float(c.rms_norm_eps),
            "SM_SCALE": 1.0 / math.sqrt(c.head_dim),
            "LAYER_STRIDE": arena.layer_stride,
            "OFF_O": arena.o,
            "OFF_GU": arena.gate_up,
            "OFF_DOWN": arena.down,
            # Weight-only quantization: bits of the codes (0: weights in the model dtype),
            # group size (0: one scale per row), zero points stored or fixed.
            "WBITS": quant.bits if quant else 0,
            "GROUP": (quant.group_size or 0) if quant else 0,
            # What the int4 maths subtracts (kernels/decode.py ZP_*): the fixed 8, stored
            # zero points, or x's offset sums.
            "ZERO_POINTS": (1 if quant and not quant.symmetric else 2 if t.offset_sums else 0),
            "SCALE_WORDS": t.scale_words,
            "LM_WBITS": quant.bits if quant and quant.lm_head else 0,
            "SCALE_STRIDE": scales.layer_stride,
            "SOFF_O": scales.o,
            "SOFF_GU": scales.gate_up,
            "SOFF_DOWN": scales.down,
            "NORM_STRIDE": norms.layer_stride,
            "BN_QKV": t.qkv_rows,
            "BK_QKV": t.qkv_block_k,
            "BN_O": t.o_rows,
            "BN_UP": t.gate_up_rows,
            "BN_DOWN": t.down_rows,
            "BN_LM": t.lm_rows,
            "BK": t.block_k,
            "DOWN_SPLITS": t.down_splits,
            "DOWN_SPLITS_P": _pow2(t.down_splits),
            "BS": t.block_s,
            "USE_DOT": self.use_dot,
            "KSPLIT": self.dot_ksplit(min(t.o_rows, t.down_rows, 2 * t.gate_up_rows,
                                          t.lm_rows), t.block_k),
            "KSPLIT_QKV": self.dot_ksplit(t.qkv_rows, t.qkv_block_k),
            "PARTS_O": parts_o,
            "PARTS_O_P": _pow2(parts_o),
            "PARTS_DOWN": parts_down,
            "PARTS_DOWN_P": _pow2(parts_down),
            "DOT_PREC": "ieee" if self.dtype == torch.float32 else "tf32",
            "QKV_BIAS": c.qkv_bias,
            "QK_NORM": c.qk_norm,
            "PF_K": t.l2_prefetch_k if ptx else 0,  # (a hint: same results)
            "PTX": ptx,
            "EARLY_PROBE": t.early_probe if ptx else 0,
            "ACQUIRE_FENCE": ptx and self.gpu.acquire_fence,
            "NEXT_HINT": t.next_hint if t.static_schedule else 0,
            "STAGES": t.pipeline_stages,
            "ATTN_STAGES": t.attention_stages,
            "IGNORE_DEPS": bool(t.ignore_deps),
            "PROFILE": bool(t.profile),
            "STATIC": bool(t.static_schedule),
        }

    # What one step must read: the floor of a memory-bound step.
    def weight_bytes(self) -> int:
        """Bytes of weights the tasks stream (codes, scales and zero points when quantized),
        counted from the table itself."""
        return sum(self.weight_bytes_by_op.values())

    def kv_bytes(self, positions: list[int] | torch.Tensor) -> int:
        """KV-cache bytes read (keys and values 0..pos of every layer) plus the new rows."""
        c = self.config
        size = torch.empty((), dtype=self.dtype).element_size()
        per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * size
        return sum(int(p) + 1 for p in positions) * per_token

    def step_bytes(self, positions: list[int] | torch.Tensor) -> int:
        return self.weight_bytes() + self.kv_bytes(positions)

    def floor_ms(self, positions: list[int] | torch.Tensor, bandwidth_bytes_per_s: float) -> float:
        return self.step_bytes(positions) / bandwidth_bytes_per_s * 1e3

    def summary(self) -> str:
        per_op = Counter(t.op for t in self.tasks)
        t = self.tiles
        lines = [
            f"plan: {self.config.summary()}",
            f"  batch {self.batch}, max_seq_len {self.max_seq_len}, {self.dtype}, "
            f"gpu {self.gpu.name} ({self.gpu.num_sms} SMs), grid {self.grid} programs",
            f"  {self.num_tasks} tasks, {self.num_counters} counters; tasks per op: "
            + ", ".join(f"{op.name} {per_op[op]}" for op in Op),
            f"  tiles: qkv {t.qkv_rows}x{t.qkv_block_k}, o {t.o_rows}, gate/up {t.gate_up_rows}, "
            f"down {t.down_rows}, lm {t.lm_rows}, k-chunk {t.block_k}, kv block {t.block_s}, "
            f"{t.kv_splits} kv splits, {t.num_warps} warps",
            f"  weights streamed per step: {self.weight_bytes() / 1e9:.3f} GB"
            f"{' (' + self.quant.describe() + ')' if self.quant else ''}; "
            f"KV per sequence at position 512: {self.kv_bytes([512]) / 1e6:.1f} MB",
        ]
        return "\n".join(lines)


class _Counters:
    """Named completion counters; a counter's target is the number of tasks signalling it."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.targets: list[int] = []

    def new(self, name: str) -> int:
        self.names.append(name)
        self.targets.append(0)
        return len(self.names) - 1

    def signal(self, counter: int) -> int:
        self.targets[counter] += 1
        return counter

    def arrival(self, name: str, count: int) -> int:
        """A counter that `count` tasks arrive on (a task's aux_counter): the last of them
        finishes the work of all and signals for them."""
        counter = self.new(f"{name}.arrive")
        self.targets[counter] = count
        return counter


def make_plan(
    config: ModelConfig,
    *,
    batch: int = 1,
    max_seq_len: int = 4096,
    dtype: torch.dtype = torch.bfloat16,
    gpu: GpuSpec | None = None,
    tiles: Tiles | None = None,
    quant: QuantScheme | None = None,
    **tile_overrides: int,
) -> Plan:
    """Build the task table of one decode step (`quant`: the weights' quantization, as
    `PackedWeights.scheme`)."""
    gpu = gpu or GpuSpec.current()
    _check_supported(config, batch, max_seq_len)
    if tiles is None:
        tiles = default_tiles(config, batch, max_seq_len, gpu, quant)
        if gpu.num_sms > 1 and quant is None:  # what `flashformer-triton autotune` stored
            tiles = _with_tuned(tiles, config, batch, dtype, gpu)
    tiles = replace(tiles, **tile_overrides)
    if quant:
        _check_quant(config, tiles, quant, batch, dtype)
    elif tiles.fp16_activations:
        raise ValueError("fp16_activations=1 is for quantized weights (bf16 weights would need "
                         "their inputs converted back); leave it at 0")
    elif tiles.offset_sums:
        raise ValueError("offset_sums=1 is for symmetric int4 weights; leave it at 0")
    _check_tiles(config, tiles, batch)

    c, t = config, tiles
    d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    ctr = _Counters()
    tasks: list[Task] = []
    streamed: Counter[Op] = Counter()
    size = torch.empty((), dtype=dtype).element_size()

    def matrix_bytes(rows: int, k: int, quantized: bool, row_scales: bool) -> int:
        """Bytes of `rows` rows of a matrix with `k` inputs: codes + fp16 scales + zeros
        (per-row scales counted once per row, by the part of it with row_scales)."""
        if not quantized:
            return rows * k * size
        if quant.group_size:
            groups = rows * quant.groups(k)
        else:
            groups = rows if row_scales else 0
        return rows * k * quant.bits // 8 + groups * 2 + (0 if quant.symmetric else groups)

    def add(task: Task, *, rows: int = 0, k: int = 0, first_part: bool = True) -> None:
        tasks.append(task)
        quantized = quant is not None and (task.op != Op.LMHEAD or quant.lm_head)
        streamed[task.op] += matrix_bytes(rows, k, quantized, first_part)

    def rows_of(total: int, tile: int) -> list[tuple[int, int]]:
        return [(i, min(tile, total - i * tile)) for i in range(math.ceil(total / tile))]

    # Embedding rows are tiled like the down projection: both publish h for the next input
    # norm with one sum of squares per tile (kernels/decode.py _publish_rows).
    embed_done = ctr.new("embed")
    for tile, _ in rows_of(d, t.down_rows):
        add(Task(Op.EMBED, 0, tile, signal_counter=ctr.signal(embed_done)))
    prev_ctr, prev_target = embed_done, ctr.targets[embed_done]

    for layer in range(c.num_layers):
        group_ctrs = [ctr.new(f"L{layer}.qkv[g{g}]") for g in range(c.num_kv_heads)]
        # Group by group (its query heads, then its key and value head), so the first groups
        # are complete, and their attention can start, while later groups still stream.
        for group in range(c.num_kv_heads):
            q_heads = range(group * c.group_size, (group + 1) * c.group_size)
            kv_heads = (c.num_heads + group, c.num_heads + c.num_kv_heads + group)
            for head in (*q_heads, *kv_heads):
                chunks = hd // t.qkv_rows
                arrivals = NO_COUNTER
                if c.qk_norm and head < c.num_heads + c.num_kv_heads:
                    # qk-norm spans the head: its chunks arrive here, the last one norms,
                    # rotates and stores the head and signals the group (once per head).
                    arrivals = ctr.arrival(f"L{layer}.qkv[h{head}]", chunks)
                    ctr.signal(group_ctrs[group])
                for chunk in range(chunks):
                    if arrivals == NO_COUNTER:
                        ctr.signal(group_ctrs[group])
                    add(
                        Task(Op.QKV, layer, head, chunk, 0, prev_ctr, prev_target,
                             group_ctrs[group], arrivals),
                        rows=t.qkv_rows, k=d,
                    )

        merged = ctr.new(f"L{layer}.merge")
        for g in range(c.num_kv_heads):  # in the order the groups' QKV tasks complete
            for seq in range(batch):
                # Each split arrives here; the one that brings it to kv_splits merges and
                # signals `merged` (once per sequence and kv head). One split merges nothing:
                # it writes the output and signals itself.
                arrivals = (ctr.arrival(f"L{layer}.attn[b{seq},g{g}]", t.kv_splits)
                            if t.kv_splits > 1 else NO_COUNTER)
                for split in range(t.kv_splits):
                    add(Task(Op.ATTN, layer, seq, g, split, group_ctrs[g],
                             ctr.targets[group_ctrs[g]], merged, arrivals))
                ctr.signal(merged)

        o_done = ctr.new(f"L{layer}.oproj")
        for tile, rows in rows_of(d, t.o_rows):
            add(Task(Op.OPROJ, layer, tile, 0, 0, merged, ctr.targets[merged],
                     ctr.signal(o_done)), rows=rows, k=c.q_size)

        # Gate/up tiles signal the part of F their outputs fall in; down tasks of part j
        # wait for that part only (down_splits 1: the whole stage).
        splits, f_part = t.down_splits, f // t.down_splits
        up_done = [ctr.new(f"L{layer}.gateup[f{j}]") for j in range(splits)]
        for tile, rows in rows_of(f, t.gate_up_rows):
            add(Task(Op.GATEUP, layer, tile, 0, 0, o_done, ctr.targets[o_done],
                     ctr.signal(up_done[tile * t.gate_up_rows // f_part])), rows=2 * rows, k=d)

        down_done = ctr.new(f"L{layer}.down")
        down_tiles = rows_of(d, t.down_rows)
        arrivals = [ctr.arrival(f"L{layer}.down[t{tile}]", splits) if splits > 1
                    else NO_COUNTER for tile, _ in down_tiles]
        for j in range(splits):
            for tile, rows in down_tiles:
                if j == 0:  # one signal per row tile (split: by the last part to arrive)
                    ctr.signal(down_done)
                add(Task(Op.DOWN, layer, tile, j, 0, up_done[j], ctr.targets[up_done[j]],
                         down_done, arrivals[tile]), rows=rows, k=f_part, first_part=j == 0)
        prev_ctr, prev_target = down_done, ctr.targets[down_done]

    # The host reads the logits after the launch and no task waits for them, so the LM-head
    # tasks signal nothing: a release waits for the task's stores to reach L2, ~0.4 us a task
    # on an H100 (bench/NOTES.md Q34), and 8B has ~15 LM-head tasks a program.
    for tile, rows in rows_of(c.vocab_size, t.lm_rows):
        add(Task(Op.LMHEAD, c.num_layers, tile, 0, 0, prev_ctr, prev_target), rows=rows, k=d)

    # The interpreter runs programs one after another: a static schedule needs just one there.
    grid = (gpu.num_sms * t.programs_per_sm if gpu.num_sms > 1
            else 1 if t.static_schedule else 2)
    return Plan(
        config=config, batch=batch, max_seq_len=max_seq_len, dtype=dtype, tiles=tiles, gpu=gpu,
        tasks=tasks, counter_names=ctr.names, counter_targets=ctr.targets, grid=grid,
        quant=quant, weight_bytes_by_op=dict(streamed),
    )


def _check_supported(config: ModelConfig, batch: int, max_seq_len: int) -> None:
    hd = config.head_dim
    if hd & (hd - 1) or hd < 16:
        raise UnsupportedModelError(f"head_dim={hd} must be a power of two >= 16 for the kernel")
    if not 1 <= batch <= 16:
        raise ValueError(f"batch={batch} is outside the supported range 1..16")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len} must be positive")
    if config.sliding_window is not None and max_seq_len > config.sliding_window:
        raise UnsupportedModelError(
            f"sliding_window={config.sliding_window} is in use and max_seq_len={max_seq_len} "
            f"exceeds it; pass max_seq_len <= {config.sliding_window}"
        )


def _check_tiles(config: ModelConfig, t: Tiles, batch: int) -> None:
    def pow2(name: str, value: int, low: int) -> None:
        if value < low or value & (value - 1):
            raise ValueError(f"tile {name}={value} must be a power of two >= {low}")

    def one_of(name: str, *meanings: str) -> None:
        """The tile must be 0, 1, ... up to the number of meanings (each value's)."""
        value = getattr(t, name)
        if value not in range(len(meanings)):
            choices = [f"{i} ({meaning})" for i, meaning in enumerate(meanings)]
            raise ValueError(f"{name}={value} must be {', '.join(choices[:-1])} or "
                             f"{choices[-1]}")

    # Tensor cores (batch > 1, or the tile) run the row tiles through tl.dot: at least one
    # 16-row MMA tile.
    min_rows = 16 if _on_tensor_cores(batch, t.tensor_cores) else 2
    for name in ("o_rows", "gate_up_rows", "down_rows", "lm_rows"):
        pow2(name, getattr(t, name), min_rows)
    for name in ("block_k", "qkv_block_k", "block_s"):
        pow2(name, getattr(t, name), 16)
    pow2("qkv_rows", t.qkv_rows, min_rows if config.head_dim >= min_rows else 2)
    if t.l2_prefetch_k:  # at least one 128-byte line of int4 codes
        pow2("l2_prefetch_k", t.l2_prefetch_k, 256)
    if config.head_dim % t.qkv_rows:
        raise ValueError(f"qkv_rows={t.qkv_rows} must divide head_dim={config.head_dim}")
    if t.kv_splits < 1:
        raise ValueError(f"kv_splits={t.kv_splits} must be >= 1")
    if t.attention_stages < 1:
        raise ValueError(f"attention_stages={t.attention_stages} must be >= 1 (1: one block "
                         f"at a time)")
    one_of("early_probe", "off", "a probe at each task's start",
           "1, and the publishing fence probes the next task's counter")
    one_of("scale_words", "2-byte scale loads", "4-byte words of two groups' scales")
    one_of("next_hint", "off", "the next task's first chunk into L2", "1, and its int4 scales")
    f = config.intermediate_size
    if not 1 <= t.down_splits <= 8 or (t.down_splits > 1 and (
            f % (t.down_splits * t.block_k) or (f // t.down_splits) % t.gate_up_rows)):
        raise ValueError(
            f"down_splits={t.down_splits} must be 1..8 (the last part loads them all at once) "
            f"and, above 1, cut intermediate_size={f} into parts of whole k-chunks "
            f"(block_k={t.block_k}) and whole gate/up tiles (gate_up_rows={t.gate_up_rows}); "
            f"use 1 or a divisor that does"
        )


def _tensor_cores_ok(quant: QuantScheme, batch: int) -> bool:
    """int4 groups of 32 or 64 at batch 1 on tensor cores gave wrong logits with triton 3.6 on
    an H100 (tests/test_quantize.py, test_gpu_quant.py; right at batch 3 and with groups of
    128): those stay on the FMA path."""
    return batch > 1 or quant.bits == 8 or (quant.group_size or 0) >= 128


def _check_quant(config: ModelConfig, t: Tiles, quant: QuantScheme, batch: int,
                 dtype: torch.dtype) -> None:
    check_quantizable(config, quant)
    if t.fp16_activations and not _on_tensor_cores(batch, t.tensor_cores):
        raise ValueError(
            "fp16_activations=1 needs tensor_cores=1 (fp16 operands for the codes); the FMA "
            "path computes in fp32 and gains nothing from it: leave fp16_activations at 0"
        )
    if t.tensor_cores and not _tensor_cores_ok(quant, batch):
        raise ValueError(
            f"tensor_cores=1 is not supported for {quant.describe()} at batch 1 (int4 groups "
            f"under 128 compute wrong results there); leave tensor_cores at 0"
        )
    if quant.group_size:
        for name in ("block_k", "qkv_block_k"):
            if getattr(t, name) < quant.group_size:
                raise ValueError(
                    f"tile {name}={getattr(t, name)} must be >= the int4 group size "
                    f"{quant.group_size} (a streamed chunk holds whole groups)"
                )
    if t.offset_sums:
        _check_offset_sums(config, t, quant, batch, dtype)


OFFSET_SUM_COLS = 16  # kernels/decode.py OSUM_COLS: columns per published offset sum


def _check_offset_sums(config: ModelConfig, t: Tiles, quant: QuantScheme, batch: int,
                       dtype: torch.dtype) -> None:
    """The offset-sum GEMVs: symmetric int4 on tensor cores of a 16-bit model, and every
    producer of a GEMV input (O-proj, down and embed row tiles, gate/up tiles, attention
    heads) covering whole runs of OFFSET_SUM_COLS columns."""
    if dtype == torch.float32:
        raise ValueError(
            "offset_sums=1 is for bf16/fp16 models: it saves work on their fp16 operands, and "
            "in fp32 taking the offsets (about 1000 x) off after the product costs precision "
            "(1.3e-4 relative on the H100); leave offset_sums at 0"
        )
    if quant.bits != 4 or not quant.symmetric or not _on_tensor_cores(batch, t.tensor_cores):
        raise ValueError(
            f"offset_sums=1 is for symmetric int4 weights on tensor cores (batch > 1, or "
            f"tensor_cores=1); this plan has {quant.describe()} at batch {batch} with "
            f"tensor_cores={t.tensor_cores}: leave offset_sums at 0"
        )
    sizes = dict(o_rows=t.o_rows, down_rows=t.down_rows, gate_up_rows=t.gate_up_rows,
                 head_dim=config.head_dim)
    for name, size in sizes.items():
        if size % OFFSET_SUM_COLS:
            raise ValueError(
                f"offset_sums=1 needs {name}={size} to be a multiple of {OFFSET_SUM_COLS} "
                f"(its producers publish sums per {OFFSET_SUM_COLS} columns); leave "
                f"offset_sums at 0"
            )


def _with_tuned(tiles: Tiles, config: ModelConfig, batch: int, dtype: torch.dtype,
                gpu: GpuSpec) -> Tiles:
    """`tiles` with the autotuner's stored choice for this GPU and shape, if any and valid
    (a stale entry must not stop a model from loading)."""
    from flashformer_triton.tuning import load_tuned_tiles

    tuned = load_tuned_tiles(gpu.name, config, batch, dtype)
    if not tuned:
        return tiles
    candidate = replace(tiles, **tuned)
    try:
        _check_tiles(config, candidate, batch)
    except ValueError:
        return tiles
    return candidate
