"""Sweep tile settings of the decode kernel on one GPU: weights built once per shape.

    python bench/sweep.py --shape llama-3.1-8b --configs "" "programs_per_sm=3" \\
        "block_k=1024,num_warps=8"
    python bench/sweep.py --shape llama-3.1-8b --weights int8 int4-g128 --configs "" \\
        "num_warps=8"

Each config is a comma list of plan.Tiles fields over the shape's defaults. Prints one row a
config (ms per step, fraction of the floor, registers and spills) and the best last.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from bench_decode import copy_bandwidth, decode_runtime, log, time_ms
from bench_quant import SCHEMES, packed

from flashformer_triton.config import preset
from flashformer_triton.loading import random_state_dict
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
    parser.add_argument("--weights", nargs="+", default=["bf16"], choices=list(SCHEMES))
    parser.add_argument("--dump-asm", type=Path, default=None,
                        help="write each config's SASS (or PTX) there, for reading the loops")
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth()
    config = preset(args.shape)
    state = random_state_dict(config, seed=0, dtype=torch.bfloat16, device="cuda")
    results = []
    for scheme_name in args.weights:
        weights = packed(config, state, SCHEMES[scheme_name])
        results += sweep(args, config, weights, scheme_name, bandwidth)
        del weights
        torch.cuda.empty_cache()
    if results:
        ms, label, scheme_name = min(results)
        defaults = make_plan(config, batch=args.batch, max_seq_len=1024,
                             quant=SCHEMES[scheme_name]).tiles
        print(f"best: {label} {ms:.3f} ms; defaults were {asdict(defaults)}")
    return 0


def timed_runtime(config, weights, *, batch: int, pos: int, **tiles: int):
    """A runtime for these tiles, launched and checked once, then timed: (ms, runtime)."""
    runtime = decode_runtime(config, weights, batch=batch, pos=pos, **tiles)
    runtime.launch()
    runtime.check()
    ms = time_ms(runtime.launch, inner=10, repeats=9)
    runtime.check()
    return ms, runtime


def sweep(args, config, weights, scheme_name: str,
          bandwidth: float) -> list[tuple[float, str, str]]:
    """One row a config for these packed weights; (ms, label, scheme_name) of those that
    ran."""
    results = []
    for text in args.configs:
        try:
            ms, runtime = timed_runtime(config, weights, batch=args.batch, pos=args.pos,
                                        **parse(text))
            plan = runtime.plan
        except Exception as exc:  # a config that does not compile or hangs: report, go on
            log(f"{text or 'defaults'}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        floor = plan.floor_ms([args.pos] * args.batch, bandwidth)
        regs = getattr(runtime.compiled, "n_regs", "?")
        spills = getattr(runtime.compiled, "n_spills", "?")
        label = f"{scheme_name} {text or 'defaults'}"
        results.append((ms, label, scheme_name))
        print(f"{args.shape} b{args.batch} p{args.pos} {label:<48} {ms:8.3f} ms "
              f"frac {floor / ms:5.3f} tasks {plan.num_tasks:6d} regs {regs} spills {spills}",
              flush=True)
        if args.dump_asm:
            asm = runtime.compiled.asm
            kind = "sass" if asm.get("sass") else "ptx"
            args.dump_asm.mkdir(parents=True, exist_ok=True)
            name = f"{args.shape}-{label.replace(' ', '-').replace(',', '-')}.{kind}"
            (args.dump_asm / name).write_text(asm[kind])
        del runtime
    return results


if __name__ == "__main__":
    sys.exit(main())
