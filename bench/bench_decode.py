"""Decode-step benchmark: the megakernel against peers measured in the same run.

    python bench/bench_decode.py                                  # 1B + 8B, batch 1, pos 512
    python bench/bench_decode.py --shapes llama-3.2-3b qwen3-8b --batch 1 4 16 --pos 512 8192
    python bench/bench_decode.py --full --peers compile           # every shape, batch, position
    python bench/bench_decode.py --no-peers                       # the kernel only

Every row: ms per decode step (median over repeats of back-to-back calls timed with CUDA
events), tokens/s (batch / step time), GB/s of the bytes the step must read, and the
fraction of the floor (those bytes over the device-to-device copy bandwidth measured in this
run). Peers (bench/peers.py), each optional and built from the same random weights:
`compile` (reference.py under torch.compile reduce-overhead, the gpt-fast recipe),
`hf-eager` (transformers, dynamic cache) and `hf-static` (transformers, StaticCache +
torch.compile reduce-overhead fullgraph). Speed-ups are ratios within this run. A peer that
is missing or fails, or a row or peer that would not fit in GPU memory (computed before
anything is allocated), is skipped with its reason, logged and kept in the JSON.
Memory: the kernel's weights plus at most one peer are alive at a time.
Results go to bench/results/<date>-<gpu>-decode.json (or --json), rewritten after every row.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton

from flashformer_triton.config import ModelConfig, preset
from flashformer_triton.loading import random_state_dict
from flashformer_triton.plan import make_plan
from flashformer_triton.runtime import DecodeRuntime
from flashformer_triton.tuning import time_cuda
from flashformer_triton.weights import PackedWeights, pack_weights

RESULTS = Path(__file__).parent / "results"
SHAPES = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen3-8b")
BATCHES = (1, 4, 16)
POSITIONS = (512, 8192, 32768)
DEFAULT_SHAPES = ("llama-3.2-1b", "llama-3.1-8b")
PEERS = ("compile", "hf-eager", "hf-static")
KERNEL = ("flashformer (launch)", "flashformer (graph)")
# Kept free on top of every estimate: CUDA-graph pools, allocator fragmentation, scratch.
HEADROOM_BYTES = 3 << 30
# A peer is not started with less time than this left (compiling an 8B model takes ~1-2 min).
PEER_RESERVE_S = {"compile": 90.0, "hf-eager": 20.0, "hf-static": 120.0}
_T0 = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def time_ms(fn, *, inner: int = 20, repeats: int = 15, warmup: int = 3) -> float:
    """Median ms per call of `fn`, timing `inner` back-to-back calls between two events."""
    return time_cuda(fn, inner=inner, repeats=repeats, warmup=warmup)


def time_step(fn, *, warmup: int = 3, target_s: float = 2.0, max_inner: int = 20,
              repeats: int = 15) -> tuple[float, int, int]:
    """`time_ms` with `inner`/`repeats` sized so one measurement takes about `target_s`
    (slow peers get fewer calls). Returns (ms, inner, repeats)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - start, 1e-6)
    inner = max(1, min(max_inner, int(target_s / (repeats * one))))
    if inner * repeats * one > 1.5 * target_s:
        repeats = max(5, int(target_s / (inner * one)))
    return time_ms(fn, inner=inner, repeats=repeats, warmup=0), inner, repeats


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


def default_max_seq_len(pos: int) -> int:
    return max(1024, pos + 64)


def decode_runtime(config: ModelConfig, weights: PackedWeights, *, batch: int, pos: int,
                   max_seq_len: int | None = None, **tiles: int) -> DecodeRuntime:
    """Plan (for the weights' quantization, if any) + random KV cache + runtime, its ids/pos
    buffers set for a step at `pos` (then time `runtime.launch`)."""
    max_seq_len = max_seq_len or default_max_seq_len(pos)
    plan = make_plan(config, batch=batch, max_seq_len=max_seq_len, dtype=torch.bfloat16,
                     quant=weights.scheme, **tiles)
    shape = (config.num_layers, batch, config.num_kv_heads, max_seq_len, config.head_dim)
    k = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    runtime = DecodeRuntime(config, weights, plan, k, torch.randn_like(k))
    runtime.ids.random_(0, config.vocab_size)
    runtime.pos.fill_(pos)
    return runtime


# What fits: estimated from the shapes before anything is allocated.


def kv_bytes(config: ModelConfig, batch: int, tokens: int, element: int = 2) -> int:
    """Keys and values of every layer for `tokens` positions of `batch` sequences."""
    return 2 * config.num_layers * batch * config.num_kv_heads * tokens * config.head_dim * element


def memory_needs(config: ModelConfig, batch: int, pos: int, max_seq_len: int | None = None,
                 element: int = 2) -> dict[str, int]:
    """Peak bytes on the GPU while each system runs, the kernel's weights and cache included
    for the peers (they run next to it). `kernel`: weights + KV cache + workspaces (while
    packing, the state dict doubles the weights: `kernel_build`). Peers rebuild the state
    dict; `compile` fuses QKV and gate/up into copies; the transformers model takes the
    state's tensors (meta-device build); `hf-eager` holds `pos` tokens plus the copy
    torch.cat makes of one layer while appending."""
    c = config
    s = max_seq_len or default_max_seq_len(pos)
    weights = c.num_parameters() * element
    work = 4 * batch * (2 * c.vocab_size + 4 * c.hidden_size + 3 * c.q_size
                        + 2 * c.intermediate_size) + 4 * batch * c.num_heads * 64 * (c.head_dim + 2)
    kernel = weights + kv_bytes(c, batch, s, element) + work
    scores = 4 * 3 * batch * c.num_heads * s  # fp32 attention scores + softmax, T = 1
    fused = c.num_layers * (c.qkv_size + 2 * c.intermediate_size) * c.hidden_size * element
    per_layer = kv_bytes(c, batch, pos + 1, element) // c.num_layers
    return {
        "kernel_build": 2 * weights,
        "kernel": kernel,
        "compile": kernel + weights + fused + kv_bytes(c, batch, s, element) + scores + work,
        "hf-static": kernel + weights + kv_bytes(c, batch, s, element) + scores + work,
        "hf-eager": kernel + weights + kv_bytes(c, batch, pos, element) + 2 * per_layer + scores
        + work,
    }


def fit_report(config: ModelConfig, batch: int, pos: int, peers: list[str], capacity: int,
               max_seq_len: int | None = None) -> tuple[str | None, dict[str, str]]:
    """(why the row cannot run at all or None, {peer: why it cannot run next to the kernel})
    for `capacity` free bytes (headroom not yet taken off)."""
    needs = memory_needs(config, batch, pos, max_seq_len)
    usable = capacity - HEADROOM_BYTES

    def gb(n: int) -> str:
        return f"{n / 1e9:.1f} GB"

    for key in ("kernel_build", "kernel"):
        if needs[key] > usable:
            what = "packing the weights" if key == "kernel_build" else "the kernel"
            return (f"does not fit: {what} needs {gb(needs[key])}, {gb(usable)} usable "
                    f"({gb(capacity)} free less {gb(HEADROOM_BYTES)} headroom)"), {}
    skipped = {}
    for peer in peers:
        need = needs[peer]
        if need > usable:
            skipped[peer] = (f"does not fit next to the kernel: {gb(need)} needed (kernel "
                             f"{gb(needs['kernel'])} + peer), {gb(usable)} usable")
    return None, skipped


# Results.


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    name = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        transformers = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        transformers = None
    return dict(gpu=props.name, sms=props.multi_processor_count,
                gpu_memory=props.total_memory, torch=torch.__version__,
                triton=triton.__version__, transformers=transformers, cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def add_speedups(rows: list[dict], key_fields: tuple[str, ...] = ("shape", "batch", "pos"),
                 time_field: str = "ms") -> None:
    """rows[i]["speedup"] = {peer: peer time / this time} over the peers of its group."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("peer"):
            groups.setdefault(tuple(r[k] for k in key_fields), {})[r["peer"]] = r[time_field]
    for r in rows:
        peers = groups.get(tuple(r[k] for k in key_fields), {})
        r["speedup"] = {p: t / r[time_field] for p, t in peers.items() if r[time_field] > 0}


@dataclass
class Results:
    """Rows and skipped entries of one run, written to `path` after every change."""

    path: Path
    env: dict
    bandwidth: float
    args: dict
    kind: str = "decode"
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write()

    def skip(self, reason: str, **where) -> None:
        log(f"skipped {' '.join(f'{k}={v}' for k, v in where.items())}: {reason}")
        self.skipped.append(dict(where, reason=reason))
        self.write()

    def write(self) -> None:
        add_speedups(self.rows, *(() if self.kind == "decode" else
                                  (("shape", "batch", "prompt_len", "new_tokens"), "seconds")))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(self.env, kind=self.kind, bandwidth=self.bandwidth,
                                       args=self.args, rows=self.rows, skipped=self.skipped),
                                  indent=1))
        tmp.replace(self.path)


def speedup_text(row: dict, peer: str) -> str:
    """The row's speed-up over `peer` for a text table ("-" when that peer did not run)."""
    value = row.get("speedup", {}).get(peer)
    return f"{value:.2f}x" if value else "-"


def format_table(env: dict, bandwidth: float, rows: list[dict]) -> str:
    add_speedups(rows)
    lines = [
        f"{env['gpu']} ({env['sms']} SMs), torch {env['torch']}, triton {env['triton']}, "
        f"transformers {env.get('transformers')}, copy bandwidth {bandwidth / 1e12:.2f} TB/s",
        f"{'shape':<14}{'B':>3}{'pos':>7}  {'system':<30}{'ms/step':>9}{'tok/s':>9}"
        f"{'GB/s':>8}{'floor ms':>10}{'frac':>6}{'vs compile':>11}{'vs HF stat':>11}"
        f"{'vs HF eager':>12}",
    ]

    for r in rows:
        lines.append(
            f"{r['shape']:<14}{r['batch']:>3}{r['pos']:>7}  {r['system']:<30}{r['ms']:>9.3f}"
            f"{r['tok_s']:>9.0f}{r['gbs']:>8.0f}{r['floor_ms']:>10.3f}{r['fraction']:>6.2f}"
            f"{speedup_text(r, 'compile'):>11}{speedup_text(r, 'hf-static'):>11}"
            f"{speedup_text(r, 'hf-eager'):>12}"
        )
    return "\n".join(lines)


# The benchmark.


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def runnable_peers(results: Results, peers: list[str], where: dict) -> list[str]:
    """The selected peers in PEERS order; without transformers its peers are recorded as
    skipped instead."""
    import peers as peer_lib

    wanted = [p for p in PEERS if p in peers]
    if peer_lib.transformers_version() is None:
        for p in [p for p in wanted if p in peer_lib.HF_PEERS]:
            results.skip("transformers is not installed", system=peer_lib.SYSTEMS[p], **where)
        wanted = [p for p in wanted if p not in peer_lib.HF_PEERS]
    return wanted


def run_peers(results: Results, config: ModelConfig, name: str, batch: int, pos: int,
              max_seq_len: int, peers: list[str], unfit: dict[str, str], row, deadline: float,
              hf_attn: str) -> None:
    """Time each selected peer next to the live kernel, one at a time, freeing in between."""
    import peers as peer_lib

    where = dict(shape=name, batch=batch, pos=pos)
    wanted = runnable_peers(results, peers, where)
    hf = None  # one transformers model serves both HF peers
    try:
        for key in wanted:
            system = peer_lib.SYSTEMS[key]
            if key in unfit:
                results.skip(unfit[key], system=system, **where)
                continue
            left = deadline - time.time()
            if left < PEER_RESERVE_S[key]:
                results.skip(f"time budget: {left:.0f} s left, {PEER_RESERVE_S[key]:.0f} s "
                             "reserved for this peer", system=system, **where)
                continue
            peer = None
            try:
                log(f"{system}: building")
                if key == "compile":
                    state = random_state_dict(config, seed=0, dtype=torch.bfloat16,
                                              device="cuda")
                    peer = peer_lib.reference_decode_peer(config, state, batch=batch, pos=pos,
                                                          max_seq_len=max_seq_len)
                    del state
                else:
                    if hf is None:
                        state = random_state_dict(config, seed=0, dtype=torch.bfloat16,
                                                  device="cuda")
                        hf = peer_lib.hf_model(config, state, device="cuda", attn=hf_attn,
                                               log=log)
                        del state
                    peer = peer_lib.hf_decode_peer(key, hf, config, batch=batch, pos=pos,
                                                   max_seq_len=max_seq_len)
                torch.cuda.empty_cache()
                log(f"{system}: compiling / warming up")
                ms, inner, repeats = time_step(peer.step, warmup=peer.warmup)
                results.add(row(system, ms, peer=key, inner=inner, repeats=repeats,
                                info=peer.info))
                log(f"{system} {ms:.3f} ms")
            except Exception as exc:  # a peer must never crash the table
                log(traceback.format_exc(limit=4))
                results.skip(_reason(exc), system=system, **where)
            finally:
                peer = None
                peer_lib.free_memory()
    finally:
        hf = None
        peer_lib.free_memory()


def bench_row(results: Results, config: ModelConfig, name: str, weights: PackedWeights,
              batch: int, pos: int, bandwidth: float, peers: list[str], unfit: dict[str, str],
              deadline: float, hf_attn: str = "sdpa", max_seq_len: int | None = None,
              **tiles: int) -> None:
    log(f"{name} batch {batch} pos {pos}: compiling the kernel")
    runtime = decode_runtime(config, weights, batch=batch, pos=pos, max_seq_len=max_seq_len,
                             **tiles)
    plan = runtime.plan
    runtime.launch()
    runtime.check()
    log(plan.summary())
    step_bytes = plan.step_bytes([pos] * batch)
    floor = step_bytes / bandwidth * 1e3
    common = dict(shape=name, batch=batch, pos=pos, max_seq_len=plan.max_seq_len,
                  step_bytes=step_bytes, floor_ms=floor)

    def row(system: str, ms: float, **extra) -> dict:
        return dict(common, system=system, ms=ms, tok_s=batch * 1e3 / ms,
                    gbs=step_bytes / (ms * 1e-3) / 1e9, fraction=floor / ms, **extra)

    tile_info = asdict(plan.tiles)
    ms, inner, repeats = time_step(runtime.launch)
    runtime.check()
    results.add(row(KERNEL[0], ms, peer=None, inner=inner, repeats=repeats, tiles=tile_info))
    log(f"kernel {ms:.3f} ms")
    replay = graph_of(runtime.launch)
    ms, inner, repeats = time_step(replay)
    runtime.check()
    results.add(row(KERNEL[1], ms, peer=None, inner=inner, repeats=repeats, tiles=tile_info))
    log(f"kernel in a CUDA graph {ms:.3f} ms")
    del replay
    if peers:
        run_peers(results, config, name, batch, pos, plan.max_seq_len, peers, unfit, row,
                  deadline, hf_attn)
    del runtime
    torch.cuda.empty_cache()


def bench_shape(results: Results, name: str, batches: list[int], positions: list[int],
                bandwidth: float, peers: list[str], deadline: float, capacity: int,
                hf_attn: str = "sdpa", max_seq_len: int | None = None, **tiles: int) -> None:
    """Every (batch, position) row of one shape; the kernel's weights are built once."""
    config = preset(name)
    weights = None
    try:
        for batch in batches:
            for pos in positions:
                where = dict(shape=name, batch=batch, pos=pos)
                s = max_seq_len or default_max_seq_len(pos)
                if pos >= s:
                    results.skip(f"pos {pos} is not below max_seq_len {s}", **where)
                    continue
                if time.time() > deadline:
                    results.skip("time budget used up", **where)
                    continue
                fatal, unfit = fit_report(config, batch, pos, peers, capacity, s)
                if fatal:
                    results.skip(fatal, **where)
                    continue
                try:
                    if weights is None:
                        log(f"{name}: building random bf16 weights ({config.summary()})")
                        _, state, weights = random_weights(name)
                        del state
                        torch.cuda.empty_cache()
                    bench_row(results, config, name, weights, batch, pos, bandwidth, peers,
                              unfit, deadline, hf_attn, max_seq_len, **tiles)
                except Exception as exc:
                    log(traceback.format_exc(limit=6))
                    results.skip(_reason(exc), **where)
                    torch.cuda.synchronize()  # a broken context stops the run here
    finally:
        weights = None
        torch.cuda.empty_cache()


def parse_tiles(text: str) -> dict[str, int]:
    pairs = [item.split("=") for item in text.split(",") if item.strip()]
    return {key.strip(): int(value) for key, value in pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Shapes: " + ", ".join(SHAPES) + f"; --full = batches {BATCHES} x positions "
        f"{POSITIONS} x every shape.",
    )
    parser.add_argument("--shapes", nargs="+", default=None, choices=[*SHAPES, "all"],
                        help="default: " + " ".join(DEFAULT_SHAPES))
    parser.add_argument("--batch", nargs="+", type=int, default=None, help="default: 1")
    parser.add_argument("--pos", nargs="+", type=int, default=None, help="default: 512")
    parser.add_argument("--full", action="store_true",
                        help="every shape, batch 1/4/16, position 512/8192/32768 (unless given)")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS,
                        help="peers to measure (default: all three)")
    parser.add_argument("--no-peers", action="store_true", help="the kernel only")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers peers")
    parser.add_argument("--hf-attn", default="sdpa", help="transformers attention (default sdpa)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="KV-cache length of every system (default max(1024, pos + 64))")
    parser.add_argument("--tiles", default="", help="plan.Tiles overrides, e.g. block_k=1024")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no row or peer once this many seconds have passed")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args(argv)
    shapes = args.shapes or (list(SHAPES) if args.full else list(DEFAULT_SHAPES))
    shapes = list(SHAPES) if "all" in shapes else shapes
    batches = args.batch or (list(BATCHES) if args.full else [1])
    positions = args.pos or (list(POSITIONS) if args.full else [512])
    peers = [] if args.no_peers else [p for p in args.peers
                                      if not (args.no_hf and p.startswith("hf"))]
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment()
    deadline = _T0 + args.budget_s if args.budget_s else float("inf")
    bandwidth = copy_bandwidth()
    torch.cuda.empty_cache()  # the copy's 4 GiB must not count as used
    capacity = torch.cuda.mem_get_info()[0]
    out = args.json or RESULTS / f"{env['date'][:10]}-{gpu_slug(env['gpu'])}-decode.json"
    results = Results(out, env, bandwidth, dict(shapes=shapes, batches=batches,
                                                positions=positions, peers=peers,
                                                hf_attn=args.hf_attn, tiles=args.tiles))
    log(f"{env['gpu']}: {capacity / 1e9:.1f} GB free, copy bandwidth "
        f"{bandwidth / 1e12:.2f} TB/s; results -> {out}")
    for name in shapes:
        first = len(results.rows)
        bench_shape(results, name, batches, positions, bandwidth, peers, deadline, capacity,
                    args.hf_attn, args.max_seq_len, **parse_tiles(args.tiles))
        new = results.rows[first:]
        if new:
            print("\n".join(format_table(env, bandwidth, new).splitlines()[2:]), flush=True)
    results.write()
    print(format_table(env, bandwidth, results.rows))
    for s in results.skipped:
        print(f"skipped {s['shape']} b{s['batch']} p{s['pos']} {s.get('system', 'row')}: "
              f"{s['reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
