"""The kernel's peers, built from the same random weights (Hugging Face names):

    compile    reference.py's model under torch.compile(mode="reduce-overhead") (gpt-fast recipe)
    hf-eager   Hugging Face transformers, eager (default sdpa attention, dynamic cache)
    hf-static  transformers with a StaticCache and torch.compile(model.forward,
               mode="reduce-overhead", fullgraph=True) (the transformers recipe)

`decode_peer(...)` gives one decode step at a KV position as a zero-argument callable;
`generate_peer(...)` a whole greedy generation. Builders raise on failure: the callers turn
that into a skipped row with its reason, never a crashed table. The transformers model is
built on the meta device and takes the state dict's tensors themselves (no second copy of
the weights); its RoPE buffers are rebuilt on the device. Works on a CPU too (tests, tiny
shapes), there without torch.compile.
"""

from __future__ import annotations

import gc
import importlib.metadata
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from flashformer_triton.config import ModelConfig
from flashformer_triton.loading import config_to_hf_dict
from flashformer_triton.reference import ReferenceModel

PEERS = ("compile", "hf-eager", "hf-static")
SYSTEMS = {
    "compile": "torch.compile reduce-overhead",
    "hf-eager": "transformers eager",
    "hf-static": "transformers static+compile",
}
HF_PEERS = ("hf-eager", "hf-static")


def transformers_version() -> str | None:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def free_memory() -> None:
    """Drop compiled graphs (their CUDA-graph pools) and cached blocks between peers."""
    gc.collect()
    try:
        torch.compiler.reset()
    except Exception:  # pragma: no cover - older torch
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Transformers models from our random state dicts.


def hf_config(config: ModelConfig, *, attn: str = "sdpa"):
    """The transformers config object of `config` (via loading.config_to_hf_dict)."""
    import transformers

    d = config_to_hf_dict(config)
    model_type = d.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **d)
    cfg._attn_implementation = attn
    cfg.use_cache = True
    return cfg


def _from_config(cfg, dtype: torch.dtype):
    import transformers

    auto = transformers.AutoModelForCausalLM
    try:
        return auto.from_config(cfg, dtype=dtype)  # transformers >= 4.56
    except TypeError:
        return auto.from_config(cfg, torch_dtype=dtype)


def _rebuild_meta_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (the RoPE frequencies) are not in a state dict: rebuild the
    modules that own them on `device` from the model's config."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device(device):
            setattr(parent, child, type(module)(config=model.config))


def hf_model(config: ModelConfig, state: dict[str, torch.Tensor], *,
             device: torch.device | str = "cuda", attn: str = "sdpa",
             log: Callable[[str], None] | None = None) -> torch.nn.Module:
    """A transformers *ForCausalLM of `config` holding the tensors of `state` (same dtype
    and device; no copy), in eval mode."""
    device = torch.device(device)
    dtype = next(iter(state.values())).dtype
    cfg = hf_config(config, attn=attn)
    tied = config.tie_word_embeddings
    try:
        with torch.device("meta"):
            model = _from_config(cfg, dtype)
        result = model.load_state_dict(state, strict=False, assign=True)
        if tied:
            model.tie_weights()
        _rebuild_meta_buffers(model, device)
        missing = set(result.missing_keys) - ({"lm_head.weight"} if tied else set())
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if missing or result.unexpected_keys or left:
            raise RuntimeError(f"missing {sorted(missing)[:3]}, unexpected "
                               f"{result.unexpected_keys[:3]}, still on meta {left[:3]}")
    except Exception as exc:
        # Fallback: a real model (its own init), then a copy of the weights (twice the memory
        # while loading).
        if log:
            log(f"transformers model on the meta device failed ({type(exc).__name__}: "
                f"{str(exc)[:200]}); building it on {device} and copying the weights")
        model = None
        gc.collect()
        with torch.device(device):
            model = _from_config(cfg, dtype)
        model.load_state_dict(state, strict=not tied)
        if tied:
            model.tie_weights()
    model.generation_config.eos_token_id = None  # random weights: always max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def static_cache(model: torch.nn.Module, config: ModelConfig, *, batch: int,
                 max_cache_len: int, device: torch.device, dtype: torch.dtype):
    """A transformers StaticCache with its tensors allocated now, across API versions
    (before 4.56 it takes batch size, device and dtype; later ones allocate lazily)."""
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kwargs: dict[str, Any] = {"config": model.config, "max_cache_len": max_cache_len}
    if "max_batch_size" in params:
        kwargs["max_batch_size"] = batch
    elif "batch_size" in params:
        kwargs["batch_size"] = batch
    for name, value in (("device", device), ("dtype", dtype)):
        if name in params:
            kwargs[name] = value
    cache = StaticCache(**kwargs)
    if hasattr(cache, "early_initialization"):
        cache.early_initialization(batch_size=batch, num_heads=config.num_kv_heads,
                                   head_dim=config.head_dim, dtype=dtype, device=device)
    return cache


def _cache_allocated(cache) -> bool:
    layers = getattr(cache, "layers", None)
    return layers is None or all(getattr(layer, "is_initialized", True) for layer in layers)


def _rewind(cache) -> None:
    """Set the running write position of every StaticCache layer (transformers >= 4.56)
    back to 0; older caches have none."""
    for layer in getattr(cache, "layers", None) or []:
        count = getattr(layer, "cumulative_length", None)
        if isinstance(count, torch.Tensor):
            count.zero_()
        elif isinstance(count, int):
            layer.cumulative_length = 0


def _compile(fn, *, enabled: bool):
    if not enabled:
        return fn
    return torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)


# One decode step.


@dataclass
class Peer:
    key: str  # one of PEERS
    step: Callable[[], Any]  # one decode step (no host sync)
    info: dict[str, Any] = field(default_factory=dict)
    warmup: int = 5  # calls before timing (compile, CUDA-graph recording)

    @property
    def system(self) -> str:
        return SYSTEMS[self.key]


def reference_decode_peer(config: ModelConfig, state: dict[str, torch.Tensor], *, batch: int,
                          pos: int, max_seq_len: int, compile: bool = True) -> Peer:
    """The reference model, compiled (reduce-overhead, fullgraph), one step at `pos`."""
    tensor = next(iter(state.values()))
    device, dtype = tensor.device, tensor.dtype
    ref = ReferenceModel(config, state, max_batch_size=batch, max_seq_len=max_seq_len,
                         dtype=dtype, device=device, check_positions=False)
    fn = _compile(ref, enabled=compile)
    ids = torch.randint(0, config.vocab_size, (batch, 1), device=device)
    pos_in = torch.full((batch,), pos, dtype=torch.long, device=device)

    def step():
        with torch.no_grad():
            return fn(ids, pos_in)

    return Peer("compile", step, {"compile": "reduce-overhead" if compile else "none",
                                  "max_seq_len": max_seq_len})


def hf_decode_peer(key: str, model: torch.nn.Module, config: ModelConfig, *, batch: int,
                   pos: int, max_seq_len: int, compile: bool = True) -> Peer:
    """transformers, one decode step at `pos`: `hf-eager` on a DynamicCache holding `pos`
    random tokens (cropped back after every step, so each step appends at `pos`), or
    `hf-static` on a StaticCache of `max_seq_len` with the forward compiled."""
    import transformers

    device, dtype = model.device, model.dtype
    ids = torch.randint(0, config.vocab_size, (batch, 1), device=device)
    position_ids = torch.full((batch, 1), pos, dtype=torch.long, device=device)
    cache_position = torch.tensor([pos], dtype=torch.long, device=device)
    info = {"attn": getattr(model.config, "_attn_implementation", "?")}
    if key == "hf-eager":
        cache = transformers.DynamicCache()
        shape = (batch, config.num_kv_heads, pos, config.head_dim)
        for layer in range(config.num_layers):
            k = torch.randn(shape, dtype=dtype, device=device)
            cache.update(k, torch.randn_like(k), layer)
        del k

        def step():
            with torch.no_grad():
                out = model(input_ids=ids, position_ids=position_ids,
                            cache_position=cache_position, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # negative: drop the token just appended (transformers 4 and 5)
            return out.logits

        return Peer(key, step, {**info, "cache": "dynamic"}, warmup=2)
    if key != "hf-static":
        raise ValueError(f"unknown transformers peer {key!r}")
    cache = static_cache(model, config, batch=batch, max_cache_len=max_seq_len, device=device,
                         dtype=dtype)
    inputs = dict(input_ids=ids, position_ids=position_ids, cache_position=cache_position,
                  past_key_values=cache, use_cache=True)
    if not _cache_allocated(cache):  # a version without early_initialization: allocate eagerly
        with torch.no_grad():
            model(**inputs)
    # Newer StaticCache layers write at their own running count, not at cache_position (the
    # mask still follows cache_position, so the step costs the same): rewind the count
    # before it runs past the end. Older ones write at cache_position: nothing to rewind.
    calls, room = [0], max_seq_len - 2
    forward = _compile(model.forward, enabled=compile)

    def step():
        calls[0] += 1
        if calls[0] >= room:
            _rewind(cache)
            calls[0] = 1
        with torch.no_grad():
            return forward(**inputs).logits

    return Peer(key, step, {**info, "cache": "static", "max_cache_len": max_seq_len,
                            "compile": "reduce-overhead fullgraph" if compile else "none"})


# Whole generations (greedy, no EOS): prompt [B, T] on the device -> new tokens [B, n].

Generate = Callable[[torch.Tensor], torch.Tensor]


def reference_generate(config: ModelConfig, state: dict[str, torch.Tensor], *, batch: int,
                       prompt_len: int, new_tokens: int, compile: bool = True) -> Generate:
    """Greedy loop: the reference prefills eagerly, then one compiled decode step per token
    (argmax on the device, no host sync until the end)."""
    tensor = next(iter(state.values()))
    device, dtype = tensor.device, tensor.dtype
    ref = ReferenceModel(config, state, max_batch_size=batch,
                         max_seq_len=prompt_len + new_tokens, dtype=dtype, device=device,
                         check_positions=False)
    step = _compile(ref, enabled=compile)
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    positions = [torch.full((batch,), p, dtype=torch.long, device=device)
                 for p in range(prompt_len, prompt_len + new_tokens - 1)]

    def run(prompt: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tok = ref(prompt, zeros)[:, -1].argmax(-1)
            out = [tok]
            for p in positions:
                tok = step(tok[:, None], p)[:, -1].argmax(-1)
                out.append(tok)
        return torch.stack(out, dim=1)

    return run


def hf_generate(key: str, model: torch.nn.Module, config: ModelConfig, *, batch: int,
                prompt_len: int, new_tokens: int, compile: bool = True,
                log: Callable[[str], None] | None = None) -> tuple[Generate, dict[str, Any]]:
    """model.generate, greedy: `hf-eager` (dynamic cache, nothing compiled) or `hf-static`
    (a StaticCache, reset and passed to every call so its tensors keep their addresses, and
    model.forward replaced by torch.compile(mode="reduce-overhead", fullgraph=True); the
    generate-time auto-compile of newer versions is turned off so nothing compiles twice).
    Run `hf-eager` first: `hf-static` replaces the model's forward."""
    info: dict[str, Any] = {"attn": getattr(model.config, "_attn_implementation", "?")}
    common = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, use_cache=True)
    gen_config = model.generation_config
    if key == "hf-eager":
        gen_config.cache_implementation = None

        def run(prompt: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **common)
            return out[:, prompt.shape[1]:]

        return run, {**info, "cache": "dynamic"}
    if key != "hf-static":
        raise ValueError(f"unknown transformers peer {key!r}")
    gen_config.disable_compile = True  # we compile forward ourselves (the documented recipe)
    cache = None
    try:
        cache = static_cache(model, config, batch=batch, max_cache_len=prompt_len + new_tokens,
                             device=model.device, dtype=model.dtype)
    except Exception as exc:  # fall back to the cache generate makes itself
        if log:
            log(f"own StaticCache failed ({type(exc).__name__}: {exc}); generate makes its own")
    # Either our cache or generate's own static one (both at once is refused).
    gen_config.cache_implementation = None if cache is not None else "static"
    if compile:
        model.forward = _compile(model.forward, enabled=True)
    info.update(cache="static (own, reset per call)" if cache is not None else "static",
                compile="reduce-overhead fullgraph" if compile else "none")

    def run(prompt: torch.Tensor) -> torch.Tensor:
        kwargs = dict(common)
        if cache is not None:
            cache.reset()
            kwargs["past_key_values"] = cache
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        return out[:, prompt.shape[1]:]

    return run, info
