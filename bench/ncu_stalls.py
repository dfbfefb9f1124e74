"""Where the decode kernel's warps stall, from Nsight Compute's per-instruction samples.

On the GPU machine (ncu is installed there; one decode step, ~30 s), with
PYTHONPATH=src:tests:bench:

    ncu --clock-control none --kernel-name regex:decode_step --launch-skip 2 --launch-count 1 \
        --section WarpStateStats --section SourceCounters -o $OUT/rep \
        python bench/ncu_stalls.py launch --shape llama-3.1-8b --weights int4-g128
    ncu --import $OUT/rep.ncu-rep --page source --csv --print-source sass > $OUT/source.csv
    python bench/ncu_stalls.py report $OUT/source.csv

`launch` builds the kernel on random weights and runs a few steps; `report` prints the stall
reasons over the whole kernel, per loop (a backward branch: the GEMV and attention loops,
the spin-waits) and for the most sampled instructions (bench/NOTES.md Q29 reads one).
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
import sys
from dataclasses import dataclass
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


@dataclass
class Instruction:
    address: int
    text: str
    samples: int
    executed: int
    stalls: dict[str, int]  # reason (without "stall_") -> samples

    def top(self, n: int = 2) -> str:
        return " ".join(f"{k}:{v}" for k, v in collections.Counter(self.stalls).most_common(n))


def read_source(path: Path) -> list[Instruction]:
    """The SASS rows of `ncu --page source --csv --print-source sass`, in address order."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    start = next((i for i, r in enumerate(rows)
                  if "Address" in r and "Source" in r and SAMPLES in r), None)
    if start is None:
        raise ValueError(f"{path} is not an ncu source page (no '{SAMPLES}' column): export it "
                         "with --page source --csv --print-source sass")
    header = rows[start]
    col = {name: i for i, name in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    out = []
    for row in rows[start + 1:]:
        if len(row) != len(header) or not row[col["Address"]].startswith("0x"):
            continue

        def num(name: str, row=row) -> int:
            value = row[col[name]].replace(",", "")
            return int(value) if value.isdigit() else 0

        out.append(Instruction(int(row[col["Address"]], 16), row[col["Source"]].strip(),
                               num(SAMPLES), num(EXECUTED), {r[6:]: num(r) for r in reasons}))
    return out


def loops(code: list[Instruction]) -> list[tuple[int, int]]:
    """(first, last) index of every loop: a branch back to an address at or before it."""
    index = {ins.address: i for i, ins in enumerate(code)}
    found = []
    for i, ins in enumerate(code):
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", ins.text)
        if m and (target := index.get(int(m.group(1), 16))) is not None and target <= i:
            found.append((target, i))
    return sorted(found)


def report(path: Path, top: int = 25, min_share: float = 0.005) -> str:
    code = read_source(path)
    total = sum(ins.samples for ins in code) or 1
    reasons: collections.Counter = collections.Counter()
    for ins in code:
        reasons.update(ins.stalls)
    lines = [f"{len(code)} instructions, {total} samples: "
             + " ".join(f"{k} {100 * v / total:.1f}%" for k, v in reasons.most_common(8))]
    for first, last in loops(code):
        body = code[first:last + 1]
        share = sum(ins.samples for ins in body) / total
        if share >= min_share and last - first + 1 < 0.8 * len(code):  # not the task loop
            mix: collections.Counter = collections.Counter()
            for ins in body:
                mix.update(ins.stalls)
            lines.append(f"loop {first:5d}-{last:5d} ({last - first + 1:4d} instructions, "
                         f"runs {body[-1].executed:9d}) {100 * share:5.1f}%  "
                         + " ".join(f"{k} {100 * v / total:.1f}" for k, v in mix.most_common(4)))
    for i in sorted(range(len(code)), key=lambda i: -code[i].samples)[:top]:
        ins = code[i]
        lines.append(f"{i:5d} {100 * ins.samples / total:5.2f}% x{ins.executed:<9d} "
                     f"{ins.text[:56]:56s} {ins.top()}")
    return "\n".join(lines)


def launch(args: argparse.Namespace) -> None:
    import torch
    from bench_decode import decode_runtime
    from bench_quant import SCHEMES, packed
    from sweep import parse

    from flashformer_triton.config import preset
    from flashformer_triton.loading import random_state_dict

    if not torch.cuda.is_available():
        raise SystemExit("launch needs a CUDA GPU (run it under ncu on the device machine)")
    config = preset(args.shape)
    state = random_state_dict(config, seed=0, dtype=torch.bfloat16, device="cuda")
    weights = packed(config, state, SCHEMES[args.weights])
    del state
    runtime = decode_runtime(config, weights, batch=args.batch, pos=args.pos,
                             **parse(args.tiles))
    for _ in range(args.steps):
        runtime.launch()
    torch.cuda.synchronize()
    runtime.check()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("launch", help="build and run a few decode steps (under ncu)")
    run.add_argument("--shape", default="llama-3.1-8b")
    run.add_argument("--weights", default="int4-g128")
    run.add_argument("--batch", type=int, default=1)
    run.add_argument("--pos", type=int, default=512)
    run.add_argument("--tiles", default="", help="plan tile overrides, e.g. block_k=256")
    run.add_argument("--steps", type=int, default=4)
    rep = sub.add_parser("report", help="summarise an ncu source page (CSV)")
    rep.add_argument("csv", type=Path)
    rep.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    if args.cmd == "launch":
        launch(args)
    else:
        print(report(args.csv, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
