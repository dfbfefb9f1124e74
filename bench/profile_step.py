"""Profile one decode step on the GPU: per-op wait/work times and a Gantt chart.

    python bench/profile_step.py --shape llama-3.2-1b --out bench/out
    python bench/profile_step.py --shape llama-3.1-8b --weights int4-g128 --bandwidth 16

Prints the per-op totals, each stage's window in a layer (averaged over the middle layers),
and with --bandwidth LAYER the weight bytes streamed per microsecond through that layer.

Random bf16 weights (quantized with --weights); one warm-up step, then a profiled step.
Writes timeline-<shape>-<weights>.json (the raw records) and, with matplotlib, the .png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from bench_quant import SCHEMES
from sweep import parse

from flashformer_triton.config import preset
from flashformer_triton.profile import (
    StageWindow,
    bandwidth_profile,
    gantt_png,
    profile_step,
    stage_windows,
    summarize,
    times_us,
)


def between_tasks_us(timeline: torch.Tensor) -> float:
    """Mean time from a task's end to the start of its program's next task (the pop)."""
    program = timeline[:, 0].cpu()
    start, _, end = times_us(timeline).unbind(1)
    by_start = torch.argsort(start, stable=True)
    order = by_start[torch.argsort(program[by_start], stable=True)]  # program, then start
    program, start, end = program[order], start[order], end[order]
    same = program[1:] == program[:-1]
    return float((start[1:] - end[:-1])[same].mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pos", type=int, default=512)
    parser.add_argument("--weights", default="bf16", choices=list(SCHEMES))
    parser.add_argument("--tiles", default="", help="plan tiles, e.g. static_schedule=1")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--bandwidth", type=int, default=None, metavar="LAYER",
                        help="print that layer's streamed TB/s and working/waiting tasks per us")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step needs a CUDA GPU", file=sys.stderr)
        return 2
    # compile, warm up, then the recorded step (the same code as `flashformer-triton profile`)
    plan, timeline = profile_step(preset(args.shape), batch=args.batch, pos=args.pos,
                                  quant=SCHEMES[args.weights], tiles=parse(args.tiles))
    summary = summarize(plan, timeline)
    print(f"{args.shape} {args.weights} batch {args.batch} pos {args.pos} {args.tiles}")
    print(summary.format())
    print(f"between tasks (a program's end to its next start): "
          f"{between_tasks_us(timeline):.2f} us")
    print("each stage of a layer, us from the layer's first QKV start (middle layers):")
    print(StageWindow.HEADER)
    for window in stage_windows(plan, timeline):
        print(window.format())
    if args.bandwidth is not None:
        print(f"layer {args.bandwidth}: us, weight TB/s, tasks working, tasks waiting")
        for t, tbs, working, waiting in bandwidth_profile(plan, timeline, args.bandwidth):
            print(f"{t:6.1f} {tbs:5.2f} {working:4d} {waiting:4d}")
    args.out.mkdir(parents=True, exist_ok=True)
    records = timeline.cpu().tolist()
    stem = f"timeline-{args.shape}-{args.weights}"
    stem += f"-b{args.batch}" if args.batch != 1 else ""
    stem += f"-{args.tiles.replace('=', '').replace(',', '-')}" if args.tiles else ""
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"shape": args.shape, "weights": args.weights, "batch": args.batch, "pos": args.pos,
         "fields": ["program", "sm", "start_ns", "ready_ns", "end_ns"],
         "ops": [int(t.op) for t in plan.tasks], "layers": [t.layer for t in plan.tasks],
         "records": records}))
    try:
        gantt_png(plan, timeline, str(args.out / f"{stem}.png"))
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
