"""The persistent decode-step kernel: one launch runs every layer of one decode step.

Each program takes task ids until the table is empty: with the static schedule (the plan's
default) program p runs p, p + grid, p + 2 grid, ... and loads its next row while a task
runs; otherwise it pops them from a global atomic queue. A task first issues the load of
its first weight chunk, then spin-waits (acquire) on its producer counter, so weights of
the next stage stream while the current one finishes (EARLY_PROBE: it reads the counter,
relaxed, before that load, and an acquire fence replaces the first poll if the read met
the target; EARLY_PROBE 2: the previous task's publishing fence made that read already);
after its stores it signals its own counter (barrier + release; NEXT_HINT: the task loop
does, after hinting the program's next first chunk into L2). The table
(plan.py) is topologically ordered, so a single program can run it alone, which is how the
Triton interpreter runs it; on a GPU either schedule makes progress as long as every
program is resident (runtime.py sizes the grid so), since the earliest unfinished task
always has its producers done.

No reset launch: the last program to leave zeroes the queue and every counter, so the next
launch (or CUDA-graph replay) starts clean. Spin-waits are bounded: on timeout the task
records itself in the control block, skips its body and every other waiter bails out.

Buffers (fp32 unless noted; B = plan batch):
  h [B, D] residual stream; xn_mlp / xn_attn [B, D]: h times the weights of the
  next RMSNorm (input norm / post-attention norm), ss_mlp [B, D/BN_DOWN] / ss_attn
  [B, D/BN_O]: h's sums of squares per producer tile; q [B, H*HD]; qk_raw [B, (H+KVH)*HD]
  query and key rows before the qk-norm (Qwen3); attn [B, H*HD] and act [B, F]; logits
  [B, V]. xn, attn and act, the GEMVs' inputs, are in the plan's activation dtype (the model
  dtype, or fp16 for quantized bf16 models);
  part_m/part_l [B, H, NSPLIT], part_o [B, H, NSPLIT, HD] flash-decoding partials;
  partial [DOWN_SPLITS, B, D] the down projection's partial sums over parts of F;
  osum_xn_mlp / osum_xn_attn / osum_attn / osum_act [B, width / OSUM_COLS]: with
  offset-sum int4 GEMVs (plan tile offset_sums), the offset sums of each GEMV input,
  written by its producers (_store_offset_sums);
  k_cache/v_cache [L, B, KVH, S_MAX, HD] (model dtype); ctrl int32 [8]; counters int32.
Task rows are int32 [op, layer, a, b, c, wait counter, wait target, signal counter, aux
counter] (plan.TASK_FIELDS).
The plain-torch statement of the same maths is flashformer_triton.reference.
"""

import triton
import triton.language as tl

# Opcodes and task-row columns (plan.Op / plan.TASK_FIELDS).
OP_EMBED = tl.constexpr(0)
OP_QKV = tl.constexpr(1)
OP_ATTN = tl.constexpr(2)
OP_OPROJ = tl.constexpr(3)
OP_GATEUP = tl.constexpr(4)
OP_DOWN = tl.constexpr(5)
OP_LMHEAD = tl.constexpr(6)
TASK_COLS = tl.constexpr(9)

# Control block slots (runtime.CTRL_*).
CTRL_QUEUE = tl.constexpr(0)
CTRL_DONE = tl.constexpr(1)
# ERR_BASE - id of the earliest task (in table order) that timed out, 0 when fine. The
# earliest, not the first in time: with every program spinning at once, that is the task
# closest to the cause; everything downstream of it times out too.
CTRL_ERR_TASK = tl.constexpr(2)
CTRL_ERR_SEEN = tl.constexpr(3)  # the count it saw (in a rare race: another failed task's)
ERR_BASE = tl.constexpr(1 << 30)


# ---------------------------------------------------------------- timeline (opt-in)
# PROFILE: every task writes [program, SM, start, ready (after its wait), end] (int64, ns of
# the global timer) to prof[task]. Inline PTX: GPU only; compiled away when PROFILE is off.


@triton.jit
def _now(anchor):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [anchor],
                                     dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _sm_id(anchor):
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [anchor], dtype=tl.int32,
                                     is_pure=False, pack=1)


# ---------------------------------------------------------------- dependency protocol


# _probe's reads: one per thread at the default 4 warps (replicated with more warps, shared
# with fewer; tl.min over them is the same for every thread either way).
PROBE_LANES = tl.constexpr(128)


@triton.jit
def _probe(counters_ptr, counter, EARLY_PROBE: tl.constexpr):
    """EARLY_PROBE (plan tile early_probe; GPU only, inline PTX): a relaxed read of the task's
    counter by every thread, issued first thing in a task so that its round trip overlaps
    those of the task's first loads; _wait decides on it after them (an acquire there would
    hold those loads back). Otherwise a placeholder."""
    if EARLY_PROBE:
        ptrs = counters_ptr + tl.maximum(counter, 0) + tl.zeros([PROBE_LANES], dtype=tl.int32)
        seen = tl.inline_asm_elementwise("ld.relaxed.gpu.global.b32 $0, [$1];", "=r,l",
                                         [ptrs], dtype=tl.int32, is_pure=False, pack=1)
    else:
        seen = 0
    return seen


# The probe's acquire fence, by ACQUIRE_FENCE (see _wait).
PROBE_FENCE_ASM = tl.constexpr(("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;",
                                "fence.acquire.gpu;\n\tmov.u32 $0, 0;"))


@triton.jit
def _wait(counters_ptr, ctrl_ptr, counter, target, task_id, max_spin, prof_ptr, probe,
          IGNORE_DEPS: tl.constexpr, PROFILE: tl.constexpr, EARLY_PROBE: tl.constexpr,
          ACQUIRE_FENCE: tl.constexpr):
    """Spin (acquire) until counters[counter] >= target; False on timeout or on another
    task's failure. counter < 0 means no dependency. IGNORE_DEPS (benchmark diagnostic only:
    results are garbage) measures the streaming without any stage barrier.

    probe (_probe, issued before the task's first loads): where every thread already saw the
    target, an acquire fence takes the place of the first poll (a relaxed read followed by a
    fence is an acquire), so the poll's round trip hides behind the first chunk's. With
    EARLY_PROBE 2 the probe may come from the previous task's publish (_publish: thread 0's
    read, encoded -1 - value, before that fence): then no fence is needed here.

    ACQUIRE_FENCE (PTX 8.6 on sm_90, plan constexpr): that fence is `fence.acquire.gpu`,
    which ptxas makes a bare L1 invalidation (CCTL.IVALL), rather than `fence.acq_rel.gpu`,
    which also waits at a MEMBAR.ALL.GPU for the task's loads in flight (its first chunk)
    though an acquire has no earlier stores of its own to publish."""
    need = tl.where((counter >= 0) & (not IGNORE_DEPS), target, 0)
    ptr = counters_ptr + tl.maximum(counter, 0)
    if EARLY_PROBE:
        early = tl.min(probe, axis=0)
        if EARLY_PROBE == 2:
            fenced = early < 0
            early = tl.where(fenced, -1 - early, early)
        else:
            fenced = False
        if early >= need:
            if not fenced:
                tl.inline_asm_elementwise(PROBE_FENCE_ASM[ACQUIRE_FENCE], "=r,r", [early],
                                          dtype=tl.int32, is_pure=False, pack=1)
            seen = early
        else:
            seen = tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()  # every thread's fence (or thread 0's acquire) before any reads
    else:
        seen = tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")
    spins = max_spin * 0
    failed = spins
    while (seen < need) & (spins < max_spin) & (failed == 0):
        seen = tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")
        spins += 1
        if spins % 32 == 0:  # another task's failure: checked now and then, off the hot path
            failed = tl.load(ctrl_ptr + CTRL_ERR_TASK, volatile=True)
    ok = seen >= need
    if PROFILE:
        tl.store(prof_ptr + task_id * 5 + 3, _now(task_id))
    if seen < need:
        code = ERR_BASE - task_id
        if tl.atomic_max(ctrl_ptr + CTRL_ERR_TASK, code) < code:
            tl.store(ctrl_ptr + CTRL_ERR_SEEN, seen)
    return ok


@triton.jit
def _task_row(tasks_ptr, task, n_tasks):
    """The task's row (zeros past the end of the table)."""
    row = tasks_ptr + task * TASK_COLS
    live = task < n_tasks
    return (tl.load(row + 0, mask=live, other=0), tl.load(row + 1, mask=live, other=0),
            tl.load(row + 2, mask=live, other=0), tl.load(row + 3, mask=live, other=0),
            tl.load(row + 4, mask=live, other=0), tl.load(row + 5, mask=live, other=0),
            tl.load(row + 6, mask=live, other=0), tl.load(row + 7, mask=live, other=0),
            tl.load(row + 8, mask=live, other=0))


@triton.jit
def _release(counters_ptr, counter):
    """One release increment of `counter` (none where it is -1: no task waits on it)."""
    if counter >= 0:
        tl.atomic_add(counters_ptr + counter, 1, sem="release", scope="gpu")


@triton.jit
def _signal(counters_ptr, counter, DEFER_SIGNAL: tl.constexpr):
    """Publish this task's stores: every thread's writes, then one release increment.
    DEFER_SIGNAL (EARLY_PROBE 2, NEXT_HINT): the increment is left to the task loop and the
    counter returned; otherwise -1."""
    tl.debug_barrier()
    if DEFER_SIGNAL:
        return counter
    else:
        _release(counters_ptr, counter)
        return -1


@triton.jit
def _tile_rows(tile, BN: tl.constexpr, N):
    """The rows of row tile `tile` of an [N, ?] matrix (O-proj, down, LM head), and which of
    them exist."""
    rows = tile * BN + tl.arange(0, BN)
    return rows, rows < N


@triton.jit
def _qkv_rows(head, chunk, HD: tl.constexpr, BN_QKV: tl.constexpr, QKV_ROWS: tl.constexpr):
    """The rows of QKV task (head, chunk) in the stacked [q; k; v] matrix, and which exist."""
    rows = head * HD + chunk * BN_QKV + tl.arange(0, BN_QKV)
    return rows, rows < QKV_ROWS


@triton.jit
def _gate_up_rows(tile, BN_UP: tl.constexpr, F: tl.constexpr):
    """The rows of gate/up tile `tile` in the stacked [gate; up] matrix, gate row f and up row
    f interleaved (so one tile yields both halves of SwiGLU), and their f indices."""
    j = tl.arange(0, 2 * BN_UP)
    f_rows = tile * BN_UP + j // 2
    return f_rows + (j % 2) * F, f_rows


# Thread 0 reads the next task's counter, fences and increments this task's counter: the fence
# releases this task's stores (fence then relaxed increment) and acquires what the read saw
# (relaxed read then fence), so the next task needs no fence of its own. Other threads give
# the largest int32, so a minimum over the threads is thread 0's read.
INT32_MAX = tl.constexpr(0x7FFFFFFF)
PUBLISH_ASM = tl.constexpr("""{
        .reg .pred p;
        .reg .b32 t;
        mov.u32 t, %tid.x;
        setp.eq.u32 p, t, 0;
        mov.u32 $0, 0x7FFFFFFF;
        @p ld.relaxed.gpu.global.b32 $0, [$1];
        @p fence.acq_rel.gpu;
        @p red.relaxed.gpu.global.add.s32 [$2], 1;
        }""")


@triton.jit
def _publish(counters_ptr, counter, next_counter):
    """EARLY_PROBE 2 (static schedule): publish the task's counter (_signal left it, after
    its barrier) in one fence with the next task's probe. Returns that probe for _wait
    (thread 0's read as -1 - value, the largest int32 in other threads, so that the minimum
    over the threads is thread 0's) and whether there is one."""
    if counter >= 0:
        seen = tl.inline_asm_elementwise(PUBLISH_ASM, "=r,l,l",
                                         [counters_ptr + tl.maximum(next_counter, 0),
                                          counters_ptr + counter],
                                         dtype=tl.int32, is_pure=False, pack=1)
        # The read comes before this task's own increment: count it where the next task
        # waits on the same counter (this thread's own stores need no acquire).
        own = tl.where(next_counter == counter, 1, 0)
        seen = tl.where(seen == INT32_MAX, seen, -1 - (seen + own))
        fenced = 1
    else:
        seen = 0
        fenced = 0
    return seen, fenced


@triton.jit
def _arrive(counters_ptr, counter):
    """Publish this task's stores and arrive on an arrival counter (the task's aux counter):
    returns how many arrived before; the last one (acquiring the others' stores) finishes the
    work of all of them."""
    tl.debug_barrier()
    return tl.atomic_add(counters_ptr + counter, 1, sem="acq_rel", scope="gpu")


# ---------------------------------------------------------------- GEMV building blocks
# A GEMV reads its activations x [B, K] in the model dtype, already multiplied by the RMSNorm
# weights where a norm comes first: the tasks that write the residual stream publish them
# (_publish_rows), with per-tile sums of squares for the norm's 1/rms (_inv_rms), applied to
# the GEMV's output. So the streamed loops only convert, multiply and add.
#
# Batch 1 runs on the FMA units, batch > 1 (and quantized weights at batch 1, plan tile
# tensor_cores) on tensor cores with the weights as the matmul's M operand (x^T is the N
# operand: the batch, padded to a power of two). There a chunk's
# columns are cut in KSPLIT blocks (int4: its groups) that form the batch dimension of one
# 3-D tl.dot: each warp owns a block, so no warp reloads another's weights. KSPLIT 1 (plan
# tile plain_dot, and tiles of 64 rows or more) multiplies the chunk as one 2-D dot instead.
#
# Up to this padded batch, a task requests the loads that need no weights (the residual
# rows and norm weights, the norm's 1/rms, RoPE's angles) before its weight stream, so their
# round trip hides behind it instead of following it. Above it they stay after the stream:
# the registers they hold across it made 8B batch 16's kernel spill (6.55 -> 7.83 ms,
# bench/NOTES.md row 49).
EARLY_LOADS_MAX_BP = tl.constexpr(4)


@triton.jit
def _load_w(w_ptr, rows, row_mask, K, k0, BK: tl.constexpr, WBITS: tl.constexpr,
            GROUP: tl.constexpr, USE_DOT: tl.constexpr, KSPLIT: tl.constexpr):
    """The stored codes of the [rows, BK] chunk at column k0 of a row-major [?, K] weight
    matrix (read once: evict first). Model dtype or int8: [BN, BK], or [KSPLIT, BN, BK/KSPLIT]
    for tl.dot with KSPLIT > 1. int4 (two columns per byte): the chunk's BK/GROUP groups as
    [BN, groups, GROUP/2] bytes, or [groups, BN, GROUP/2] for tl.dot, so each group meets its
    scale by broadcasting."""
    if WBITS == 4:
        HALF_G: tl.constexpr = GROUP // 2
        grp = k0 // GROUP + tl.arange(0, BK // GROUP)
        byte = tl.arange(0, HALF_G)[None, None, :]
        gmask = grp < K // GROUP
        if USE_DOT:
            offs = rows[None, :, None] * (K // 2) + grp[:, None, None] * HALF_G + byte
            mask = row_mask[None, :, None] & gmask[:, None, None]
        else:
            offs = rows[:, None, None] * (K // 2) + grp[None, :, None] * HALF_G + byte
            mask = row_mask[:, None, None] & gmask[None, :, None]
    elif USE_DOT and KSPLIT > 1:
        SUB: tl.constexpr = BK // KSPLIT
        kk = (k0 + tl.arange(0, KSPLIT)[:, None, None] * SUB
              + tl.arange(0, SUB)[None, None, :])
        offs = rows[None, :, None] * K + kk
        mask = row_mask[None, :, None] & (kk < K)
    else:
        kk = k0 + tl.arange(0, BK)
        offs = rows[:, None] * K + kk[None, :]
        mask = row_mask[:, None] & (kk[None, :] < K)
    return tl.load(w_ptr + offs, mask=mask, other=0, eviction_policy="evict_first")


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    """a @ b in fp32 from operands already rounded to the storage dtype.

    DOT_PREC "upcast" (set only under the Triton interpreter, whose bf16 dot is wrong) does
    the product in fp32: bf16 x bf16 products are exact in fp32, so the maths is the GPU's."""
    if DOT_PREC == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=DOT_PREC)
    return out


@triton.jit
def _load_x(x_ptr, cols, K):
    """Batch 1: the activations at `cols` (any shape) in fp32.

    x is written by other programs this launch, yet a plain (L1-cached) load is safe: it
    follows the task's acquire poll, which invalidates the SM's L1 (CCTL.IVALL in the
    SASS). The other tasks of a stage on this SM then find x in L1 (1B batch 1 1.023 ->
    1.009 ms, int4 0.718 -> 0.695 against ".cg", bench/NOTES.md row 44)."""
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _load_xt(x_ptr, seq, cols, K, B: tl.constexpr):
    """Batch > 1: x[seq, cols] in the model dtype, seq and cols broadcast against each other
    (x^T: the sequences on an inner axis). L1-cached like _load_x (in the pipelined loops
    Triton copies it with cp.async.cg, which bypasses L1 either way)."""
    mask = (cols < K) & (seq < B)
    return tl.load(x_ptr + seq * K + cols, mask=mask, other=0.0)


@triton.jit
def _load_ss(ss_ptr, B: tl.constexpr, BP: tl.constexpr, PARTS: tl.constexpr,
             PARTS_P: tl.constexpr):
    """The per-tile sums of squares the producers of h wrote (ss [B, PARTS]) -> [BP, PARTS_P],
    for _inv_rms. Apart from it so that a task requests them before its weight stream and
    does the maths after it (8B int4 batch 1 2.271 / 2.268 -> 2.247 / 2.247 ms, same run;
    bench/NOTES.md row 57)."""
    bidx = tl.arange(0, BP)
    p = tl.arange(0, PARTS_P)
    return tl.load(ss_ptr + bidx[:, None] * PARTS + p[None, :],
                   mask=(bidx[:, None] < B) & (p[None, :] < PARTS), other=0.0,
                   cache_modifier=".cg")


@triton.jit
def _inv_rms(parts, D: tl.constexpr, EPS: tl.constexpr):
    """RMSNorm's 1/rms per sequence [BP] from _load_ss's parts, added in a fixed order, so
    every reader agrees bit for bit."""
    return tl.rsqrt(tl.sum(parts, axis=1) / D + EPS)


# Small integers to fp32 without the int->float converter (a quarter-rate unit; int4 needs two
# conversions per byte): OR the value into the mantissa of 2^23 and subtract 2^23 (exact for
# 0 <= v < 2^23).
MAGIC_BITS = tl.constexpr(0x4B000000)
MAGIC = tl.constexpr(8388608.0)


@triton.jit
def _as_f32_plus_magic(v):
    """float(v) + 2^23 for an unsigned integer tensor v < 2^23 (two integer ops)."""
    return (v.to(tl.int32) | MAGIC_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _int8_to_f32(w):
    """int8 codes -> fp32 exactly, by the same trick: the byte XOR 0x80 is w + 128 (0..255),
    and the one XOR also sets the bits of 2^23 (5.50 -> 4.95 ms on 8B, bench/NOTES.md Q10)."""
    u = w.to(tl.uint8, bitcast=True).to(tl.int32)
    return (u ^ (MAGIC_BITS | 0x80)).to(tl.float32, bitcast=True) - (MAGIC + 128.0)


@triton.jit
def _int8_to_f16(w):
    """int8 codes -> fp16 on tensor-core paths, four per 32-bit word in five instructions
    (Triton's own conversion takes about four per code): XOR 0x80 gives w + 128 per byte, two
    byte permutes put each byte under the fp16 exponent of 1024 (1024 + w + 128, exact) and
    two packed subtractions of 1152 leave w. GPU only (inline PTX)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 t, c;
        xor.b32 t, $2, 0x80808080;
        mov.b32 c, 0x64806480;
        prmt.b32 $0, t, 0x64646464, 0x4140;
        prmt.b32 $1, t, 0x64646464, 0x4342;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        }""",
        "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)


# Packed int4 words (quantize.pack_int4's layout) -> fp16, the eight codes of a 32-bit word
# in nine instructions: one shift lines bytes 1 and 3 up under bytes 0 and 2 (_INT4_SPREAD),
# masks put each low nibble under the fp16 exponent of 1024 and each high nibble (4 bits up)
# under that of 64, and four packed subtracts take those off with the zero point, exactly.
# The shift pairs bytes 0 with 2 and 1 with 3, so the codes come out in the byte order 0, 2,
# 1, 3; pack_int4 stores each word's column pairs in that order, so they come out in column
# order. (The layout before, columns 2j and 2j + 1 in byte j, took two byte permutes a word
# and split x into even and odd columns: 8B int4 0.4-0.6% slower at batch 1, spills at batch
# 4 and 16; bench/NOTES.md Q38.)
_INT4_SPREAD = """
        shr.b32 t, $4, 8;
        lop3.b32 $0, $4, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $1, t, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $2, $4, 0x00F000F0, 0x54005400, 0xEA;
        lop3.b32 $3, t, 0x00F000F0, 0x54005400, 0xEA;"""


def _int4_f16_asm(off_lo: str, off_hi: str) -> str:
    return ("{\n        .reg .b32 t, lo, hi;\n"
            f"        mov.b32 lo, {off_lo};\n        mov.b32 hi, {off_hi};"
            + _INT4_SPREAD + """
        sub.f16x2 $0, $0, lo;
        sub.f16x2 $1, $1, lo;
        sub.f16x2 $2, $2, hi;
        sub.f16x2 $3, $3, hi;
        }""")


# Offsets: 1024 and 64 (the codes as they are) or with the symmetric scheme's 8 (1032, 72).
INT4_F16_CODES = tl.constexpr(_int4_f16_asm("0x64006400", "0x54005400"))
INT4_F16_SIGNED = tl.constexpr(_int4_f16_asm("0x64086408", "0x54805480"))


# What z_ptr holds for int4 weights (constexpr ZERO_POINTS): nothing (the symmetric scheme's
# fixed 8, taken off in the converter), the stored zero points (asymmetric), or the offset
# sums of x (plan tile offset_sums: symmetric codes enter the dot with the offsets below).
ZP_FIXED = tl.constexpr(0)
ZP_STORED = tl.constexpr(1)
ZP_OFFSET_SUMS = tl.constexpr(2)

# Symmetric int4 codes with no subtracts (tile offset_sums): _INT4_SPREAD alone,
# 1024 + code (low nibbles) and 64 + code (high), five instructions per 32-bit word instead
# of nine. So the dot's sums carry, on top of sum((code - 8) x), sum(x) times 1032 (the low
# nibbles' columns, the first 16 of every 32) or 72 (the high ones'): the producers of x
# publish those sums per OSUM_COLS columns (_store_offset_sums) and the GEMV takes them off
# once per group.
INT4_RAW_ASM = tl.constexpr("{\n        .reg .b32 t;" + _INT4_SPREAD + "\n        }")
INT4_OFF_LO = tl.constexpr(1032.0)  # 1024 in the operand + the zero point 8
INT4_OFF_HI = tl.constexpr(72.0)  # 64 + 8
OSUM_COLS = tl.constexpr(16)


@triton.jit
def _int4_raw_to_f16(w):
    """Packed int4 bytes -> (1024 + low nibble, 64 + high nibble) in fp16, each word's bytes
    in column order (INT4_RAW_ASM). GPU only (inline PTX)."""
    return tl.inline_asm_elementwise(INT4_RAW_ASM, "=r,=r,=r,=r,r", [w],
                                     dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def _int4_to_f16(w, SIGNED: tl.constexpr):
    """Packed int4 bytes -> (low, high) nibble codes in fp16, minus 8 when SIGNED (the
    symmetric scheme's fixed zero point), each word's bytes in column order
    (_int4_f16_asm). GPU only (inline PTX)."""
    if SIGNED:
        out = tl.inline_asm_elementwise(INT4_F16_SIGNED, "=r,=r,=r,=r,r", [w],
                                        dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        out = tl.inline_asm_elementwise(INT4_F16_CODES, "=r,=r,=r,=r,r", [w],
                                        dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    return out


@triton.constexpr_function
def _scale_words(K, BK, GROUP, ZERO_POINTS, SCALE_WORDS, USE_DOT):
    """Whether an int4 chunk's scales load as 4-byte words of two groups' fp16 scales each:
    with the plan tile scale_words, for symmetric codes on tensor cores with an even number
    of groups a row and whole pairs a chunk. Triton's pipeliner copies only loads of 4 bytes
    or more a thread (cp.async), so the chunk's scales then travel with its codes, in the
    same iteration, where 2-byte loads are requested a chunk ahead in registers."""
    K, BK, GROUP = int(K), int(BK), int(GROUP)
    return (bool(SCALE_WORDS) and bool(USE_DOT) and int(ZERO_POINTS) == int(ZP_FIXED)
            and GROUP > 0 and (K // GROUP) % 2 == 0 and BK % (2 * GROUP) == 0)


@triton.jit
def _group_params(s_ptr, z_ptr, rows, row_mask, K, k0, BK: tl.constexpr, GROUP: tl.constexpr,
                  ZERO_POINTS: tl.constexpr, SCALE_WORDS: tl.constexpr, USE_DOT: tl.constexpr):
    """The scales and zero points (fp32) of an int4 chunk's groups, shaped like the chunk's
    first two dims (_load_w's layout); the scales read as 4-byte words where _scale_words
    says so, else one fp16 a load."""
    if _scale_words(K, BK, GROUP, ZERO_POINTS, SCALE_WORDS, USE_DOT):
        # [pairs, rows] words -> [pairs, rows, 2] halves (the even group in the low half)
        # -> [groups, rows]. The fixed zero point 8 is for the interpreter's path.
        pair = k0 // (2 * GROUP) + tl.arange(0, BK // (2 * GROUP))
        widx = rows[None, :] * (K // (2 * GROUP)) + pair[:, None]
        words = tl.load(s_ptr.to(tl.pointer_type(tl.int32)) + widx,
                        mask=row_mask[None, :] & (pair < K // (2 * GROUP))[:, None], other=0)
        even = (words & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        odd = (words >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        scale = tl.reshape(tl.permute(tl.join(even, odd), (0, 2, 1)),
                           (BK // GROUP, rows.shape[0])).to(tl.float32)
        return scale, tl.zeros_like(scale) + 8.0
    grp = k0 // GROUP + tl.arange(0, BK // GROUP)
    gmask = grp < K // GROUP
    if USE_DOT:
        sidx = rows[None, :] * (K // GROUP) + grp[:, None]
        smask = row_mask[None, :] & gmask[:, None]
    else:
        sidx = rows[:, None] * (K // GROUP) + grp[None, :]
        smask = row_mask[:, None] & gmask[None, :]
    scale = tl.load(s_ptr + sidx, mask=smask, other=0.0).to(tl.float32)
    if ZERO_POINTS == ZP_STORED:
        zero = tl.load(z_ptr + sidx, mask=smask, other=0).to(tl.float32)
    else:
        zero = tl.zeros_like(scale) + 8.0
    return scale, zero


@triton.jit
def _offset_parts(osum_ptr, K, k0, BK: tl.constexpr, GROUP: tl.constexpr, B: tl.constexpr,
                  BP: tl.constexpr):
    """What the offset-sum GEMV takes off each group of the chunk at k0, per sequence, in
    parts: the GROUP // OSUM_COLS offset sums of x there (osum [B, K / OSUM_COLS], written by
    x's producers this launch) -> [groups, BP, parts] fp32. Loaded beside x in the same
    chunk (_chunk_mv), so that Triton's pipeliner requests both stages ahead."""
    PER_GROUP: tl.constexpr = GROUP // OSUM_COLS
    grp = k0 // GROUP + tl.arange(0, BK // GROUP)
    blocks = grp[:, None, None] * PER_GROUP + tl.arange(0, PER_GROUP)[None, None, :]
    seq = tl.arange(0, BP)[None, :, None]
    return tl.load(osum_ptr + seq * (K // OSUM_COLS) + blocks,
                   mask=(seq < B) & (grp < K // GROUP)[:, None, None], other=0.0)


@triton.jit
def _chunk_params(s_ptr, z_ptr, rows, row_mask, K, k0, BK: tl.constexpr, WBITS: tl.constexpr,
                  GROUP: tl.constexpr, ZERO_POINTS: tl.constexpr, SCALE_WORDS: tl.constexpr,
                  USE_DOT: tl.constexpr):
    """_group_params of the chunk at k0 for int4 weights (columns past K come masked: zeros;
    with ZP_OFFSET_SUMS the zeros are unused: _chunk_mv reads x's offset sums); other weights
    have none (placeholders)."""
    if WBITS == 4:
        scale, zero = _group_params(s_ptr, z_ptr, rows, row_mask, K, k0, BK, GROUP, ZERO_POINTS,
                                    SCALE_WORDS, USE_DOT)
    else:
        scale = 0.0
        zero = 0.0
    return scale, zero


@triton.jit
def _load_first(w_ptr, s_ptr, z_ptr, rows, row_mask, K, k0, BK: tl.constexpr,
                WBITS: tl.constexpr, GROUP: tl.constexpr, ZERO_POINTS: tl.constexpr,
                SCALE_WORDS: tl.constexpr, USE_DOT: tl.constexpr, KSPLIT: tl.constexpr,
                PF_K: tl.constexpr):
    """A task's first chunk for _gemv, requested before its wait: the codes and the int4
    scales and zero points (after the wait, the scales' round trip to HBM stalled every
    gate/up task: ncu, 8B int4). Triton stages each load through registers right after it
    is issued, so the hints come first (PF_K > 0): the tile's next PF_K columns, and the
    scales' line (their load then waits for L2 only, after the codes' round trip rather than
    before it)."""
    if PF_K > 0:
        _prefetch_l2(w_ptr, rows, row_mask, K, k0 + BK, PF_K, WBITS)
        if WBITS == 4:  # one 128-byte line a row: 64 fp16 scales, 128 uint8 zero points
            _prefetch_l2(s_ptr, rows, row_mask, K // GROUP, k0 // GROUP, 64, 0)
            if ZERO_POINTS == ZP_STORED:
                _prefetch_l2(z_ptr, rows, row_mask, K // GROUP, k0 // GROUP, 128, 0)
    w = _load_w(w_ptr, rows, row_mask, K, k0, BK, WBITS, GROUP, USE_DOT, KSPLIT)
    scale, zero = _chunk_params(s_ptr, z_ptr, rows, row_mask, K, k0, BK, WBITS, GROUP,
                                ZERO_POINTS, SCALE_WORDS, USE_DOT)
    return w, scale, zero


@triton.jit
def _int4_lo_cols(k0, BK: tl.constexpr, GROUP: tl.constexpr, IN_ORDER: tl.constexpr):
    """The columns of the low nibbles of the int4 chunk at k0, [groups, GROUP / 2] like the
    chunk's bytes (_load_w); the high nibbles' are 16 further on (quantize.pack_int4: pair i
    of each 32 columns holds columns i and 16 + i, a word's pairs stored 0, 2, 1, 3).
    IN_ORDER: the bytes went through a PTX converter, which undoes that order; else they are
    used as stored."""
    pair = tl.arange(0, GROUP // 2)
    if not IN_ORDER:
        pair = (pair // 4) * 4 + (pair % 2) * 2 + (pair // 2) % 2
    grp = k0 // GROUP + tl.arange(0, BK // GROUP)
    return grp[:, None] * GROUP + ((pair // 16) * 32 + pair % 16)[None, :]


@triton.jit
def _int4_terms(w, scale, zero):
    """A packed int4 chunk (_load_w's layout) and its groups' scales and zero points
    (_group_params) -> (code - zero) of its low and high nibbles (columns: _int4_lo_cols) in
    fp32 (the maths of quantize.dequantize)."""
    # code + 2^23 - (zero + 2^23) = code - zero, exactly.
    lo = _as_f32_plus_magic(w & 15) - (zero + MAGIC)[:, :, None]
    hi = _as_f32_plus_magic(w >> 4) - (zero + MAGIC)[:, :, None]
    return lo, hi


@triton.jit
def _chunk_mv(w, x_ptr, z_ptr, scale, zero, K, k0,
              B: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
              WBITS: tl.constexpr, GROUP: tl.constexpr, ZERO_POINTS: tl.constexpr,
              CDT: tl.constexpr, KSPLIT: tl.constexpr, PTX: tl.constexpr):
    """One streamed chunk on tensor cores: per column block (int4: group) of the chunk,
    (w dequantized) @ x^T -> [blocks, BN, BP] fp32. int8: the codes enter the product as they
    are (in fp16 on the GPU, exact, with x in fp16 too); the per-row scale is applied once,
    after the last chunk (_gemv). int4: `zero` is the groups' zero points; with
    ZP_OFFSET_SUMS, z_ptr points at x's offset sums instead (_offset_parts)."""
    # Quantized codes become fp16 operands through the inline-PTX converters (not in the
    # interpreter, nor for fp32 models, whose operands stay fp32). x comes in fp16 already
    # when the plan stores activations so (tile fp16_activations), else it is converted here.
    F16_CODES: tl.constexpr = PTX and tl.float32 != CDT
    XDT: tl.constexpr = x_ptr.dtype.element_ty
    if WBITS == 4:
        # x^T as [groups, pairs, BP] for the low nibbles and for the high ones.
        lo_cols = _int4_lo_cols(k0, BK, GROUP, F16_CODES)[:, :, None]
        seq = tl.arange(0, BP)[None, None, :]
        xe = _load_xt(x_ptr, seq, lo_cols, K, B)
        xo = _load_xt(x_ptr, seq, lo_cols + 16, K, B)
        offsets = 0.0
        if ZERO_POINTS == ZP_OFFSET_SUMS:
            # The codes with their operand offsets (INT4_RAW_ASM), whose share of the sums
            # comes off per group and sequence, then the scales multiply (as below).
            if F16_CODES:
                lo, hi = _int4_raw_to_f16(w)
            else:
                lo = (w & 15).to(tl.float32) + 1024.0
                hi = (w >> 4).to(tl.float32) + 64.0
            offsets = tl.sum(_offset_parts(z_ptr, K, k0, BK, GROUP, B, BP), axis=2)[:, None, :]
            sum_scale = scale[:, :, None]
        elif F16_CODES and ZERO_POINTS == ZP_FIXED:
            # Symmetric codes minus 8 are exact fp16 operands: the groups' scales multiply
            # the dot's [groups, BN, BP] sums in fp32 rather than every weight (a packed
            # multiply per two weights was a fifth of the loop's instructions; 8B int4 2.533
            # -> 2.432 ms, bench/NOTES.md Q25).
            lo, hi = _int4_to_f16(w, True)
            sum_scale = scale[:, :, None]
        elif F16_CODES:
            # Zero points: fp16 operands (finer than bf16), code * scale - zero * scale with
            # one rounding.
            lo, hi = _int4_to_f16(w, False)
            scale16 = scale.to(tl.float16)[:, :, None]
            zs = (zero * scale).to(tl.float16)[:, :, None]
            lo = tl.fma(lo, scale16, -zs)
            hi = tl.fma(hi, scale16, -zs)
            sum_scale = 1.0  # (in the operands)
        else:
            lo, hi = _int4_terms(w, scale, zero)
            lo = lo * scale[:, :, None]
            hi = hi * scale[:, :, None]
            if DOT_PREC != "upcast":  # (the interpreter's fp32 -> bf16 truncates)
                lo = lo.to(XDT)
                hi = hi.to(XDT)
            sum_scale = 1.0
        out = _dot(lo, xe.to(lo.dtype), DOT_PREC) + _dot(hi, xo.to(hi.dtype), DOT_PREC)
        out = (out - offsets) * sum_scale
    else:
        if KSPLIT == 1:  # [BN, BK] @ [BK, BP]
            x = _load_xt(x_ptr, tl.arange(0, BP)[None, :], k0 + tl.arange(0, BK)[:, None], K, B)
        else:
            SUB: tl.constexpr = BK // KSPLIT
            cols = (k0 + tl.arange(0, KSPLIT)[:, None, None] * SUB
                    + tl.arange(0, SUB)[None, :, None])
            x = _load_xt(x_ptr, tl.arange(0, BP)[None, None, :], cols, K, B)
        if WBITS == 8:
            if F16_CODES:
                w = _int8_to_f16(w)
            else:  # through fp32: the interpreter converts int8 -> bf16 wrongly
                w = _int8_to_f32(w).to(XDT)
        out = _dot(w, x.to(w.dtype), DOT_PREC)
    return out


@triton.jit
def _chunk_fma(acc, w, x_ptr, scale, zero, K, k0, BK: tl.constexpr, WBITS: tl.constexpr,
               GROUP: tl.constexpr):
    """Batch 1, one streamed chunk on the FMA units: acc += w * x element by element (acc is
    shaped like the chunk). Nothing is reduced across threads until the tile's last chunk
    (_gemv): a per-chunk reduction cost more shuffles and shared-memory round trips than the
    multiply-adds themselves."""
    if WBITS == 4:
        lo, hi = _int4_terms(w, scale, zero)
        lo_cols = _int4_lo_cols(k0, BK, GROUP, False)  # (no converter here)
        xe = _load_x(x_ptr, lo_cols, K)
        xo = _load_x(x_ptr, lo_cols + 16, K)
        acc += (lo * xe[None, :, :] + hi * xo[None, :, :]) * scale[:, :, None]
    else:
        x = _load_x(x_ptr, k0 + tl.arange(0, BK), K)
        if WBITS == 8:
            acc += _int8_to_f32(w) * x[None, :]
        else:
            acc += w.to(tl.float32) * x[None, :]
    return acc


@triton.jit
def _accumulate(acc, w, x_ptr, z_ptr, scale, zero, K, k0,
                B: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
                DOT_PREC: tl.constexpr, WBITS: tl.constexpr, GROUP: tl.constexpr,
                ZERO_POINTS: tl.constexpr, CDT: tl.constexpr, KSPLIT: tl.constexpr,
                PTX: tl.constexpr):
    """Add the chunk of columns k0..k0+BK to the GEMV's accumulator (its shapes: _gemv)."""
    if USE_DOT:
        acc += _chunk_mv(w, x_ptr, z_ptr, scale, zero, K, k0, B, BP, BK, DOT_PREC,
                         WBITS, GROUP, ZERO_POINTS, CDT, KSPLIT, PTX)
    else:
        acc = _chunk_fma(acc, w, x_ptr, scale, zero, K, k0, BK, WBITS, GROUP)
    return acc


@triton.jit
def _gemv(w_ptr, s_ptr, z_ptr, rows, row_mask, K, k_lo, k_hi, w_first, s_first, z_first,
          x_ptr, B: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, STAGES: tl.constexpr,
          WBITS: tl.constexpr, GROUP: tl.constexpr, ZERO_POINTS: tl.constexpr,
          SCALE_WORDS: tl.constexpr, CDT: tl.constexpr, KSPLIT: tl.constexpr, PTX: tl.constexpr):
    """out[b, n] = sum_k W[rows[n], k] * x[b, k] over columns k_lo <= k < k_hi (whole
    chunks) of a [?, K] matrix -> [BP, BN] fp32, with the first chunk (at k_lo) already
    loaded (_load_first: codes, int4 scales and zero points); W in the model dtype or
    quantized (WBITS 8/4, scales at s_ptr, zeros at z_ptr, indexed like the rows)."""
    # The accumulator keeps the chunk's blocks apart (tensor cores: [blocks, BN, BP]; batch 1:
    # shaped like the chunk) and is reduced once, after the last chunk.
    if USE_DOT:
        if WBITS == 4:
            acc = tl.zeros([BK // GROUP, BN, BP], dtype=tl.float32)
        elif KSPLIT == 1:
            acc = tl.zeros([BN, BP], dtype=tl.float32)
        else:
            acc = tl.zeros([KSPLIT, BN, BP], dtype=tl.float32)
    elif WBITS == 4:
        acc = tl.zeros([BN, BK // GROUP, GROUP // 2], dtype=tl.float32)
    else:
        acc = tl.zeros([BN, BK], dtype=tl.float32)
    # int4 scales as words (_scale_words) come in the chunk that uses them, through the
    # pipeliner; other int4 scales (and zero points) are requested a chunk ahead of their use:
    # the pipeliner leaves them to plain loads (a thread's 2 bytes are under cp.async's 4),
    # whose round trip each chunk then waited on (ncu, 8B int4: the down loop's most sampled
    # stall).
    WORDS: tl.constexpr = STAGES > 0 and WBITS == 4 and _scale_words(K, BK, GROUP, ZERO_POINTS,
                                                                     SCALE_WORDS, USE_DOT)
    scale, zero = s_first, z_first
    if WBITS == 4 and ZERO_POINTS == ZP_OFFSET_SUMS:
        tl.static_assert(USE_DOT, "int4 offset sums are for the tensor-core GEMVs")
    if not WORDS:
        scale_next, zero_next = _chunk_params(s_ptr, z_ptr, rows, row_mask, K, k_lo + BK, BK,
                                              WBITS, GROUP, ZERO_POINTS, SCALE_WORDS, USE_DOT)
    acc = _accumulate(acc, w_first, x_ptr, z_ptr, scale, zero, K, k_lo, B, BP, BK, USE_DOT,
                      DOT_PREC, WBITS, GROUP, ZERO_POINTS, CDT, KSPLIT, PTX)
    if STAGES > 0:
        # Triton's software pipeliner keeps STAGES chunks in flight (through shared memory).
        for k0 in tl.range(k_lo + BK, k_hi, BK, num_stages=STAGES):
            w = _load_w(w_ptr, rows, row_mask, K, k0, BK, WBITS, GROUP, USE_DOT, KSPLIT)
            if WORDS:  # pipelined with the codes
                scale, zero = _chunk_params(s_ptr, z_ptr, rows, row_mask, K, k0, BK, WBITS,
                                            GROUP, ZERO_POINTS, SCALE_WORDS, USE_DOT)
            else:
                scale, zero = scale_next, zero_next
                scale_next, zero_next = _chunk_params(s_ptr, z_ptr, rows, row_mask, K, k0 + BK,
                                                      BK, WBITS, GROUP, ZERO_POINTS,
                                                      SCALE_WORDS, USE_DOT)
            acc = _accumulate(acc, w, x_ptr, z_ptr, scale, zero, K, k0, B, BP, BK, USE_DOT,
                              DOT_PREC, WBITS, GROUP, ZERO_POINTS, CDT, KSPLIT, PTX)
    else:
        # Hand double-buffering: the next chunk is requested before this one's maths.
        w_next = _load_w(w_ptr, rows, row_mask, K, k_lo + BK, BK, WBITS, GROUP, USE_DOT,
                         KSPLIT)
        for k0 in range(k_lo + BK, k_hi, BK):
            w_cur = w_next
            w_next = _load_w(w_ptr, rows, row_mask, K, k0 + BK, BK, WBITS, GROUP, USE_DOT,
                             KSPLIT)
            scale, zero = scale_next, zero_next
            scale_next, zero_next = _chunk_params(s_ptr, z_ptr, rows, row_mask, K, k0 + BK,
                                                  BK, WBITS, GROUP, ZERO_POINTS,
                                                  SCALE_WORDS, USE_DOT)
            acc = _accumulate(acc, w_cur, x_ptr, z_ptr, scale, zero, K, k0, B, BP, BK, USE_DOT,
                              DOT_PREC, WBITS, GROUP, ZERO_POINTS, CDT, KSPLIT, PTX)
    # The one cross-thread reduction of the tile.
    if USE_DOT:
        if WBITS != 4 and KSPLIT == 1:  # one 2-D dot: already [BN, BP]
            out = tl.trans(acc)
        else:
            out = tl.trans(tl.sum(acc, axis=0))
    elif WBITS == 4:
        out = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    else:
        out = tl.sum(acc, axis=1)[None, :]
    if WBITS == 8:
        out = out * tl.load(s_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    return out


@triton.jit
def _prefetch_l2(w_ptr, rows, row_mask, K, k0, PF_K: tl.constexpr, WBITS: tl.constexpr):
    """Hint HBM -> L2 for columns [k0, k0 + PF_K) of the tile's rows (one address per 128-byte
    line of the stored codes), issued before a spin-wait so that the first chunks after it
    come from L2. int4 rows hold two columns per byte. _load_first hints before it loads
    the first chunk, whose staging through registers waits for its round trip (1B bf16
    batch 1 1.009 / 1.006 -> 0.994 / 0.998 ms, same run)."""
    BITS: tl.constexpr = WBITS if WBITS > 0 else w_ptr.dtype.element_ty.primitive_bitwidth
    PER_LINE: tl.constexpr = 1024 // BITS  # columns per 128-byte line
    cols = tl.minimum(k0 + tl.arange(0, PF_K // PER_LINE) * PER_LINE, K - 1)
    if WBITS == 4:
        offs = cols // 2
        row_len = K // 2
    else:
        offs = cols
        row_len = K
    safe_rows = tl.where(row_mask, rows, 0)
    ptrs = w_ptr + safe_rows[:, None] * row_len + offs[None, :]
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _hint_first(w_ptr, s_ptr, rows, row_mask, K, k0, BK: tl.constexpr, WBITS: tl.constexpr,
                GROUP: tl.constexpr, NEXT_HINT: tl.constexpr):
    """NEXT_HINT (plan tile next_hint): hint a task's first chunk, columns [k0, k0 + BK) of its
    rows, into L2 from the task before it on the same program, just before that one's
    release, whose MEMBAR waits for the stores' round trip anyway; 2: and the int4 scales'
    line of those rows."""
    _prefetch_l2(w_ptr, rows, row_mask, K, k0, BK, WBITS)
    if WBITS == 4 and NEXT_HINT == 2:
        _prefetch_l2(s_ptr, rows, row_mask, K // GROUP, k0 // GROUP, 64, 0)


@triton.jit
def _load_rows(v_ptr, rows, row_mask, B: tl.constexpr, BP: tl.constexpr, D: tl.constexpr):
    """v[:, rows] of a [B, D] fp32 buffer written by other programs this launch (.cg)."""
    bidx = tl.arange(0, BP)
    mask = (bidx < B)[:, None] & row_mask[None, :]
    return tl.load(v_ptr + bidx[:, None] * D + rows[None, :], mask=mask, other=0.0,
                   cache_modifier=".cg")


@triton.jit
def _publish_inputs(h_ptr, g_ptr, rows, row_mask, B: tl.constexpr, BP: tl.constexpr,
                    D: tl.constexpr):
    """What _publish_rows needs besides a task's result: the residual stream's rows h[:, rows]
    as they are (another program wrote them) and the next RMSNorm's weights g[rows]."""
    h = _load_rows(h_ptr, rows, row_mask, B, BP, D)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    return h, g


@triton.jit
def _store_offset_sums(osum_ptr, x, first, mask, N: tl.constexpr):
    """For the int4 GEMVs with offset sums (INT4_RAW_ASM) that will read x [R, N] (as they
    read it: stored and back in fp32, zeros where nothing is): per OSUM_COLS columns, the sum
    of x times the offset its codes' operands carry, to osum_ptr + first [R] + j for the j-th
    run of OSUM_COLS columns where mask [R, N / OSUM_COLS]. Low nibbles (INT4_OFF_LO) meet
    the even runs of a row, high nibbles (INT4_OFF_HI) the odd ones (_int4_lo_cols); a row
    has an even number of runs (int4 inputs are whole groups of 32), so the parity of the
    index in osum is the run's."""
    R: tl.constexpr = x.shape[0]
    NB: tl.constexpr = N // OSUM_COLS
    run = first[:, None] + tl.arange(0, NB)[None, :]
    sums = tl.sum(tl.reshape(x, [R, NB, OSUM_COLS]), axis=2)
    sums *= tl.where(run % 2 == 0, INT4_OFF_LO, INT4_OFF_HI)
    tl.store(osum_ptr + run, sums, mask=mask)


@triton.jit
def _store_tile_offset_sums(osum_ptr, x, tile, B: tl.constexpr, WIDTH: tl.constexpr):
    """_store_offset_sums of a row tile: columns tile * BN.. of a [B, WIDTH] GEMV input,
    x [BP, BN] as stored (osum [B, WIDTH / OSUM_COLS])."""
    BP: tl.constexpr = x.shape[0]
    BN: tl.constexpr = x.shape[1]
    NB: tl.constexpr = BN // OSUM_COLS
    bidx = tl.arange(0, BP)
    cols = tile * BN + tl.arange(0, BN)
    runs = tile * NB + tl.arange(0, NB)
    x = tl.where((bidx < B)[:, None] & (cols < WIDTH)[None, :], x.to(tl.float32), 0.0)
    _store_offset_sums(osum_ptr, x, bidx * (WIDTH // OSUM_COLS) + tile * NB,
                       (bidx < B)[:, None] & (runs < WIDTH // OSUM_COLS)[None, :], BN)


@triton.jit
def _publish_rows(h_ptr, xn_ptr, ss_ptr, osum_ptr, g, tile, rows, row_mask, h,
                  B: tl.constexpr, BP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                  OFFSET_SUMS: tl.constexpr):
    """Store the residual stream's new h[:, rows] (each row has one writer per stage) and
    what the readers of the next RMSNorm (weights g[rows]) need: xn = h * g in the model
    dtype and this tile's sum of h^2 per sequence, ss[b, tile] (and with OFFSET_SUMS xn's
    offset sums, osum [B, D / OSUM_COLS]). The callers load h's old value and g
    (_publish_inputs; before their GEMV up to EARLY_LOADS_MAX_BP)."""
    bidx = tl.arange(0, BP)
    bmask = bidx < B
    mask = bmask[:, None] & row_mask[None, :]
    offs = bidx[:, None] * D + rows[None, :]
    tl.store(h_ptr + offs, h, mask=mask)
    xn = (h * g[None, :]).to(xn_ptr.dtype.element_ty)
    tl.store(xn_ptr + offs, xn, mask=mask)
    if OFFSET_SUMS:
        _store_tile_offset_sums(osum_ptr, xn, tile, B, D)
    h = tl.where(mask, h, 0.0)
    tl.store(ss_ptr + bidx * ((D + BN - 1) // BN) + tile, tl.sum(h * h, axis=1), mask=bmask)


# ---------------------------------------------------------------- task bodies


@triton.jit
def _embed(tile, ids_ptr, embed_ptr, h_ptr, xn_ptr, ss_ptr, osum_ptr, g_ptr, B: tl.constexpr,
           BP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, OFFSET_SUMS: tl.constexpr):
    """Rows tile*BN.. of h = the token embeddings (tiled like the down projection, whose
    outputs the next readers take in the same shape)."""
    bidx = tl.arange(0, BP)
    ids = tl.load(ids_ptr + bidx, mask=bidx < B, other=0).to(tl.int64)
    rows = tile * BN + tl.arange(0, BN)
    row_mask = rows < D
    emb = tl.load(embed_ptr + ids[:, None] * D + rows[None, :],
                  mask=(bidx[:, None] < B) & row_mask[None, :], other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    _publish_rows(h_ptr, xn_ptr, ss_ptr, osum_ptr, g, tile, rows, row_mask, emb.to(tl.float32),
                  B, BP, D, BN, OFFSET_SUMS)


@triton.jit
def _qkv(layer, head, chunk, w_first, s_first, z_first, w_ptr, s_ptr, z_ptr, norms_ptr,
         bias_ptr, inv_freq_ptr, pos_ptr, xn_ptr, ss_ptr, q_ptr, qk_raw_ptr, k_cache_ptr,
         v_cache_ptr, counters_ptr, signal_ctr, arrive_ctr,
         B: tl.constexpr, BP: tl.constexpr, D: tl.constexpr, H: tl.constexpr,
         KVH: tl.constexpr, HD: tl.constexpr, S_MAX: tl.constexpr, EPS: tl.constexpr,
         NORM_STRIDE: tl.constexpr, BN_QKV: tl.constexpr, BK_QKV: tl.constexpr,
         USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, QKV_BIAS: tl.constexpr,
         QK_NORM: tl.constexpr, STAGES: tl.constexpr, WBITS: tl.constexpr, GROUP: tl.constexpr,
         ZERO_POINTS: tl.constexpr, SCALE_WORDS: tl.constexpr, KSPLIT: tl.constexpr,
         PARTS: tl.constexpr, PARTS_P: tl.constexpr, PTX: tl.constexpr,
         DEFER_SIGNAL: tl.constexpr):
    """RMSNorm + BN_QKV pair-ordered rows of one head, bias, then (_finish_head) RoPE and the
    store to q (query heads) or to the KV cache (key/value heads), and the signal (_signal's
    result).
    xn/ss: the normed input and its sums of squares in PARTS tiles (_publish_rows).

    Qwen3's qk-norm spans a whole query or key head: each chunk leaves its raw rows in qk_raw
    and arrives on the head's counter; the chunk that arrives last (acquiring the others'
    rows, as the attention merge does) norms, rotates and stores the whole head."""
    QKV_ROWS: tl.constexpr = (H + 2 * KVH) * HD
    QK_ROWS: tl.constexpr = (H + KVH) * HD  # query and key rows: qk_raw's width
    rows, row_mask = _qkv_rows(head, chunk, HD, BN_QKV, QKV_ROWS)
    dims = chunk * (BN_QKV // 2) + tl.arange(0, BN_QKV // 2)
    if BP <= EARLY_LOADS_MAX_BP:  # before the stream
        ss = _load_ss(ss_ptr, B, BP, PARTS, PARTS_P)
        pos, cos, sin = _rotary(pos_ptr, inv_freq_ptr, dims, B, BP)
    acc = _gemv(w_ptr, s_ptr, z_ptr, rows, row_mask, D, 0, D, w_first, s_first, z_first,
                xn_ptr, B, BP, BN_QKV, BK_QKV, USE_DOT, DOT_PREC, STAGES, WBITS, GROUP,
                ZERO_POINTS, SCALE_WORDS, k_cache_ptr.dtype.element_ty, KSPLIT, PTX)
    if BP > EARLY_LOADS_MAX_BP:
        ss = _load_ss(ss_ptr, B, BP, PARTS, PARTS_P)
        pos, cos, sin = _rotary(pos_ptr, inv_freq_ptr, dims, B, BP)
    acc = acc * _inv_rms(ss, D, EPS)[:, None]
    if QKV_BIAS:
        acc += tl.load(bias_ptr + layer * QKV_ROWS + rows)[None, :]
    bidx = tl.arange(0, BP)
    if QK_NORM:
        normed_head = head < H + KVH  # query or key head (value heads have no qk-norm)
    else:
        normed_head = head < 0
    sig = -1
    if normed_head:
        tl.store(qk_raw_ptr + bidx[:, None] * QK_ROWS + rows[None, :], acc,
                 mask=(bidx < B)[:, None])
        if _arrive(counters_ptr, arrive_ctr) == HD // BN_QKV - 1:
            head_rows = head * HD + tl.arange(0, HD)
            whole = tl.load(qk_raw_ptr + bidx[:, None] * QK_ROWS + head_rows[None, :],
                            mask=(bidx < B)[:, None], other=0.0, cache_modifier=".cg")
            head_dims = tl.arange(0, HD // 2)
            pos_h, cos_h, sin_h = _rotary(pos_ptr, inv_freq_ptr, head_dims, B, BP)
            _finish_head(layer, head, whole, head_dims, pos_h, cos_h, sin_h, norms_ptr, q_ptr,
                         k_cache_ptr, v_cache_ptr, B, BP, D, H, KVH, HD, S_MAX, EPS,
                         NORM_STRIDE, True)
            sig = _signal(counters_ptr, signal_ctr, DEFER_SIGNAL)
    else:
        _finish_head(layer, head, acc, dims, pos, cos, sin, norms_ptr, q_ptr, k_cache_ptr,
                     v_cache_ptr, B, BP, D, H, KVH, HD, S_MAX, EPS, NORM_STRIDE, False)
        sig = _signal(counters_ptr, signal_ctr, DEFER_SIGNAL)
    return sig


@triton.jit
def _rotary(pos_ptr, inv_freq_ptr, dims, B: tl.constexpr, BP: tl.constexpr):
    """Each sequence's position [BP] and RoPE's cos and sin [BP, len(dims)] at it."""
    bidx = tl.arange(0, BP)
    pos = tl.load(pos_ptr + bidx, mask=bidx < B, other=0)
    angle = pos.to(tl.float32)[:, None] * tl.load(inv_freq_ptr + dims)[None, :]
    return pos, tl.cos(angle), tl.sin(angle)


@triton.jit
def _finish_head(layer, head, x, dims, pos, cos, sin, norms_ptr, q_ptr, k_cache_ptr,
                 v_cache_ptr, B: tl.constexpr, BP: tl.constexpr, D: tl.constexpr,
                 H: tl.constexpr, KVH: tl.constexpr, HD: tl.constexpr, S_MAX: tl.constexpr,
                 EPS: tl.constexpr, NORM_STRIDE: tl.constexpr, QK_NORM: tl.constexpr):
    """Rows x [BP, 2 * len(dims)] of one head in rotary pairs (dims[i], HD/2 + dims[i]): the
    qk-norm (QK_NORM: x is the whole query or key head), RoPE (not for value heads; cos and
    sin from _rotary at the positions pos) and the store to q or to the KV cache at each
    sequence's position."""
    HALF: tl.constexpr = HD // 2
    x1, x2 = tl.split(tl.reshape(x, [BP, dims.shape[0], 2]))
    is_q = head < H
    is_v = head >= H + KVH
    if QK_NORM:
        rms = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HD + EPS)
        gbase = norms_ptr + layer * NORM_STRIDE + 2 * D + tl.where(is_q, 0, HD)
        x1 = x1 * rms[:, None] * tl.load(gbase + dims)[None, :]
        x2 = x2 * rms[:, None] * tl.load(gbase + HALF + dims)[None, :]
    bidx = tl.arange(0, BP)
    bmask = bidx < B
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    x1 = tl.where(is_v, x1, r1)
    x2 = tl.where(is_v, x2, r2)
    smask = bmask[:, None] & (dims[None, :] < HALF)
    if is_q:
        qrow = q_ptr + bidx[:, None] * (H * HD) + head * HD
        tl.store(qrow + dims[None, :], x1, mask=smask)
        tl.store(qrow + HALF + dims[None, :], x2, mask=smask)
    else:
        kvh = head - H - tl.where(is_v, KVH, 0)
        slot = ((layer.to(tl.int64) * B + bidx) * KVH + kvh) * S_MAX + pos
        cmask = smask & (pos < S_MAX)[:, None]
        if is_v:
            crow = v_cache_ptr + slot[:, None] * HD
            tl.store(crow + dims[None, :], x1.to(v_cache_ptr.dtype.element_ty), mask=cmask)
            tl.store(crow + HALF + dims[None, :], x2.to(v_cache_ptr.dtype.element_ty),
                     mask=cmask)
        else:
            crow = k_cache_ptr + slot[:, None] * HD
            tl.store(crow + dims[None, :], x1.to(k_cache_ptr.dtype.element_ty), mask=cmask)
            tl.store(crow + HALF + dims[None, :], x2.to(k_cache_ptr.dtype.element_ty),
                     mask=cmask)


@triton.jit
def _store_attn(attn_ptr, osum_ptr, seq, kvh, out, H: tl.constexpr, KVH: tl.constexpr,
                HD: tl.constexpr, GP: tl.constexpr, OFFSET_SUMS: tl.constexpr):
    """attn[seq, query heads of kv group kvh] = out [GP, HD] (rows past the group's heads
    are padding), in attn's dtype; with OFFSET_SUMS its offset sums too (osum [B, H * HD /
    OSUM_COLS])."""
    G: tl.constexpr = H // KVH
    g = tl.arange(0, GP)
    heads = kvh * G + g
    out = out.to(attn_ptr.dtype.element_ty)
    tl.store(attn_ptr + seq * (H * HD) + heads[:, None] * HD + tl.arange(0, HD)[None, :],
             out, mask=(g < G)[:, None])
    if OFFSET_SUMS:
        NB: tl.constexpr = HD // OSUM_COLS
        _store_offset_sums(osum_ptr, out.to(tl.float32), (seq * H + heads) * NB,
                           tl.broadcast_to((g < G)[:, None], (GP, NB)), HD)


@triton.jit
def _attn_partial(layer, seq, kvh, split, pos, q_ptr, k_cache_ptr, v_cache_ptr,
                  part_m_ptr, part_l_ptr, part_o_ptr, attn_ptr, osum_ptr,
                  B: tl.constexpr, H: tl.constexpr, KVH: tl.constexpr, HD: tl.constexpr,
                  S_MAX: tl.constexpr, GP: tl.constexpr, NSPLIT: tl.constexpr,
                  SM_SCALE: tl.constexpr, BS: tl.constexpr, STAGES: tl.constexpr,
                  DOT_PREC: tl.constexpr, OFFSET_SUMS: tl.constexpr):
    """Flash-decoding: the query heads of one kv group against one split of the cache
    (positions 0..pos of this sequence, split in NSPLIT runs of whole BS blocks). The blocks
    go through Triton's pipeliner, STAGES deep: one block at a time left a long cache's
    stream latency-bound (1B at KV 32000: 1.589 -> 1.393 ms, bench/NOTES.md row 41).
    pos: the sequence's position, loaded before the task's wait (the host wrote it).
    Stores the split's running max, sum and unnormalised output (part_*), or with NSPLIT 1
    the normalised output itself (attn)."""
    G: tl.constexpr = H // KVH
    n_ctx = tl.minimum(pos + 1, S_MAX)
    per_split = tl.cdiv(tl.cdiv(n_ctx, NSPLIT), BS) * BS
    start = split * per_split
    end = tl.minimum(start + per_split, n_ctx)
    g = tl.arange(0, GP)
    d = tl.arange(0, HD)
    heads = kvh * G + g
    gmask = g < G
    q = tl.load(q_ptr + seq * (H * HD) + heads[:, None] * HD + d[None, :], mask=gmask[:, None],
                other=0.0, cache_modifier=".cg")
    q = (q * SM_SCALE).to(k_cache_ptr.dtype.element_ty)
    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, HD], dtype=tl.float32)
    base = ((layer.to(tl.int64) * B + seq) * KVH + kvh) * S_MAX * HD
    for s0 in tl.range(start, end, BS, num_stages=STAGES):
        s = s0 + tl.arange(0, BS)
        smask = s < end
        offs = base + s[:, None] * HD + d[None, :]
        k = tl.load(k_cache_ptr + offs, mask=smask[:, None], other=0.0, cache_modifier=".cg")
        v = tl.load(v_cache_ptr + offs, mask=smask[:, None], other=0.0, cache_modifier=".cg")
        scores = _dot(q, tl.trans(k), DOT_PREC)
        scores = tl.where(smask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC)
        m = m_new
    if NSPLIT == 1:  # the whole cache: the output itself, nothing to merge
        _store_attn(attn_ptr, osum_ptr, seq, kvh, acc / tl.where(gmask, l, 1.0)[:, None], H,
                    KVH, HD, GP, OFFSET_SUMS)
    else:
        row = (seq * H + heads) * NSPLIT + split
        tl.store(part_m_ptr + row, m, mask=gmask)
        tl.store(part_l_ptr + row, l, mask=gmask)
        tl.store(part_o_ptr + row[:, None] * HD + d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _attn_merge(seq, kvh, part_m_ptr, part_l_ptr, part_o_ptr, attn_ptr, osum_ptr,
                H: tl.constexpr, KVH: tl.constexpr, HD: tl.constexpr, GP: tl.constexpr,
                NSPLIT: tl.constexpr, NSPLIT_P: tl.constexpr, OFFSET_SUMS: tl.constexpr):
    """Combine the splits into attn[seq, heads of kvh], deterministically (a fixed reduction
    tree). The partials are read in blocks of up to 8 splits, all requested at once (one L2
    round trip for 8 splits, where a loop over them made one round trip a split)."""
    G: tl.constexpr = H // KVH
    MB: tl.constexpr = NSPLIT_P if NSPLIT_P < 8 else 8
    g = tl.arange(0, GP)
    d = tl.arange(0, HD)
    heads = kvh * G + g
    gmask = g < G
    rows = (seq * H + heads) * NSPLIT
    sp = tl.arange(0, NSPLIT_P)
    mask2 = gmask[:, None] & (sp[None, :] < NSPLIT)
    ms = tl.load(part_m_ptr + rows[:, None] + sp[None, :], mask=mask2, other=float("-inf"),
                 cache_modifier=".cg")
    ls = tl.load(part_l_ptr + rows[:, None] + sp[None, :], mask=mask2, other=0.0,
                 cache_modifier=".cg")
    m_all = tl.where(gmask, tl.max(ms, axis=1), 0.0)
    denom = tl.sum(tl.exp(ms - m_all[:, None]) * ls, axis=1)
    acc = tl.zeros([GP, HD], dtype=tl.float32)
    for s0 in tl.static_range(0, NSPLIT_P, MB):
        sb = s0 + tl.arange(0, MB)
        mask_b = gmask[:, None] & (sb[None, :] < NSPLIT)
        m_s = tl.load(part_m_ptr + rows[:, None] + sb[None, :], mask=mask_b,
                      other=float("-inf"), cache_modifier=".cg")
        o_s = tl.load(part_o_ptr + (rows[:, None] + sb[None, :])[:, :, None] * HD
                      + d[None, None, :], mask=mask_b[:, :, None], other=0.0,
                      cache_modifier=".cg")
        acc += tl.sum(o_s * tl.exp(m_s - m_all[:, None])[:, :, None], axis=1)
    _store_attn(attn_ptr, osum_ptr, seq, kvh, acc / tl.where(gmask, denom, 1.0)[:, None], H,
                KVH, HD, GP, OFFSET_SUMS)


@triton.jit
def _residual_task(tile, part, w_ptr, s_ptr, z_ptr, K, x_ptr, h_ptr, xn_ptr, ss_ptr, osum_ptr,
                   g_ptr, partial_ptr, counters_ptr, ctrl_ptr, wait_ctr, wait_target, signal_ctr,
                   arrive_ctr, task, max_spin, prof_ptr, probe, B: tl.constexpr,
                   BP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   SPLITS: tl.constexpr,
                   SPLITS_P: tl.constexpr, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
                   STAGES: tl.constexpr, PF_K: tl.constexpr, IGNORE_DEPS: tl.constexpr,
                   PROFILE: tl.constexpr, WBITS: tl.constexpr, GROUP: tl.constexpr,
                   ZERO_POINTS: tl.constexpr, SCALE_WORDS: tl.constexpr, CDT: tl.constexpr,
                   KSPLIT: tl.constexpr, PTX: tl.constexpr, EARLY_PROBE: tl.constexpr,
                   ACQUIRE_FENCE: tl.constexpr, DEFER_SIGNAL: tl.constexpr):
    """O-projection or down-projection: BN rows of a [D, K] matrix times x, added to h, and
    published for the next norm (weights g; xn's offset sums to osum_ptr with offset-sum
    int4 weights, whose z_ptr is x's). The first weight chunk is requested before the
    wait on the producers of x.

    Split over K (SPLITS > 1: the down projection), a task takes columns part * K/SPLITS..
    and waits only for the producers of those inputs; it leaves its partial sum in
    partial[part] and arrives on the tile's counter, and the last part to arrive adds the
    parts in order (deterministic; SPLITS_P: SPLITS padded to a power of two, from the plan),
    publishes the rows and signals."""
    KPART: tl.constexpr = K // SPLITS
    OFFSET_SUMS: tl.constexpr = ZERO_POINTS == ZP_OFFSET_SUMS
    rows, row_mask = _tile_rows(tile, BN, D)
    k_lo = part * KPART
    w0, s0, z0 = _load_first(w_ptr, s_ptr, z_ptr, rows, row_mask, K, k_lo, BK, WBITS, GROUP,
                             ZERO_POINTS, SCALE_WORDS, USE_DOT, KSPLIT, PF_K)
    sig = -1
    if _wait(counters_ptr, ctrl_ptr, wait_ctr, wait_target, task, max_spin, prof_ptr, probe,
             IGNORE_DEPS, PROFILE, EARLY_PROBE, ACQUIRE_FENCE):
        if SPLITS == 1 and BP <= EARLY_LOADS_MAX_BP:  # before the stream
            h, g = _publish_inputs(h_ptr, g_ptr, rows, row_mask, B, BP, D)
        acc = _gemv(w_ptr, s_ptr, z_ptr, rows, row_mask, K, k_lo, k_lo + KPART, w0, s0, z0,
                    x_ptr, B, BP, BN, BK, USE_DOT, DOT_PREC, STAGES, WBITS, GROUP, ZERO_POINTS,
                    SCALE_WORDS, CDT, KSPLIT, PTX)
        if SPLITS == 1:
            if BP > EARLY_LOADS_MAX_BP:
                h, g = _publish_inputs(h_ptr, g_ptr, rows, row_mask, B, BP, D)
            _publish_rows(h_ptr, xn_ptr, ss_ptr, osum_ptr, g, tile, rows, row_mask, h + acc, B, BP,
                          D, BN, OFFSET_SUMS)
            sig = _signal(counters_ptr, signal_ctr, DEFER_SIGNAL)
        else:
            bidx = tl.arange(0, BP)
            offs = bidx[:, None] * D + rows[None, :]
            mask = (bidx < B)[:, None] & row_mask[None, :]
            tl.store(partial_ptr + part * (B * D) + offs, acc, mask=mask)
            if _arrive(counters_ptr, arrive_ctr) == SPLITS - 1:
                h, g = _publish_inputs(h_ptr, g_ptr, rows, row_mask, B, BP, D)
                # The parts as one [SPLITS, BP, BN] load, added in a fixed order (tl.sum's
                # tree): one round trip, and fewer registers than an unrolled loop of loads
                # (1B batch 16: 12 -> 8 bytes of spills, 1.255 / 1.261 -> 1.249 / 1.253 ms).
                sp = tl.arange(0, SPLITS_P)[:, None, None]
                parts = tl.load(partial_ptr + sp * (B * D) + offs[None, :, :],
                                mask=(sp < SPLITS) & mask[None, :, :], other=0.0,
                                cache_modifier=".cg")
                total = tl.sum(parts, axis=0)
                _publish_rows(h_ptr, xn_ptr, ss_ptr, osum_ptr, g, tile, rows, row_mask, h + total,
                              B, BP, D, BN, OFFSET_SUMS)
                sig = _signal(counters_ptr, signal_ctr, DEFER_SIGNAL)
    return sig


# ---------------------------------------------------------------- the persistent kernel


@triton.jit(do_not_specialize=["n_tasks", "n_counters", "max_spin"])
def decode_step_kernel(
    tasks_ptr, n_tasks, ctrl_ptr, counters_ptr, n_counters, max_spin,
    ids_ptr, pos_ptr,
    arena_ptr, scales_ptr, zeros_ptr, norms_ptr, bias_ptr, embed_ptr, lm_head_ptr,
    lm_scales_ptr, lm_zeros_ptr, inv_freq_ptr,
    k_cache_ptr, v_cache_ptr,
    h_ptr, xn_mlp_ptr, ss_mlp_ptr, xn_attn_ptr, ss_attn_ptr, q_ptr, qk_raw_ptr, attn_ptr,
    act_ptr, osum_xn_mlp_ptr, osum_xn_attn_ptr, osum_attn_ptr, osum_act_ptr,
    logits_ptr, part_m_ptr, part_l_ptr, part_o_ptr, partial_ptr, prof_ptr,
    B: tl.constexpr, BP: tl.constexpr, D: tl.constexpr, F: tl.constexpr, H: tl.constexpr,
    KVH: tl.constexpr, HD: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    S_MAX: tl.constexpr, GP: tl.constexpr, NSPLIT: tl.constexpr, NSPLIT_P: tl.constexpr,
    EPS: tl.constexpr, SM_SCALE: tl.constexpr,
    LAYER_STRIDE: tl.constexpr, OFF_O: tl.constexpr, OFF_GU: tl.constexpr,
    OFF_DOWN: tl.constexpr, NORM_STRIDE: tl.constexpr,
    WBITS: tl.constexpr, GROUP: tl.constexpr, ZERO_POINTS: tl.constexpr,
    SCALE_WORDS: tl.constexpr, LM_WBITS: tl.constexpr,
    SCALE_STRIDE: tl.constexpr, SOFF_O: tl.constexpr, SOFF_GU: tl.constexpr,
    SOFF_DOWN: tl.constexpr,
    BN_QKV: tl.constexpr, BK_QKV: tl.constexpr, BN_O: tl.constexpr, BN_UP: tl.constexpr,
    BN_DOWN: tl.constexpr, BN_LM: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr,
    DOWN_SPLITS: tl.constexpr, DOWN_SPLITS_P: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, QKV_BIAS: tl.constexpr,
    QK_NORM: tl.constexpr, PF_K: tl.constexpr, STAGES: tl.constexpr,
    ATTN_STAGES: tl.constexpr,
    KSPLIT: tl.constexpr, KSPLIT_QKV: tl.constexpr, PARTS_O: tl.constexpr,
    PARTS_O_P: tl.constexpr, PARTS_DOWN: tl.constexpr, PARTS_DOWN_P: tl.constexpr,
    PTX: tl.constexpr, IGNORE_DEPS: tl.constexpr, PROFILE: tl.constexpr,
    STATIC: tl.constexpr, EARLY_PROBE: tl.constexpr, ACQUIRE_FENCE: tl.constexpr,
    NEXT_HINT: tl.constexpr,
):
    Q: tl.constexpr = H * HD
    QKV_ROWS: tl.constexpr = (H + 2 * KVH) * HD
    CDT: tl.constexpr = embed_ptr.dtype.element_ty  # the model dtype (tl.dot operands)
    # Offset-sum int4 GEMVs (plan tile offset_sums): every producer of a GEMV input publishes
    # its offset sums (osum_<input>), which the GEMV reads through its z pointer.
    OFFSET_SUMS: tl.constexpr = ZERO_POINTS == ZP_OFFSET_SUMS
    # h's sums of squares come in PARTS_O parts, one per O-proj tile (read by gate/up), and
    # PARTS_DOWN, one per down tile (read by QKV and the LM head; EMBED is tiled like down):
    # Plan.norm_parts, which also sizes the buffers.

    # Pops are relaxed (no fence): the table is read-only and the counters order the data.
    # STATIC: program p runs tasks p, p + grid, ... with no pop, and its next task's row
    # streams in while this one runs (every program must be resident: runtime.py's grid).
    if STATIC:
        task = tl.program_id(0)
    else:
        task = tl.atomic_add(ctrl_ptr + CTRL_QUEUE, 1, sem="relaxed", scope="gpu")
    fields = _task_row(tasks_ptr, task, n_tasks)
    # EARLY_PROBE 2 with the static schedule: a task that signals reads the next task's
    # counter in the same fence (_publish), and the next task needs neither probe nor fence.
    FUSED: tl.constexpr = EARLY_PROBE == 2 and STATIC
    # NEXT_HINT (static schedule): the task loop signals, after hinting the next task's first
    # chunk into L2, so that chunk comes from L2 when the next task starts.
    DEFER_SIGNAL: tl.constexpr = FUSED or (NEXT_HINT > 0 and STATIC)
    if FUSED:
        fenced_seen = 0
        fenced = 0
    while task < n_tasks:
        op, layer, a, b, c, wait_ctr, wait_target, signal_ctr, aux_ctr = fields
        if FUSED:
            if fenced != 0:
                probe = tl.zeros([PROBE_LANES], dtype=tl.int32) + fenced_seen
            else:
                probe = _probe(counters_ptr, wait_ctr, EARLY_PROBE)
        else:
            probe = _probe(counters_ptr, wait_ctr, EARLY_PROBE)
        if STATIC:
            task_next = task + tl.num_programs(0)
            fields = _task_row(tasks_ptr, task_next, n_tasks)
        layer_w = arena_ptr + layer.to(tl.int64) * LAYER_STRIDE
        layer_s = scales_ptr + layer.to(tl.int64) * SCALE_STRIDE
        layer_z = zeros_ptr + layer.to(tl.int64) * SCALE_STRIDE
        # What each GEMV's z pointer reads: its zero points, or its input's offset sums.
        if OFFSET_SUMS:
            z_qkv, z_o, z_gu, z_down = (osum_xn_mlp_ptr, osum_attn_ptr, osum_xn_attn_ptr,
                                        osum_act_ptr)
            z_lm = osum_xn_mlp_ptr
        else:
            z_qkv, z_o, z_gu, z_down = (layer_z, layer_z + SOFF_O, layer_z + SOFF_GU,
                                        layer_z + SOFF_DOWN)
            z_lm = lm_zeros_ptr
        if PROFILE:
            rec = prof_ptr + task * 5
            tl.store(rec + 0, tl.program_id(0).to(tl.int64))
            tl.store(rec + 1, _sm_id(task).to(tl.int64))
            tl.store(rec + 2, _now(task))

        sig = -1  # the counter this task publishes (DEFER_SIGNAL: the task loop does)
        if op == OP_QKV:
            rows_qkv, mask_qkv = _qkv_rows(a, b, HD, BN_QKV, QKV_ROWS)
            w0_qkv, s0_qkv, z0_qkv = _load_first(layer_w, layer_s, z_qkv, rows_qkv, mask_qkv, D,
                                                 0, BK_QKV, WBITS, GROUP, ZERO_POINTS,
                                                 SCALE_WORDS, USE_DOT, KSPLIT_QKV, PF_K)
            if _wait(counters_ptr, ctrl_ptr, wait_ctr, wait_target, task, max_spin, prof_ptr,
                     probe, IGNORE_DEPS, PROFILE, EARLY_PROBE, ACQUIRE_FENCE):
                sig = _qkv(layer, a, b, w0_qkv, s0_qkv, z0_qkv, layer_w, layer_s, z_qkv,
                           norms_ptr, bias_ptr, inv_freq_ptr, pos_ptr, xn_mlp_ptr, ss_mlp_ptr,
                           q_ptr, qk_raw_ptr, k_cache_ptr, v_cache_ptr, counters_ptr, signal_ctr,
                           aux_ctr, B, BP, D, H, KVH, HD, S_MAX, EPS, NORM_STRIDE, BN_QKV,
                           BK_QKV, USE_DOT, DOT_PREC, QKV_BIAS, QK_NORM, STAGES, WBITS, GROUP,
                           ZERO_POINTS, SCALE_WORDS, KSPLIT_QKV, PARTS_DOWN, PARTS_DOWN_P, PTX,
                           DEFER_SIGNAL)
        elif op == OP_ATTN:
            pos_attn = tl.load(pos_ptr + a)  # the split's bounds need no round trip after the wait
            if _wait(counters_ptr, ctrl_ptr, wait_ctr, wait_target, task, max_spin, prof_ptr,
                     probe, IGNORE_DEPS, PROFILE, EARLY_PROBE, ACQUIRE_FENCE):
                _attn_partial(layer, a, b, c, pos_attn, q_ptr, k_cache_ptr, v_cache_ptr,
                              part_m_ptr, part_l_ptr, part_o_ptr, attn_ptr, osum_attn_ptr, B, H,
                              KVH, HD, S_MAX, GP, NSPLIT, SM_SCALE, BS, ATTN_STAGES, DOT_PREC,
                              OFFSET_SUMS)
                if NSPLIT == 1:  # one task per (sequence, kv head) wrote attn itself
                    sig = _signal(counters_ptr, signal_ctr, DEFER_SIGNAL)
                else:
                    # Publish the partial; the split that arrives last (acquiring the others')
                    # merges all of them and signals the layer's merge counter.
                    if _arrive(counters_ptr, aux_ctr) == NSPLIT - 1:
                        _attn_merge(a, b, part_m_ptr, part_l_ptr, part_o_ptr, attn_ptr,
                                    osum_attn_ptr, H, KVH, HD, GP, NSPLIT, NSPLIT_P, OFFSET_SUMS)
                        sig = _signal(counters_ptr, signal_ctr, DEFER_SIGNAL)
        elif op == OP_OPROJ:
            # Publishes h for the post-attention norm of this layer.
            sig = _residual_task(a, 0, layer_w + OFF_O, layer_s + SOFF_O, z_o, Q,
                                 attn_ptr, h_ptr, xn_attn_ptr, ss_attn_ptr, osum_xn_attn_ptr,
                                 norms_ptr + layer * NORM_STRIDE + D, partial_ptr, counters_ptr,
                                 ctrl_ptr, wait_ctr, wait_target, signal_ctr, aux_ctr, task,
                                 max_spin, prof_ptr, probe, B, BP, D, BN_O, BK, 1, 1, USE_DOT,
                                 DOT_PREC, STAGES, PF_K, IGNORE_DEPS, PROFILE, WBITS, GROUP,
                                 ZERO_POINTS, SCALE_WORDS, CDT, KSPLIT, PTX, EARLY_PROBE,
                                 ACQUIRE_FENCE, DEFER_SIGNAL)
        elif op == OP_GATEUP:
            rows_gu, f_rows = _gate_up_rows(a, BN_UP, F)
            w_gu = layer_w + OFF_GU
            w0_gu, s0_gu, z0_gu = _load_first(w_gu, layer_s + SOFF_GU, z_gu,
                                              rows_gu, f_rows < F, D, 0, BK, WBITS, GROUP,
                                              ZERO_POINTS, SCALE_WORDS, USE_DOT, KSPLIT, PF_K)
            if _wait(counters_ptr, ctrl_ptr, wait_ctr, wait_target, task, max_spin, prof_ptr,
                     probe, IGNORE_DEPS, PROFILE, EARLY_PROBE, ACQUIRE_FENCE):
                if BP <= EARLY_LOADS_MAX_BP:  # before the stream
                    ss_gu = _load_ss(ss_attn_ptr, B, BP, PARTS_O, PARTS_O_P)
                acc_gu = _gemv(w_gu, layer_s + SOFF_GU, z_gu, rows_gu, f_rows < F,
                               D, 0, D, w0_gu, s0_gu, z0_gu, xn_attn_ptr, B, BP, 2 * BN_UP,
                               BK, USE_DOT, DOT_PREC, STAGES, WBITS, GROUP, ZERO_POINTS,
                               SCALE_WORDS, CDT, KSPLIT, PTX)
                if BP > EARLY_LOADS_MAX_BP:
                    ss_gu = _load_ss(ss_attn_ptr, B, BP, PARTS_O, PARTS_O_P)
                acc_gu *= _inv_rms(ss_gu, D, EPS)[:, None]
                gate, up = tl.split(tl.reshape(acc_gu, [BP, BN_UP, 2]))
                act = gate / (1.0 + tl.exp(-gate)) * up
                b_gu = tl.arange(0, BP)
                cols_gu = a * BN_UP + tl.arange(0, BN_UP)
                act = act.to(act_ptr.dtype.element_ty)
                tl.store(act_ptr + b_gu[:, None] * F + cols_gu[None, :], act,
                         mask=(b_gu[:, None] < B) & (cols_gu[None, :] < F))
                if OFFSET_SUMS:
                    _store_tile_offset_sums(osum_act_ptr, act, a, B, F)
                sig = _signal(counters_ptr, signal_ctr, DEFER_SIGNAL)
        elif op == OP_DOWN:
            # Publishes h for the next layer's input norm (after the last: the final norm).
            # Split over F (DOWN_SPLITS parts): part b waits only for its gate/up tiles.
            sig = _residual_task(a, b, layer_w + OFF_DOWN, layer_s + SOFF_DOWN, z_down,
                                 F, act_ptr, h_ptr, xn_mlp_ptr, ss_mlp_ptr, osum_xn_mlp_ptr,
                                 norms_ptr + (layer + 1) * NORM_STRIDE, partial_ptr, counters_ptr,
                                 ctrl_ptr, wait_ctr, wait_target, signal_ctr, aux_ctr, task,
                                 max_spin, prof_ptr, probe, B, BP, D, BN_DOWN, BK, DOWN_SPLITS,
                                 DOWN_SPLITS_P, USE_DOT, DOT_PREC, STAGES, PF_K, IGNORE_DEPS,
                                 PROFILE, WBITS, GROUP, ZERO_POINTS, SCALE_WORDS, CDT, KSPLIT, PTX,
                                 EARLY_PROBE, ACQUIRE_FENCE, DEFER_SIGNAL)
        elif op == OP_LMHEAD:
            rows_lm, mask_lm = _tile_rows(a, BN_LM, V)
            w0_lm, s0_lm, z0_lm = _load_first(lm_head_ptr, lm_scales_ptr, z_lm, rows_lm, mask_lm,
                                              D, 0, BK, LM_WBITS, GROUP, ZERO_POINTS,
                                              SCALE_WORDS, USE_DOT, KSPLIT, PF_K)
            if _wait(counters_ptr, ctrl_ptr, wait_ctr, wait_target, task, max_spin, prof_ptr,
                     probe, IGNORE_DEPS, PROFILE, EARLY_PROBE, ACQUIRE_FENCE):
                if BP <= EARLY_LOADS_MAX_BP:  # before the stream
                    ss_lm = _load_ss(ss_mlp_ptr, B, BP, PARTS_DOWN, PARTS_DOWN_P)
                acc_lm = _gemv(lm_head_ptr, lm_scales_ptr, z_lm, rows_lm, mask_lm,
                               D, 0, D, w0_lm, s0_lm, z0_lm, xn_mlp_ptr, B, BP, BN_LM, BK,
                               USE_DOT, DOT_PREC, STAGES, LM_WBITS, GROUP, ZERO_POINTS,
                               SCALE_WORDS, CDT, KSPLIT, PTX)
                if BP > EARLY_LOADS_MAX_BP:
                    ss_lm = _load_ss(ss_mlp_ptr, B, BP, PARTS_DOWN, PARTS_DOWN_P)
                acc_lm *= _inv_rms(ss_lm, D, EPS)[:, None]
                b_lm = tl.arange(0, BP)
                tl.store(logits_ptr + b_lm[:, None] * V + rows_lm[None, :], acc_lm,
                         mask=(b_lm[:, None] < B) & (rows_lm[None, :] < V))
                sig = _signal(counters_ptr, signal_ctr, DEFER_SIGNAL)
        else:  # OP_EMBED
            if _wait(counters_ptr, ctrl_ptr, wait_ctr, wait_target, task, max_spin, prof_ptr,
                     probe, IGNORE_DEPS, PROFILE, EARLY_PROBE, ACQUIRE_FENCE):
                _embed(a, ids_ptr, embed_ptr, h_ptr, xn_mlp_ptr, ss_mlp_ptr, osum_xn_mlp_ptr,
                       norms_ptr, B, BP, D, BN_DOWN, OFFSET_SUMS)
                sig = _signal(counters_ptr, signal_ctr, DEFER_SIGNAL)
        if FUSED:
            _op, _layer, _a, _b, _c, next_wait_ctr, _target, _signal_ctr, _aux = fields
            fenced_seen, fenced = _publish(counters_ptr, sig, next_wait_ctr)
        elif DEFER_SIGNAL:
            if PTX and task_next < n_tasks:
                n_op, n_layer, n_a, n_b, _c, _wait_ctr, _target, _signal_ctr, _aux = fields
                n_w = arena_ptr + n_layer.to(tl.int64) * LAYER_STRIDE
                n_s = scales_ptr + n_layer.to(tl.int64) * SCALE_STRIDE
                # Each op's first chunk, with the rows its own branch above takes.
                if n_op == OP_QKV:
                    n_rows, n_mask = _qkv_rows(n_a, n_b, HD, BN_QKV, QKV_ROWS)
                    _hint_first(n_w, n_s, n_rows, n_mask, D, 0, BK_QKV, WBITS, GROUP, NEXT_HINT)
                elif n_op == OP_GATEUP:
                    n_rows, n_f = _gate_up_rows(n_a, BN_UP, F)
                    _hint_first(n_w + OFF_GU, n_s + SOFF_GU, n_rows, n_f < F, D, 0, BK, WBITS,
                                GROUP, NEXT_HINT)
                elif n_op == OP_OPROJ:
                    n_rows, n_mask = _tile_rows(n_a, BN_O, D)
                    _hint_first(n_w + OFF_O, n_s + SOFF_O, n_rows, n_mask, Q, 0, BK, WBITS,
                                GROUP, NEXT_HINT)
                elif n_op == OP_DOWN:  # part n_b of the columns (_residual_task's k_lo)
                    n_rows, n_mask = _tile_rows(n_a, BN_DOWN, D)
                    _hint_first(n_w + OFF_DOWN, n_s + SOFF_DOWN, n_rows, n_mask, F,
                                n_b * (F // DOWN_SPLITS), BK, WBITS, GROUP, NEXT_HINT)
                elif n_op == OP_LMHEAD:
                    n_rows, n_mask = _tile_rows(n_a, BN_LM, V)
                    _hint_first(lm_head_ptr, lm_scales_ptr, n_rows, n_mask, D, 0, BK, LM_WBITS,
                                GROUP, NEXT_HINT)
            _release(counters_ptr, sig)
        if PROFILE:
            tl.store(prof_ptr + task * 5 + 4, _now(task))
        if STATIC:
            task = task_next
        else:
            task = tl.atomic_add(ctrl_ptr + CTRL_QUEUE, 1, sem="relaxed", scope="gpu")
            fields = _task_row(tasks_ptr, task, n_tasks)

    # The last program out leaves the queue and counters at zero for the next launch.
    leaving = tl.atomic_add(ctrl_ptr + CTRL_DONE, 1, sem="acq_rel", scope="gpu")
    if leaving == tl.num_programs(0) - 1:
        for i in range(0, n_counters, 256):
            idx = i + tl.arange(0, 256)
            tl.store(counters_ptr + idx, tl.zeros([256], dtype=tl.int32), mask=idx < n_counters)
        tl.store(ctrl_ptr + CTRL_QUEUE, 0)
        tl.store(ctrl_ptr + CTRL_DONE, 0)
