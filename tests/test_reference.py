"""reference.py against Hugging Face transformers on tiny random models (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, build_hf_model

from flashformer_triton.config import ModelConfig
from flashformer_triton.reference import (
    KVCache,
    ReferenceModel,
    apply_rope,
    rms_norm,
    rope_cos_sin,
)

pytest.importorskip("transformers")

FP32_TOL = 1e-4
BF16_TOL = 2e-2

# id -> (helpers.FAMILIES entry, config overrides). All GQA with ratio > 1 and odd vocab;
# mistral-window5 has a sliding window shorter than the prompts.
VARIANTS = {
    "llama": ("llama", {}),
    "llama3-scaled-tied": ("llama3_scaled", {}),
    "mistral": ("mistral", {}),
    "mistral-window5": ("mistral", {"sliding_window": 5}),
    "qwen2-bias": ("qwen2", {}),
    "qwen3-qknorm": ("qwen3", {}),
}


def build_hf(name: str):
    family, overrides = VARIANTS[name]
    model = build_hf_model(family, seed=sum(map(ord, name)), **overrides)
    # No early stop in generate(): every variant decodes the full number of steps.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def hf_model(request):
    return build_hf(request.param)


def make_reference(hf, **kw) -> ReferenceModel:
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    return ReferenceModel(config, hf.state_dict(), **kw)


def prompt(hf, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hf.config.vocab_size, (1, length), generator=g)


@torch.no_grad()
def test_config_matches_hf(hf_model):
    """The parsed config has the features the variant is meant to exercise."""
    ref = make_reference(hf_model)
    cfg, hf_cfg = ref.config, hf_model.config
    assert cfg.num_heads > cfg.num_kv_heads
    assert cfg.head_dim == hf_model.model.layers[0].self_attn.head_dim
    assert cfg.qkv_bias == (cfg.family == "qwen2")
    assert cfg.qk_norm == (cfg.family == "qwen3")
    assert cfg.tie_word_embeddings == hf_cfg.tie_word_embeddings
    assert cfg.sliding_window == getattr(hf_cfg, "sliding_window", None)
    torch.testing.assert_close(ref.inv_freq, hf_model.model.rotary_emb.inv_freq, rtol=0, atol=0)


@torch.no_grad()
def test_prefill_matches_hf(hf_model):
    ids = prompt(hf_model, 7, seed=1)
    expected = hf_model(ids).logits
    ref = make_reference(hf_model, max_seq_len=32)
    logits = ref(ids, torch.tensor([0]))
    assert logits.dtype == torch.float32
    assert_close(logits, expected, rtol_norm=FP32_TOL, name="prefill logits")


@torch.no_grad()
def test_greedy_decode_matches_hf_generate(hf_model):
    ids = prompt(hf_model, 7, seed=2)
    steps = 8
    out = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=steps,
        output_logits=True,
        return_dict_in_generate=True,
    )
    hf_tokens = out.sequences[0, ids.shape[1] :].tolist()
    assert len(hf_tokens) == steps

    ref = make_reference(hf_model, max_seq_len=32)
    logits = ref(ids, torch.tensor([0]))[:, -1]
    tokens, pos = [], ids.shape[1]
    for step in range(steps):
        assert_close(logits, out.logits[step], rtol_norm=FP32_TOL, name=f"step {step} logits")
        nxt = logits.argmax(-1)
        tokens.append(int(nxt))
        if step + 1 < steps:
            logits = ref(nxt[:, None], torch.tensor([pos]))[:, -1]
            pos += 1
    assert tokens == hf_tokens


@torch.no_grad()
@pytest.mark.parametrize("slots", [None, (2, 0, 3)], ids=["slots-default", "slots-permuted"])
def test_ragged_batch_matches_hf_per_sequence(hf_model, slots):
    """Prefill 3 prompts of different lengths one by one into their cache slots, extend them
    together by a ragged 2-token chunk, then decode them together at different positions;
    every logit row must match transformers run on that sequence alone."""
    lengths = (5, 9, 3)
    batch, decode_steps = len(lengths), 5
    prompts = [prompt(hf_model, n, seed=10 + i) for i, n in enumerate(lengths)]
    slot_t = None if slots is None else torch.tensor(slots)
    slot_of = list(range(batch)) if slots is None else list(slots)
    ref = make_reference(hf_model, max_batch_size=4, max_seq_len=24)
    ref.cache.k.normal_()  # stale values in the cache must be masked out
    ref.cache.v.normal_()

    seqs = [p[0].tolist() for p in prompts]  # token stream of each sequence
    rows = [[] for _ in range(batch)]  # logits row for each position of each sequence
    for b, p in enumerate(prompts):
        logits = ref(p, torch.tensor([0]), batch_index=torch.tensor([slot_of[b]]))
        rows[b] += list(logits[0])

    # Ragged multi-token step: 2 new tokens per row, each row at its own position.
    chunk = torch.cat([prompt(hf_model, 2, seed=20 + b) for b in range(batch)])
    logits = ref(chunk, torch.tensor([len(s) for s in seqs]), batch_index=slot_t)
    for b in range(batch):
        rows[b] += list(logits[b])
        seqs[b] += chunk[b].tolist()

    # Greedy decode: T=1, B=3, every row at a different position.
    for _ in range(decode_steps):
        nxt = torch.stack([rows[b][-1].argmax() for b in range(batch)])
        logits = ref(nxt[:, None], torch.tensor([len(s) for s in seqs]), batch_index=slot_t)
        for b in range(batch):
            seqs[b].append(int(nxt[b]))
            rows[b].append(logits[b, 0])

    for b in range(batch):
        expected = hf_model(torch.tensor([seqs[b]])).logits[0]
        assert_close(torch.stack(rows[b]), expected, rtol_norm=FP32_TOL, name=f"sequence {b}")
        # The greedy tokens fed back are transformers' argmax too.
        fed = seqs[b][-decode_steps:]
        assert expected[-decode_steps - 1 : -1].argmax(-1).tolist() == fed


@torch.no_grad()
def test_bf16_close_to_fp32(hf_model):
    ids = prompt(hf_model, 7, seed=3)
    ref32 = make_reference(hf_model, max_seq_len=16)
    ref16 = make_reference(hf_model, max_seq_len=16, dtype=torch.bfloat16)
    assert ref16.cache.k.dtype == torch.bfloat16
    assert ref16.layers[0].wqkv.dtype == torch.bfloat16
    actual = ref16(ids, torch.tensor([0]))
    expected = ref32(ids, torch.tensor([0]))
    assert actual.dtype == torch.float32
    assert_close(actual, expected, rtol_norm=BF16_TOL, name="bf16 prefill logits")
    tok = expected[:, -1:].argmax(-1)
    for step in range(3):
        pos = torch.tensor([ids.shape[1] + step])
        expected = ref32(tok, pos)
        assert_close(ref16(tok, pos), expected, rtol_norm=BF16_TOL, name=f"bf16 step {step}")
        tok = expected.argmax(-1)


@torch.no_grad()
def test_positions_beyond_cache_raise():
    hf = build_hf("llama")
    ref = make_reference(hf, max_batch_size=2, max_seq_len=16)
    ref(prompt(hf, 16, seed=4), torch.tensor([0]))  # exactly fills the cache: fine
    one = torch.zeros(1, 1, dtype=torch.long)
    two = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"max_seq_len=16"):
        ref(prompt(hf, 3, seed=5), torch.tensor([14]))
    with pytest.raises(ValueError, match=r"max_seq_len=16"):
        ref(two, torch.tensor([3, 16]))
    with pytest.raises(ValueError, match=r">= 0"):
        ref(one, torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"max_batch_size=2"):
        ref(torch.zeros(3, 1, dtype=torch.long), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match=r"batch_index"):
        ref(one, torch.tensor([0]), batch_index=torch.tensor([2]))
    with pytest.raises(ValueError, match=r"input_pos"):
        ref(two, torch.tensor([0]))


@torch.no_grad()
def test_decode_step_traces_as_one_graph():
    """The decode path has no graph break (static shapes, no .item()): what
    torch.compile(mode="reduce-overhead") needs on a GPU."""
    hf = build_hf("qwen3-qknorm")
    ref = make_reference(hf, max_batch_size=2, max_seq_len=16)
    ref(torch.cat([prompt(hf, 4, seed=6), prompt(hf, 4, seed=7)]), torch.tensor([0, 3]))
    tok = torch.tensor([[5], [7]])
    pos = torch.tensor([4, 7])
    k_before, v_before = ref.cache.k.clone(), ref.cache.v.clone()
    eager = ref(tok, pos)
    ref.cache.k.copy_(k_before)
    ref.cache.v.copy_(v_before)
    compiled = torch.compile(ref, backend="eager", fullgraph=True, dynamic=False)
    assert_close(compiled(tok, pos), eager, rtol_norm=1e-6, name="compiled decode")
    assert_close(compiled(tok, pos + 1), ref(tok, pos + 1), rtol_norm=1e-6, name="next position")


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama3_scaled", "qwen2"])
def test_from_checkpoint(hf_checkpoint, family):
    ckpt = hf_checkpoint(family)
    ref = ReferenceModel.from_checkpoint(ckpt.path, max_seq_len=16)
    assert ref.config == ModelConfig.from_hf_dict(ckpt.model.config.to_dict())
    ids = prompt(ckpt.model, 6, seed=8)
    expected = ckpt.model(ids).logits
    assert_close(ref(ids, torch.tensor([0])), expected, rtol_norm=FP32_TOL, name=family)


def test_small_ops():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    w = torch.randn(8)
    expected = w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), expected)
    xb = x.bfloat16()
    assert rms_norm(xb, w.bfloat16(), 1e-6).dtype == torch.bfloat16

    inv_freq = torch.tensor([1.0, 0.1, 0.01, 0.001])
    cos, sin = rope_cos_sin(inv_freq, torch.tensor([[0, 3]]))
    assert cos.shape == (1, 2, 8) and cos.dtype == torch.float32
    torch.testing.assert_close(cos[0, 0], torch.ones(8))
    # RoPE rotates the pair (x[i], x[i + half]) by angle pos * inv_freq[i].
    q = torch.randn(1, 2, 3, 8)
    rotated = apply_rope(q, cos[:, :, None], sin[:, :, None])
    torch.testing.assert_close(rotated[:, 0], q[:, 0])
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1))
    angle = 3 * inv_freq[0]
    torch.testing.assert_close(
        rotated[0, 1, :, 0], q[0, 1, :, 0] * angle.cos() - q[0, 1, :, 4] * angle.sin()
    )
    torch.testing.assert_close(
        rotated[0, 1, :, 4], q[0, 1, :, 4] * angle.cos() + q[0, 1, :, 0] * angle.sin()
    )

    cfg = ModelConfig(
        family="llama",
        vocab_size=11,
        hidden_size=16,
        intermediate_size=8,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=4,
    )
    cache = KVCache(cfg, max_batch_size=3, max_seq_len=5, dtype=torch.bfloat16, device="cpu")
    assert cache.k.shape == (2, 3, 2, 5, 4) and cache.v.dtype == torch.bfloat16
    cache.k.fill_(1.0)
    cache.v.fill_(1.0)
    cache.reset()
    assert not cache.k.any() and not cache.v.any()
