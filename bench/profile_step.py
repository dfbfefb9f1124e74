"""Profile one decode step on the GPU: per-op wait/work times and a Gantt chart.

    python bench/profile_step.py --shape llama-3.2-1b --out bench/out

Random bf16 weights; one warm-up step, then a profiled step. Writes timeline-<shape>.json
(the raw records) and, with matplotlib, timeline-<shape>.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from flashformer_triton.config import preset
from flashformer_triton.loading import random_state_dict
from flashformer_triton.plan import make_plan
from flashformer_triton.profile import gantt_png, summarize
from flashformer_triton.runtime import DecodeRuntime
from flashformer_triton.weights import pack_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pos", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step needs a CUDA GPU", file=sys.stderr)
        return 2
    config = preset(args.shape)
    state = random_state_dict(config, seed=0, dtype=torch.bfloat16, device="cuda")
    weights = pack_weights(config, state, dtype=torch.bfloat16, device="cuda")
    del state
    max_seq = max(1024, args.pos + 64)
    plan = make_plan(config, batch=args.batch, max_seq_len=max_seq, dtype=torch.bfloat16,
                     profile=1)
    shape = (config.num_layers, args.batch, config.num_kv_heads, max_seq, config.head_dim)
    k = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    runtime = DecodeRuntime(config, weights, plan, k, torch.randn_like(k))
    ids = torch.randint(0, config.vocab_size, (args.batch,), device="cuda", dtype=torch.int32)
    pos = torch.full((args.batch,), args.pos, dtype=torch.int32, device="cuda")
    for _ in range(3):  # compile, warm up, then the recorded step
        runtime.step(ids, pos)
    summary = summarize(plan, runtime.timeline)
    print(f"{args.shape} batch {args.batch} pos {args.pos}")
    print(summary.format())
    args.out.mkdir(parents=True, exist_ok=True)
    records = runtime.timeline.cpu().tolist()
    (args.out / f"timeline-{args.shape}.json").write_text(json.dumps(
        {"shape": args.shape, "batch": args.batch, "pos": args.pos,
         "fields": ["program", "sm", "start_ns", "ready_ns", "end_ns"],
         "ops": [int(t.op) for t in plan.tasks], "layers": [t.layer for t in plan.tasks],
         "records": records}))
    try:
        gantt_png(plan, runtime.timeline, str(args.out / f"timeline-{args.shape}.png"))
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
