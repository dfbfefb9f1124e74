"""Checkpoint loading: Hugging Face safetensors (single file or sharded) into a flat dict.

Data flow: ``config.py`` says which shapes a model has, this module finds the checkpoint
(local directory or hub id), checks that every tensor the model needs is there with the
right shape, and reads the tensors one at a time, cast to the requested dtype, onto the
requested device. ``weights.py`` packs the result for the kernel.

Only safetensors are read. Pickle files (``pytorch_model*.bin``) are refused: loading
them runs arbitrary code.

The returned dict uses the Hugging Face tensor names (``model.layers.0.self_attn.q_proj.weight``
and so on). With tied word embeddings there is no ``lm_head.weight`` in it: consumers use
``model.embed_tokens.weight``.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flashformer_triton.config import ARCHITECTURES, ModelConfig, UnsupportedModelError
from flashformer_triton.quantize import QuantizedLinear

__all__ = [
    "CheckpointNotFoundError",
    "MissingTensorError",
    "ShapeMismatchError",
    "SUPPORTED_DTYPES",
    "config_to_hf_dict",
    "expected_shapes",
    "load_checkpoint",
    "random_state_dict",
    "resolve_checkpoint",
    "save_checkpoint",
]

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
# Floating dtypes a checkpoint file may hold; anything else (int8 packs, fp8) is refused.
_CHECKPOINT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


class CheckpointNotFoundError(FileNotFoundError):
    """No usable checkpoint at the given path or hub id."""


class MissingTensorError(KeyError):
    """A tensor the model needs is not in the checkpoint."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(ValueError):
    """A tensor in the checkpoint does not have the shape the config implies."""


# Expected tensors.
def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face names and shapes of every tensor a checkpoint of ``config`` must hold.

    The order is the order of the forward pass (embedding, layers, final norm, LM head).
    ``lm_head.weight`` is absent with tied word embeddings.
    """
    d, f, v, hd = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    q, kv = config.q_size, config.kv_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (q, d)
        shapes[p + "self_attn.k_proj.weight"] = (kv, d)
        shapes[p + "self_attn.v_proj.weight"] = (kv, d)
        if config.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        if config.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "self_attn.o_proj.weight"] = (d, q)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.").lower()
        if key not in _DTYPE_NAMES:
            raise ValueError(
                f"unsupported dtype {dtype!r}: use torch.bfloat16, torch.float16 or torch.float32"
            )
        return _DTYPE_NAMES[key]
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"unsupported dtype {dtype}: use torch.bfloat16, torch.float16 or torch.float32"
        )
    return dtype


# Finding the checkpoint.
def _looks_like_path(name: str) -> bool:
    """True for strings that can only be a filesystem path, never a hub id."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith("/")
    )


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def _has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_checkpoint(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """Local directory of a checkpoint: ``name_or_path`` itself, or a hub snapshot.

    A hub id is looked up in the local Hugging Face cache first and downloaded only when
    the cache does not have it (and ``HF_HUB_OFFLINE`` is not set). Only config, tokenizer
    and safetensors files are fetched.
    """
    name = os.fspath(name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointNotFoundError(
            f"{name} is a file; give the checkpoint directory (the one with config.json and "
            "*.safetensors) or a Hugging Face hub id"
        )
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(name):
        raise CheckpointNotFoundError(
            f"no checkpoint directory at {local}: give an existing directory with config.json "
            "and *.safetensors, or a Hugging Face hub id such as 'Qwen/Qwen3-0.6B'"
        )

    from huggingface_hub import snapshot_download

    tried: list[str] = []
    where = f"{name}" + (f" (revision {revision})" if revision else "")
    try:
        path = Path(
            snapshot_download(
                name, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True
            )
        )
        if _has_weights(path):
            return path
        tried.append("local Hugging Face cache: snapshot without config.json or safetensors")
    except Exception as exc:  # not cached, or an invalid id
        if isinstance(exc, FileNotFoundError):
            tried.append("local Hugging Face cache: not there")
        else:
            tried.append(f"local Hugging Face cache: {type(exc).__name__}: {_first_line(exc)}")
        if type(exc).__name__ == "HFValidationError":
            raise CheckpointNotFoundError(
                f"{name!r} is neither an existing local directory nor a valid Hugging Face hub "
                f"id ({_first_line(exc)})"
            ) from exc

    if _hub_offline():
        tried.append("download: skipped, offline mode (HF_HUB_OFFLINE is set)")
    else:
        try:
            path = Path(
                snapshot_download(
                    name, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=False
                )
            )
            return path
        except Exception as exc:
            hint = ""
            kind = type(exc).__name__
            if kind == "GatedRepoError":
                hint = " (gated model: accept its licence on huggingface.co, then log in)"
            elif kind == "RepositoryNotFoundError":
                hint = " (no such repository, or a private one you are not logged in for)"
            elif kind == "RevisionNotFoundError":
                hint = " (no such revision)"
            tried.append(f"download from the hub: {kind}: {_first_line(exc)}{hint}")

    raise CheckpointNotFoundError(
        f"could not find checkpoint {where}. Tried:\n"
        + "".join(f"  - {t}\n" for t in tried)
        + "What to do: give a local directory holding config.json and *.safetensors; or check "
        "the hub id (and revision); for gated or private models log in with `hf auth login` "
        "(or set HF_TOKEN); to download, unset HF_HUB_OFFLINE and make sure huggingface.co "
        "is reachable."
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# Reading.
def _weight_files(path: Path) -> tuple[dict[str, str] | None, list[Path]]:
    """(weight_map from the index or None, safetensors files to read)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointNotFoundError(
                f"{index} is not a valid safetensors index: {exc}"
            ) from exc
        files = sorted({path / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointNotFoundError(
                f"{index} names shard(s) that are not in {path}: {', '.join(absent)}"
            )
        return dict(weight_map), files
    if (path / SINGLE_FILE).is_file():
        return None, [path / SINGLE_FILE]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return None, others
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise CheckpointNotFoundError(
            f"{path} holds only PyTorch pickle weights ({', '.join(pickles[:3])}"
            f"{', ...' if len(pickles) > 3 else ''}); pickle files are not loaded because they "
            "can run arbitrary code. Convert the checkpoint to safetensors first, e.g. "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, "
            "safe_serialization=True)`."
        )
    raise CheckpointNotFoundError(
        f"no weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards (a "
        "model published only as pytorch_model*.bin must be converted to safetensors first)"
    )


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=total, desc=desc, unit="tensor")


def load_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    progress: bool = False,
) -> tuple[ModelConfig, dict[str, torch.Tensor | QuantizedLinear]]:
    """Read a Hugging Face checkpoint: its ``ModelConfig`` and its tensors.

    A pre-quantized GPTQ or AWQ checkpoint (int4, ``quantization_config`` in config.json)
    gives its projection matrices as ``quantize.QuantizedLinear`` values under the usual
    ``<prefix>.weight`` names, converted exactly (``quant_formats``); other tensors as usual.

    Tensors are read one at a time from the safetensors file(s), cast to ``dtype`` and
    moved to ``device``, so the host never holds more than one tensor beyond what the
    caller keeps. Tensors the model does not use are skipped; ``lm_head.weight`` is left
    out when the word embeddings are tied.

    Raises:
        CheckpointNotFoundError: no directory / hub snapshot, no config.json, no safetensors.
        MissingTensorError: a tensor the config needs is not in the checkpoint.
        ShapeMismatchError: a tensor has another shape than the config implies.
        UnsupportedModelError: the config (or a quantised checkpoint) is not supported.
        ValueError: ``dtype`` is not bfloat16, float16 or float32.
    """
    from safetensors import safe_open

    dtype = _check_dtype(dtype)
    path = resolve_checkpoint(name_or_path, revision=revision)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointNotFoundError(
            f"no config.json in {path}: a checkpoint directory needs config.json next to its "
            "*.safetensors files"
        )
    raw = json.loads(config_file.read_text())
    qcfg = raw.get("quantization_config") or None
    if qcfg is not None:
        from flashformer_triton import quant_formats

        quant_formats.scheme_from_quantization_config(qcfg)  # unsupported -> clear error
    config = ModelConfig.from_hf_dict(raw)
    config_shapes = expected_shapes(config)
    shapes: dict[str, tuple[int, ...] | None] = dict(config_shapes)
    weight_map, files = _weight_files(path)
    # Pre-quantized (GPTQ/AWQ): each quantized linear is read as its packed tensors (shapes
    # checked by the converter) and converted to a QuantizedLinear after reading.
    quantized: dict[str, tuple[int, int]] = {}  # prefix -> (out, in) features
    optional: set[str] = set()
    if qcfg is not None:
        stored = set(weight_map) if weight_map is not None else _tensor_names(files)
        for prefix in quant_formats.quantized_linear_prefixes(config.num_layers, stored):
            weight = f"{prefix}.weight"
            # (a tied checkpoint's quantized LM head is not among the config's tensors)
            quantized[prefix] = (config_shapes.get(weight)
                                 or (config.vocab_size, config.hidden_size))
            shapes.pop(weight, None)
            for name in quant_formats.quantized_tensor_names(prefix, qcfg):
                shapes[name] = None
            if f"{prefix}.g_idx" in shapes:
                optional.add(f"{prefix}.g_idx")  # older GPTQ checkpoints leave it out

    # Which file holds which tensor.
    location: dict[str, Path] = {}
    if weight_map is not None:
        for name in shapes:
            if name in weight_map:
                location[name] = path / weight_map[name]
    else:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    if name in shapes and name not in location:
                        location[name] = file
    for name in optional - set(location):
        del shapes[name]
    missing = [n for n in shapes if n not in location]
    if missing:
        searched = INDEX_FILE if weight_map is not None else ", ".join(f.name for f in files)
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingTensorError(
            f"tensor {missing[0]!r}{more} is missing from the checkpoint in {path} "
            f"(searched: {searched})"
        )

    out: dict[str, torch.Tensor] = {}
    bar = _progress(len(shapes), progress, f"loading {path.name}")
    try:
        for file in files:
            names = [n for n in shapes if location[n] == file]
            if not names:
                continue
            with safe_open(str(file), framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise MissingTensorError(
                            f"tensor {name!r} is missing from {file.name} in {path} "
                            f"({INDEX_FILE} says it is there)"
                        )
                    found = tuple(f.get_slice(name).get_shape())
                    if shapes[name] is None:  # packed quantized tensor: read as stored
                        out[name] = f.get_tensor(name)
                        if bar is not None:
                            bar.update(1)
                        continue
                    if found != shapes[name]:
                        raise ShapeMismatchError(
                            f"tensor {name!r} in {file.name} has shape {list(found)}, expected "
                            f"{list(shapes[name])} for {config.summary()}"
                        )
                    tensor = f.get_tensor(name)
                    if tensor.dtype not in _CHECKPOINT_DTYPES:
                        raise UnsupportedModelError(
                            f"tensor {name!r} in {file.name} is {tensor.dtype}; only float "
                            "checkpoints (bf16, fp16, fp32) are supported"
                        )
                    out[name] = tensor.to(device=device, dtype=dtype)
                    del tensor
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    state: dict[str, torch.Tensor | QuantizedLinear] = {
        name: out[name] for name, shape in shapes.items() if shape is not None
    }
    for prefix, (out_features, in_features) in quantized.items():
        packed = {n: out.pop(n) for n in quant_formats.quantized_tensor_names(prefix, qcfg)
                   if n in out}  # (g_idx is optional)
        state[f"{prefix}.weight"] = quant_formats.convert_linear(
            qcfg, packed, prefix, in_features, out_features
        ).to(device)
    return config, state


def _tensor_names(files: list[Path]) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


# Random weights.
def _tensor_seed(seed: int, name: str) -> int:
    # Stable across runs and Python versions (unlike hash()); each tensor independent of
    # which other tensors exist.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def random_state_dict(
    config: ModelConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    generator_device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Deterministic random weights for every tensor of ``expected_shapes(config)``.

    Scales keep activations and logits well spread for any depth that RMSNorm tames:
    projection matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm weights 1 + 0.1 N(0, 1),
    biases 0.1 N(0, 1). With tied embeddings the shared matrix is N(0, 1/hidden) so the
    logits keep a unit-ish scale.

    Each tensor is drawn in fp32 by its own generator seeded from ``(seed, name)`` on
    ``generator_device`` (default: ``device``) and then cast, so the bf16 weights are the
    fp32 weights rounded, and real-size models are created directly on a GPU one tensor
    at a time. Different generator devices (CPU vs CUDA) give different numbers; pass
    ``generator_device="cpu"`` for weights identical on every machine (small models).
    """
    dtype = _check_dtype(dtype)
    device = torch.device(device)
    gen_device = torch.device(generator_device) if generator_device is not None else device
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(config).items():
        gen = torch.Generator(device=gen_device)
        gen.manual_seed(_tensor_seed(seed, name))
        t = torch.randn(shape, generator=gen, device=gen_device, dtype=torch.float32)
        if name.endswith("norm.weight"):
            t.mul_(0.1).add_(1.0)
        elif name.endswith(".bias"):
            t.mul_(0.1)
        elif name == "model.embed_tokens.weight":
            if config.tie_word_embeddings:
                t.mul_(config.hidden_size**-0.5)
        else:  # [out, in] projection
            t.mul_(shape[1] ** -0.5)
        out[name] = t.to(device=device, dtype=dtype)
        del t
    return out


# Writing (tests, the tiny demo).
def config_to_hf_dict(config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict that ``ModelConfig.from_hf_dict`` reads back equal.

    Uses the transformers-4 layout (``rope_theta`` + ``rope_scaling``), which transformers 5
    still reads.
    """
    arch = {family: name for name, family in ARCHITECTURES.items()}[config.family]
    d: dict[str, Any] = {
        "architectures": [arch],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": config.torch_dtype,
        "sliding_window": config.sliding_window,
    }
    if config.qkv_bias != (config.family == "qwen2"):
        raise UnsupportedModelError(
            f"a {config.family} config.json cannot express qkv_bias={config.qkv_bias}"
        )
    if config.family in ("qwen2", "qwen3"):
        d["use_sliding_window"] = config.sliding_window is not None
    if config.eos_token_id:
        ids = config.eos_token_id
        d["eos_token_id"] = ids[0] if len(ids) == 1 else list(ids)
    return d


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"cannot read shard size {size!r} (use bytes or e.g. '200KB', '5GB')")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def save_checkpoint(
    directory: str | os.PathLike,
    config: ModelConfig | Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    *,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write ``config.json`` and safetensors weights (sharded with an index if asked).

    ``config`` is a ``ModelConfig`` (converted with ``config_to_hf_dict``) or a ready
    ``config.json`` dict. Returns the directory.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf_dict(config) if isinstance(config, ModelConfig) else dict(config)
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in state_dict.items():
        t = t.detach().to("cpu").contiguous()
        if t.data_ptr() in seen and t.numel():  # shared storage (tied weights): own copy
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[name] = t

    metadata = {"format": "pt"}
    if max_shard_size is None:
        save_file(tensors, str(out / SINGLE_FILE), metadata=metadata)
        return out

    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out
