"""Autotuning of the decode kernel's tiles, and the store of what was found.

``flashformer-triton autotune`` times a small set of tile candidates (``plan.Tiles`` fields)
for one model shape and batch on the local GPU and keeps the fastest in a JSON file keyed by
(GPU name, model shape signature, batch, dtype). ``load_tuned_tiles`` reads that file back;
``plan.make_plan`` consults it when no tiles are given.

The store: ``$FLASHFORMER_TUNING`` if set (``off``, ``none``, ``0`` or an empty value turn
the lookup off), else ``~/.cache/flashformer_triton/tuning.json``::

    {"version": 1,
     "entries": {
      "NVIDIA H100 80GB HBM3|llama:l16:d2048:f8192:h32:kv8:hd64:v128256:tied|b1|bfloat16":
       {"gpu": ..., "shape": ..., "batch": 1, "dtype": "bfloat16",
        "tiles": {"o_rows": 8, ...}, "ms": 1.31, "default_ms": 1.34, ...}}}

Everything but the GPU timer (``kernel_timer``) and ``autotune`` is plain Python, so the
search logic is tested on a CPU with a fake timing function.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flashformer_triton.config import ModelConfig

ENV_VAR = "FLASHFORMER_TUNING"
DEFAULT_PATH = Path("~/.cache/flashformer_triton/tuning.json")
FORMAT_VERSION = 1
_OFF = ("", "0", "off", "none", "false", "no")

# The fields the autotuner turns, in the order coordinate search visits them (the per-stage
# row tiles first: they matter most at batch 1, bench/NOTES.md rows 11-17).
TUNED_FIELDS = (
    "o_rows",
    "down_rows",
    "gate_up_rows",
    "qkv_rows",
    "block_k",
    "programs_per_sm",
    "pipeline_stages",
)
ROW_FIELDS = ("o_rows", "down_rows", "gate_up_rows", "qkv_rows")
BLOCK_K = (256, 512, 1024)
PROGRAMS_PER_SM = (1, 2)
PIPELINE_STAGES = (2, 3)

Overrides = dict[str, int]
TimeFn = Callable[[Overrides], float]


class TuningWarning(UserWarning):
    """The tuning file exists but cannot be used (unreadable, not JSON, another version)."""


class SearchAborted(RuntimeError):
    """Raised by a timing function when no further candidate can run (a broken CUDA context):
    the search stops and keeps the best found so far."""


# Keys.


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"`` (the key's dtype part)."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    text = str(dtype).strip().removeprefix("torch.")
    return _DTYPE_ALIASES.get(text.lower(), text)


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32"}


def shape_signature(config: ModelConfig) -> str:
    """What the kernel is specialised on, as one string: family (qkv bias, qk-norm), layers,
    hidden, ffn, heads, kv heads, head dim, vocab, tied embeddings. Checkpoints of one shape
    (a base model and its instruct tune) share their tuned tiles."""
    parts = [
        config.family,
        f"l{config.num_layers}",
        f"d{config.hidden_size}",
        f"f{config.intermediate_size}",
        f"h{config.num_heads}",
        f"kv{config.num_kv_heads}",
        f"hd{config.head_dim}",
        f"v{config.vocab_size}",
    ]
    if config.tie_word_embeddings:
        parts.append("tied")
    if config.qkv_bias:
        parts.append("qkvbias")
    if config.qk_norm:
        parts.append("qknorm")
    return ":".join(parts)


def tuning_key(gpu_name: str, config: ModelConfig, batch: int, dtype: torch.dtype | str) -> str:
    """The store's key of one (GPU, model shape, batch, dtype)."""
    return f"{gpu_name.strip()}|{shape_signature(config)}|b{int(batch)}|{dtype_name(dtype)}"


def tuning_path(path: str | os.PathLike | None = None) -> Path | None:
    """The store's path: ``path`` if given, else ``$FLASHFORMER_TUNING``, else the default;
    ``None`` when the environment variable turns tuning off."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR)
    if env is not None:
        if env.strip().lower() in _OFF:
            return None
        return Path(env).expanduser()
    return DEFAULT_PATH.expanduser()


# The store.

_cache: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}


def load_store(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The store's entries (``{}`` when it is absent or off). An unusable file gives a
    ``TuningWarning`` and ``{}``: a broken cache must never stop a model from running."""
    p = tuning_path(path)
    if p is None or not p.is_file():
        return {}
    try:
        stat = p.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = _cache.get(p)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        warnings.warn(f"ignoring the tuning file {p}: {exc}", TuningWarning, stacklevel=2)
        return {}
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        warnings.warn(
            f"ignoring the tuning file {p}: format version {version!r}, this version reads "
            f"{FORMAT_VERSION} (run `flashformer-triton autotune` again)",
            TuningWarning,
            stacklevel=2,
        )
        return {}
    entries = data.get("entries")
    entries = entries if isinstance(entries, dict) else {}
    _cache[p] = (stamp, entries)
    return entries


def save_entry(key: str, entry: dict[str, Any], path: str | os.PathLike | None = None) -> Path:
    """Add or replace one entry, keeping the others; written atomically. Returns the path."""
    p = tuning_path(path)
    if p is None:
        raise ValueError(
            f"tuning is turned off (${ENV_VAR}={os.environ.get(ENV_VAR)!r}); give a path"
        )
    entries = dict(load_store(p)) if p.is_file() else {}
    entries[key] = entry
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"version": FORMAT_VERSION, "entries": entries}, indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name, suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _cache.pop(p, None)
    return p


def _valid_fields() -> set[str]:
    from dataclasses import fields

    from flashformer_triton.plan import Tiles  # lazy: plan.py imports this module

    return {f.name for f in fields(Tiles)}


def load_tuned_tiles(
    gpu_name: str,
    config: ModelConfig,
    batch: int,
    dtype: torch.dtype | str,
    *,
    path: str | os.PathLike | None = None,
) -> dict[str, int] | None:
    """Tile overrides stored by ``autotune`` for this GPU, model shape, batch and dtype, or
    ``None`` (nothing stored, tuning off, unusable file). Only ``plan.Tiles`` fields with
    integer values are returned, so an entry of an older version cannot break ``make_plan``."""
    entry = load_store(path).get(tuning_key(gpu_name, config, batch, dtype))
    if not isinstance(entry, dict) or not isinstance(entry.get("tiles"), dict):
        return None
    valid = _valid_fields()
    tiles = {
        k: int(v)
        for k, v in entry["tiles"].items()
        if k in valid and isinstance(v, int) and not isinstance(v, bool)
    }
    return tiles or None


# Candidates.


def candidate_space(config: ModelConfig, batch: int) -> dict[str, tuple[int, ...]]:
    """Values each tuned field may take for this shape and batch. Row tiles are 8 or 16 at
    batch 1 and 16 otherwise (batch > 1 multiplies on tensor cores, which need 16 rows)."""
    rows = (8, 16) if batch == 1 else (16,)
    space: dict[str, tuple[int, ...]] = {}
    for name in ROW_FIELDS:
        if name == "qkv_rows":
            choices = tuple(r for r in rows if r <= config.head_dim and config.head_dim % r == 0)
            if not choices:
                continue
            space[name] = choices
        else:
            space[name] = rows
    space["block_k"] = BLOCK_K
    space["programs_per_sm"] = PROGRAMS_PER_SM
    space["pipeline_stages"] = PIPELINE_STAGES
    return {name: space[name] for name in TUNED_FIELDS if name in space}


def grid_candidates(space: dict[str, tuple[int, ...]]) -> list[Overrides]:
    """Every combination (the full product: 192 at batch 1 for a Llama shape)."""
    names = list(space)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*space.values())]


def coordinate_candidates(
    space: dict[str, tuple[int, ...]], base: Overrides
) -> list[Overrides]:
    """The first pass of coordinate search seen from ``base``: each field's other values with
    the rest at ``base`` (what ``--list`` shows; the search itself moves ``base`` as it goes)."""
    out = []
    for name, values in space.items():
        for value in values:
            if value != base.get(name):
                out.append({**base, name: value})
    return out


def _canonical(overrides: Overrides) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(overrides.items()))


@dataclass
class Trial:
    tiles: Overrides  # the full setting of the tuned fields
    ms: float | None  # None: it failed
    error: str = ""


@dataclass
class TuneResult:
    best: Overrides  # the full setting of the tuned fields
    best_ms: float
    default: Overrides
    default_ms: float
    trials: list[Trial] = field(default_factory=list)
    stopped: str = ""  # why the search ended early ("" when it finished)

    @property
    def speedup(self) -> float:
        return self.default_ms / self.best_ms

    def changed(self) -> Overrides:
        """The fields whose best value differs from the default."""
        return {k: v for k, v in self.best.items() if self.default.get(k) != v}


def search(
    space: dict[str, tuple[int, ...]],
    default: Overrides,
    time_fn: TimeFn,
    *,
    strategy: str = "coordinate",
    passes: int = 2,
    min_gain: float = 0.005,
    budget_s: float | None = None,
    max_trials: int | None = None,
    log: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> TuneResult:
    """Find the fastest setting of the fields of ``space``.

    ``default`` holds the current value of every field (the plan's defaults); it is timed
    first and is the answer unless a candidate is faster by more than ``min_gain`` (a
    fraction: noise must not move the tiles). ``time_fn(setting)`` returns ms per step or
    raises (the candidate is recorded as failed and skipped). ``coordinate``: one field at a
    time, the others at the best so far, repeated until a pass changes nothing (at most
    ``passes``); ``grid``: every combination. ``budget_s`` / ``max_trials`` end the search
    early with the best found so far."""
    if strategy not in ("coordinate", "grid"):
        raise ValueError(f"strategy must be 'coordinate' or 'grid', got {strategy!r}")
    missing = [name for name in space if name not in default]
    if missing:
        raise ValueError(f"default has no value for {missing}")
    default = {name: int(default[name]) for name in space}
    start = clock()
    trials: list[Trial] = []
    seen: dict[tuple, Trial] = {}
    say = log or (lambda message: None)

    def out_of_time() -> str:
        if max_trials is not None and len(trials) >= max_trials:
            return f"max_trials={max_trials} reached"
        if budget_s is not None and clock() - start >= budget_s:
            return f"time budget of {budget_s:.0f} s used"
        return ""

    def run(setting: Overrides) -> Trial:
        key = _canonical(setting)
        if key in seen:
            return seen[key]
        try:
            ms = float(time_fn(dict(setting)))
            if not math.isfinite(ms) or ms <= 0:
                raise ValueError(f"timing returned {ms}")
            trial = Trial(dict(setting), ms)
        except SearchAborted:
            raise
        except Exception as exc:  # a setting that does not compile, hangs or is invalid
            trial = Trial(dict(setting), None, f"{type(exc).__name__}: {str(exc)[:300]}")
        trials.append(trial)
        seen[key] = trial
        changed = {k: v for k, v in setting.items() if default.get(k) != v}
        what = ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"
        say(f"{what:<60} " + (f"{trial.ms:8.3f} ms" if trial.ms else f"failed: {trial.error}"))
        return trial

    base = run(default)
    if base.ms is None:
        raise RuntimeError(f"the default tiles failed: {base.error}")
    best, best_ms, stopped = dict(default), base.ms, ""

    def better(trial: Trial) -> bool:
        return trial.ms is not None and trial.ms < best_ms * (1 - min_gain)

    def settings():
        """The candidates in search order, reading `best` as it moves."""
        if strategy == "grid":
            yield from grid_candidates(space)
            return
        for _ in range(max(1, passes)):
            before = dict(best)
            for name, values in space.items():
                for value in values:
                    if value != best[name]:
                        yield {**best, name: value}
            if best == before:  # a whole pass changed nothing
                return

    try:
        for setting in settings():
            if (stopped := out_of_time()):
                break
            trial = run(setting)
            if better(trial):
                best, best_ms = dict(setting), trial.ms
    except SearchAborted as exc:
        stopped = f"aborted: {exc}"
    return TuneResult(best, best_ms, default, base.ms, trials, stopped)


# The GPU side.


def time_cuda(fn: Callable[[], None], *, inner: int = 10, repeats: int = 9,
              warmup: int = 2) -> float:
    """Median ms per call of ``fn`` over ``repeats`` groups of ``inner`` back-to-back calls,
    each group timed with two CUDA events."""
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


@dataclass
class KernelTimer:
    """Times one decode step of the kernel for tile settings: random weights of the shape
    packed once, one KV cache, a fresh plan and runtime per setting."""

    config: ModelConfig
    batch: int
    dtype: torch.dtype
    pos: int
    max_seq_len: int
    device: torch.device
    gpu: Any = None  # plan.GpuSpec
    default: Overrides = field(default_factory=dict)
    _weights: Any = None
    _k: Any = None
    _v: Any = None

    @classmethod
    def build(cls, config: ModelConfig, *, batch: int, dtype: torch.dtype = torch.bfloat16,
              pos: int = 512, max_seq_len: int | None = None,
              device: torch.device | str = "cuda", seed: int = 0) -> KernelTimer:
        from dataclasses import asdict

        from flashformer_triton.loading import random_state_dict
        from flashformer_triton.plan import GpuSpec, default_tiles
        from flashformer_triton.weights import pack_weights

        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError("autotuning times the kernel on a GPU: CUDA is not available")
        max_seq_len = max_seq_len or max(1024, pos + 64)
        if pos >= max_seq_len:
            raise ValueError(f"pos={pos} must be below max_seq_len={max_seq_len}")
        gpu = GpuSpec.current(device)
        defaults = asdict(default_tiles(config, batch, max_seq_len, gpu))
        state = random_state_dict(config, seed=seed, dtype=dtype, device=device)
        weights = pack_weights(config, state, dtype=dtype, device=device)
        del state
        shape = (config.num_layers, batch, config.num_kv_heads, max_seq_len, config.head_dim)
        k = torch.randn(shape, dtype=dtype, device=device)
        v = torch.randn_like(k)
        torch.cuda.empty_cache()
        timer = cls(config, batch, dtype, pos, max_seq_len, device, gpu,
                    {name: defaults[name] for name in TUNED_FIELDS})
        timer._weights, timer._k, timer._v = weights, k, v
        return timer

    def __call__(self, setting: Overrides) -> float:
        from flashformer_triton.plan import default_tiles, make_plan
        from flashformer_triton.runtime import DecodeRuntime

        # The defaults passed explicitly: tuned tiles already in the store must not leak in.
        base = default_tiles(self.config, self.batch, self.max_seq_len, self.gpu)
        plan = make_plan(self.config, batch=self.batch, max_seq_len=self.max_seq_len,
                         dtype=self.dtype, gpu=self.gpu, tiles=base, **setting)
        runtime = DecodeRuntime(self.config, self._weights, plan, self._k, self._v)
        runtime.ids.random_(0, self.config.vocab_size)
        runtime.pos.fill_(self.pos)
        try:
            runtime.launch()  # compiles
            runtime.check()
            ms = time_cuda(runtime.launch)
            runtime.check()
        except Exception as exc:
            try:
                torch.cuda.synchronize()
            except Exception as broken:  # the CUDA context is gone: no later candidate can run
                raise SearchAborted(f"{type(broken).__name__}: {broken}") from exc
            raise
        return ms


def autotune(
    config: ModelConfig,
    *,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    pos: int = 512,
    max_seq_len: int | None = None,
    strategy: str = "coordinate",
    budget_s: float | None = None,
    max_trials: int | None = None,
    device: torch.device | str = "cuda",
    log: Callable[[str], None] | None = None,
    time_fn: TimeFn | None = None,
    default: Overrides | None = None,
) -> TuneResult:
    """Search the tiles of one shape and batch on the GPU (``time_fn`` and ``default``
    replace the GPU timer and the plan's defaults, for tests)."""
    space = candidate_space(config, batch)
    if time_fn is None:
        timer = KernelTimer.build(config, batch=batch, dtype=dtype, pos=pos,
                                  max_seq_len=max_seq_len, device=device)
        time_fn, default = timer, timer.default
    if default is None:
        raise ValueError("a custom time_fn needs the default tiles")
    return search(space, default, time_fn, strategy=strategy, budget_s=budget_s,
                  max_trials=max_trials, log=log)


def make_entry(result: TuneResult, *, gpu_name: str, config: ModelConfig, batch: int,
               dtype: torch.dtype | str, pos: int, max_seq_len: int | None,
               strategy: str) -> dict[str, Any]:
    """The stored record of one search: the winning tiles plus how they were found."""
    import triton

    failed = [t for t in result.trials if t.ms is None]
    return {
        "gpu": gpu_name,
        "shape": shape_signature(config),
        "batch": int(batch),
        "dtype": dtype_name(dtype),
        "tiles": dict(result.best),
        "ms": result.best_ms,
        "default_tiles": dict(result.default),
        "default_ms": result.default_ms,
        "speedup": result.speedup,
        "pos": pos,
        "max_seq_len": max_seq_len,
        "strategy": strategy,
        "trials": len(result.trials),
        "failed": len(failed),
        "stopped": result.stopped,
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", "?"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def format_trials(trials: Iterable[Trial], default: Overrides) -> str:
    """One line per trial, fastest first, failures last."""
    done = sorted((t for t in trials if t.ms is not None), key=lambda t: t.ms)
    failed = [t for t in trials if t.ms is None]
    lines = []
    for t in done + failed:
        changed = {k: v for k, v in t.tiles.items() if default.get(k) != v}
        what = ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"
        lines.append(f"  {what:<60} " + (f"{t.ms:8.3f} ms" if t.ms else f"failed: {t.error}"))
    return "\n".join(lines)
