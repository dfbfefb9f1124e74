"""The int4 GEMV loop alone: what one program streams outside the decode kernel.

The loop is kernels/decode.py's `_load_first` + `_gemv` as the O-proj and down tasks call
them (batch 1, tensor cores, symmetric groups of 128). Program p runs tasks p, p + grid, ...
of a [rows, K] int4 matrix, each task BN rows x K; with `--l2-tiles N` the tasks cycle over N
tiles, so after a warm-up launch they come from L2. Each row prints the launch's median
time, us a task and GB/s a program; the difference between two K values is the chunks'
time without the launch (bench/NOTES.md Q37 a). Timing needs CUDA; `check` runs anywhere
(the Triton interpreter on a CPU) against a torch reference of the same maths.

    python bench/loop_bench.py --k 4096 7168 --grid 264 --tasks 3
    python bench/loop_bench.py --k 4096 --grid 264 --tasks 3 --l2-tiles 64 --tiles 32x512 16x1024
"""

from __future__ import annotations

import argparse
import statistics

import torch

from flashformer_triton.quantize import QuantizedLinear, QuantScheme
from flashformer_triton.runtime import kernel_module

# The kernels before triton itself: without CUDA, this switches on Triton's interpreter.
decode = kernel_module(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

GROUP_SIZE = 128
GROUP = tl.constexpr(GROUP_SIZE)


@triton.jit
def loop_kernel(w_ptr, s_ptr, x_ptr, out_ptr, n_tasks, tile_mod, N_ROWS: tl.constexpr,
                K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                PF_K: tl.constexpr, SCALE_WORDS: tl.constexpr, DOT_PREC: tl.constexpr,
                PTX: tl.constexpr):
    task = tl.program_id(0)
    while task < n_tasks:
        rows = (task % tile_mod) * BN + tl.arange(0, BN)
        row_mask = rows < N_ROWS
        w0, s0, z0 = decode._load_first(w_ptr, s_ptr, s_ptr, rows, row_mask, K, 0, BK, 4, GROUP,
                                        0, SCALE_WORDS, True, 1, PF_K)
        acc = decode._gemv(w_ptr, s_ptr, s_ptr, rows, row_mask, K, 0, K, w0, s0, z0, x_ptr, 1,
                           1, BN, BK, True, DOT_PREC, STAGES, 4, GROUP, 0, SCALE_WORDS,
                           tl.bfloat16, 1, PTX)
        tl.store(out_ptr + task * BN + tl.arange(0, BN)[None, :], acc)
        task += tl.num_programs(0)


def inputs(rows: int, k: int, device: torch.device, seed: int = 0):
    """Random packed int4 codes [rows, k / 2], fp16 group scales [rows, k / 128], x [k]."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(rows, k // GROUP_SIZE, generator=gen) * 0.02 + 0.001).half()
    x = torch.randn(k, generator=gen).half()
    return codes.to(device), scales.to(device), x.to(device)


def reference(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The rows dequantized as the kernel's scheme defines them (quantize.dequantize), times
    x, in fp32."""
    weights = QuantizedLinear(codes.cpu(), scales.cpu(), None, QuantScheme(4, GROUP_SIZE))
    return weights.dequantize() @ x.cpu().float()


def launch(codes, scales, x, out, *, grid: int, tasks: int, tile_mod: int, bn: int, bk: int,
           stages: int = 3, pf_k: int = 1024, scale_words: int = 1, warps: int = 4):
    on_gpu = codes.is_cuda
    return loop_kernel[(grid,)](
        codes, scales, x, out, grid * tasks, tile_mod, N_ROWS=codes.shape[0],
        K=2 * codes.shape[1], BN=bn, BK=bk, STAGES=stages, PF_K=pf_k if on_gpu else 0,
        SCALE_WORDS=scale_words, DOT_PREC="tf32" if on_gpu else "upcast", PTX=on_gpu,
        num_warps=warps)


def check(device: torch.device, *, k: int = 512, bn: int = 32, bk: int = 256, grid: int = 2,
          tasks: int = 2, scale_words: int = 1) -> float:
    """Largest |kernel - reference| over grid x tasks tasks of BN rows (tiles cycled)."""
    rows = 3 * bn
    codes, scales, x = inputs(rows, k, device)
    out = torch.empty(grid * tasks * bn, device=device, dtype=torch.float32)
    launch(codes, scales, x, out, grid=grid, tasks=tasks, tile_mod=rows // bn, bn=bn, bk=bk,
           scale_words=scale_words)
    ref = reference(codes, scales, x)
    want = torch.cat([ref[(t % (rows // bn)) * bn:][:bn] for t in range(grid * tasks)])
    return (out.cpu() - want).abs().max().item()


def time_row(rows: int, k: int, bn: int, bk: int, *, grid: int, tasks: int, l2_tiles: int = 0,
             stages: int = 3, scale_words: int = 1, reps: int = 30) -> str:
    """One timed configuration (CUDA): the launch's median us, us a task, GB/s a program."""
    codes, scales, x = inputs(rows, k, torch.device("cuda"))
    out = torch.empty(grid * tasks * bn, device="cuda", dtype=torch.float32)
    tile_mod = l2_tiles or rows // bn
    if grid * tasks > tile_mod and not l2_tiles:
        raise ValueError(f"{grid * tasks} tasks need {grid * tasks * bn} rows; pass --rows")
    kw = dict(grid=grid, tasks=tasks, tile_mod=tile_mod, bn=bn, bk=bk, stages=stages,
              scale_words=scale_words)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    compiled = launch(codes, scales, x, out, **kw)
    times = []
    for _ in range(reps):
        flush.sum()  # evict the tiles (reads: no dirty lines to write back)
        if l2_tiles:
            launch(codes, scales, x, out, **kw)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch(codes, scales, x, out, **kw)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    us = statistics.median(times)
    task_bytes = bn * k // 2 * (1 + 4 / GROUP_SIZE)  # codes + fp16 scales
    return (f"K {k:5d} {bn:3d}x{bk:<5d} stages {stages} grid {grid:4d} x {tasks} tasks "
            f"l2 {l2_tiles:3d}: {us:7.1f} us, {us / tasks:6.2f} us a task, "
            f"{task_bytes * tasks / us / 1e3:5.1f} GB/s a program "
            f"({getattr(compiled, 'n_regs', '?')} registers, "
            f"{getattr(compiled, 'n_spills', '?')} spilled)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[4096, 7168])
    parser.add_argument("--tiles", nargs="+", default=["32x512"], help="ROWSxCOLUMNS a chunk")
    parser.add_argument("--grid", type=int, nargs="+", default=[264])
    parser.add_argument("--tasks", type=int, default=3, help="tasks a program")
    parser.add_argument("--l2-tiles", type=int, default=0)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--scale-words", type=int, default=1, choices=[0, 1])
    parser.add_argument("--rows", type=int, default=32768)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"no CUDA: checking the loop in the interpreter only (max error "
              f"{check(torch.device('cpu')):.2e})")
        return 0
    print(f"max error against torch: {check(torch.device('cuda')):.2e}")
    for tile in args.tiles:
        bn, bk = (int(v) for v in tile.split("x"))
        for grid in args.grid:
            for k in args.k:
                print(time_row(args.rows, k, bn, bk, grid=grid, tasks=args.tasks,
                               l2_tiles=args.l2_tiles, stages=args.stages,
                               scale_words=args.scale_words), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
