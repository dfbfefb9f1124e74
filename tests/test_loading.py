"""Loading: real safetensors checkpoints written by transformers, and every error path."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flashformer_triton.config import PRESETS, ModelConfig, UnsupportedModelError
from flashformer_triton.loading import (
    CheckpointNotFoundError,
    MissingTensorError,
    ShapeMismatchError,
    config_to_hf_dict,
    expected_shapes,
    load_checkpoint,
    random_state_dict,
    resolve_checkpoint,
    save_checkpoint,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hf_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The HF model's persistent tensors, tied lm_head dropped like save_pretrained does."""
    sd = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def copy_checkpoint(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_single_file(path: Path, edit) -> None:
    """Apply ``edit(dict)`` to the tensors of ``path/model.safetensors`` and write it back."""
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


# Expected tensors.
@pytest.mark.parametrize("family", list(FAMILIES))
def test_expected_shapes_match_transformers(family, hf_checkpoint):
    _, model = hf_checkpoint(family)
    cfg = ModelConfig.from_hf_dict(model.config.to_dict())
    want = {k: tuple(v.shape) for k, v in hf_tensors(model).items()}
    assert expected_shapes(cfg) == want
    assert sum(torch.Size(s).numel() for s in want.values()) == cfg.num_parameters()


def test_expected_shapes_optional_tensors():
    tiny = PRESETS["tiny"]
    names = expected_shapes(tiny)
    assert "lm_head.weight" in names
    assert not any(n.endswith(".bias") or "q_norm" in n for n in names)
    tied = expected_shapes(dataclasses.replace(tiny, tie_word_embeddings=True))
    assert "lm_head.weight" not in tied
    biased = expected_shapes(dataclasses.replace(tiny, qkv_bias=True))
    assert biased["model.layers.1.self_attn.k_proj.bias"] == (tiny.kv_size,)
    normed = expected_shapes(dataclasses.replace(tiny, qk_norm=True))
    assert normed["model.layers.0.self_attn.q_norm.weight"] == (tiny.head_dim,)


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "tiny"])
def test_expected_shapes_real_sizes(name):
    cfg = PRESETS[name]
    shapes = expected_shapes(cfg)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == cfg.num_parameters()
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (cfg.kv_size, cfg.hidden_size)


# Loading real transformers checkpoints.
@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_matches_transformers_fp32(family, hf_checkpoint):
    path, model = hf_checkpoint(family)
    cfg, tensors = load_checkpoint(path, dtype=torch.float32)
    assert cfg == ModelConfig.from_json(path)
    ref = hf_tensors(model)
    assert list(tensors) == list(expected_shapes(cfg))
    assert set(tensors) == set(ref)
    for name, t in tensors.items():
        assert t.dtype == torch.float32 and t.device.type == "cpu", name
        assert torch.equal(t, ref[name]), name


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_load_casts(family, dtype, hf_checkpoint):
    path, model = hf_checkpoint(family)
    _, tensors = load_checkpoint(path, dtype=DTYPES[dtype])
    ref = hf_tensors(model)
    for name, t in tensors.items():
        assert t.dtype == DTYPES[dtype], name
        assert torch.equal(t, ref[name].to(DTYPES[dtype])), name


def test_load_default_dtype_is_bf16_and_strings_accepted(hf_checkpoint):
    path, _ = hf_checkpoint("mistral")
    _, default = load_checkpoint(path)
    _, named = load_checkpoint(path, dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in default.values())
    assert all(torch.equal(default[k], named[k]) for k in default)


def test_load_bf16_checkpoint_to_fp32(hf_checkpoint, tmp_path):
    path, model = hf_checkpoint("qwen2")
    _, bf16 = load_checkpoint(path, dtype=torch.bfloat16)
    out = save_checkpoint(
        tmp_path / "bf16", json.loads(Path(path, "config.json").read_text()), bf16
    )
    _, back = load_checkpoint(out, dtype=torch.float32)
    for name, t in back.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, bf16[name].float()), name


@pytest.mark.parametrize("family", ["llama", "llama3_scaled", "qwen2"])
def test_sharded_loads_identically(family, hf_checkpoint):
    path, _ = hf_checkpoint(family, sharded=True)
    files = sorted(p.name for p in Path(path).glob("*.safetensors"))
    assert len(files) > 1 and (Path(path) / "model.safetensors.index.json").is_file()
    single_path, _ = hf_checkpoint(family)
    cfg1, sharded = load_checkpoint(path, dtype=torch.float32, progress=True)
    cfg2, single = load_checkpoint(single_path, dtype=torch.float32)
    assert cfg1 == cfg2
    assert list(sharded) == list(single)
    assert all(torch.equal(sharded[k], single[k]) for k in single)


def test_tied_embeddings_have_no_lm_head(hf_checkpoint, tmp_path):
    path, model = hf_checkpoint("llama3_scaled")
    cfg, tensors = load_checkpoint(path, dtype=torch.float32)
    assert cfg.tie_word_embeddings
    assert "lm_head.weight" not in tensors
    assert torch.equal(tensors["model.embed_tokens.weight"], model.lm_head.weight)
    # A tied checkpoint that still stores lm_head.weight is accepted (and it is dropped).
    out = copy_checkpoint(path, tmp_path / "with_head")

    def add_head(tensors):
        tensors["lm_head.weight"] = model.lm_head.weight.detach().clone()

    rewrite_single_file(out, add_head)
    _, again = load_checkpoint(out, dtype=torch.float32)
    assert "lm_head.weight" not in again
    assert list(again) == list(tensors)


def test_tied_single_file_with_lm_head(tmp_path):
    cfg = dataclasses.replace(PRESETS["tiny"], tie_word_embeddings=True)
    sd = random_state_dict(cfg)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # shared storage, as in HF
    save_checkpoint(tmp_path, cfg, sd)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" in f.keys()  # noqa: SIM118
    loaded_cfg, tensors = load_checkpoint(tmp_path, dtype=torch.float32)
    assert loaded_cfg == cfg
    assert "lm_head.weight" not in tensors


def test_extra_tensors_ignored(hf_checkpoint, tmp_path):
    path, model = hf_checkpoint("llama")
    out = copy_checkpoint(path, tmp_path / "ckpt")

    def add(tensors):
        tensors["model.rotary_emb.inv_freq"] = model.model.rotary_emb.inv_freq.clone()
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    rewrite_single_file(out, add)
    _, tensors = load_checkpoint(out, dtype=torch.float32)
    assert set(tensors) == set(hf_tensors(model))


def test_save_checkpoint_round_trip(tmp_path):
    cfg = PRESETS["tiny"]
    sd = random_state_dict(cfg, seed=3)
    save_checkpoint(tmp_path / "one", cfg, sd)
    save_checkpoint(tmp_path / "many", cfg, sd, max_shard_size="50KB")
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    assert len(set(index["weight_map"].values())) > 2
    for d in ("one", "many"):
        loaded_cfg, tensors = load_checkpoint(tmp_path / d, dtype=torch.float32)
        assert loaded_cfg == cfg
        assert all(torch.equal(tensors[k], sd[k]) for k in sd), d


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_to_hf_dict_round_trip(name):
    cfg = PRESETS[name]
    assert ModelConfig.from_hf_dict(config_to_hf_dict(cfg)) == cfg


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_to_hf_dict_round_trip_families(family, hf_checkpoint):
    cfg = ModelConfig.from_json(hf_checkpoint(family).path)
    assert ModelConfig.from_hf_dict(config_to_hf_dict(cfg)) == cfg


def test_config_to_hf_dict_is_read_by_transformers():
    import transformers

    cfg = dataclasses.replace(PRESETS["llama-3.2-1b"], eos_token_id=[128001, 128009])
    hf = transformers.LlamaConfig(**config_to_hf_dict(cfg))
    assert hf.rope_parameters["rope_type"] == "llama3"
    assert ModelConfig.from_hf_dict(hf.to_dict()) == cfg


# Errors, each with its message.
def test_missing_tensor(hf_checkpoint, tmp_path):
    out = copy_checkpoint(hf_checkpoint("qwen3").path, tmp_path / "ckpt")
    victim = "model.layers.1.self_attn.k_norm.weight"
    rewrite_single_file(out, lambda t: t.pop(victim))
    with pytest.raises(MissingTensorError) as info:
        load_checkpoint(out)
    msg = str(info.value)
    assert victim in msg and "model.safetensors" in msg and str(out) in msg
    assert isinstance(info.value, KeyError)


def test_missing_tensor_in_shard(hf_checkpoint, tmp_path):
    out = copy_checkpoint(hf_checkpoint("llama", sharded=True).path, tmp_path / "ckpt")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    victim = "model.layers.0.mlp.up_proj.weight"
    shard = out / index["weight_map"][victim]
    tensors = load_file(str(shard))
    del tensors[victim]
    save_file(tensors, str(shard))
    with pytest.raises(MissingTensorError, match=f"{victim}.*missing from {shard.name}"):
        load_checkpoint(out)
    # ... and when the index does not list it either
    del index["weight_map"][victim]
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MissingTensorError, match=f"{victim}.*model.safetensors.index.json"):
        load_checkpoint(out)


def test_missing_lm_head_untied(tmp_path):
    cfg = PRESETS["tiny"]
    sd = random_state_dict(cfg)
    del sd["lm_head.weight"]
    save_checkpoint(tmp_path, cfg, sd)
    with pytest.raises(MissingTensorError, match="'lm_head.weight' is missing"):
        load_checkpoint(tmp_path)


def test_wrong_shape(hf_checkpoint, tmp_path):
    out = copy_checkpoint(hf_checkpoint("llama").path, tmp_path / "ckpt")
    victim = "model.layers.1.self_attn.o_proj.weight"

    def transpose(tensors):
        tensors[victim] = tensors[victim][:, :48].contiguous()

    rewrite_single_file(out, transpose)
    with pytest.raises(ShapeMismatchError) as info:
        load_checkpoint(out)
    msg = str(info.value)
    assert victim in msg and "[96, 48]" in msg and "expected [96, 96]" in msg


def test_only_pickle_weights(hf_checkpoint, tmp_path):
    out = tmp_path / "bin"
    out.mkdir()
    shutil.copy(hf_checkpoint("llama").path / "config.json", out)
    (out / "pytorch_model.bin").write_bytes(b"not loaded, never unpickled")
    with pytest.raises(CheckpointNotFoundError) as info:
        load_checkpoint(out)
    msg = str(info.value)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "Convert" in msg
    assert "safetensors" in msg


def test_no_weights_at_all(hf_checkpoint, tmp_path):
    shutil.copy(hf_checkpoint("llama").path / "config.json", tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no weights in .*model.safetensors"):
        load_checkpoint(tmp_path)


def test_missing_config_json(hf_checkpoint, tmp_path):
    out = copy_checkpoint(hf_checkpoint("llama").path, tmp_path / "ckpt")
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json in .*ckpt"):
        load_checkpoint(out)


def test_unsupported_config_in_checkpoint(hf_checkpoint, tmp_path):
    out = copy_checkpoint(hf_checkpoint("llama").path, tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="hidden_act='gelu'"):
        load_checkpoint(out)


def test_unsupported_quantized_checkpoint_refused(hf_checkpoint, tmp_path):
    """GPTQ/AWQ int4 load (tests/test_quantize.py); other methods are named and refused."""
    out = copy_checkpoint(hf_checkpoint("llama").path, tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="quant_method='bitsandbytes'.*'gptq'"):
        load_checkpoint(out)


def test_integer_tensor_refused(tmp_path):
    cfg = PRESETS["tiny"]
    sd = random_state_dict(cfg)
    sd["model.norm.weight"] = torch.ones(cfg.hidden_size, dtype=torch.int8)
    save_checkpoint(tmp_path, cfg, sd)
    with pytest.raises(UnsupportedModelError, match="'model.norm.weight'.*torch.int8"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.float64, "float8", torch.float8_e4m3fn], ids=str
)
def test_unsupported_dtype(dtype, hf_checkpoint):
    with pytest.raises(ValueError, match="unsupported dtype.*bfloat16, torch.float16 or"):
        load_checkpoint(hf_checkpoint("llama").path, dtype=dtype)
    with pytest.raises(ValueError, match="unsupported dtype"):
        random_state_dict(PRESETS["tiny"], dtype=dtype)


def test_missing_local_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory at"):
        load_checkpoint(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory at"):
        resolve_checkpoint("./does/not/exist")


def test_file_instead_of_directory(hf_checkpoint):
    with pytest.raises(FileNotFoundError, match="is a file; give the checkpoint directory"):
        resolve_checkpoint(str(hf_checkpoint("llama").path / "config.json"))


def test_local_directory_used_as_is(hf_checkpoint):
    path = hf_checkpoint("llama").path
    assert resolve_checkpoint(path) == path
    assert resolve_checkpoint(str(path)) == path


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and offline mode: no network call can happen."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))


def test_hub_id_offline(offline_hub):
    with pytest.raises(CheckpointNotFoundError) as info:
        load_checkpoint("no-such-org/no-such-model", revision="main")
    msg = str(info.value)
    assert "no-such-org/no-such-model (revision main)" in msg
    assert "local Hugging Face cache" in msg and "offline mode" in msg
    assert "local directory" in msg and "check the hub id" in msg and "log in" in msg


def test_invalid_hub_id(offline_hub):
    with pytest.raises(CheckpointNotFoundError, match="neither an existing local directory"):
        resolve_checkpoint("not a valid id!!")


def test_hub_id_from_cache(offline_hub, hf_checkpoint, monkeypatch):
    """A hub id found in the cache resolves through snapshot_download(local_files_only)."""
    import huggingface_hub

    path = hf_checkpoint("llama").path
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return path

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    cfg, tensors = load_checkpoint("some-org/tiny-llama", dtype=torch.float32)
    assert cfg == ModelConfig.from_json(path)
    assert len(calls) == 1
    repo_id, kwargs = calls[0]
    assert repo_id == "some-org/tiny-llama" and kwargs["local_files_only"] is True
    assert "*.safetensors" in kwargs["allow_patterns"]
    assert not any("bin" in p for p in kwargs["allow_patterns"])


def test_hub_download_failure_hint(monkeypatch):
    """Online failures (gated, unknown repo) are reported with what to do."""
    import huggingface_hub
    from huggingface_hub import constants

    class GatedRepoError(Exception):  # stands in for huggingface_hub.errors.GatedRepoError
        pass

    def fake_snapshot_download(repo_id, *, local_files_only, **kwargs):
        if local_files_only:
            raise FileNotFoundError("not in cache")
        raise GatedRepoError("403 Client Error: access to model is restricted")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoint("meta-llama/Llama-3.2-1B")
    msg = str(info.value)
    assert "download from the hub: GatedRepoError" in msg and "accept its licence" in msg
    assert "hf auth login" in msg


# Random weights.
def test_random_state_dict_deterministic():
    cfg = dataclasses.replace(PRESETS["tiny"], qkv_bias=True, qk_norm=True)
    a = random_state_dict(cfg, seed=0)
    b = random_state_dict(cfg, seed=0)
    c = random_state_dict(cfg, seed=1)
    assert {k: tuple(v.shape) for k, v in a.items()} == expected_shapes(cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in a.values())
    # each tensor drawn independently: no two alike
    firsts = {float(v.flatten()[0]) for v in a.values()}
    assert len(firsts) == len(a)


def test_random_state_dict_scales():
    cfg = PRESETS["tiny"]
    sd = random_state_dict(cfg)
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    assert q.std().item() == pytest.approx(cfg.hidden_size**-0.5, rel=0.1)
    down = sd["model.layers.0.mlp.down_proj.weight"]
    assert down.std().item() == pytest.approx(cfg.intermediate_size**-0.5, rel=0.1)
    assert sd["model.embed_tokens.weight"].std().item() == pytest.approx(1.0, rel=0.1)
    norm = sd["model.norm.weight"]
    assert norm.mean().item() == pytest.approx(1.0, abs=0.05) and norm.std().item() > 0.05


def test_random_state_dict_bf16_is_rounded_fp32():
    cfg = PRESETS["tiny"]
    fp32 = random_state_dict(cfg, seed=5)
    bf16 = random_state_dict(cfg, seed=5, dtype=torch.bfloat16)
    assert all(bf16[k].dtype == torch.bfloat16 for k in bf16)
    assert all(torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)


def test_random_tiny_model_has_spread_logits():
    """The built-in tiny default gives non-degenerate logits through a real HF model."""
    import transformers

    cfg = PRESETS["tiny"]
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf_dict(cfg)))
    model.load_state_dict(random_state_dict(cfg, seed=0), strict=True)
    ids = torch.arange(1, 33).reshape(2, 16) * 7 % cfg.vocab_size
    with torch.no_grad():
        logits = model.eval()(ids).logits
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std().item() < 10.0
    top = logits.argmax(-1)
    assert len(set(top.flatten().tolist())) > 8  # not one token everywhere
    probs = logits.softmax(-1)
    assert probs.max().item() < 0.99


def test_random_state_dict_on_device_and_generator_device():
    cfg = PRESETS["tiny"]
    a = random_state_dict(cfg, device="cpu", generator_device="cpu")
    b = random_state_dict(cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.device.type == "cpu" for v in a.values())
