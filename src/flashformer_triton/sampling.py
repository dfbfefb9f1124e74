"""Token sampling on the device with no host sync: greedy, temperature, top-k, top-p.

Everything here is a fixed sequence of tensor ops on the logits' device with static shapes,
so one sampling step can be captured in a CUDA graph together with the decode kernel.

Randomness. Instead of a stateful ``torch.Generator`` (whose state a CUDA graph would have
to be told about) the noise is a pure function of ``(seed, counter, row, column)``: an
integer hash of those four numbers, turned into a uniform number and then into Gumbel noise.
``seed`` and ``counter`` are small int64 device tensors, so a captured graph reads them at
replay time and the caller advances ``counter`` on the device between steps. Consequences:

* the same seed gives the same tokens run after run, eager or graph-replayed, on a CPU or a
  GPU (the noise is bitwise identical everywhere; tokens can only differ where the logits
  themselves differ);
* row ``b`` of a batch gets its own independent noise, whatever the other rows do.

Sampling uses the Gumbel-max trick: ``argmax(logits / T + g)`` with ``g = -log(-log(u))`` is a
draw from ``softmax(logits / T)`` (the same as the exponential race ``argmax(p / e)``).
Top-k and top-p set the logits outside the kept set to ``-inf`` first, in the order
transformers applies them (temperature, then top-k, then top-p).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SamplingConfig",
    "filter_logits",
    "gumbel_noise",
    "make_seed",
    "probabilities",
    "sample",
    "uniform_noise",
]

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    ``temperature == 0`` is greedy decoding (``argmax``; top-k and top-p are then ignored).
    ``top_k`` keeps the k most likely tokens (``None``: all). ``top_p`` keeps the smallest
    set of most likely tokens whose probability reaches ``top_p`` (``None`` or 1.0: all).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature={t!r} must be a finite number >= 0 (0 = greedy)")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k={k!r} must be None or an integer >= 1")
        p = self.top_p
        if p is not None and (
            isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0
        ):
            raise ValueError(f"top_p={p!r} must be None or a number in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        parts = [f"temperature {self.temperature:g}"]
        if self.top_k is not None:
            parts.append(f"top-k {self.top_k}")
        if self.top_p is not None and self.top_p < 1.0:
            parts.append(f"top-p {self.top_p:g}")
        return ", ".join(parts)


# Counter-based noise.


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (the 'lowbias32' hash) on int64 tensors in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _as_key(value: Tensor | int, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=torch.int64).reshape(-1)[:1]
    return torch.tensor([int(value)], dtype=torch.int64, device=device)


def uniform_noise(
    seed: Tensor | int, counter: Tensor | int, rows: int, cols: int, device: torch.device | str
) -> Tensor:
    """Uniform numbers in (0, 1), float32 ``[rows, cols]``, a pure function of
    ``(seed, counter, row, column)``. ``seed``/``counter`` may be int64 device tensors (read
    at run time, so graph-capturable) or Python ints. 24 bits of resolution."""
    device = torch.device(device)
    seed_t = _as_key(seed, device)
    count_t = _as_key(counter, device)
    key = _mix((seed_t & _M32) ^ 0x9E3779B9)
    key = _mix(key ^ ((seed_t >> 32) & _M32))
    key = _mix(key ^ (count_t & _M32))
    key = _mix(key ^ ((count_t >> 32) & _M32) ^ 0x85EBCA6B)
    row = _mix(torch.arange(rows, device=device, dtype=torch.int64) ^ 0x632BE5AB)
    col = _mix(torch.arange(cols, device=device, dtype=torch.int64) ^ 0x27D4EB2F)
    h = _mix(_mix(key ^ row)[:, None] ^ col[None, :])
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(
    seed: Tensor | int, counter: Tensor | int, rows: int, cols: int, device: torch.device | str
) -> Tensor:
    """Standard Gumbel noise ``-log(-log(u))`` from :func:`uniform_noise`."""
    u = uniform_noise(seed, counter, rows, cols, device)
    return -torch.log(-torch.log(u))


def make_seed(seed: int | None, device: torch.device | str) -> Tensor:
    """An int64 seed tensor ``[1]`` on ``device``. ``None`` draws one from torch's default CPU
    generator, so ``torch.manual_seed`` makes unseeded sampling reproducible too."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # a CPU draw: no device sync
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} must be an int or None")
    return torch.tensor([seed & (2**63 - 1)], dtype=torch.int64, device=device)


# Filtering and drawing.


def filter_logits(logits: Tensor, config: SamplingConfig) -> Tensor:
    """``logits / temperature`` (fp32) with the tokens outside top-k / top-p set to ``-inf``.

    ``logits`` is ``[..., vocab]``. Greedy configs return the logits unchanged (as fp32).
    """
    x = logits.float()
    if config.greedy:
        return x
    x = x / config.temperature
    vocab = x.shape[-1]
    if config.top_k is not None and config.top_k < vocab:
        kth = torch.topk(x, config.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        # Drop a token once the more likely ones already reach top_p (the first never is).
        sorted_x = sorted_x.masked_fill(mass_before >= config.top_p, float("-inf"))
        x = torch.empty_like(x).scatter_(-1, order, sorted_x)
    return x


def probabilities(logits: Tensor, config: SamplingConfig) -> Tensor:
    """The distribution :func:`sample` draws from (one-hot at the argmax when greedy)."""
    if config.greedy:
        idx = logits.float().argmax(dim=-1, keepdim=True)
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, idx, 1.0)
    return torch.softmax(filter_logits(logits, config), dim=-1)


def sample(
    logits: Tensor,
    config: SamplingConfig,
    *,
    seed: Tensor | int = 0,
    counter: Tensor | int = 0,
) -> Tensor:
    """Next token per row of ``logits`` ``[B, vocab]`` -> int64 ``[B]`` on the same device.

    No host sync, static shapes: safe inside a CUDA graph. Greedy picks the first maximum.
    Sampled rows use the noise of ``(seed, counter, row)``; advance ``counter`` between
    steps (the caller does, on the device) to get fresh noise.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, vocab], got shape {tuple(logits.shape)}")
    if config.greedy:
        return logits.argmax(dim=-1)
    x = filter_logits(logits, config)
    rows, cols = x.shape
    g = gumbel_noise(seed, counter, rows, cols, x.device)
    return (x + g).argmax(dim=-1)
