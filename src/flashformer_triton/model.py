"""``FlashFormer``: the user-facing ``torch.nn.Module`` around the persistent decode kernel.

Stages (design notes, section 2): a checkpoint is read by ``loading``, packed once by
``weights.pack_weights`` into the arena the kernel streams, and that arena is the only copy
of the weights. From it:

* **prefill** (``T > 1`` tokens per row) runs in plain torch on views into the arena
  (``F.linear`` + ``scaled_dot_product_attention``), writing K (after RoPE) and V into the
  KV cache in exactly the layout the kernel reads;
* **decode** (``T == 1``) is one launch of the persistent kernel (``runtime.DecodeRuntime``),
  which reads and appends to the same KV cache;
* ``generate`` / ``stream`` chain the two with on-device sampling (``sampling``). On CUDA the
  decode step + sampling + bookkeeping is captured once in a CUDA graph and replayed: the
  sampled tokens go straight into the kernel's input buffer and positions advance on the
  device, so there is no host sync per token.

The rows of a batch are KV-cache *slots* ``0 .. max_batch_size - 1``; a call with ``B`` rows
uses slots ``0 .. B - 1``. The kernel always runs all ``max_batch_size`` rows (its plan is
specialised on that batch); unused rows get token 0 at position 0 and are ignored (so a
decode step with fewer rows overwrites position 0 of the unused slots' cache).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flashformer_triton.config import PRESETS, ModelConfig, UnsupportedModelError, preset
from flashformer_triton.loading import _check_dtype, load_checkpoint, random_state_dict
from flashformer_triton.plan import GpuSpec, Plan, make_plan
from flashformer_triton.quantize import INT4_LAYOUT, QuantizedLinear, QuantScheme
from flashformer_triton.reference import KVCache, apply_rope, rms_norm, rope_cos_sin
from flashformer_triton.runtime import (
    DecodeRuntime,
    check_interpreter_possible,
    interpreter_active,
)
from flashformer_triton.sampling import SamplingConfig, make_seed, sample
from flashformer_triton.weights import (
    ArenaLayout,
    NormLayout,
    PackedWeights,
    ScaleLayout,
    arena_matrices,
    pack_weights,
)

__all__ = ["FlashFormer", "InterpreterWarning", "KVCache", "MAX_BATCH"]

MAX_BATCH = 16  # the kernel's plan supports batch 1..16
DEFAULT_MAX_SEQ_LEN = 4096
PREFILL_CHUNK = 512  # prompt tokens per prefill pass (bounds the attention scores' memory)
EOS_CHECK_EVERY = 16  # CUDA-graph decode: look at the finished flags every this many steps
MAX_CACHED_LOOPS = 4  # captured CUDA graphs kept (one per sampling setting)


class InterpreterWarning(UserWarning):
    """The decode kernel runs on the CPU through the Triton interpreter (slow)."""


_interpreter_warned = False


def _warn_interpreter() -> None:
    """One line, once per process."""
    global _interpreter_warned
    if _interpreter_warned:
        return
    _interpreter_warned = True
    warnings.warn_explicit(
        "device='cpu': the decode kernel runs in the Triton interpreter, which is slow (about "
        "a second per token even for the tiny model); use a CUDA GPU for real speed",
        InterpreterWarning,
        filename="flashformer_triton",
        lineno=0,
        module="flashformer_triton",
    )


_gpu_interpreter_warned = False


def _warn_gpu_interpreter() -> None:
    global _gpu_interpreter_warned
    if _gpu_interpreter_warned:
        return
    _gpu_interpreter_warned = True
    warnings.warn_explicit(
        "TRITON_INTERPRET=1 is set: the decode kernel runs in the Triton interpreter even on "
        "the GPU (slow); unset it before starting Python for the compiled kernel",
        InterpreterWarning,
        filename="flashformer_triton",
        lineno=0,
        module="flashformer_triton",
    )


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a device: use 'cuda', 'cuda:N' or 'cpu'"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "no GPU visible" if torch.version.cuda else "a build without CUDA"
            raise RuntimeError(
                f"device={str(device)!r} was asked for but CUDA is not available (torch "
                f"{torch.__version__}, {why}); "
                "pass device='cpu' to run the same kernel in the Triton interpreter (slow: "
                "tests and the tiny model), or device='auto' to pick the GPU when there is one"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device={str(device)!r} is not supported: use 'cuda' or 'cpu'")
    return dev


@dataclass
class _Loop:
    """Device state of one generation loop; a captured CUDA graph reads exactly these
    tensors, so they live as long as the graph and are refilled (in place) per call."""

    sampling: SamplingConfig
    pad: int
    eos: Tensor | None  # [E] int64
    seed: Tensor  # [1] int64
    counter: Tensor  # [1] int64: sampling step (noise index)
    step: Tensor  # [1] int64: next row of `tokens`
    finished: Tensor  # [max_batch] bool (unused rows count as finished)
    active: Tensor  # [max_batch] bool: rows in use
    advance: Tensor  # [max_batch] int32: 1 for rows in use, 0 otherwise
    tokens: Tensor  # [max_seq_len, max_batch] int64: token i of every row
    graph: Any = None  # torch.cuda.CUDAGraph once captured


def _as_int_tensor(x: Any, name: str, device: torch.device) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(
            f"{name} must hold integer token ids (torch.long or torch.int), got {x.dtype}"
        )
    if x.device != device:
        raise ValueError(
            f"{name} is on {x.device} but the model is on {device}; move it with "
            f"`.to(model.device)`"
        )
    return x


class FlashFormer(torch.nn.Module):
    """A Llama-family decoder whose decode step is ONE persistent Triton kernel launch.

    Build it with :meth:`from_pretrained` (checkpoint dir, hub id, or ``"tiny"``),
    :meth:`from_hf` (a loaded transformers model), :meth:`from_preset` (random weights of a
    named shape) or directly from a ``ModelConfig`` and a Hugging Face-named state dict.

    Options (all constructors):
        device: ``"cuda"`` (default), ``"cuda:N"``, ``"cpu"`` (the kernel runs in the Triton
            interpreter: slow, for tests and the tiny model) or ``"auto"``.
        dtype: ``torch.bfloat16`` (default), ``torch.float16`` or ``torch.float32``.
        max_batch_size: KV-cache slots, 1..16; the kernel always computes this many rows.
        max_seq_len: KV-cache length (prompt + generated tokens); default
            ``min(4096, config.max_position_embeddings)``.
        tiles: tile-size overrides for ``plan.make_plan`` (e.g. ``{"block_k": 256}``).
        cuda_graph: capture the decode step in a CUDA graph in ``generate``/``stream``
            (default True; ignored on the CPU). Also the attribute ``use_cuda_graph``.
        quantize: weight-only quantization at load time: ``"int8"`` (symmetric, per output
            channel), ``"int4"`` (group-wise, ``group_size`` 32/64/128, default 128;
            ``symmetric=False`` stores a zero point per group) or a ``quantize.QuantScheme``.
            The embedding table stays in ``dtype``; the LM head is quantized too unless
            ``quantize_lm_head=False``. Pre-quantized GPTQ/AWQ checkpoints need no option.
            ``model.quant`` is the scheme in use (None: not quantized).

    ``state_dict()`` holds the packed tensors the kernel reads (``arena``, ``norms``,
    ``embed``, ``lm_head`` unless tied, ``qkv_bias`` for Qwen2): compact and exactly what
    ``load_state_dict`` of a model with the same config and dtype expects. The KV cache and
    the RoPE frequencies are not in it. For Hugging Face names use :meth:`hf_state_dict` or
    :meth:`save_pretrained` (a quantized model gives its dequantized weights there).
    Quantized models also hold ``scales`` (and ``zeros`` when asymmetric, ``lm_scales``/
    ``lm_zeros`` for a quantized LM head) and the integer codes in ``arena``/``lm_head``.
    """

    def __init__(
        self,
        config: ModelConfig,
        state_dict: dict[str, Tensor],
        *,
        device: torch.device | str | None = "cuda",
        dtype: torch.dtype | str = torch.bfloat16,
        max_batch_size: int = 1,
        max_seq_len: int | None = None,
        tiles: dict[str, int] | None = None,
        cuda_graph: bool = True,
        quantize: str | QuantScheme | None = None,
        group_size: int | None = None,
        symmetric: bool = True,
        quantize_lm_head: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        dev = _resolve_device(device)
        dtype = _check_dtype(dtype)
        if (
            isinstance(max_batch_size, bool)
            or not isinstance(max_batch_size, int)
            or not (1 <= max_batch_size <= MAX_BATCH)
        ):
            raise ValueError(
                f"max_batch_size={max_batch_size!r} must be an integer in 1..{MAX_BATCH} (the "
                "kernel targets low-batch decoding)"
            )
        if max_seq_len is None:
            max_seq_len = min(DEFAULT_MAX_SEQ_LEN, config.max_position_embeddings)
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len!r} must be an integer >= 2")
        self.config = config
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.use_cuda_graph = bool(cuda_graph)
        self._dtype = dtype
        self._tiles = dict(tiles or {})

        quant = QuantScheme.parse(quantize, group_size=group_size, symmetric=symmetric,
                                  lm_head=quantize_lm_head)
        packed = pack_weights(config, state_dict, dtype=dtype, device=dev, quant=quant)
        self.quant: QuantScheme | None = packed.scheme  # also set by pre-quantized checkpoints

        def param(t: Tensor) -> torch.nn.Parameter:
            return torch.nn.Parameter(t, requires_grad=False)

        self.arena = param(packed.arena)
        self.norms = param(packed.norms)
        self.embed = param(packed.embed)
        if packed.lm_head is not packed.embed:
            self.lm_head = param(packed.lm_head)
        # Quantization side tensors; one-element placeholders (not weights) when unused.
        q = self.quant
        for name, used in (("scales", q), ("zeros", q and not q.symmetric),
                           ("lm_scales", q and q.lm_head),
                           ("lm_zeros", q and q.lm_head and not q.symmetric)):
            if used:
                setattr(self, name, param(getattr(packed, name)))
            else:
                self.register_buffer(name, getattr(packed, name), persistent=False)
        if config.qkv_bias:
            self.qkv_bias = param(packed.qkv_bias)
        else:  # the kernel takes a pointer either way; a placeholder, not a weight
            self.register_buffer("qkv_bias", packed.qkv_bias, persistent=False)
        self.register_buffer("inv_freq", packed.inv_freq, persistent=False)
        if q and q.bits == 4:  # saved, so that a state_dict of another layout is refused
            self.register_buffer("int4_layout", torch.tensor(INT4_LAYOUT))
            self.register_load_state_dict_pre_hook(FlashFormer._check_int4_layout)
        del packed
        self.cache = KVCache(config, max_batch_size, max_seq_len, dtype, dev)
        self._loops: OrderedDict[tuple, _Loop] = OrderedDict()
        self._runtime: DecodeRuntime | None = None
        self._plan: Plan | None = None
        self._build_runtime()
        self.register_load_state_dict_post_hook(FlashFormer._after_load)
        self.eval()

    # Construction helpers.

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: torch.device | str | None = "cuda",
        dtype: torch.dtype | str = torch.bfloat16,
        max_batch_size: int = 1,
        max_seq_len: int | None = None,
        revision: str | None = None,
        progress: bool = False,
        **options: Any,
    ) -> FlashFormer:
        """Load a Hugging Face safetensors checkpoint (local directory or hub id).

        A built-in preset name (``"tiny"``, ``"llama-3.2-1b"``, ...) that is not a local
        directory builds that shape with random weights (:meth:`from_preset`).
        ``progress=True`` shows a tqdm bar while the tensors are read.
        """
        name = os.fspath(name_or_path)
        if isinstance(name_or_path, str) and name in PRESETS and not Path(name).is_dir():
            return cls.from_preset(
                name,
                device=device,
                dtype=dtype,
                max_batch_size=max_batch_size,
                max_seq_len=max_seq_len,
                **options,
            )
        _resolve_device(device)  # fail before reading gigabytes
        # Read onto the host, pack onto the device: the device holds one copy of the weights.
        config, state = load_checkpoint(
            name_or_path, dtype=dtype, device="cpu", revision=revision, progress=progress
        )
        return cls(
            config,
            state,
            device=device,
            dtype=dtype,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            **options,
        )

    @classmethod
    def from_hf(cls, hf_model: torch.nn.Module, **options: Any) -> FlashFormer:
        """Build from a loaded transformers ``*ForCausalLM`` (Llama, Mistral, Qwen2, Qwen3);
        its weights are copied into the packed arena. Same options as the constructor."""
        hf_config = getattr(hf_model, "config", None)
        if hf_config is None or not hasattr(hf_config, "to_dict"):
            raise UnsupportedModelError(
                f"{type(hf_model).__name__} has no transformers config; from_hf expects a "
                "transformers *ForCausalLM model"
            )
        config = ModelConfig.from_hf_dict(hf_config.to_dict())
        state = {name: t.detach() for name, t in hf_model.state_dict().items()}
        return cls(config, state, **options)

    @classmethod
    def from_preset(cls, name: str = "tiny", *, seed: int = 0, **options: Any) -> FlashFormer:
        """A built-in shape (``config.PRESETS``: ``tiny``, ``llama-3.2-1b``, ...) with
        deterministic random weights (``loading.random_state_dict``). Models under 100M
        parameters draw their weights on the CPU, so they are identical on every machine."""
        config = preset(name)
        device = _resolve_device(options.pop("device", "cuda"))
        dtype = _check_dtype(options.pop("dtype", torch.bfloat16))
        small = config.num_parameters() < 100_000_000
        gen_device = torch.device("cpu") if small else device
        state = random_state_dict(
            config, seed=seed, dtype=dtype, device=gen_device, generator_device=gen_device
        )
        return cls(config, state, device=device, dtype=dtype, **options)

    # Properties.

    @property
    def device(self) -> torch.device:
        return self.arena.device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def plan(self) -> Plan:
        """The kernel's task table and tiles (``plan.summary()`` describes it)."""
        return self._plan

    @property
    def runtime(self) -> DecodeRuntime:
        return self._runtime

    @property
    def eos_token_id(self) -> list[int]:
        return list(self.config.eos_token_id)

    def num_parameters(self) -> int:
        return self.config.num_parameters()

    def extra_repr(self) -> str:
        return (
            f"{self.config.summary()}\ndevice={self.device}, dtype={self.dtype}, "
            f"max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}"
            + (f", weights {self.quant.describe()}" if self.quant else "")
        )

    def _lm_head(self) -> Tensor:
        """What the kernel reads for the LM head: its own tensor (codes when quantized), or
        the embedding table when tied."""
        return self.lm_head if "lm_head" in self._parameters else self.embed

    def packed_weights(self) -> PackedWeights:
        """The tensors the kernel reads, as ``weights.PackedWeights`` (views, no copy)."""
        return PackedWeights(
            arena=self.arena.detach(),
            norms=self.norms.detach(),
            qkv_bias=self.qkv_bias.detach(),
            embed=self.embed.detach(),
            lm_head=self._lm_head().detach(),
            inv_freq=self.inv_freq,
            scales=self.scales.detach(),
            zeros=self.zeros.detach(),
            lm_scales=self.lm_scales.detach(),
            lm_zeros=self.lm_zeros.detach(),
            scheme=self.quant,
        )

    # Runtime management (.to(), load_state_dict).

    def _build_runtime(self) -> None:
        device = self.device
        self._loops.clear()
        self._plan = make_plan(
            self.config,
            batch=self.max_batch_size,
            max_seq_len=self.max_seq_len,
            dtype=self.dtype,
            gpu=GpuSpec.current(device),
            quant=self.quant,
            **self._tiles,
        )
        self._runtime = DecodeRuntime(
            self.config, self.packed_weights(), self._plan, self.cache.k, self.cache.v
        )
        if device.type == "cpu":
            _warn_interpreter()
        elif interpreter_active():
            _warn_gpu_interpreter()

    def _apply(self, fn, recurse: bool = True):
        # `.to()`, `.cuda()`, `.half()`, ...: find out what fn does before doing it.
        device = self.arena.device
        try:
            probe = fn(torch.empty(0, dtype=self._dtype, device=device))
            probe32 = fn(torch.empty(0, dtype=torch.float32, device=device))
        except (RuntimeError, AssertionError) as exc:
            hint = "" if torch.cuda.is_available() else " (CUDA is not available here)"
            raise RuntimeError(f"cannot move FlashFormer: {exc}{hint}") from exc
        if probe.dtype != self._dtype or probe32.dtype != torch.float32:
            raise TypeError(
                f"FlashFormer's dtype is fixed when it is built ({self._dtype}; the norms stay "
                "fp32): the packed arena and the compiled kernel depend on it. Build a new "
                f"model with dtype={probe.dtype} instead of converting this one"
            )
        if probe.device.type not in ("cpu", "cuda"):
            raise ValueError(f"FlashFormer runs on 'cuda' or 'cpu', not {probe.device}")
        if probe.device != device and probe.device.type == "cpu":
            check_interpreter_possible()  # before moving anything
        super()._apply(fn, recurse)
        if probe.device != device:
            self._build_runtime()  # new plan for the new chip, new kernel buffers
        return self

    def _check_int4_layout(self, state_dict, prefix, *args) -> None:
        got = state_dict.get(prefix + "int4_layout")
        if got is None or int(got) != INT4_LAYOUT:
            layout = 1 if got is None else int(got)
            raise ValueError(
                f"this state_dict's int4 arena is packed in layout {layout}, and this version "
                f"of flashformer_triton reads layout {INT4_LAYOUT} (quantize.pack_int4): "
                f"rebuild the model from its weights instead (hf_state_dict() or "
                f"save_pretrained() with the version that wrote it, then from_pretrained)"
            )

    def _after_load(self, incompatible_keys) -> None:
        q = self.quant
        codes = q.storage_dtype if q else self._dtype
        expected = {"arena": codes, "embed": self._dtype,
                    "lm_head": codes if q and q.lm_head else self._dtype}
        for name, dtype in expected.items():
            t = self._lm_head() if name == "lm_head" else getattr(self, name)
            if t.dtype != dtype:
                raise TypeError(f"loaded {name} is {t.dtype}; this model needs {dtype}")
        w = self._runtime.weights
        names = ("arena", "embed", "norms", "scales", "zeros", "lm_scales", "lm_zeros")
        if any(getattr(w, n).data_ptr() != getattr(self, n).data_ptr() for n in names):
            self._build_runtime()

    @torch.inference_mode()
    def reset(self) -> None:
        """Forget the KV cache (zero it)."""
        self.cache.reset()

    @torch.inference_mode()
    def warmup(self) -> float:
        """Run the kernel once so that it is compiled (GPU) before the first real token; returns
        the seconds it took. Clears the KV cache."""
        start = time.perf_counter()
        rt = self._runtime
        rt.ids.zero_()
        rt.pos.zero_()
        rt.launch()
        rt.check()
        self.reset()
        return time.perf_counter() - start

    # Hugging Face-named weights.

    @torch.no_grad()
    def hf_state_dict(self) -> dict[str, Tensor]:
        """The weights under Hugging Face names (``model.layers.0.self_attn.q_proj.weight``,
        ...), unpacked from the arena (views where the layout allows, else copies)."""
        from flashformer_triton.weights import rotary_pair_order

        c, nl = self.config, NormLayout.of(self.config)
        f, hd = c.intermediate_size, c.head_dim
        heads = c.num_heads + 2 * c.num_kv_heads
        order = rotary_pair_order(hd)
        rows = (torch.arange(heads)[:, None] * hd + order[None, :]).reshape(-1)
        unpermute = torch.argsort(rows).to(self.device)
        dt = self._dtype
        out: dict[str, Tensor] = {"model.embed_tokens.weight": self.embed.detach()}
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            w = self._layer_weights(i)
            nb = i * nl.layer_stride
            out[p + "input_layernorm.weight"] = self.norms[nb + nl.attn : nb + nl.mlp].to(dt)
            q, k, v = w["qkv"][unpermute].split([c.q_size, c.kv_size, c.kv_size])
            out[p + "self_attn.q_proj.weight"] = q
            out[p + "self_attn.k_proj.weight"] = k
            out[p + "self_attn.v_proj.weight"] = v
            if c.qkv_bias:
                qb, kb, vb = (
                    self.qkv_bias[i][unpermute].to(dt).split([c.q_size, c.kv_size, c.kv_size])
                )
                out[p + "self_attn.q_proj.bias"] = qb
                out[p + "self_attn.k_proj.bias"] = kb
                out[p + "self_attn.v_proj.bias"] = vb
            if c.qk_norm:
                out[p + "self_attn.q_norm.weight"] = self.norms[nb + nl.q : nb + nl.k].to(dt)
                out[p + "self_attn.k_norm.weight"] = self.norms[
                    nb + nl.k : nb + nl.layer_stride
                ].to(dt)
            out[p + "self_attn.o_proj.weight"] = w["o"]
            out[p + "post_attention_layernorm.weight"] = self.norms[nb + nl.mlp : nb + nl.q].to(dt)
            out[p + "mlp.gate_proj.weight"] = w["gate_up"][:f]
            out[p + "mlp.up_proj.weight"] = w["gate_up"][f:]
            out[p + "mlp.down_proj.weight"] = w["down"]
        out["model.norm.weight"] = self.norms[c.num_layers * nl.layer_stride :].to(dt)
        if not c.tie_word_embeddings:
            out["lm_head.weight"] = self.dequantized_lm_head()
        return out

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> Path:
        """Write ``config.json`` + safetensors with Hugging Face names, readable by
        :meth:`from_pretrained` and by transformers. ``kwargs`` go to
        ``loading.save_checkpoint`` (e.g. ``max_shard_size="2GB"``)."""
        from flashformer_triton.loading import save_checkpoint

        return save_checkpoint(directory, self.config, self.hf_state_dict(), **kwargs)

    # Prefill in plain torch, on views into the arena.

    def _layer_weights(self, layer: int) -> dict[str, Tensor]:
        """The layer's matrices in the model dtype: views into the arena, or dequantized
        copies (rows of Wqkv in rotary-pair order, gate rows then up rows)."""
        c, q = self.config, self.quant
        if q:
            lay, sl = ArenaLayout.of(c, q), ScaleLayout.of(c, q)
            codes = self.arena.detach()[layer * lay.layer_stride :]
            scales = self.scales.detach()[layer * sl.layer_stride :]
            zeros = None if q.symmetric else self.zeros.detach()[layer * sl.layer_stride :]
            out = {}
            for name, rows, k in arena_matrices(c):
                c0, s0 = getattr(lay, name), getattr(sl, name)
                groups = q.groups(k)
                ql = QuantizedLinear(
                    codes[c0 : c0 + rows * k // q.values_per_byte].view(rows, -1),
                    scales[s0 : s0 + rows * groups].view(rows, groups),
                    None if zeros is None else zeros[s0 : s0 + rows * groups].view(rows, groups),
                    q,
                )
                out[name] = ql.dequantize(self._dtype)
            return out
        lay = ArenaLayout.of(c)
        d, f = c.hidden_size, c.intermediate_size
        slab = self.arena.detach()[layer * lay.layer_stride : (layer + 1) * lay.layer_stride]
        return {
            "qkv": slab[lay.qkv : lay.o].view(c.qkv_size, d),  # rows in rotary-pair order
            "o": slab[lay.o : lay.gate_up].view(d, c.q_size),
            "gate_up": slab[lay.gate_up : lay.down].view(2 * f, d),  # gate rows, then up rows
            "down": slab[lay.down : lay.layer_stride].view(d, f),
        }

    def _prefill_hidden(self, ids: Tensor, positions: Tensor, max_pos: int) -> Tensor:
        """Final-normed hidden states ``[B, T, D]`` for ``ids`` ``[B, T]`` at ``positions``
        ``[B, T]`` (slots 0..B-1), writing K/V of every token into the cache. ``max_pos``
        is the largest position (host int). Long prompts go in chunks of PREFILL_CHUNK."""
        outs = []
        for start in range(0, ids.shape[1], PREFILL_CHUNK):
            chunk_pos = positions[:, start : start + PREFILL_CHUNK]
            end = max_pos + 1 if start + PREFILL_CHUNK >= ids.shape[1] else None
            outs.append(self._prefill_chunk(ids[:, start : start + PREFILL_CHUNK], chunk_pos, end))
        h = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        nl = NormLayout.of(self.config)
        final = self.norms[self.config.num_layers * nl.layer_stride :].to(self._dtype)
        return rms_norm(h, final, self.config.rms_norm_eps)

    def _prefill_chunk(self, ids: Tensor, positions: Tensor, end: int | None) -> Tensor:
        c, nl, dt = self.config, NormLayout.of(self.config), self._dtype
        B, T = ids.shape
        H, KVH, hd, G = c.num_heads, c.num_kv_heads, c.head_dim, c.group_size
        eps = c.rms_norm_eps
        if end is None:  # an inner chunk: attend up to its own last position
            end = int(positions.max()) + 1
        cos, sin = rope_cos_sin(self.inv_freq, positions)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        # mask[b, t, s]: token t of row b sees cache position s (causal by position).
        key_pos = torch.arange(end, device=ids.device)
        visible = key_pos <= positions[:, :, None]
        if c.sliding_window is not None:
            visible &= key_pos > positions[:, :, None] - c.sliding_window
        mask = visible[:, None, None].expand(B, 1, G, T, end).reshape(B, 1, G * T, end)

        x = F.embedding(ids, self.embed.detach())
        for layer in range(c.num_layers):
            w = self._layer_weights(layer)
            nb = layer * nl.layer_stride
            h = rms_norm(x, self.norms[nb + nl.attn : nb + nl.mlp].to(dt), eps)
            bias = self.qkv_bias[layer].to(dt) if c.qkv_bias else None
            qkv = F.linear(h, w["qkv"], bias)
            # Per head the rows come as pairs (i, i + hd/2): undo the interleave.
            qkv = (
                qkv.view(B, T, H + 2 * KVH, hd // 2, 2)
                .transpose(-1, -2)
                .reshape(B, T, H + 2 * KVH, hd)
            )
            q, k, v = qkv.split([H, KVH, KVH], dim=2)
            if c.qk_norm:
                q = rms_norm(q, self.norms[nb + nl.q : nb + nl.k].to(dt), eps)
                k = rms_norm(k, self.norms[nb + nl.k : nb + nl.layer_stride].to(dt), eps)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
            self.cache.update(layer, None, positions, k, v)  # slots 0 .. B-1
            keys = self.cache.k[layer, :B, :, :end]
            values = self.cache.v[layer, :B, :, :end]
            # Query heads of one KV group side by side: [B, KVH, G * T, hd] (GQA, no K/V copy).
            qg = q.transpose(1, 2).reshape(B, KVH, G * T, hd)
            att = F.scaled_dot_product_attention(
                qg, keys, values, attn_mask=mask, scale=1.0 / math.sqrt(hd)
            )
            # reshape, not view: CUDA's SDPA kernels return other strides than the CPU's.
            att = att.reshape(B, H, T, hd).transpose(1, 2).reshape(B, T, H * hd)
            x = x + F.linear(att, w["o"])
            h = rms_norm(x, self.norms[nb + nl.mlp : nb + nl.q].to(dt), eps)
            gate, up = F.linear(h, w["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w["down"])
        return x

    def _logits(self, h: Tensor) -> Tensor:
        q = self.quant
        if not (q and q.lm_head):
            return F.linear(h, self._lm_head().detach()).float()
        # Dequantize the LM head a block of rows at a time: bounded temporary memory.
        head, block = self._quantized_lm_head(), 16384
        out = [F.linear(h, head.rows(slice(r, r + block)).dequantize(self._dtype)).float()
               for r in range(0, self.config.vocab_size, block)]
        return torch.cat(out, dim=-1)

    def _quantized_lm_head(self) -> QuantizedLinear:
        q = self.quant
        zeros = None if q.symmetric else self.lm_zeros.detach()
        return QuantizedLinear(self.lm_head.detach(), self.lm_scales.detach(), zeros, q)

    def dequantized_lm_head(self) -> Tensor:
        """The LM head in the model dtype (a copy when it is quantized)."""
        q = self.quant
        if not (q and q.lm_head):
            return self._lm_head().detach()
        return self._quantized_lm_head().dequantize(self._dtype)

    # forward.

    def _check_forward(self, input_ids: Tensor, input_pos: Tensor | None) -> tuple[Tensor, int]:
        """Validated positions [B, T] (long) and the largest one. One host sync."""
        _as_int_tensor(input_ids, "input_ids", self.device)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T == 0 or B == 0:
            raise ValueError(
                f"input_ids is empty (shape {tuple(input_ids.shape)}): give at "
                "least one token per row"
            )
        if self.max_batch_size < B:
            raise ValueError(
                f"batch of {B} rows exceeds max_batch_size={self.max_batch_size}; build the "
                f"model with max_batch_size={B} (up to {MAX_BATCH})"
            )
        if input_pos is None:
            positions = torch.arange(T, device=self.device).expand(B, T)
        else:
            _as_int_tensor(input_pos, "input_pos", self.device)
            if tuple(input_pos.shape) == (B,):
                positions = input_pos.long()[:, None] + torch.arange(T, device=self.device)
            elif tuple(input_pos.shape) == (B, T):
                positions = input_pos.long()
            else:
                raise ValueError(
                    f"input_pos must be [B]={B} (position of each row's first token) or "
                    f"[B, T]=[{B}, {T}], got shape {tuple(input_pos.shape)}"
                )
        lo_id, hi_id, lo_pos, hi_pos = torch.stack(
            [input_ids.min().long(), input_ids.max().long(), positions.min(), positions.max()]
        ).tolist()
        self._check_ids(lo_id, hi_id, "input_ids")
        if lo_pos < 0:
            raise ValueError(f"input_pos must be >= 0, got {lo_pos}")
        if hi_pos >= self.max_seq_len:
            raise ValueError(
                f"position {hi_pos} does not fit in the KV cache of max_seq_len="
                f"{self.max_seq_len}; build the model with a larger max_seq_len"
            )
        return positions, int(hi_pos)

    def _check_ids(self, lo: int, hi: int, what: str) -> None:
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{what} holds token id {bad}, outside the vocabulary [0, {self.config.vocab_size})"
            )

    @torch.no_grad()
    def forward(self, input_ids: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """Logits ``[B, T, vocab]`` (fp32) of ``input_ids`` ``[B, T]`` in slots ``0..B-1``.

        ``input_pos`` is ``[B]`` (the position of each row's first token; default 0) or
        ``[B, T]``. ``T > 1`` prefills in torch; ``T == 1`` is one decode-kernel step, which
        reads the cached K/V of positions ``0 .. input_pos`` of its slot. Both write the
        new tokens' K/V into the cache.
        """
        positions, hi_pos = self._check_forward(input_ids, input_pos)
        B, T = input_ids.shape
        # State (KV cache, kernel buffers) is only ever changed in inference mode, so the model
        # works whether or not the caller is in inference mode; the result is then copied out
        # in the caller's mode (a normal tensor unless the caller is in inference mode).
        with torch.inference_mode():
            if T > 1:
                out = self._logits(self._prefill_hidden(input_ids.long(), positions, hi_pos))
            else:
                rt = self._runtime
                rt.ids.zero_()
                rt.pos.zero_()
                rt.ids[:B].copy_(input_ids[:, 0])
                rt.pos[:B].copy_(positions[:, 0])
                rt.launch()
                rt.check()
                out = rt.logits[:B, None, :]
        return out.clone()

    # generate / stream.

    def _prompts(
        self, input_ids: Any, attention_mask: Tensor | None, pad: int
    ) -> tuple[list[list[int]], Tensor]:
        """Prompt token lists and the prompt block of the output ``[B, T]``."""
        dev = self.device
        if isinstance(input_ids, Tensor):
            _as_int_tensor(input_ids, "input_ids", dev)
            ids = input_ids[None] if input_ids.dim() == 1 else input_ids
            if ids.dim() != 2:
                raise ValueError(
                    f"input_ids must be [T] or [B, T], got shape {tuple(input_ids.shape)}"
                )
            rows = ids.tolist()
            if attention_mask is None:
                prompts = rows
            else:
                if not isinstance(attention_mask, Tensor):
                    raise TypeError("attention_mask must be a torch.Tensor of 0/1")
                if attention_mask.device != dev:
                    raise ValueError(
                        f"attention_mask is on {attention_mask.device} but the model is on "
                        f"{dev}; move it with `.to(model.device)`"
                    )
                mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
                if tuple(mask.shape) != tuple(ids.shape):
                    raise ValueError(
                        f"attention_mask has shape {tuple(attention_mask.shape)}, "
                        f"input_ids {tuple(input_ids.shape)}"
                    )
                prompts = []
                for b, (row, m) in enumerate(zip(rows, mask.tolist(), strict=True)):
                    keep = [i for i, flag in enumerate(m) if flag]
                    if keep and keep != list(range(keep[0], keep[-1] + 1)):
                        raise ValueError(
                            f"attention_mask row {b} has holes; only left or right padding "
                            "(one contiguous run of ones) is supported"
                        )
                    prompts.append([row[i] for i in keep])
            block = ids
        elif isinstance(input_ids, (list, tuple)):
            items = list(input_ids)
            if items and all(isinstance(t, int) and not isinstance(t, bool) for t in items):
                items = [items]  # one prompt given as a list of ints
            prompts = []
            for b, item in enumerate(items):
                if isinstance(item, Tensor):
                    _as_int_tensor(item, f"prompt {b}", dev)
                    if item.dim() != 1:
                        raise ValueError(f"prompt {b} must be 1-D, got shape {tuple(item.shape)}")
                    prompts.append(item.tolist())
                elif isinstance(item, (list, tuple)):
                    if not all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                        raise TypeError(f"prompt {b} must hold integer token ids")
                    prompts.append(list(item))
                else:
                    raise TypeError(
                        f"prompt {b} is a {type(item).__name__}; give token ids as a 1-D "
                        "tensor or a list of ints"
                    )
            block = None
        else:
            raise TypeError(
                "input_ids must be a [B, T] tensor (with an optional attention_mask), a 1-D "
                f"tensor, or a list of prompts; got {type(input_ids).__name__}"
            )
        if not prompts:
            raise ValueError("no prompts given")
        for b, p in enumerate(prompts):
            if not p:
                raise ValueError(
                    f"prompt {b} is empty: give at least one token (for example the BOS token)"
                )
        if len(prompts) > self.max_batch_size:
            raise ValueError(
                f"{len(prompts)} prompts exceed max_batch_size={self.max_batch_size}; build "
                f"the model with max_batch_size={len(prompts)} (up to {MAX_BATCH})"
            )
        flat = [t for p in prompts for t in p]
        self._check_ids(min(flat), max(flat), "the prompt")
        if block is None:  # left-pad: the generated tokens all start at column T
            width = max(len(p) for p in prompts)
            block = torch.tensor(
                [[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=dev
            )
        return prompts, block

    def _get_loop(self, sampling: SamplingConfig, eos: tuple[int, ...], pad: int) -> _Loop:
        key = (sampling, eos, pad)
        if key in self._loops:
            self._loops.move_to_end(key)
            return self._loops[key]
        dev, nb = self.device, self.max_batch_size
        loop = _Loop(
            sampling=sampling,
            pad=pad,
            eos=torch.tensor(eos, dtype=torch.long, device=dev) if eos else None,
            seed=torch.zeros(1, dtype=torch.long, device=dev),
            counter=torch.zeros(1, dtype=torch.long, device=dev),
            step=torch.zeros(1, dtype=torch.long, device=dev),
            finished=torch.zeros(nb, dtype=torch.bool, device=dev),
            active=torch.zeros(nb, dtype=torch.bool, device=dev),
            advance=torch.zeros(nb, dtype=torch.int32, device=dev),
            tokens=torch.zeros(self.max_seq_len, nb, dtype=torch.long, device=dev),
        )
        self._loops[key] = loop
        while len(self._loops) > MAX_CACHED_LOOPS:
            self._loops.popitem(last=False)
        return loop

    def _commit(self, loop: _Loop, tok: Tensor) -> None:
        """Record sampled tokens [max_batch] and set up the next kernel step (device only)."""
        rt = self._runtime
        loop.counter.add_(1)
        tok = torch.where(loop.finished, loop.pad, tok)
        loop.tokens.index_copy_(0, loop.step, tok[None])
        loop.step.add_(1)
        if loop.eos is not None:
            loop.finished |= (tok[:, None] == loop.eos[None, :]).any(dim=-1)
        rt.ids.copy_(torch.where(loop.active, tok, 0))
        rt.pos.add_(loop.advance)

    def _decode_step(self, loop: _Loop) -> None:
        """One kernel launch + sampling + bookkeeping: what the CUDA graph captures."""
        self._runtime.launch()
        self._commit(
            loop, sample(self._runtime.logits, loop.sampling, seed=loop.seed, counter=loop.counter)
        )

    def _graph_step(self, loop: _Loop) -> None:
        if loop.graph is not None:
            loop.graph.replay()
            return
        # First use: a real step on a side stream (compiles the kernel, warms the allocator
        # and the sampling ops), then capture the same step for every later replay.
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._decode_step(loop)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._decode_step(loop)
        loop.graph = graph

    @torch.inference_mode()
    def _run(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingConfig,
        eos: tuple[int, ...],
        pad: int,
        seed: int | None,
        sync_every_step: bool,
    ) -> Iterator[tuple[int, _Loop]]:
        """Prefill, then decode; yields ``(i, loop)`` after token ``i`` of every row has been
        written to ``loop.tokens[i]``. Stops early once every sequence has finished."""
        dev, B, nb = self.device, len(prompts), self.max_batch_size
        lens = [len(p) for p in prompts]
        width = max(lens)
        loop = self._get_loop(sampling, eos, pad)
        loop.seed.copy_(make_seed(seed, dev))
        loop.counter.zero_()
        loop.step.zero_()
        active = torch.arange(nb, device=dev) < B
        loop.active.copy_(active)
        loop.advance.copy_(active.int())
        loop.finished.copy_(~active)
        rt = self._runtime
        rt.ids.zero_()
        rt.pos.zero_()
        rt.pos[:B].copy_(torch.tensor(lens, dtype=torch.int32) - 1)

        # Prefill every prompt at once, right-padded: a pad's K/V lands at positions that the
        # decode steps overwrite before anything reads them.
        ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=dev)
        positions = torch.arange(width, device=dev).expand(B, width)
        hidden = self._prefill_hidden(ids, positions, width - 1)
        last = hidden[torch.arange(B, device=dev), torch.tensor(lens, device=dev) - 1]
        logits = torch.zeros(nb, self.config.vocab_size, device=dev)
        logits[:B] = self._logits(last)
        self._commit(loop, sample(logits, sampling, seed=loop.seed, counter=loop.counter))

        use_graph = self.use_cuda_graph and dev.type == "cuda"
        every = 1 if (sync_every_step or dev.type == "cpu") else EOS_CHECK_EVERY
        try:
            yield 0, loop
            for i in range(1, max_new_tokens):
                if loop.eos is not None and i % every == 0 and bool(loop.finished.all()):
                    break
                if use_graph:
                    self._graph_step(loop)
                else:
                    self._decode_step(loop)
                yield i, loop
        finally:
            rt.check()

    def _generation_args(
        self, max_new_tokens, temperature, top_k, top_p, do_sample, eos_token_id, pad_token_id
    ) -> tuple[SamplingConfig, tuple[int, ...], int]:
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or (max_new_tokens < 1)
        ):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
        if do_sample is False:
            temperature = 0.0
        elif do_sample is True and temperature == 0:
            temperature = 1.0
        if top_k == 0 and not isinstance(top_k, bool):  # transformers' "no top-k"
            top_k = None
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        if eos_token_id is None:
            eos = tuple(self.config.eos_token_id)
        elif isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool):
            eos = (eos_token_id,)
        else:
            eos = tuple(int(e) for e in eos_token_id)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        return sampling, eos, int(pad_token_id)

    def _check_length(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} = "
                f"{longest + max_new_tokens} exceeds max_seq_len={self.max_seq_len}; shorten "
                "the prompt, ask for fewer tokens or build the model with a larger max_seq_len"
            )

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor | Sequence,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        *,
        attention_mask: Tensor | None = None,
        pad_token_id: int | None = None,
        do_sample: bool | None = None,
    ) -> Tensor:
        """Generate up to ``max_new_tokens`` tokens per prompt; returns ``[B, T + n]`` (int64,
        on the model's device).

        Prompts: a ``[B, T]`` tensor (padded rows: pass ``attention_mask`` with ones on the
        real tokens, left or right padding), a 1-D tensor (one prompt), or a list of 1-D
        tensors / lists of ints of different lengths. Columns ``0..T-1`` hold the prompts
        (as given; a list is left-padded with the pad id to its longest prompt ``T``),
        columns ``T..`` the new tokens.

        Sampling: ``temperature=0`` is greedy; otherwise softmax(logits / temperature),
        restricted by ``top_k`` / ``top_p``, drawn on the device from the counter-based
        noise of ``seed`` (same seed, same tokens; ``None`` takes a seed from torch's CPU
        generator). ``do_sample=False`` forces greedy, as in transformers.

        Stopping: a row stops after emitting a token of ``eos_token_id`` (default
        ``config.eos_token_id``; ``[]`` never stops); its later columns hold ``pad_token_id``
        (default: the first EOS id, else 0). ``n <= max_new_tokens`` is the longest row's
        count: generation ends early once every row has stopped.
        """
        sampling, eos, pad = self._generation_args(
            max_new_tokens, temperature, top_k, top_p, do_sample, eos_token_id, pad_token_id
        )
        prompts, block = self._prompts(input_ids, attention_mask, pad)
        self._check_length(prompts, max_new_tokens)
        n, tokens = 0, None
        for i, loop in self._run(prompts, max_new_tokens, sampling, eos, pad, seed, False):
            n, tokens = i + 1, loop.tokens
        new = tokens[:n, : len(prompts)].t().cpu()
        if eos:
            hit = torch.isin(new, torch.tensor(eos))
            first = torch.where(hit.any(1), hit.int().argmax(1) + 1, n)
            width = int(first.max())
            new = new[:, :width]
        return torch.cat([block, new.to(self.device)], dim=1)

    @torch.no_grad()
    def stream(
        self,
        input_ids: Tensor | Sequence,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        *,
        attention_mask: Tensor | None = None,
        pad_token_id: int | None = None,
        do_sample: bool | None = None,
    ) -> Iterator[Tensor]:
        """Like :meth:`generate`, but yields each step's new tokens as they come: a CPU int64
        tensor ``[B]`` per step (``int(tok)`` for a single prompt). A row that has stopped
        yields the pad id. Ends when every row has stopped or after ``max_new_tokens``
        steps. One host sync per token (that is what showing tokens as they come costs);
        the same seed gives the same tokens as :meth:`generate`."""
        sampling, eos, pad = self._generation_args(
            max_new_tokens, temperature, top_k, top_p, do_sample, eos_token_id, pad_token_id
        )
        prompts, _ = self._prompts(input_ids, attention_mask, pad)
        self._check_length(prompts, max_new_tokens)
        B = len(prompts)
        for i, loop in self._run(prompts, max_new_tokens, sampling, eos, pad, seed, True):
            yield loop.tokens[i, :B].to("cpu", copy=True)
