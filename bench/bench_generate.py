"""End-to-end generation benchmark: greedy tokens/s of a whole `generate` call.

    python bench/bench_generate.py                                # 1B, batch 1: 128 + 256 tokens
    python bench/bench_generate.py --shapes llama-3.1-8b --batch 1 4 --peers compile hf-static

A prompt of --prompt-len random tokens, then --new-tokens greedy tokens (no EOS), the same
prompt for every system; time of the whole call (prefill included), median of --repeats
runs after one warm-up run (which compiles and records CUDA graphs). Systems:
`FlashFormer.generate` (decode steps as CUDA-graph replays of the kernel) and the peers of
bench/peers.py: `compile` (the reference prefills, then a greedy loop of compiled decode
steps), `hf-eager` (model.generate, dynamic cache) and `hf-static` (model.generate with a
StaticCache and model.forward compiled reduce-overhead fullgraph). `agree` is how many
leading new tokens every row shares with FlashFormer's (bf16 rounding differs, so long
greedy runs of random models drift apart; a peer at 0 computes something else). Peers are
optional and skipped with a logged reason when missing, failing or too big.
Results go to bench/results/<date>-<gpu>-generate.json (or --json), rewritten after every row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
from bench_decode import (
    PEER_RESERVE_S,
    PEERS,
    RESULTS,
    SHAPES,
    Results,
    add_speedups,
    environment,
    fit_report,
    gpu_slug,
    log,
    runnable_peers,
    speedup_text,
)

from flashformer_triton.config import preset
from flashformer_triton.loading import random_state_dict

FLASHFORMER = "flashformer generate"
DEVICE = "cuda"  # module-level so a CPU dry run of the logic can switch it
DTYPE = torch.bfloat16
_T0 = time.time()


def agreement(tokens: torch.Tensor, reference: torch.Tensor | None) -> int | None:
    """Leading new tokens that every row shares with `reference` ([B, n] each)."""
    if reference is None:
        return None
    same = (tokens.cpu() == reference.cpu()).all(0).tolist() + [False]
    return same.index(False)


def time_runs(run, prompt: torch.Tensor, repeats: int, target_s: float = 20.0):
    """One warm-up run, then up to `repeats` timed runs (fewer when a run is slow). Returns
    (seconds of each timed run, tokens of the last)."""
    tokens = run(prompt)
    torch.cuda.synchronize()
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) + times[-1] <= target_s):
        torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = run(prompt)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, tokens


def bench_generate(results: Results, name: str, batch: int, prompt_len: int, new_tokens: int,
                   peers: list[str], repeats: int, deadline: float, capacity: int,
                   hf_attn: str = "sdpa", flashformer: bool = True) -> None:
    import peers as peer_lib

    from flashformer_triton.model import FlashFormer

    config = preset(name)
    total = prompt_len + new_tokens
    where = dict(shape=name, batch=batch, pos=total)
    fatal, unfit = fit_report(config, batch, total - 1, peers, capacity, total)
    if fatal:
        results.skip(fatal, **where)
        return
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (batch, prompt_len), device=DEVICE,
                           generator=gen)
    common = dict(shape=name, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens)
    first: torch.Tensor | None = None

    def add(system: str, peer: str | None, times: list[float], tokens, **extra) -> None:
        seconds = statistics.median(times)
        results.add(dict(common, system=system, peer=peer, seconds=seconds,
                         tok_s=batch * new_tokens / seconds,
                         ms_per_token=seconds * 1e3 / new_tokens, runs=times,
                         agree=agreement(tokens, first), **extra))
        log(f"{system}: {seconds:.3f} s, {batch * new_tokens / seconds:.1f} tokens/s")

    model = None
    if flashformer:
        try:
            log(f"{name} batch {batch}: FlashFormer ({config.summary()})")
            model = FlashFormer.from_preset(name, device=DEVICE, dtype=DTYPE,
                                            max_batch_size=batch, max_seq_len=total)
            log(f"kernel compiled in {model.warmup():.1f} s")

            def run(p: torch.Tensor) -> torch.Tensor:
                return model.generate(p, max_new_tokens=new_tokens, eos_token_id=[])[:, prompt_len:]

            times, tokens = time_runs(run, prompt, repeats)
            add(FLASHFORMER, None, times, tokens, tiles=asdict(model.plan.tiles))
            first = tokens  # the peers' agreement is counted against these
        except Exception as exc:
            log(traceback.format_exc(limit=6))
            results.skip(f"{type(exc).__name__}: {str(exc)[:300]}", system=FLASHFORMER, **where)
        # kept alive while the peers run, like the kernel in bench_decode

    wanted = runnable_peers(results, peers, where)
    hf = None
    try:
        for key in wanted:  # compile, then hf-eager before hf-static (that one compiles forward)
            system = peer_lib.SYSTEMS[key]
            if key in unfit:
                results.skip(unfit[key], system=system, **where)
                continue
            left = deadline - time.time()
            if left < PEER_RESERVE_S[key]:
                results.skip(f"time budget: {left:.0f} s left", system=system, **where)
                continue
            run = None
            try:
                log(f"{system}: building")
                info = {}
                if key == "compile":
                    state = random_state_dict(config, seed=0, dtype=DTYPE,
                                              device=DEVICE)
                    run = peer_lib.reference_generate(config, state, batch=batch,
                                                      prompt_len=prompt_len,
                                                      new_tokens=new_tokens)
                    info = {"compile": "reduce-overhead (decode steps)", "prefill": "eager"}
                    del state
                else:
                    if hf is None:
                        state = random_state_dict(config, seed=0, dtype=DTYPE,
                                                  device=DEVICE)
                        hf = peer_lib.hf_model(config, state, device=DEVICE, attn=hf_attn,
                                               log=log)
                        del state
                    run, info = peer_lib.hf_generate(key, hf, config, batch=batch,
                                                     prompt_len=prompt_len,
                                                     new_tokens=new_tokens, log=log)
                torch.cuda.empty_cache()
                log(f"{system}: warm-up run (compiles)")
                times, tokens = time_runs(run, prompt, repeats)
                add(system, key, times, tokens, info=info)
            except Exception as exc:
                log(traceback.format_exc(limit=6))
                results.skip(f"{type(exc).__name__}: {str(exc)[:300]}", system=system, **where)
            finally:
                run = None
                peer_lib.free_memory()
    finally:
        hf = model = None
        peer_lib.free_memory()


def format_table(env: dict, rows: list[dict]) -> str:
    add_speedups(rows, ("shape", "batch", "prompt_len", "new_tokens"), "seconds")
    lines = [
        f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, transformers "
        f"{env.get('transformers')}: greedy generate, prompt + new tokens",
        f"{'shape':<14}{'B':>3}{'tokens':>9}  {'system':<30}{'s':>8}{'tok/s':>9}{'ms/tok':>8}"
        f"{'agree':>6}{'vs compile':>11}{'vs HF stat':>11}{'vs HF eager':>12}",
    ]

    for r in rows:
        agree = "-" if r["agree"] is None else str(r["agree"])
        lines.append(
            f"{r['shape']:<14}{r['batch']:>3}{r['prompt_len']:>4}+{r['new_tokens']:<4}  "
            f"{r['system']:<30}{r['seconds']:>8.3f}{r['tok_s']:>9.1f}{r['ms_per_token']:>8.2f}"
            f"{agree:>6}{speedup_text(r, 'compile'):>11}{speedup_text(r, 'hf-static'):>11}"
            f"{speedup_text(r, 'hf-eager'):>12}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["llama-3.2-1b"],
                        choices=[*SHAPES, "all"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (after a warm-up)")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers peers")
    parser.add_argument("--no-flashformer", action="store_true", help="peers only")
    parser.add_argument("--hf-attn", default="sdpa")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no row or peer once this many seconds have passed")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    shapes = list(SHAPES) if "all" in args.shapes else args.shapes
    peers = [] if args.no_peers else [p for p in args.peers
                                      if not (args.no_hf and p.startswith("hf"))]
    if not torch.cuda.is_available():
        print("bench_generate needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment()
    deadline = _T0 + args.budget_s if args.budget_s else float("inf")
    capacity = torch.cuda.mem_get_info()[0]
    out = args.json or RESULTS / f"{env['date'][:10]}-{gpu_slug(env['gpu'])}-generate.json"
    results = Results(out, env, 0.0, dict(shapes=shapes, batches=args.batch,
                                          prompt_len=args.prompt_len,
                                          new_tokens=args.new_tokens, peers=peers,
                                          repeats=args.repeats), kind="generate")
    for name in shapes:
        for batch in args.batch:
            if time.time() > deadline:
                results.skip("time budget used up", shape=name, batch=batch,
                             pos=args.prompt_len + args.new_tokens)
                continue
            first = len(results.rows)
            try:
                bench_generate(results, name, batch, args.prompt_len, args.new_tokens, peers,
                               args.repeats, deadline, capacity, args.hf_attn,
                               not args.no_flashformer)
            except Exception as exc:
                log(traceback.format_exc(limit=6))
                results.skip(f"{type(exc).__name__}: {str(exc)[:300]}", shape=name,
                             batch=batch, pos=args.prompt_len + args.new_tokens)
            new = results.rows[first:]
            if new:
                print("\n".join(format_table(env, new).splitlines()[2:]), flush=True)
    results.write()
    print(format_table(env, results.rows))
    for s in results.skipped:
        print(f"skipped {s['shape']} b{s['batch']} {s.get('system', 'row')}: {s['reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
