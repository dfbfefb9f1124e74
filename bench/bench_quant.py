"""Quantized decode steps: the megakernel on bf16 / int8 / int4 weights against the int8
weight-only torch.compile peer (gpt-fast's recipe), measured in the same run.

    python bench/bench_quant.py --shapes llama-3.2-1b llama-3.1-8b

Rows: ms per step (CUDA graph replay, CUDA-event medians), GB/s of the bytes the step must
read (codes + scales + zero points + KV cache) and the fraction of that floor (those bytes
over the copy bandwidth measured in this run). JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_decode import copy_bandwidth, decode_runtime, environment, graph_of, log, time_ms

from flashformer_triton.config import preset
from flashformer_triton.loading import random_state_dict
from flashformer_triton.quantize import QuantScheme, quantize, quantize_state
from flashformer_triton.reference import ReferenceModel
from flashformer_triton.weights import pack_weights

RESULTS = Path(__file__).parent / "results"
SCHEMES = {"bf16": None, "int8": QuantScheme(8), "int4-g128": QuantScheme(4, 128)}


class Int8WeightOnlyReference(ReferenceModel):
    """The reference model with gpt-fast's int8 weight-only linears: int8 weights with one
    scale per output channel, F.linear(x, w.to(x.dtype)) * scale (Inductor fuses the
    conversion into the matmul). The LM head too, as gpt-fast does."""

    MATRICES = ("wqkv", "wo", "w_gate_up", "w_down")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.lm_head is None:  # tied: the head gets its own int8 copy
            self.lm_head = torch.nn.Parameter(self.embed.detach().clone(), requires_grad=False)
        owners = [(layer, name) for layer in self.layers for name in self.MATRICES]
        for owner, name in [*owners, (self, "lm_head")]:
            w = getattr(owner, name)
            q = quantize(w, QuantScheme(8))
            setattr(owner, name, torch.nn.Parameter(q.qweight, requires_grad=False))
            owner.register_buffer(f"{name}_scale", q.scales.to(w.dtype).reshape(-1))
            del w

    def _linear(self, x, owner, name, bias=None):
        w = getattr(owner, name)
        if w.dtype != torch.int8:  # the embedding table
            return super()._linear(x, owner, name, bias)
        out = F.linear(x, w.to(x.dtype)) * getattr(owner, f"{name}_scale")
        return out if bias is None else out + bias


def packed(config, state, scheme: QuantScheme | None):
    """The bf16 state dict quantized with `scheme` (None: as it is), packed on the GPU."""
    quantized = quantize_state(config.num_layers, state, scheme,
                               tied=config.tie_word_embeddings) if scheme else state
    return pack_weights(config, quantized, dtype=torch.bfloat16, device="cuda")


def kernel_row(config, state, scheme, *, pos: int, bandwidth: float, **tiles: int) -> dict:
    weights = packed(config, state, scheme)
    runtime = decode_runtime(config, weights, batch=1, pos=pos, max_seq_len=pos + 64, **tiles)
    plan = runtime.plan
    log(f"compiling the kernel ({weights.scheme.describe() if weights.scheme else 'bf16'})")
    runtime.launch()
    runtime.check()
    ms = time_ms(graph_of(runtime.launch))
    runtime.check()
    step_bytes = plan.step_bytes([pos])
    del runtime, weights
    torch.cuda.empty_cache()
    return dict(step_bytes=step_bytes, ms=ms, floor_ms=step_bytes / bandwidth * 1e3,
                tiles=tiles)


def int8_peer_ms(config, state, *, pos: int) -> float:
    """ms per decode step of the int8 weight-only reference under torch.compile."""
    ref = Int8WeightOnlyReference(config, state, max_batch_size=1, max_seq_len=pos + 64,
                                  dtype=torch.bfloat16, device="cuda", check_positions=False)
    torch.cuda.empty_cache()
    # gpt-fast's compiler settings (its generate.py): tuned reduction configs for the GEMVs.
    inductor = torch._inductor.config
    inductor.coordinate_descent_tuning = True
    inductor.triton.unique_kernel_names = True
    inductor.fx_graph_cache = True
    ref.cache.k.normal_()
    ref.cache.v.normal_()
    compiled = torch.compile(ref, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(0, config.vocab_size, (1, 1), device="cuda")
    pos_in = torch.tensor([pos], device="cuda")

    def step() -> torch.Tensor:
        return compiled(ids, pos_in)

    log("int8 torch.compile peer: compiling")
    with torch.no_grad():
        ms = time_ms(step, warmup=5)
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    parser.add_argument("--pos", type=int, default=512)
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--no-peer", action="store_true", help="skip the int8 compile peer")
    parser.add_argument("--tiles", default="", help="plan tile overrides, e.g. block_k=1024")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_quant needs a CUDA GPU", file=sys.stderr)
        return 2
    tiles = {k: int(v) for k, v in (kv.split("=") for kv in args.tiles.split(",") if kv)}
    env = environment()
    bandwidth = copy_bandwidth()
    rows = []
    for name in args.shapes:
        config = preset(name)
        log(f"{name}: random bf16 weights")
        state = random_state_dict(config, seed=0, dtype=torch.bfloat16, device="cuda")
        peer = None if args.no_peer else int8_peer_ms(config, state, pos=args.pos)
        for scheme in args.schemes:
            r = kernel_row(config, state, SCHEMES[scheme], pos=args.pos, bandwidth=bandwidth,
                           **tiles)
            r.update(shape=name, pos=args.pos, weights=scheme, int8_peer_ms=peer,
                     fraction=r["floor_ms"] / r["ms"], gbs=r["step_bytes"] / r["ms"] / 1e6)
            rows.append(r)
            log(f"{name} {scheme}: {r['ms']:.3f} ms, {r['fraction']:.2f} of its floor")
        del state
        torch.cuda.empty_cache()
    lines = [f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, copy bandwidth "
             f"{bandwidth / 1e12:.2f} TB/s, batch 1, KV position {args.pos}",
             f"{'shape':<14}{'weights':<11}{'ms/step':>9}{'GB/s':>8}{'floor ms':>10}"
             f"{'frac':>6}{'int8 peer ms':>14}{'vs peer':>9}"]
    for r in rows:
        peer = r["int8_peer_ms"]
        peer_ms = f"{peer:.3f}" if peer else "-"
        speedup = f"{peer / r['ms']:.2f}x" if peer else "-"
        lines.append(f"{r['shape']:<14}{r['weights']:<11}{r['ms']:>9.3f}{r['gbs']:>8.0f}"
                     f"{r['floor_ms']:>10.3f}{r['fraction']:>6.2f}{peer_ms:>14}{speedup:>9}")
    out = args.json or RESULTS / f"{env['date'][:10]}-quant.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env, bandwidth=bandwidth, rows=rows), indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
