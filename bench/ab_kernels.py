"""A/B kernel versions in one process, on one set of weights, in turns.

    git show HEAD:kernels/decode.py > /tmp/head.py
    python bench/ab_kernels.py --shape llama-3.1-8b --weights int4-g128 --rounds 3 \\
        base=/tmp/head.py new=kernels/decode.py "new-probe2=kernels/decode.py:early_probe=2"

Each variant is NAME=PATH[:TILES]: a copy of kernels/decode.py and plan.Tiles overrides
(comma list). The variants run one after the other, --rounds times, each with the module
loaded from its file; the table gives every time, the median, and the median against the
first variant. Why one process: on one H100 the same kernel took up to 3% more or less in
separate processes (bench/NOTES.md Q34), about what the changes under test are worth, while
rows of one process agree within about 0.5%. bench/sweep.py does the same for tiles alone
(and times each row the same way: sweep.timed_runtime).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

KERNEL_MODULE = "flashformer_triton.kernels.decode"


def parse_variant(text: str) -> tuple[str, Path, dict[str, int]]:
    """NAME=PATH[:key=value,...] -> (name, path, tiles)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"variant {text!r}: expected NAME=PATH[:key=value,...]")
    path, _, tiles = rest.partition(":")
    pairs = [item.split("=") for item in tiles.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"variant {text!r}: tiles must be key=value pairs, comma-separated")
    return name, Path(path), {key.strip(): int(value) for key, value in pairs}


def use_kernel_source(path: Path):
    """Load `path` as flashformer_triton.kernels.decode, the module that DecodeRuntime launches
    from (runtime.kernel_module), and return it."""
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {path} does not exist")
    spec = importlib.util.spec_from_file_location(KERNEL_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[KERNEL_MODULE] = module
    spec.loader.exec_module(module)
    import flashformer_triton.kernels as package

    package.decode = module
    return module


def summary(times: dict[str, list[float]]) -> list[str]:
    """One line a variant: its times, median and the median against the first variant's."""
    base = statistics.median(next(iter(times.values())))
    lines = []
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"{name:<20} " + " ".join(f"{v:.3f}" for v in values)
                     + f"  median {median:.3f} ms  {100 * (median / base - 1):+.1f}%")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", help="NAME=PATH[:key=value,...]")
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--weights", default="bf16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pos", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants]

    import torch
    from bench_decode import copy_bandwidth
    from bench_quant import SCHEMES, packed
    from sweep import timed_runtime

    from flashformer_triton.config import preset
    from flashformer_triton.loading import random_state_dict

    if not torch.cuda.is_available():
        raise SystemExit("bench/ab_kernels.py times kernels on a GPU; no CUDA device here")
    bandwidth = copy_bandwidth()
    config = preset(args.shape)
    state = random_state_dict(config, seed=0, dtype=torch.bfloat16, device="cuda")
    weights = packed(config, state, SCHEMES[args.weights])
    del state
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for round_ in range(args.rounds):
        for name, path, tiles in variants:
            use_kernel_source(path)
            ms, runtime = timed_runtime(config, weights, batch=args.batch, pos=args.pos, **tiles)
            times[name].append(ms)
            floor = runtime.plan.floor_ms([args.pos] * args.batch, bandwidth)
            spills = getattr(runtime.compiled, "n_spills", "?")
            print(f"{args.shape} {args.weights} b{args.batch} p{args.pos} round {round_} "
                  f"{name:<20} {ms:8.3f} ms frac {floor / ms:5.3f} spills {spills}",
                  flush=True)
            del runtime
    print("\n".join(summary(times)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
