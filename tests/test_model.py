"""FlashFormer (model.py): generate against transformers, prefill against the reference,
EOS, seeds, every user error, state_dict / .to() behaviour.

On a CPU every decode token is one kernel launch in the Triton interpreter (~0.8 s for these
tiny models), so the token counts here are small and chosen per test; prefill is plain torch
and cheap. Models are fp32 so greedy tokens can be compared exactly with transformers.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from helpers import FAMILIES, HAS_CUDA, assert_close, build_hf_model

import flashformer_triton.model as model_module
from flashformer_triton import FlashFormer, InterpreterWarning, UnsupportedModelError
from flashformer_triton.config import ModelConfig, preset
from flashformer_triton.loading import random_state_dict, save_checkpoint
from flashformer_triton.reference import ReferenceModel

DEVICE = "cuda" if HAS_CUDA else "cpu"
F32 = torch.float32
# Long greedy runs for two families, short ones for the rest (interpreter time).
GREEDY_TOKENS = {"llama": 16, "qwen3": 16, "llama3_scaled": 6, "mistral": 6, "qwen2": 6}


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_generate(hf, prompt: list[int], n: int, eos: list[int]) -> list[int]:
    """transformers greedy generation of one prompt; the new tokens only."""
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=eos or None,
        pad_token_id=eos[0] if eos else 0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def tiny() -> FlashFormer:
    return FlashFormer.from_preset(
        "tiny", device=DEVICE, dtype=F32, max_batch_size=2, max_seq_len=32
    )


# Agreement with transformers and the reference.


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generate_matches_transformers(family: str, hf_checkpoint) -> None:
    path, hf = hf_checkpoint(family)
    model = FlashFormer.from_pretrained(path, device=DEVICE, dtype=F32, max_seq_len=64)
    n = GREEDY_TOKENS[family]
    prompt = _prompt(hf.config.vocab_size, 5, seed=len(family))
    out = model.generate(torch.tensor([prompt], device=DEVICE), max_new_tokens=n)
    assert out.shape[0] == 1 and out.dtype == torch.long
    assert out[0, :5].tolist() == prompt
    want = _hf_generate(hf, prompt, n, model.config.eos_token_id)
    assert out[0, 5:].tolist() == want


def test_batch_of_ragged_prompts_matches_transformers_per_sequence(hf_checkpoint) -> None:
    path, hf = hf_checkpoint("qwen2")  # q/k/v biases
    model = FlashFormer.from_pretrained(
        path, device=DEVICE, dtype=F32, max_batch_size=3, max_seq_len=32
    )
    lengths = [3, 7, 1]
    prompts = [_prompt(hf.config.vocab_size, n, seed=10 + n) for n in lengths]
    n = 5
    out = model.generate(
        [torch.tensor(p, device=DEVICE) for p in prompts], max_new_tokens=n, pad_token_id=0
    )
    assert tuple(out.shape) == (3, 7 + n)
    for b, p in enumerate(prompts):
        # prompts are left-padded to the longest, new tokens start at column 7
        assert out[b, :7].tolist() == [0] * (7 - len(p)) + p
        assert out[b, 7:].tolist() == _hf_generate(hf, p, n, []), f"row {b}"


def test_padded_tensor_with_attention_mask(hf_checkpoint) -> None:
    """Left and right padding with an attention mask give the unpadded prompts' tokens."""
    path, hf = hf_checkpoint("llama")
    model = FlashFormer.from_pretrained(
        path, device=DEVICE, dtype=F32, max_batch_size=2, max_seq_len=32
    )
    prompts = [_prompt(hf.config.vocab_size, 6, seed=1), _prompt(hf.config.vocab_size, 3, 2)]
    want = [_hf_generate(hf, p, 3, []) for p in prompts]
    for side in ("left", "right"):
        ids = torch.full((2, 6), 5, dtype=torch.long)
        mask = torch.zeros(2, 6, dtype=torch.long)
        for b, p in enumerate(prompts):
            cols = slice(6 - len(p), 6) if side == "left" else slice(0, len(p))
            ids[b, cols] = torch.tensor(p)
            mask[b, cols] = 1
        out = model.generate(
            ids.to(DEVICE), attention_mask=mask.to(DEVICE), max_new_tokens=3, eos_token_id=[]
        )
        assert torch.equal(out[:, :6].cpu(), ids), "the prompt block is returned as given"
        assert out[:, 6:].tolist() == want, side


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_logits_match_reference_and_transformers(family: str) -> None:
    hf = build_hf_model(family, seed=4)
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    state = hf.state_dict()
    model = FlashFormer.from_hf(hf, device=DEVICE, dtype=F32, max_batch_size=2, max_seq_len=24)
    ref = ReferenceModel(config, state, max_batch_size=2, max_seq_len=24, device=DEVICE)
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    ids = ids.to(DEVICE)
    pos = torch.tensor([0, 4], device=DEVICE)  # row 1 starts at position 4
    logits = model(ids, pos)
    assert logits.shape == (2, 9, config.vocab_size) and logits.dtype == F32
    assert_close(logits, ref(ids, pos), rtol_norm=1e-5, name=f"{family} vs reference")
    with torch.no_grad():
        hf_logits = hf(ids[:1].cpu()).logits
    assert_close(logits[:1], hf_logits, rtol_norm=1e-5, name=f"{family} vs transformers")
    # bf16: against the fp32 reference on the same bf16-rounded weights
    model16 = FlashFormer.from_hf(hf, device=DEVICE, dtype=torch.bfloat16, max_seq_len=24)
    rounded = {k: v.to(torch.bfloat16).float() for k, v in state.items()}
    ref16 = ReferenceModel(config, rounded, max_seq_len=24, device=DEVICE)
    assert_close(model16(ids[:1]), ref16(ids[:1], pos[:1]), rtol_norm=2e-2, name="bf16")


def test_prefill_writes_the_cache_the_kernel_reads(tiny: FlashFormer) -> None:
    """Prefill n + 1 tokens at once, or n then one kernel step: same logits, same cache."""
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]], device=DEVICE)
    whole = tiny(ids)[:, -1]
    k_whole = tiny.cache.k[:, 0, :, :6].clone()
    v_whole = tiny.cache.v[:, 0, :, :6].clone()
    tiny.reset()
    tiny(ids[:, :5])
    step = tiny(ids[:, 5:], torch.tensor([5], device=DEVICE))[:, 0]
    assert_close(step, whole, rtol_norm=1e-5, name="kernel step vs prefill")
    assert_close(tiny.cache.k[:, 0, :, :6], k_whole, rtol_norm=1e-6, name="K cache")
    assert_close(tiny.cache.v[:, 0, :, :6], v_whole, rtol_norm=1e-6, name="V cache")


def test_decode_step_with_fewer_rows_than_slots(tiny: FlashFormer) -> None:
    config = tiny.config
    ref = ReferenceModel(
        config,
        random_state_dict(config, seed=0, generator_device="cpu"),
        max_seq_len=32,
        device=DEVICE,
    )
    ids = torch.tensor([[1, 9, 8, 7]], device=DEVICE)
    tiny(ids)
    ref(ids, torch.tensor([0], device=DEVICE))
    nxt, pos = torch.tensor([[33]], device=DEVICE), torch.tensor([4], device=DEVICE)
    out = tiny(nxt, pos)
    assert out.shape == (1, 1, config.vocab_size)
    assert_close(out, ref(nxt, pos), rtol_norm=1e-4, name="decode b1 of 2 slots")


def test_prefill_in_chunks_equals_one_pass(tiny: FlashFormer, monkeypatch) -> None:
    ids = torch.randint(0, 263, (2, 11), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    whole = tiny(ids)
    monkeypatch.setattr(model_module, "PREFILL_CHUNK", 4)
    assert_close(tiny(ids), whole, rtol_norm=1e-6, name="chunked prefill")


# Sampling, EOS, streaming.


def test_seeded_sampling_is_reproducible_and_stream_agrees(tiny: FlashFormer) -> None:
    prompt = [[1, 72, 101, 108]]
    kw = dict(max_new_tokens=3, temperature=1.0, top_k=40, top_p=0.95, eos_token_id=[])
    a = tiny.generate(prompt, seed=11, **kw)
    assert torch.equal(a, tiny.generate(prompt, seed=11, **kw))
    streamed = [int(t) for t in tiny.stream(prompt, seed=11, **kw)]
    assert streamed == a[0, 4:].tolist()
    b = tiny.generate(prompt, seed=12, **kw)
    assert not torch.equal(a, b)


def test_eos_stops_each_sequence_and_pads(tiny: FlashFormer) -> None:
    prompts = [[1, 20, 30], [1, 50]]
    free = tiny.generate(prompts, max_new_tokens=4, eos_token_id=[], pad_token_id=0)
    new = free[:, 3:]
    eos = int(new[0, 1])  # row 0 stops after its second token
    out = tiny.generate(prompts, max_new_tokens=4, eos_token_id=eos, pad_token_id=0)
    for b in range(2):
        row = new[b].tolist()
        cut = row.index(eos) + 1 if eos in row else len(row)
        expected = row[:cut] + [0] * (out.shape[1] - 3 - cut)
        assert out[b, 3:].tolist() == expected, f"row {b}"
    # a single sequence stops early: the output ends at its EOS
    single = tiny.generate([prompts[0]], max_new_tokens=4, eos_token_id=eos)
    assert single[0, 3:].tolist() == new[0, :2].tolist()
    assert [int(t) for t in tiny.stream([prompts[0]], max_new_tokens=4, eos_token_id=eos)] == (
        new[0, :2].tolist()
    )


# Errors a user can make.


def _meta(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.long, device="meta")


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: m.generate([[1] * 20], max_new_tokens=13), ValueError, "exceeds max_seq_len=32"),
        (
            lambda m: m.generate([[1], [2], [3]], max_new_tokens=2),
            ValueError,
            "3 prompts exceed max_batch_size=2",
        ),
        (
            lambda m: m(torch.ones(3, 2, dtype=torch.long, device=DEVICE)),
            ValueError,
            "exceeds max_batch_size=2",
        ),
        (
            lambda m: m.generate([[1, 263]], max_new_tokens=2),
            ValueError,
            r"token id 263, outside the vocabulary \[0, 263\)",
        ),
        (lambda m: m(torch.tensor([[1, -4]], device=DEVICE)), ValueError, "token id -4"),
        (
            lambda m: m.generate(torch.ones(1, 3, device=DEVICE), max_new_tokens=2),
            TypeError,
            "integer token ids",
        ),
        (lambda m: m(torch.ones(1, 3, device=DEVICE)), TypeError, "torch.float32"),
        (
            lambda m: m.generate(_meta(1, 3), max_new_tokens=2),
            ValueError,
            "is on meta but the model is on",
        ),
        (
            lambda m: m(torch.ones(1, 3, dtype=torch.long, device=DEVICE), _meta(1)),
            ValueError,
            "input_pos is on meta",
        ),
        (lambda m: m.generate([[]], max_new_tokens=2), ValueError, "prompt 0 is empty"),
        (lambda m: m.generate([[1, 2], []], max_new_tokens=2), ValueError, "prompt 1 is empty"),
        (
            lambda m: m.generate(torch.zeros(1, 0, dtype=torch.long, device=DEVICE)),
            ValueError,
            "prompt 0 is empty",
        ),
        (
            lambda m: m(torch.zeros(1, 0, dtype=torch.long, device=DEVICE)),
            ValueError,
            "input_ids is empty",
        ),
        (lambda m: m.generate([[1, 2]], max_new_tokens=0), ValueError, "max_new_tokens"),
        (lambda m: m.generate([[1, 2]], temperature=-1.0), ValueError, "temperature"),
        (lambda m: m.generate([[1, 2]], temperature=1.0, top_p=2.0), ValueError, "top_p"),
        (
            lambda m: m(
                torch.ones(1, 1, dtype=torch.long, device=DEVICE), torch.tensor([32], device=DEVICE)
            ),
            ValueError,
            "max_seq_len=32",
        ),
        (
            lambda m: m(
                torch.ones(1, 2, dtype=torch.long, device=DEVICE),
                torch.zeros(1, 3, dtype=torch.long, device=DEVICE),
            ),
            ValueError,
            r"input_pos must be \[B\]",
        ),
        (
            lambda m: m.generate(
                torch.ones(2, 3, dtype=torch.long, device=DEVICE),
                attention_mask=torch.tensor([[1, 0, 1], [1, 1, 1]], device=DEVICE),
            ),
            ValueError,
            "holes",
        ),
        (lambda m: m.generate("hello"), TypeError, "input_ids must be"),
    ],
    ids=[
        "too-long",
        "batch-generate",
        "batch-forward",
        "vocab-generate",
        "vocab-negative",
        "float-ids-generate",
        "float-ids-forward",
        "device-ids",
        "device-pos",
        "empty-list",
        "empty-second",
        "empty-tensor",
        "empty-forward",
        "zero-new-tokens",
        "temperature",
        "top-p",
        "position-overflow",
        "pos-shape",
        "mask-holes",
        "text-prompt",
    ],
)
def test_user_errors(tiny: FlashFormer, call, error, message) -> None:
    with pytest.raises(error, match=message):
        call(tiny)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (dict(dtype=torch.int8), ValueError, "unsupported dtype"),
        (dict(dtype="float64"), ValueError, "unsupported dtype"),
        (dict(max_batch_size=17), ValueError, "max_batch_size=17 must be an integer in 1..16"),
        (dict(max_batch_size=0), ValueError, "max_batch_size=0"),
        (dict(max_seq_len=1), ValueError, "max_seq_len=1"),
        (dict(device="mps:0"), ValueError, "not supported"),
        (dict(device="gpu"), ValueError, "not a device"),
    ],
)
def test_bad_options(options: dict, error, message: str) -> None:
    with pytest.raises(error, match=message):
        FlashFormer.from_preset("tiny", **{"device": DEVICE, **options})


@pytest.mark.skipif(HAS_CUDA, reason="checks the message when CUDA is absent")
def test_cuda_asked_for_but_absent() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available.*device='cpu'"):
        FlashFormer.from_preset("tiny", device="cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        FlashFormer.from_pretrained("tiny")  # the default device is cuda


def test_unsupported_hf_model() -> None:
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2' is not supported"):
        FlashFormer.from_hf(transformers.GPT2LMHeadModel(cfg), device=DEVICE)
    with pytest.raises(UnsupportedModelError, match="from_hf expects"):
        FlashFormer.from_hf(torch.nn.Linear(2, 2), device=DEVICE)


@pytest.mark.skipif(HAS_CUDA, reason="CPU interpreter only")
def test_triton_imported_before_the_interpreter_is_explained() -> None:
    code = (
        "import triton.language, torch\n"
        "import flashformer_triton\n"
        "flashformer_triton.FlashFormer.from_preset('tiny', device='cpu', dtype=torch.float32)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode != 0
    assert "before triton is first imported" in proc.stderr
    assert "set TRITON_INTERPRET=1 in the environment" in proc.stderr


def test_cpu_warning_is_one_line_and_shown_once(monkeypatch) -> None:
    monkeypatch.setattr(model_module, "_interpreter_warned", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model_module._warn_interpreter()
        model_module._warn_interpreter()
    assert len(seen) == 1 and issubclass(seen[0].category, InterpreterWarning)
    text = warnings.formatwarning(
        seen[0].message, seen[0].category, seen[0].filename, seen[0].lineno, seen[0].line
    )
    assert text.count("\n") == 1 and "Triton interpreter" in text


# nn.Module behaviour.


def test_state_dict_holds_the_packed_weights(tiny: FlashFormer) -> None:
    sd = tiny.state_dict()
    assert sorted(sd) == ["arena", "embed", "lm_head", "norms"]  # tiny: untied, no biases
    assert sd["arena"].dtype == F32 and sd["norms"].dtype == F32
    assert all(not p.requires_grad for p in tiny.parameters())
    assert not tiny.training and tiny.eval() is tiny
    assert tiny.num_parameters() == tiny.config.num_parameters()
    # another model with other weights, loaded with these: same outputs
    other = FlashFormer.from_preset("tiny", seed=5, device=DEVICE, dtype=F32, max_seq_len=32)
    ids = torch.tensor([[1, 2, 3]], device=DEVICE)
    assert not torch.allclose(other(ids), tiny(ids))
    other.load_state_dict(sd)
    assert torch.equal(other(ids), tiny(ids))


def test_load_state_dict_with_assign_rebuilds_the_runtime(tiny: FlashFormer) -> None:
    other = FlashFormer.from_preset(
        "tiny", seed=5, device=DEVICE, dtype=F32, max_batch_size=2, max_seq_len=32
    )
    other.load_state_dict({k: v.clone() for k, v in tiny.state_dict().items()}, assign=True)
    assert other.runtime.weights.arena.data_ptr() == other.arena.data_ptr()
    ids, pos = torch.tensor([[1, 2, 3]], device=DEVICE), torch.tensor([3], device=DEVICE)
    nxt = torch.tensor([[4]], device=DEVICE)
    other(ids), tiny(ids)
    assert torch.equal(other(nxt, pos), tiny(nxt, pos))


def test_to_and_dtype_conversions(tiny: FlashFormer) -> None:
    assert tiny.to(DEVICE) is tiny and tiny.device.type == DEVICE
    with pytest.raises(TypeError, match="dtype is fixed"):
        tiny.to(torch.float16)
    with pytest.raises(TypeError, match="dtype is fixed"):
        tiny.half()
    with pytest.raises(TypeError, match="dtype is fixed"):
        tiny.bfloat16()
    assert tiny.arena.dtype == F32 and tiny.norms.dtype == F32
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="cannot move FlashFormer.*CUDA is not available"):
            tiny.to("cuda")
        assert tiny.device.type == "cpu"


def test_hf_state_dict_and_save_pretrained_round_trip(tmp_path) -> None:
    config = preset("tiny")
    state = random_state_dict(config, seed=0, generator_device="cpu")
    model = FlashFormer(config, state, device=DEVICE, dtype=F32, max_seq_len=32)
    unpacked = model.hf_state_dict()
    assert sorted(unpacked) == sorted(state)
    for name, t in state.items():
        assert torch.equal(unpacked[name].cpu(), t), name
    model.save_pretrained(tmp_path / "ckpt")
    again = FlashFormer.from_pretrained(tmp_path / "ckpt", device=DEVICE, dtype=F32, max_seq_len=32)
    ids = torch.tensor([[1, 5, 9, 13]], device=DEVICE)
    assert torch.equal(again(ids), model(ids))
    # "tiny" is the built-in preset: the same weights
    assert torch.equal(
        FlashFormer.from_pretrained("tiny", device=DEVICE, dtype=F32, max_seq_len=32)(ids),
        model(ids),
    )


def test_qwen2_state_dict_has_biases_and_tied_embeddings_no_head() -> None:
    qwen = FlashFormer.from_hf(build_hf_model("qwen2"), device=DEVICE, dtype=F32, max_seq_len=16)
    assert "qkv_bias" in qwen.state_dict()
    tied = FlashFormer.from_hf(
        build_hf_model("llama3_scaled"), device=DEVICE, dtype=F32, max_seq_len=16
    )
    assert "lm_head" not in tied.state_dict()
    assert tied.runtime.weights.lm_head.data_ptr() == tied.embed.data_ptr()


def test_inference_mode_or_not_and_normal_outputs(tiny: FlashFormer) -> None:
    prompt = [[1, 2, 3]]
    with torch.inference_mode():
        a = tiny.generate(prompt, max_new_tokens=1)
        built_inside = FlashFormer.from_preset("tiny", device=DEVICE, dtype=F32, max_seq_len=16)
    b = tiny.generate(prompt, max_new_tokens=1)  # state created in inference mode is reused
    assert torch.equal(a, b) and not b.is_inference()
    b[0, 0] = 7  # a normal tensor: editable
    logits = tiny(torch.tensor([[1, 2, 3]], device=DEVICE))
    assert not logits.is_inference()
    assert built_inside.generate(prompt, max_new_tokens=1).shape == (1, 4)
    built_inside.reset()
    # transformers' top_k=0 means "no top-k"
    sampled = tiny.generate(prompt, max_new_tokens=1, temperature=1.0, top_k=0, seed=1)
    assert sampled.shape == (1, 4)


def test_repr_and_defaults(tiny: FlashFormer) -> None:
    text = repr(tiny)
    assert "llama: 2 layers" in text and "max_batch_size=2" in text and "KVCache" in text
    default = FlashFormer.from_preset("tiny", device=DEVICE, dtype=F32)
    assert default.max_seq_len == 512  # min(4096, max_position_embeddings)
    assert default.eos_token_id == [2]


# GPU only.


@pytest.mark.gpu
def test_cuda_graph_replay_gives_the_same_tokens_as_eager() -> None:
    model = FlashFormer.from_preset(
        "tiny", device="cuda", dtype=F32, max_batch_size=3, max_seq_len=128
    )
    prompts = [[1, 10, 20, 30], [1, 99], [1, 5, 6, 7, 8, 9, 10]]
    for kw in (dict(), dict(temperature=0.9, top_k=50, top_p=0.9, seed=3)):
        model.use_cuda_graph = False
        eager = model.generate(prompts, max_new_tokens=40, eos_token_id=[], **kw)
        model.use_cuda_graph = True
        graph = model.generate(prompts, max_new_tokens=40, eos_token_id=[], **kw)
        assert torch.equal(graph, eager), kw
        again = model.generate(prompts, max_new_tokens=40, eos_token_id=[], **kw)  # replayed
        assert torch.equal(again, eager), kw
        streamed = torch.stack(
            list(model.stream(prompts, max_new_tokens=40, eos_token_id=[], **kw)), dim=1
        )
        assert torch.equal(streamed, eager[:, 7:].cpu()), kw


@pytest.mark.gpu
def test_from_pretrained_saved_tiny_checkpoint_on_cuda(tmp_path, hf_checkpoint) -> None:
    config = preset("tiny")
    path = save_checkpoint(
        tmp_path / "tiny", config, random_state_dict(config, seed=0, generator_device="cpu")
    )
    cuda = FlashFormer.from_pretrained(path, device="cuda", dtype=F32, max_seq_len=64)
    preset_model = FlashFormer.from_preset("tiny", device="cuda", dtype=F32, max_seq_len=64)
    prompt = [[1, 72, 105]]
    assert torch.equal(
        cuda.generate(prompt, max_new_tokens=24), preset_model.generate(prompt, max_new_tokens=24)
    )
    # and a real transformers checkpoint, greedy, against transformers
    ckpt, hf = hf_checkpoint("llama")
    model = FlashFormer.from_pretrained(ckpt, device="cuda", dtype=F32, max_seq_len=64)
    p = _prompt(hf.config.vocab_size, 5, seed=1)
    out = model.generate([p], max_new_tokens=16)
    assert out[0, 5:].tolist() == _hf_generate(hf, p, 16, model.config.eos_token_id)
    bf16 = FlashFormer.from_pretrained(ckpt, device="cuda", max_seq_len=64)  # bf16 default
    assert bf16.generate([p], max_new_tokens=16).shape[0] == 1
