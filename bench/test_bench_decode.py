"""pytest-benchmark suite: one decode step of the kernel and of its peers.

    PYTHONPATH=src:bench pytest bench/ --benchmark-only [--benchmark-json out.json]

Not part of the normal test run (pyproject's testpaths is tests/), and skipped as a whole
without CUDA. What runs is set by environment variables (space or comma separated):
BENCH_SHAPES (default llama-3.2-1b), BENCH_BATCH (1), BENCH_POS (512), BENCH_PEERS
(compile; any of compile hf-eager hf-static, or none), BENCH_ROUNDS (50).

Each round is one step followed by torch.cuda.synchronize(), so pytest-benchmark's wall
times are the GPU's (plus a few microseconds of sync). extra_info also carries the CUDA-event
median of back-to-back steps (as bench_decode.py measures) and the fraction of the floor.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the benchmarks need a CUDA GPU", allow_module_level=True)

import peers as peer_lib  # noqa: E402
from bench_decode import (  # noqa: E402
    copy_bandwidth,
    decode_runtime,
    default_max_seq_len,
    fit_report,
    graph_of,
    random_weights,
    time_ms,
)

from flashformer_triton.loading import random_state_dict  # noqa: E402
from flashformer_triton.plan import make_plan  # noqa: E402


def env_list(name: str, default: str) -> list[str]:
    return os.environ.get(name, default).replace(",", " ").split()


SHAPES = env_list("BENCH_SHAPES", "llama-3.2-1b")
CASES = [(int(b), int(p)) for b in env_list("BENCH_BATCH", "1")
         for p in env_list("BENCH_POS", "512")]
PEERS = [p for p in env_list("BENCH_PEERS", "compile") if p != "none"]
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "50"))


@pytest.fixture(scope="module")
def bandwidth() -> float:
    return copy_bandwidth()


@pytest.fixture(scope="module", params=SHAPES)
def shape(request):
    """(name, config, packed weights) of one shape; one shape alive at a time."""
    config, state, weights = random_weights(request.param)
    del state
    torch.cuda.empty_cache()
    yield request.param, config, weights
    del weights
    peer_lib.free_memory()


@pytest.fixture(params=CASES, ids=[f"b{b}-p{p}" for b, p in CASES])
def case(request, shape):
    name, config, weights = shape
    batch, pos = request.param
    capacity = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved()
    fatal, unfit = fit_report(config, batch, pos, PEERS, capacity)
    if fatal:
        pytest.skip(fatal)
    return name, config, weights, batch, pos, unfit


def _bench(benchmark, step, *, floor_ms: float, batch: int, info: dict, warmup: int) -> None:
    """Pedantic rounds of (step, synchronize) plus the CUDA-event figure in extra_info."""
    ms = time_ms(step, warmup=warmup)  # also warms up (compiles, records graphs)
    benchmark.extra_info.update(info, cuda_event_ms=ms, floor_ms=floor_ms,
                                fraction=floor_ms / ms, tok_s=batch * 1e3 / ms)

    def run() -> None:
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=3, iterations=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:
        benchmark.extra_info["wall_fraction"] = floor_ms / (stats.median * 1e3)


@pytest.mark.parametrize("mode", ["launch", "graph"])
def test_flashformer_step(benchmark, case, bandwidth, mode: str) -> None:
    name, config, weights, batch, pos, _ = case
    runtime = decode_runtime(config, weights, batch=batch, pos=pos)
    runtime.launch()
    runtime.check()
    step = runtime.launch if mode == "launch" else graph_of(runtime.launch)
    floor = runtime.plan.floor_ms([pos] * batch, bandwidth)
    _bench(benchmark, step, floor_ms=floor, batch=batch, warmup=3,
           info=dict(shape=name, batch=batch, pos=pos, system=f"flashformer ({mode})",
                     step_bytes=runtime.plan.step_bytes([pos] * batch),
                     bandwidth=bandwidth))
    runtime.check()


@pytest.mark.parametrize("peer", PEERS)
def test_peer_step(benchmark, case, bandwidth, peer: str) -> None:
    name, config, weights, batch, pos, unfit = case
    if peer in unfit:
        pytest.skip(unfit[peer])
    if peer in peer_lib.HF_PEERS and peer_lib.transformers_version() is None:
        pytest.skip("transformers is not installed")
    max_seq_len = default_max_seq_len(pos)
    plan = make_plan(config, batch=batch, max_seq_len=max_seq_len, dtype=torch.bfloat16)
    state = random_state_dict(config, seed=0, dtype=torch.bfloat16, device="cuda")
    try:
        if peer == "compile":
            built = peer_lib.reference_decode_peer(config, state, batch=batch, pos=pos,
                                                   max_seq_len=max_seq_len)
        else:
            model = peer_lib.hf_model(config, state, device="cuda")
            built = peer_lib.hf_decode_peer(peer, model, config, batch=batch, pos=pos,
                                            max_seq_len=max_seq_len)
            del model
        del state
        _bench(benchmark, built.step, floor_ms=plan.floor_ms([pos] * batch, bandwidth),
               batch=batch, warmup=built.warmup,
               info=dict(shape=name, batch=batch, pos=pos, system=built.system,
                         step_bytes=plan.step_bytes([pos] * batch), bandwidth=bandwidth,
                         **{f"peer_{k}": v for k, v in built.info.items()}))
    finally:
        built = None
        peer_lib.free_memory()
