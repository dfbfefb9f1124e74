"""Decode-step benchmark: the megakernel against peers measured in the same run.

    python bench/bench_decode.py --shapes llama-3.2-1b llama-3.1-8b --batch 1 --pos 512

Every row: ms per decode step (median over repeats of back-to-back launches timed with CUDA
events), tokens/s, GB/s of the bytes the step must read, and the fraction of the floor
(those bytes over the device-to-device copy bandwidth measured in this run). The peer is the
reference model under torch.compile(mode="reduce-overhead") (the gpt-fast recipe).
Results go to bench/results/<date>-<gpu>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

from flashformer_triton.config import ModelConfig, preset
from flashformer_triton.loading import random_state_dict
from flashformer_triton.plan import make_plan
from flashformer_triton.reference import ReferenceModel
from flashformer_triton.runtime import DecodeRuntime
from flashformer_triton.weights import PackedWeights, pack_weights

RESULTS = Path(__file__).parent / "results"
_T0 = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def time_ms(fn, *, inner: int = 20, repeats: int = 15, warmup: int = 3) -> float:
    """Median ms per call of `fn`, timing `inner` back-to-back calls between two events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), inner=5, repeats=10)
    return 2 * nbytes / (ms * 1e-3)


def graph_of(fn):
    """Capture fn in a CUDA graph (after a warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def random_weights(name: str) -> tuple[ModelConfig, dict[str, torch.Tensor], PackedWeights]:
    """A preset shape with deterministic random bf16 weights on the GPU, packed for the kernel
    (the state dict too, for peers that need it: drop it when done)."""
    config = preset(name)
    state = random_state_dict(config, seed=0, dtype=torch.bfloat16, device="cuda")
    return config, state, pack_weights(config, state, dtype=torch.bfloat16, device="cuda")


def decode_runtime(config: ModelConfig, weights: PackedWeights, *, batch: int, pos: int,
                   max_seq_len: int | None = None, **tiles: int) -> DecodeRuntime:
    """Plan + random KV cache + runtime, its ids/pos buffers set for a step at `pos`
    (then time `runtime.launch`)."""
    max_seq_len = max_seq_len or max(1024, pos + 64)
    plan = make_plan(config, batch=batch, max_seq_len=max_seq_len, dtype=torch.bfloat16,
                     **tiles)
    shape = (config.num_layers, batch, config.num_kv_heads, max_seq_len, config.head_dim)
    k = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    runtime = DecodeRuntime(config, weights, plan, k, torch.randn_like(k))
    runtime.ids.random_(0, config.vocab_size)
    runtime.pos.fill_(pos)
    return runtime


def bench_shape(name: str, batch: int, pos: int, bandwidth: float, peers: list[str],
                max_seq_len: int | None = None, **tiles: int) -> list[dict]:
    log(f"{name} batch {batch} pos {pos}: building weights")
    config, state, weights = random_weights(name)
    runtime = decode_runtime(config, weights, batch=batch, pos=pos, max_seq_len=max_seq_len,
                             **tiles)
    plan = runtime.plan
    ref = None
    if peers:
        ref = ReferenceModel(config, state, max_batch_size=batch, max_seq_len=plan.max_seq_len,
                             dtype=torch.bfloat16, device="cuda", check_positions=False)
    del state
    torch.cuda.empty_cache()
    log("compiling the kernel")
    runtime.launch()
    runtime.check()
    log(plan.summary())

    step_bytes = plan.step_bytes([pos] * batch)
    floor = step_bytes / bandwidth * 1e3
    common = dict(shape=name, batch=batch, pos=pos, step_bytes=step_bytes, floor_ms=floor)

    def row(system: str, ms: float) -> dict:
        return dict(common, system=system, ms=ms, tok_s=batch * 1e3 / ms,
                    gbs=step_bytes / (ms * 1e-3) / 1e9, fraction=floor / ms)

    rows = [row("flashformer (launch)", time_ms(runtime.launch))]
    runtime.check()
    log(f"kernel {rows[-1]['ms']:.3f} ms")
    rows.append(row("flashformer (graph)", time_ms(graph_of(runtime.launch))))
    runtime.check()
    log(f"kernel in a CUDA graph {rows[-1]['ms']:.3f} ms")

    if "compile" in peers and ref is not None:
        ref.cache.k.copy_(runtime.k_cache)
        ref.cache.v.copy_(runtime.v_cache)
        step = torch.compile(ref, mode="reduce-overhead", fullgraph=True)
        ids_in = runtime.ids[:, None].long()
        pos_in = runtime.pos.long()
        log("torch.compile peer: compiling")
        with torch.no_grad():
            rows.append(row("torch.compile reduce-overhead", time_ms(
                lambda: step(ids_in, pos_in), warmup=5)))
        log(f"torch.compile peer {rows[-1]['ms']:.3f} ms")
    del runtime, weights, ref
    torch.cuda.empty_cache()
    return rows


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    return dict(gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def format_table(env: dict, bandwidth: float, rows: list[dict]) -> str:
    lines = [
        f"{env['gpu']} ({env['sms']} SMs), torch {env['torch']}, triton {env['triton']}, "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s",
        f"{'shape':<14}{'B':>3}{'pos':>7}  {'system':<31}{'ms/step':>9}{'tok/s':>9}"
        f"{'GB/s':>8}{'floor ms':>10}{'frac':>6}{'vs compile':>11}",
    ]
    peer = {(r["shape"], r["batch"], r["pos"]): r["ms"] for r in rows
            if r["system"].startswith("torch.compile")}
    for r in rows:
        base = peer.get((r["shape"], r["batch"], r["pos"]))
        speedup = f"{base / r['ms']:.2f}x" if base else "-"
        lines.append(
            f"{r['shape']:<14}{r['batch']:>3}{r['pos']:>7}  {r['system']:<31}{r['ms']:>9.3f}"
            f"{r['tok_s']:>9.0f}{r['gbs']:>8.0f}{r['floor_ms']:>10.3f}{r['fraction']:>6.2f}"
            f"{speedup:>11}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--pos", nargs="+", type=int, default=[512])
    parser.add_argument("--peers", nargs="*", default=["compile"], choices=["compile"])
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment()
    bandwidth = copy_bandwidth()
    rows = []
    for name in args.shapes:
        for batch in args.batch:
            for pos in args.pos:
                new = bench_shape(name, batch, pos, bandwidth, args.peers)
                rows += new
                print("\n".join(format_table(env, bandwidth, new).splitlines()[2:]), flush=True)
    table = format_table(env, bandwidth, rows)
    out = args.json or RESULTS / f"{env['date'][:10]}-{env['gpu'].replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env, bandwidth=bandwidth, rows=rows), indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
