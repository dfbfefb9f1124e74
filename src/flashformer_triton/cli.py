"""Command line: ``flashformer-triton generate | info | profile | autotune`` (also
``python -m flashformer_triton.cli``).

Examples::

    flashformer-triton generate --model tiny --prompt "Hello"
    flashformer-triton generate --model meta-llama/Llama-3.2-1B --prompt "The capital of France is"
    flashformer-triton generate --model ./my-checkpoint --prompt "Hi" --temperature 0.7 --top-p 0.9
    flashformer-triton info --model Qwen/Qwen3-8B --max-seq-len 8192 --position 4000
    flashformer-triton profile --model llama-3.2-1b --batch 1 --pos 512 --out timeline.png
    flashformer-triton autotune --model llama-3.1-8b --batch 1 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DESCRIPTION = """\
Low-batch LLM decoding with ONE persistent Triton kernel launch per decode step.

  generate  stream a completion of a prompt, then print tokens/s and ms/token
  info      show the device, the model config and the kernel's plan (tasks, tiles, bytes
            streamed per step and the bandwidth floor of one step)
  profile   time every task of one decode step on the GPU: per-op wait/work and a Gantt chart
  autotune  time tile candidates on the GPU and store the fastest for this GPU and shape

--model takes a local checkpoint directory (config.json + *.safetensors), a Hugging Face hub
id (downloaded once into the Hugging Face cache; gated models need `hf auth login`), or a
built-in name: 'tiny' (a 2-layer random-weight model with a byte tokenizer; needs no
download and runs on a CPU) or a real shape with random weights (llama-3.2-1b, llama-3.2-3b,
llama-3.1-8b, qwen3-8b). Without a GPU the kernel runs in the Triton interpreter: fine for
'tiny', far too slow for real models.

Run `flashformer-triton <command> --help` for the options of a command."""

GENERATE_EPILOG = """\
examples:
  flashformer-triton generate --model tiny --prompt "Hello"
  flashformer-triton generate --model Qwen/Qwen3-0.6B --prompt "Why is the sky blue?" --chat \\
      --max-new-tokens 128 --temperature 0.7 --top-p 0.9 --seed 1
  flashformer-triton generate --model ./ckpt --prompt-ids 1,450,4996 --max-new-tokens 32

The text streams to stdout; progress messages and the speed summary go to stderr."""

INFO_EPILOG = """\
The floor of a decode step is (weight bytes + KV-cache bytes read) / bandwidth: no kernel
can be faster on a memory-bound step. With a GPU the bandwidth is measured (device-to-device
copy); otherwise give yours with --bandwidth (default: 3010 GB/s, an H100 80GB HBM3)."""

PROFILE_EPILOG = """\
examples:
  flashformer-triton profile --model llama-3.2-1b --batch 1 --pos 512 --out timeline.png
  flashformer-triton profile --model ./ckpt --batch 4 --pos 8192 --out t.png --json t.json

Random weights of the model's shape (a checkpoint's config.json only): the timing does not
depend on the values. One warm-up step, then a step that records, per task, its program, SM
and the GPU's global timer at start, after its wait and at its end. Prints where the time
goes per op; the chart needs matplotlib. Needs a CUDA GPU."""

AUTOTUNE_EPILOG = """\
examples:
  flashformer-triton autotune --model llama-3.2-1b --batch 1
  flashformer-triton autotune --model llama-3.1-8b --batch 1 4 16 --budget-s 300
  flashformer-triton autotune --model qwen3-8b --list        # the candidates; no GPU needed

Candidates: row tiles of O-proj, down, gate/up and QKV (8 or 16 at batch 1, 16 above),
k-chunk 256/512/1024, 1 or 2 programs per SM, pipeline depth 2 or 3; every setting is a new
kernel compile, so the default search moves one field at a time from the plan's defaults
(coordinate search, up to 2 passes) rather than timing all combinations (--strategy grid).
A candidate must beat the best so far by more than 0.5% to be taken. The best setting is
stored per (GPU name, model shape, batch, dtype) in --output, default $FLASHFORMER_TUNING or
~/.cache/flashformer_triton/tuning.json, where the kernel's planner looks it up. Random
weights of the model's shape; needs a CUDA GPU."""

STATED_BANDWIDTH_GBS = 3010.0  # H100 80GB HBM3 device-to-device copy (design notes, section 4)


class CLIError(Exception):
    """A problem with the command line; printed without a traceback."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashformer-triton",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print versions and exit")
    sub = parser.add_subparsers(dest="command", metavar="{generate,info,profile,autotune}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            default="tiny",
            help="checkpoint directory, Hugging Face hub id, or built-in name (default: tiny)",
        )
        p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
        p.add_argument(
            "--device",
            default="auto",
            help="auto (default: cuda when there is a GPU, else cpu), cuda, cuda:N or cpu",
        )
        p.add_argument(
            "--max-batch-size",
            type=int,
            default=1,
            help="KV-cache slots = rows the kernel computes, 1..16 (default 1)",
        )
        p.add_argument(
            "--max-seq-len",
            type=int,
            default=None,
            help="KV-cache length in tokens (default: min(4096, the model's max positions))",
        )

    gen = sub.add_parser(
        "generate",
        help="generate text from a prompt, streaming it",
        description="Generate a completion of --prompt and stream it to stdout.",
        epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(gen)
    gen.add_argument("--prompt", default="Hello", help="the prompt text (default: 'Hello')")
    gen.add_argument(
        "--prompt-ids",
        default=None,
        help="the prompt as comma-separated token ids instead of text (no tokenizer needed)",
    )
    gen.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the tokenizer's chat template (instruction-tuned models)",
    )
    gen.add_argument(
        "--max-new-tokens", type=int, default=16, help="tokens to generate (default 16)"
    )
    gen.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); e.g. 0.7 to sample"
    )
    gen.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    gen.add_argument(
        "--top-p", type=float, default=None, help="sample from the smallest set with mass >= p"
    )
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    gen.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weights and KV cache (default auto: bfloat16 on a GPU, float32 on the CPU)",
    )
    gen.add_argument(
        "--no-cuda-graph", action="store_true", help="launch every step instead of replaying"
    )
    gen.add_argument(
        "--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens"
    )

    info = sub.add_parser(
        "info",
        help="show the device, the model config and the kernel plan",
        description="Describe the device, the model and the decode kernel's plan. Reads only "
        "config.json: no weights are loaded.",
        epilog=INFO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(info)
    info.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="weight dtype to plan for (default bfloat16)",
    )
    info.add_argument(
        "--position",
        type=int,
        default=512,
        help="KV-cache position of every sequence for the bytes/floor figures (default 512)",
    )
    info.add_argument(
        "--bandwidth", type=float, default=None, help="memory bandwidth in GB/s for the floor"
    )
    info.add_argument(
        "--sms",
        type=int,
        default=None,
        help="plan for a GPU with this many SMs instead of the local device (e.g. 132: H100)",
    )
    def shape_options(p: argparse.ArgumentParser, batch_many: bool) -> None:
        p.add_argument(
            "--model",
            default="llama-3.2-1b",
            help="built-in shape (default llama-3.2-1b), checkpoint directory or hub id: only "
            "its config.json is read, the weights are random",
        )
        p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
        p.add_argument("--device", default="cuda", help="cuda (default) or cuda:N")
        if batch_many:
            p.add_argument("--batch", type=int, nargs="+", default=[1],
                           help="batch sizes to tune, each 1..16 (default 1)")
        else:
            p.add_argument("--batch", type=int, default=1, help="sequences, 1..16 (default 1)")
        p.add_argument("--pos", type=int, default=512,
                       help="KV-cache position of every sequence (default 512)")
        p.add_argument("--max-seq-len", type=int, default=None,
                       help="KV-cache length (default max(1024, pos + 64), as bench/)")
        p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                       help="weights, KV cache and activations (default bfloat16)")

    prof = sub.add_parser(
        "profile",
        help="per-task timeline of one decode step on the GPU (wait/work per op, Gantt chart)",
        description="Profile one decode step with the kernel's own timeline (GPU only).",
        epilog=PROFILE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shape_options(prof, batch_many=False)
    prof.add_argument("--out", default="timeline.png",
                      help="Gantt chart PNG to write (default timeline.png; needs matplotlib)")
    prof.add_argument("--json", default=None,
                      help="also write the raw records [program, sm, start, ready, end] here")
    prof.add_argument("--programs", type=int, default=64,
                      help="rows (programs) drawn in the chart (default 64)")

    tune = sub.add_parser(
        "autotune",
        help="time tile candidates on the GPU, store the fastest for this GPU and shape",
        description="Search the decode kernel's tiles for a model shape and batch on this "
        "GPU and store the fastest.",
        epilog=AUTOTUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shape_options(tune, batch_many=True)
    tune.add_argument("--strategy", default="coordinate", choices=["coordinate", "grid"],
                      help="coordinate (default: one field at a time) or grid (all combinations)")
    tune.add_argument("--budget-s", type=float, default=None,
                      help="stop searching a batch size after this many seconds (keeps the best)")
    tune.add_argument("--max-trials", type=int, default=None,
                      help="stop a batch size's search after this many timed settings")
    tune.add_argument("--output", default=None,
                      help="tuning file (default $FLASHFORMER_TUNING or "
                      "~/.cache/flashformer_triton/tuning.json)")
    tune.add_argument("--list", action="store_true",
                      help="print the candidate values and the key, then exit (no GPU needed)")
    tune.add_argument("--dry-run", action="store_true",
                      help="search, but do not write the tuning file")
    return parser


# Shared helpers.


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cpu"):
        # The interpreter must be on before anything (transformers) imports triton.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(
            f"--device {name}: CUDA is not available on this machine; use --device cpu (the "
            "kernel then runs in the Triton interpreter: fine for --model tiny)"
        )
    return torch.device(name)


def _versions() -> str:
    import platform

    import torch

    import flashformer_triton

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = "not installed"
    return (
        f"flashformer-triton {flashformer_triton.__version__} | python {platform.python_version()}"
        f" | torch {torch.__version__} | triton {triton_version}"
    )


def _device_line(device) -> str:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (
            f"device: {device} {props.name}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.1f} GiB"
        )
    return "device: cpu (no GPU in use: the kernel runs in the Triton interpreter, slowly)"


def _is_builtin(model: str) -> bool:
    from flashformer_triton.config import PRESETS

    return model in PRESETS and not Path(model).is_dir()


def _config(model: str, revision: str | None):
    """ModelConfig from a preset, a local directory or a hub id (config.json only)."""
    from flashformer_triton.config import ModelConfig, preset

    if _is_builtin(model):
        return preset(model)
    local = Path(model).expanduser()
    if local.is_dir():
        return ModelConfig.from_json(local)
    try:
        from huggingface_hub import hf_hub_download

        return ModelConfig.from_json(hf_hub_download(model, "config.json", revision=revision))
    except Exception as exc:
        if type(exc).__name__ in ("UnsupportedModelError",):
            raise
        raise CLIError(
            f"--model {model}: not a built-in name, not a local directory, and its config.json "
            f"could not be fetched from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


def _measure_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), as bench/ measures it."""
    import torch

    n = 1 << 29  # 1 GiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / seconds / 1e9


# info.


def cmd_info(args: argparse.Namespace) -> int:
    from flashformer_triton.loading import _check_dtype
    from flashformer_triton.plan import GpuSpec, make_plan

    device = _device(args.device)
    dtype = _check_dtype(args.dtype)
    print(_versions())
    print(_device_line(device))
    config = _config(args.model, args.revision)
    source = "built-in shape, random weights" if _is_builtin(args.model) else "checkpoint"
    print(f"model: {args.model} ({source})")
    print(f"  {config.summary()}")
    rope = config.rope_scaling or {"rope_type": "default"}
    print(
        f"  rope theta {config.rope_theta:g} ({rope['rope_type']}), max positions "
        f"{config.max_position_embeddings}, eos {config.eos_token_id}, tied embeddings "
        f"{config.tie_word_embeddings}, qkv bias {config.qkv_bias}, qk-norm {config.qk_norm}"
    )
    max_seq_len = args.max_seq_len or max(
        min(4096, config.max_position_embeddings), args.position + 1
    )
    if args.sms is not None:
        gpu = GpuSpec(name=f"a GPU with {args.sms} SMs (--sms)", num_sms=args.sms)
    else:
        gpu = GpuSpec.current(device)
    plan = make_plan(
        config, batch=args.max_batch_size, max_seq_len=max_seq_len, dtype=dtype, gpu=gpu
    )
    print(plan.summary())
    position = min(args.position, max_seq_len - 1)
    positions = [position] * args.max_batch_size
    if args.bandwidth is not None:
        bandwidth, how = args.bandwidth, "given with --bandwidth"
    elif device.type == "cuda":
        bandwidth, how = _measure_bandwidth(device), "measured: device-to-device copy"
    else:
        bandwidth, how = STATED_BANDWIDTH_GBS, "stated: H100 80GB HBM3 copy bandwidth"
    weights, kv = plan.weight_bytes(), plan.kv_bytes(positions)
    floor = plan.floor_ms(positions, bandwidth * 1e9)
    print(
        f"per decode step at KV position {position}, batch {args.max_batch_size}: weights "
        f"{weights / 1e6:.1f} MB + KV cache {kv / 1e6:.1f} MB = {(weights + kv) / 1e6:.1f} MB"
    )
    step = f"{floor:.3f} ms" if floor >= 0.01 else f"{floor * 1e3:.2f} us"
    print(
        f"floor at {bandwidth:.0f} GB/s ({how}): {step}/step, at most "
        f"{1e3 / floor * args.max_batch_size:,.0f} tokens/s"
    )
    return 0


# profile.


def _needs_cuda(device: str, what: str) -> None:
    import torch

    if not device.startswith("cuda"):
        raise CLIError(f"{what} runs on a GPU: --device must be cuda or cuda:N, not {device!r}")
    if not torch.cuda.is_available():
        raise CLIError(f"{what} needs a CUDA GPU, and CUDA is not available on this machine")


def _check_shape_args(batch: list[int], pos: int, max_seq_len: int | None) -> int:
    for b in batch:
        if not 1 <= b <= 16:
            raise CLIError(f"--batch {b} is outside the supported range 1..16")
    if pos < 0:
        raise CLIError(f"--pos {pos} must be >= 0")
    max_seq_len = max_seq_len or max(1024, pos + 64)
    if pos >= max_seq_len:
        raise CLIError(f"--pos {pos} must be below --max-seq-len {max_seq_len}")
    return max_seq_len


def cmd_profile(args: argparse.Namespace) -> int:
    max_seq_len = _check_shape_args([args.batch], args.pos, args.max_seq_len)
    config = _config(args.model, args.revision)  # before the GPU check: a bad name says so
    _needs_cuda(args.device, "profile")
    import torch

    from flashformer_triton.profile import gantt_png, profile_step, summarize

    device = torch.device(args.device)
    _log(_versions())
    _log(_device_line(device))
    _log(f"profiling {args.model} ({config.summary()}), batch {args.batch}, position "
         f"{args.pos}, random {args.dtype} weights; the first step compiles the kernel ...")
    plan, records = profile_step(config, batch=args.batch, pos=args.pos,
                                 max_seq_len=max_seq_len, dtype=getattr(torch, args.dtype),
                                 device=device)
    print(f"{args.model} batch {args.batch} pos {args.pos}: {plan.num_tasks} tasks on "
          f"{plan.grid} programs, {plan.gpu.name}")
    print(summarize(plan, records).format())
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "model": args.model, "batch": args.batch, "pos": args.pos,
            "fields": ["program", "sm", "start_ns", "ready_ns", "end_ns"],
            "ops": [int(t.op) for t in plan.tasks], "layers": [t.layer for t in plan.tasks],
            "records": records.cpu().tolist(),
        }))
        _log(f"records written to {path}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            gantt_png(plan, records, str(out), programs=args.programs)
        except RuntimeError as exc:  # no matplotlib: the summary above still stands
            _log(f"no chart: {exc}")
            return 1
        _log(f"chart written to {out}")
    return 0


# autotune.


def cmd_autotune(args: argparse.Namespace) -> int:
    from flashformer_triton import tuning

    max_seq_len = _check_shape_args(args.batch, args.pos, args.max_seq_len)
    config = _config(args.model, args.revision)
    if args.list:
        for batch in args.batch:
            space = tuning.candidate_space(config, batch)
            total = 1
            for values in space.values():
                total *= len(values)
            print(f"{args.model} batch {batch}: {config.summary()}")
            print(f"  key (GPU name first): <gpu>|{tuning.shape_signature(config)}|b{batch}|"
                  f"{args.dtype}")
            for name, values in space.items():
                print(f"  {name:<16} {', '.join(str(v) for v in values)}")
            print(f"  {total} combinations ({args.strategy} search times "
                  f"{'all of them' if args.strategy == 'grid' else 'one field at a time'})")
        return 0
    _needs_cuda(args.device, "autotune")
    import torch

    device = torch.device(args.device)
    path = tuning.tuning_path(args.output)
    if path is None and not args.dry_run:
        raise CLIError(f"${tuning.ENV_VAR} turns tuning off; pass --output FILE to store results")
    dtype = getattr(torch, args.dtype)
    gpu_name = torch.cuda.get_device_properties(device).name
    _log(_versions())
    _log(_device_line(device))
    for batch in args.batch:
        _log(f"autotune {args.model} ({config.summary()}), batch {batch}, position {args.pos}, "
             f"{args.dtype}: {args.strategy} search; every setting compiles the kernel ...")
        start = time.perf_counter()
        result = tuning.autotune(config, batch=batch, dtype=dtype, pos=args.pos,
                                 max_seq_len=max_seq_len, strategy=args.strategy,
                                 budget_s=args.budget_s, max_trials=args.max_trials,
                                 device=device, log=lambda m: _log(f"  {m}"))
        took = time.perf_counter() - start
        changed = result.changed()
        what = ", ".join(f"{k}={v}" for k, v in changed.items()) or "the defaults"
        print(f"{args.model} batch {batch} on {gpu_name}: best {what}: {result.best_ms:.3f} ms "
              f"vs {result.default_ms:.3f} ms with the defaults ({result.speedup:.3f}x); "
              f"{len(result.trials)} settings in {took:.0f} s"
              + (f"; stopped early: {result.stopped}" if result.stopped else ""))
        print(tuning.format_trials(result.trials, result.default))
        if args.dry_run:
            continue
        entry = tuning.make_entry(result, gpu_name=gpu_name, config=config, batch=batch,
                                  dtype=dtype, pos=args.pos, max_seq_len=max_seq_len,
                                  strategy=args.strategy)
        key = tuning.tuning_key(gpu_name, config, batch, dtype)
        saved = tuning.save_entry(key, entry, path)
        print(f"stored under {key!r} in {saved}")
    return 0


# generate.


def _eos_ids(model, tokenizer, checkpoint: Path | None) -> list[int]:
    """EOS ids: the config's, the tokenizer's and generation_config.json's (chat models stop
    on an end-of-turn token that config.json often does not list)."""
    ids = list(model.config.eos_token_id)
    extra = getattr(tokenizer, "eos_token_id", None)
    if isinstance(extra, int):
        ids.append(extra)
    if checkpoint is not None and (checkpoint / "generation_config.json").is_file():
        try:
            gen = json.loads((checkpoint / "generation_config.json").read_text())
            value = gen.get("eos_token_id")
            ids += value if isinstance(value, list) else [value] if value is not None else []
        except (ValueError, OSError):
            pass
    vocab = model.config.vocab_size
    return sorted({int(i) for i in ids if 0 <= int(i) < vocab})


def _prompt_ids(args: argparse.Namespace, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        try:
            return [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError as exc:
            raise CLIError(f"--prompt-ids must be comma-separated integers: {exc}") from exc
    if args.chat:
        if not hasattr(tokenizer, "apply_chat_template"):
            raise CLIError("--chat needs a tokenizer with a chat template (not --model tiny)")
        messages = [{"role": "user", "content": args.prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer.encode(args.prompt)]


def cmd_generate(args: argparse.Namespace) -> int:
    device = _device(args.device)
    import torch

    from flashformer_triton.loading import resolve_checkpoint
    from flashformer_triton.model import FlashFormer
    from flashformer_triton.tokenizer import TextStreamer, TokenizerNotFoundError, load_tokenizer

    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    builtin = _is_builtin(args.model)

    _log(_versions())
    _log(_device_line(device))
    checkpoint = None if builtin else resolve_checkpoint(args.model, revision=args.revision)
    tokenizer = None
    if args.model == "tiny" and builtin:
        tokenizer = load_tokenizer("tiny")
    elif not builtin:
        try:
            tokenizer = load_tokenizer(checkpoint)
        except TokenizerNotFoundError as exc:
            if args.prompt_ids is None or args.chat:
                raise CLIError(str(exc)) from exc
            # token ids in, token ids out
    elif args.prompt_ids is None:
        raise CLIError(
            f"--model {args.model} is a random-weight shape without a tokenizer; pass "
            "--prompt-ids (or use --model tiny, which has a byte tokenizer)"
        )
    start = time.perf_counter()
    _log(f"loading {args.model} ({dtype}) onto {device} ...")
    model = FlashFormer.from_pretrained(
        args.model if builtin else checkpoint,
        device=device,
        dtype=dtype,
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        progress=True,
        cuda_graph=not args.no_cuda_graph,
    )
    _log(f"loaded in {time.perf_counter() - start:.1f} s: {model.config.summary()}")
    if builtin:
        _log(f"note: {args.model} has random weights, so expect gibberish (it shows the machinery)")
    prompt = _prompt_ids(args, tokenizer)
    if not prompt:
        raise CLIError("the prompt is empty: give some text with --prompt or ids with --prompt-ids")
    if device.type == "cuda":
        _log(f"compiling the decode kernel for {model.plan.gpu.name} (first launch) ...")
        _log(f"compiled in {model.warmup():.1f} s")

    eos = [] if args.ignore_eos else _eos_ids(model, tokenizer, checkpoint)
    streamer = TextStreamer(tokenizer, prompt) if tokenizer is not None else None
    if streamer is not None and not args.chat:  # a chat prompt is the template: not shown
        print(streamer.prompt_text, end="", flush=True)
    stamps = [time.perf_counter()]
    count = 0
    for tok in model.stream(
        torch.tensor([prompt], device=device),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=eos,
        seed=args.seed,
    ):
        stamps.append(time.perf_counter())
        count += 1
        token = int(tok[0])
        if streamer is not None:
            print(streamer.put(token), end="", flush=True)
        else:
            print(token, end=" ", flush=True)
    if streamer is not None:
        print(streamer.flush(), end="")
    print(flush=True)

    first = (stamps[1] - stamps[0]) * 1e3 if count else 0.0
    # Steady state: skip the first decode step as well (it captures the CUDA graph).
    steady = stamps[2:] if count >= 4 else stamps[1:]
    if len(steady) >= 2:
        ms = (steady[-1] - steady[0]) * 1e3 / (len(steady) - 1)
        speed = f"{1e3 / ms:.2f} tokens/s, {ms:.2f} ms/token"
    else:
        speed = "too few tokens to time the decode steps"
    where = "Triton interpreter on the CPU" if device.type == "cpu" else model.plan.gpu.name
    _log(
        f"{count} tokens ({model.config.family}, {dtype}, {where}): {speed}; prefill of "
        f"{len(prompt)} prompt tokens + first token {first:.1f} ms"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        print(_versions())
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        commands = {"info": cmd_info, "profile": cmd_profile, "autotune": cmd_autotune}
        return commands.get(args.command, cmd_generate)(args)
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
        return 0
    except (CLIError, ValueError, TypeError, RuntimeError, FileNotFoundError, KeyError) as exc:
        if os.environ.get("FLASHFORMER_DEBUG"):
            raise
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        _log(f"flashformer-triton {args.command}: error: {message}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
