"""Sweep tile settings of the decode kernel on one GPU: weights built once per shape.

    python bench/sweep.py --shape llama-3.1-8b --configs "" "programs_per_sm=3" \\
        "block_k=1024,num_warps=8"

Each config is a comma list of plan.Tiles fields over the shape's defaults. Prints one row a
config (ms per step, fraction of the floor, registers and spills) and the best last.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from bench_decode import copy_bandwidth, decode_runtime, log, random_weights, time_ms

from flashformer_triton.plan import make_plan


def parse(config: str) -> dict[str, int]:
    pairs = [item.split("=") for item in config.split(",") if item.strip()]
    return {key.strip(): int(value) for key, value in pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pos", type=int, default=512)
    parser.add_argument("--configs", nargs="+", default=[""])
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth()
    config, state, weights = random_weights(args.shape)
    del state
    results = []
    for text in args.configs:
        try:
            runtime = decode_runtime(config, weights, batch=args.batch, pos=args.pos,
                                     **parse(text))
            plan = runtime.plan
            runtime.launch()
            runtime.check()
            ms = time_ms(runtime.launch, inner=10, repeats=9)
            runtime.check()
        except Exception as exc:  # a config that does not compile or hangs: report, go on
            log(f"{text or 'defaults'}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        floor = plan.floor_ms([args.pos] * args.batch, bandwidth)
        regs = getattr(runtime.compiled, "n_regs", "?")
        spills = getattr(runtime.compiled, "n_spills", "?")
        results.append((ms, text))
        print(f"{args.shape} b{args.batch} p{args.pos} {text or 'defaults':<48} {ms:8.3f} ms "
              f"frac {floor / ms:5.3f} tasks {plan.num_tasks:6d} regs {regs} spills {spills}",
              flush=True)
    if results:
        best = min(results)
        print(f"best: {best[1] or 'defaults'} {best[0]:.3f} ms; defaults were "
              f"{asdict(make_plan(config, batch=args.batch, max_seq_len=plan.max_seq_len).tiles)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
