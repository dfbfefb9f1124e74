"""pytest-benchmark suite: a whole greedy generation (prompt + new tokens).

    PYTHONPATH=src:bench pytest bench/test_bench_generate.py --benchmark-only

Not part of the normal test run, skipped without CUDA. Environment: BENCH_SHAPES (default
llama-3.2-1b), BENCH_BATCH (1), BENCH_PROMPT_LEN (128), BENCH_NEW_TOKENS (256),
BENCH_GEN_PEERS (compile; any of compile hf-eager hf-static, or none), BENCH_GEN_ROUNDS (3).
Each round is one `generate` call ending in a host copy of the tokens (a sync), after one
warm-up round that compiles; extra_info gives tokens/s of the median round.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the benchmarks need a CUDA GPU", allow_module_level=True)

import peers as peer_lib  # noqa: E402
from bench_decode import fit_report  # noqa: E402

from flashformer_triton.config import preset  # noqa: E402
from flashformer_triton.loading import random_state_dict  # noqa: E402
from flashformer_triton.model import FlashFormer  # noqa: E402


def env_list(name: str, default: str) -> list[str]:
    return os.environ.get(name, default).replace(",", " ").split()


SHAPES = env_list("BENCH_SHAPES", "llama-3.2-1b")
BATCHES = [int(b) for b in env_list("BENCH_BATCH", "1")]
PROMPT = int(os.environ.get("BENCH_PROMPT_LEN", "128"))
NEW = int(os.environ.get("BENCH_NEW_TOKENS", "256"))
PEERS = [p for p in env_list("BENCH_GEN_PEERS", "compile") if p != "none"]
ROUNDS = int(os.environ.get("BENCH_GEN_ROUNDS", "3"))
CASES = [(s, b) for s in SHAPES for b in BATCHES]


@pytest.fixture(params=CASES, ids=[f"{s}-b{b}" for s, b in CASES])
def case(request):
    name, batch = request.param
    config = preset(name)
    capacity = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved()
    fatal, unfit = fit_report(config, batch, PROMPT + NEW - 1, PEERS, capacity, PROMPT + NEW)
    if fatal:
        pytest.skip(fatal)
    gen = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (batch, PROMPT), device="cuda", generator=gen)
    yield name, config, batch, prompt, unfit
    peer_lib.free_memory()


def _bench(benchmark, run, prompt: torch.Tensor, info: dict) -> None:
    def once():
        return run(prompt).cpu()  # the copy syncs

    benchmark.extra_info.update(info, prompt_len=PROMPT, new_tokens=NEW)
    benchmark.pedantic(once, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:
        benchmark.extra_info["tok_s"] = prompt.shape[0] * NEW / stats.median


def test_flashformer_generate(benchmark, case) -> None:
    name, config, batch, prompt, _ = case
    model = FlashFormer.from_preset(name, device="cuda", dtype=torch.bfloat16,
                                    max_batch_size=batch, max_seq_len=PROMPT + NEW)
    model.warmup()
    try:
        _bench(benchmark,
               lambda p: model.generate(p, max_new_tokens=NEW, eos_token_id=[])[:, PROMPT:],
               prompt, dict(shape=name, batch=batch, system="flashformer generate"))
    finally:
        model = None


@pytest.mark.parametrize("peer", PEERS)
def test_peer_generate(benchmark, case, peer: str) -> None:
    name, config, batch, prompt, unfit = case
    if peer in unfit:
        pytest.skip(unfit[peer])
    if peer in peer_lib.HF_PEERS and peer_lib.transformers_version() is None:
        pytest.skip("transformers is not installed")
    state = random_state_dict(config, seed=0, dtype=torch.bfloat16, device="cuda")
    try:
        info = {}
        if peer == "compile":
            run = peer_lib.reference_generate(config, state, batch=batch, prompt_len=PROMPT,
                                              new_tokens=NEW)
        else:
            model = peer_lib.hf_model(config, state, device="cuda")
            run, info = peer_lib.hf_generate(peer, model, config, batch=batch,
                                             prompt_len=PROMPT, new_tokens=NEW)
            del model
        del state
        _bench(benchmark, run, prompt, dict(shape=name, batch=batch,
                                            system=peer_lib.SYSTEMS[peer],
                                            **{f"peer_{k}": v for k, v in info.items()}))
    finally:
        run = None
        peer_lib.free_memory()
