"""ModelConfig: reading Hugging Face configs, RoPE frequencies, and every refusal."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import FAMILIES, build_hf_model, hf_config

from flashformer_triton.config import PRESETS, ModelConfig, UnsupportedModelError, preset

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llama_dict(**overrides):
    """A plain transformers-4 style Llama config.json dict."""
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 263,
        "hidden_size": 96,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
    }
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not ...}


# Reading the configs of each family.
@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_transformers_config(family):
    fam = FAMILIES[family]
    hf = hf_config(family)
    cfg = ModelConfig.from_hf_dict(hf.to_dict())
    kw = fam.kwargs
    assert cfg.family == fam.ours
    assert cfg.vocab_size == kw["vocab_size"]
    assert cfg.hidden_size == kw["hidden_size"]
    assert cfg.intermediate_size == kw["intermediate_size"]
    assert cfg.num_layers == kw["num_hidden_layers"]
    assert cfg.num_heads == kw["num_attention_heads"]
    assert cfg.num_kv_heads == kw["num_key_value_heads"]
    assert cfg.group_size == kw["num_attention_heads"] // kw["num_key_value_heads"] > 1
    assert cfg.head_dim == kw.get("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
    assert cfg.rms_norm_eps == kw["rms_norm_eps"]
    assert cfg.rope_theta == kw["rope_theta"]
    assert cfg.tie_word_embeddings == kw["tie_word_embeddings"]
    assert cfg.qkv_bias == (family == "qwen2")
    assert cfg.qk_norm == (family == "qwen3")
    assert cfg.sliding_window is None
    assert cfg.rope_scaling == kw.get("rope_scaling")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_saved_config_json(family, hf_checkpoint):
    path, model = hf_checkpoint(family)
    cfg = ModelConfig.from_json(path)
    assert cfg == ModelConfig.from_hf_dict(model.config.to_dict())
    assert cfg == ModelConfig.from_json(f"{path}/config.json")
    assert cfg.torch_dtype == "float32"


def test_qwen3_head_dim_is_explicit():
    cfg = ModelConfig.from_hf_dict(hf_config("qwen3").to_dict())
    assert cfg.head_dim == 32
    assert cfg.q_size == 128 != cfg.hidden_size
    assert cfg.kv_size == 64
    assert cfg.qkv_size == 256


def test_head_dim_defaults_to_hidden_over_heads():
    cfg = ModelConfig.from_hf_dict(llama_dict())
    assert cfg.head_dim == 16
    assert cfg.num_kv_heads == 2


def test_kv_heads_default_to_heads():
    cfg = ModelConfig.from_hf_dict(llama_dict(num_key_value_heads=...))
    assert cfg.num_kv_heads == cfg.num_heads == 6
    assert cfg.group_size == 1


def test_attention_bias():
    # Llama/Qwen3 attention_bias=true also puts a bias on o_proj: refused (see UNSUPPORTED).
    assert not ModelConfig.from_hf_dict(llama_dict(attention_bias=False)).qkv_bias
    # Mistral and Qwen2 ignore the field in transformers (Qwen2 always has q/k/v bias).
    mistral = llama_dict(architectures=["MistralForCausalLM"], attention_bias=True)
    assert not ModelConfig.from_hf_dict(mistral).qkv_bias
    qwen2 = llama_dict(architectures=["Qwen2ForCausalLM"], attention_bias=False)
    assert ModelConfig.from_hf_dict(qwen2).qkv_bias


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_bias_refused_matches_transformers(family):
    """transformers really adds an o_proj bias for attention_bias=true: we must refuse."""
    model = build_hf_model(family, attention_bias=True)
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    with pytest.raises(UnsupportedModelError, match="attention_bias=true is not supported"):
        ModelConfig.from_hf_dict(model.config.to_dict())


def test_model_type_without_architectures():
    cfg = ModelConfig.from_hf_dict(llama_dict(architectures=..., model_type="qwen2"))
    assert cfg.family == "qwen2"
    assert cfg.qkv_bias


@pytest.mark.parametrize(
    "eos, expected",
    [(None, []), (2, [2]), ([128001, 128009], [128001, 128009])],
    ids=["none", "int", "list"],
)
def test_eos_token_id(eos, expected):
    assert ModelConfig.from_hf_dict(llama_dict(eos_token_id=eos)).eos_token_id == expected


# RoPE scaling in both layouts.
ROPE_LAYOUTS = {
    "transformers5-rope_parameters": dict(
        rope_theta=..., rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0}
    ),
    "transformers4-rope_scaling": dict(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING)),
    "transformers4-legacy-type-key": dict(
        rope_theta=500000.0,
        rope_scaling={
            "type": "llama3",
            **{k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"},
        },
    ),
    "transformers5-read-from-legacy": dict(
        rope_theta=...,
        rope_parameters={"type": "llama3", **LLAMA3_SCALING, "rope_theta": 500000.0},
    ),
}


@pytest.mark.parametrize("layout", list(ROPE_LAYOUTS))
def test_llama3_rope_scaling_layouts(layout):
    cfg = ModelConfig.from_hf_dict(llama_dict(**ROPE_LAYOUTS[layout]))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == LLAMA3_SCALING


@pytest.mark.parametrize(
    "layout",
    [
        dict(rope_theta=123.0),
        dict(rope_theta=..., rope_parameters={"rope_type": "default", "rope_theta": 123.0}),
        dict(rope_theta=123.0, rope_scaling=None),
        dict(rope_theta=123.0, rope_scaling={"rope_type": "default"}),
    ],
    ids=["rope_theta-only", "rope_parameters-default", "rope_scaling-null", "rope_scaling-default"],
)
def test_default_rope_has_no_scaling(layout):
    cfg = ModelConfig.from_hf_dict(llama_dict(**layout))
    assert cfg.rope_theta == 123.0
    assert cfg.rope_scaling is None


def test_linear_rope_scaling():
    cfg = ModelConfig.from_hf_dict(llama_dict(rope_scaling={"type": "linear", "factor": 4.0}))
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}


ROPE_CASES = {
    "llama-default": ("llama", {}),
    "llama3-scaled": ("llama3_scaled", {}),
    "llama3-8b-shape": (
        "llama",
        dict(head_dim=128, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING)),
    ),
    "linear": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "qwen3": ("qwen3", {}),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_inv_freq_matches_transformers(case):
    import importlib

    import transformers

    family, overrides = ROPE_CASES[case]
    hf = hf_config(family, **overrides)
    model_class = FAMILIES[family].model_class
    module = importlib.import_module(getattr(transformers, model_class).__module__)
    rotary_cls = getattr(module, model_class.replace("ForCausalLM", "RotaryEmbedding"))
    ref = rotary_cls(hf).inv_freq
    ours = ModelConfig.from_hf_dict(hf.to_dict()).rope_inv_freq()
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape == (hf.head_dim // 2,)
    rel = ((ours.double() - ref.double()).abs() / ref.double().abs()).max().item()
    assert rel <= 1e-6, f"max relative difference {rel:.2e}"


def test_rope_inv_freq_matches_saved_model(hf_checkpoint):
    path, model = hf_checkpoint("llama3_scaled")
    ours = ModelConfig.from_json(path).rope_inv_freq()
    torch.testing.assert_close(ours, model.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    # all three llama3 bands occur: kept, blended and slowed by `factor`
    plain = ModelConfig.from_json(path)
    plain = dataclasses.replace(plain, rope_scaling=None).rope_inv_freq()
    ratio = plain / ours
    assert torch.isclose(ratio, torch.tensor(1.0)).any()
    assert torch.isclose(ratio, torch.tensor(8.0)).any()
    assert ((ratio > 1.01) & (ratio < 7.99)).any()


# Sliding windows: recorded, not refused, at config time.
def test_mistral_sliding_window_is_recorded():
    cfg = ModelConfig.from_hf_dict(hf_config("mistral", sliding_window=4096).to_dict())
    assert cfg.sliding_window == 4096


def test_mistral_without_sliding_window():
    assert ModelConfig.from_hf_dict(hf_config("mistral").to_dict()).sliding_window is None


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_sliding_window_unused(family):
    d = hf_config(family, use_sliding_window=False, sliding_window=4096).to_dict()
    d["sliding_window"] = 4096  # as in released Qwen2.5 config.json files
    assert ModelConfig.from_hf_dict(d).sliding_window is None


def test_qwen2_sliding_window_used():
    d = hf_config("qwen2").to_dict()
    d.update(use_sliding_window=True, sliding_window=4096, layer_types=None)
    assert ModelConfig.from_hf_dict(d).sliding_window == 4096


def test_layer_types_all_full_attention_means_no_window():
    d = llama_dict(model_type="mistral", architectures=["MistralForCausalLM"])
    d.update(sliding_window=4096, layer_types=["full_attention"] * 2)
    assert ModelConfig.from_hf_dict(d).sliding_window is None


# Every refusal, with its message.
UNSUPPORTED = {
    "gpt2-architecture": (
        dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
        "architectures=['GPT2LMHeadModel'] is not supported",
    ),
    "unknown-model_type": (
        dict(architectures=..., model_type="falcon"),
        "model_type='falcon' is not supported",
    ),
    "no-architecture-no-model_type": (
        dict(architectures=..., model_type=...),
        "model_type=None is not supported",
    ),
    "rope-yarn-rope_parameters": (
        dict(rope_theta=..., rope_parameters={"rope_type": "yarn", "factor": 4.0}),
        "rope_type='yarn' is not supported",
    ),
    "rope-yarn-rope_scaling": (
        dict(rope_scaling={"type": "yarn", "factor": 4.0}),
        "rope_type='yarn' is not supported",
    ),
    "rope-dynamic": (
        dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
        "rope_type='dynamic' is not supported",
    ),
    "llama3-without-original-context": (
        dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
        "has no 'original_max_position_embeddings'",
    ),
    "linear-without-factor": (
        dict(rope_scaling={"rope_type": "linear"}),
        "rope_scaling of type 'linear' has no 'factor'",
    ),
    "heads-not-multiple-of-kv-heads": (
        dict(num_attention_heads=6, num_key_value_heads=4),
        "num_attention_heads=6 is not a multiple of num_key_value_heads=4",
    ),
    "odd-head_dim": (
        dict(head_dim=15),
        "head_dim=15 must be even",
    ),
    "gelu": (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    "mlp_bias": (dict(mlp_bias=True), "mlp_bias=true is not supported"),
    "attention_bias": (dict(attention_bias=True), "bias to o_proj as well as q/k/v"),
    "pretraining_tp": (dict(pretraining_tp=2), "pretraining_tp=2 is not supported"),
    "missing-field": (dict(intermediate_size=...), "config.json has no 'intermediate_size'"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported(case):
    overrides, message = UNSUPPORTED[case]
    with pytest.raises(UnsupportedModelError) as info:
        ModelConfig.from_hf_dict(llama_dict(**overrides))
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unsupported_gpt2_from_transformers():
    import transformers

    d = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4).to_dict()
    d["architectures"] = ["GPT2LMHeadModel"]
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        ModelConfig.from_hf_dict(d)


def test_unsupported_in_constructor():
    with pytest.raises(UnsupportedModelError, match="rope_type='yarn' is not supported"):
        dataclasses.replace(PRESETS["tiny"], rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="not a multiple"):
        dataclasses.replace(PRESETS["tiny"], num_kv_heads=4)


def test_from_json_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json at"):
        ModelConfig.from_json(tmp_path)


def test_from_json_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(llama_dict()))
    assert ModelConfig.from_json(tmp_path) == ModelConfig.from_hf_dict(llama_dict())


# Presets.
def test_tiny_preset():
    tiny = preset("tiny")
    assert tiny is PRESETS["tiny"]
    assert tiny.num_layers == 2 and 64 <= tiny.hidden_size <= 256
    assert tiny.group_size > 1 and tiny.vocab_size % 2 == 1


def test_unknown_preset():
    with pytest.raises(UnsupportedModelError, match="no built-in model named 'nope'.*tiny"):
        preset("nope")


@pytest.mark.parametrize(
    "name, billions", [("llama-3.2-1b", 1.24), ("llama-3.1-8b", 8.03), ("qwen3-8b", 8.19)]
)
def test_preset_parameter_counts(name, billions):
    assert PRESETS[name].num_parameters() / 1e9 == pytest.approx(billions, abs=0.01)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_num_parameters_matches_transformers(family):
    model = build_hf_model(family)
    cfg = ModelConfig.from_hf_dict(model.config.to_dict())
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


def test_sliding_window_on_some_layers_only_is_refused() -> None:
    cfg = {
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": 317, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "use_sliding_window": True, "sliding_window": 8,
        "max_window_layers": 2,
        "layer_types": ["full_attention"] * 2 + ["sliding_attention"] * 2,
    }
    with pytest.raises(UnsupportedModelError, match="mixes full and sliding attention"):
        ModelConfig.from_hf_dict(cfg)
