"""sampling.py on fixed distributions: many draws at once (one row per draw), so these are
fast and need no model. Frequencies are checked against the exact filtered distribution
with a 5-sigma binomial bound."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import requires_cuda

from flashformer_triton.sampling import (
    SamplingConfig,
    filter_logits,
    make_seed,
    probabilities,
    sample,
    uniform_noise,
)

PROBS = torch.tensor([0.40, 0.20, 0.15, 0.10, 0.08, 0.04, 0.02, 0.01])
LOGITS = PROBS.log()
DRAWS = 200_000


def _frequencies(config: SamplingConfig, seed: int = 1, counter: int = 0) -> torch.Tensor:
    tokens = sample(LOGITS.expand(DRAWS, -1), config, seed=seed, counter=counter)
    return torch.bincount(tokens, minlength=len(PROBS)).double() / DRAWS


def _assert_matches(freq: torch.Tensor, expected: torch.Tensor) -> None:
    expected = expected.double()
    sigma = (expected * (1 - expected) / DRAWS).sqrt()
    bound = 5 * sigma + 1e-9
    bad = (freq - expected).abs() > bound
    assert not bad.any(), (
        f"frequencies {freq.tolist()} differ from {expected.tolist()} at {bad.nonzero().tolist()}"
    )


def test_plain_sampling_follows_softmax() -> None:
    _assert_matches(_frequencies(SamplingConfig(temperature=1.0)), PROBS)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature(temperature: float) -> None:
    expected = torch.softmax(LOGITS / temperature, dim=-1)
    _assert_matches(_frequencies(SamplingConfig(temperature=temperature)), expected)


def test_top_k_keeps_the_k_most_likely() -> None:
    freq = _frequencies(SamplingConfig(temperature=1.0, top_k=3))
    assert freq[3:].sum() == 0
    _assert_matches(freq, torch.cat([PROBS[:3] / PROBS[:3].sum(), torch.zeros(5)]))


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # 0.40 + 0.20 = 0.60 < 0.7 <= 0.75 = 0.40 + 0.20 + 0.15: the nucleus is three tokens.
    freq = _frequencies(SamplingConfig(temperature=1.0, top_p=0.7))
    assert freq[3:].sum() == 0
    _assert_matches(freq, torch.cat([PROBS[:3] / PROBS[:3].sum(), torch.zeros(5)]))


def test_top_p_always_keeps_the_most_likely_token() -> None:
    kept = probabilities(LOGITS[None], SamplingConfig(temperature=1.0, top_p=0.3))[0]
    assert kept[0] == pytest.approx(1.0) and kept[1:].sum() == 0
    tiny = probabilities(LOGITS[None], SamplingConfig(temperature=1.0, top_p=1e-6))[0]
    assert tiny[0] == pytest.approx(1.0)


def test_top_k_and_top_p_combined_and_temperature_first() -> None:
    config = SamplingConfig(temperature=0.5, top_k=4, top_p=0.9)
    scaled = torch.softmax(LOGITS / 0.5, dim=-1)[:4]
    scaled = scaled / scaled.sum()
    cum = torch.cumsum(scaled, 0) - scaled
    keep = cum < 0.9
    expected = torch.where(keep, scaled, 0.0)
    expected = torch.cat([expected / expected.sum(), torch.zeros(4)])
    assert torch.allclose(probabilities(LOGITS[None], config)[0], expected.float(), atol=1e-6)
    _assert_matches(_frequencies(config), expected)


def test_greedy_is_argmax_and_ignores_filters() -> None:
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    for config in (SamplingConfig(), SamplingConfig(temperature=0.0, top_k=3, top_p=0.5)):
        assert torch.equal(sample(logits, config, seed=5), logits.argmax(-1))
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert int(sample(ties, SamplingConfig())) == 1


def test_same_seed_same_draws_new_counter_or_seed_new_draws() -> None:
    config = SamplingConfig(temperature=1.0)
    logits = torch.zeros(4096, 100)
    a = sample(logits, config, seed=7, counter=3)
    assert torch.equal(a, sample(logits, config, seed=7, counter=3))
    seed_t, counter_t = make_seed(7, "cpu"), torch.tensor([3])
    assert torch.equal(a, sample(logits, config, seed=seed_t, counter=counter_t))
    assert (a != sample(logits, config, seed=7, counter=4)).float().mean() > 0.9
    assert (a != sample(logits, config, seed=8, counter=3)).float().mean() > 0.9


def test_rows_draw_independently() -> None:
    """A row's draw does not depend on what the other rows hold."""
    config = SamplingConfig(temperature=1.0)
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(1))
    full = sample(logits, config, seed=3, counter=0)
    changed = logits.clone()
    changed[1:] = torch.randn(7, 300)
    assert int(sample(changed, config, seed=3, counter=0)[0]) == int(full[0])


def test_uniform_noise_is_uniform_and_open() -> None:
    u = uniform_noise(11, 0, 256, 1024, "cpu")
    assert u.dtype == torch.float32 and tuple(u.shape) == (256, 1024)
    assert float(u.min()) > 0 and float(u.max()) < 1
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    hist = torch.histc(u, bins=16, min=0, max=1) / n
    assert (hist - 1 / 16).abs().max() < 5 * math.sqrt((1 / 16) * (15 / 16) / n)
    # neighbouring columns and rows are uncorrelated
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1])):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(float(corr)) < 0.01


def test_filtered_logits_mask_with_minus_inf() -> None:
    out = filter_logits(LOGITS[None], SamplingConfig(temperature=1.0, top_k=2))[0]
    assert torch.isinf(out[2:]).all() and torch.isfinite(out[:2]).all()


def test_unseeded_draws_follow_torch_manual_seed() -> None:
    torch.manual_seed(123)
    a = make_seed(None, "cpu")
    torch.manual_seed(123)
    assert torch.equal(a, make_seed(None, "cpu"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1.0, top_k=0), "top_k"),
        (dict(temperature=1.0, top_k=2.5), "top_k"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_seed_must_be_an_int() -> None:
    with pytest.raises(TypeError, match="seed"):
        make_seed("7", "cpu")


@pytest.mark.gpu
@requires_cuda
def test_no_host_sync_on_cuda() -> None:
    logits = torch.randn(4, 32000, device="cuda")
    seed, counter = make_seed(1, "cuda"), torch.zeros(1, dtype=torch.long, device="cuda")
    config = SamplingConfig(temperature=0.8, top_k=50, top_p=0.9)
    sample(logits, config, seed=seed, counter=counter)  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            sample(logits, config, seed=seed, counter=counter)
            counter.add_(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # The noise is the same on every device: same logits, same tokens.
    top_k = SamplingConfig(temperature=0.8, top_k=50)
    cpu = sample(logits.cpu(), top_k, seed=1, counter=0)
    counter.zero_()
    assert torch.equal(sample(logits, top_k, seed=seed, counter=counter).cpu(), cpu)
