"""The tile autotuner without a GPU: keys, the JSON store, the candidates, the search with a
fake timing function, and the command line's refusal without CUDA."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace

import pytest
import torch
from helpers import HAS_CUDA

from flashformer_triton import tuning
from flashformer_triton.cli import main
from flashformer_triton.config import preset
from flashformer_triton.plan import GpuSpec, make_plan

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The tuning file in a temp dir, via the environment variable plan.py's lookup reads."""
    path = tmp_path / "cache" / "tuning.json"
    monkeypatch.setenv(tuning.ENV_VAR, str(path))
    return path


# Keys.


def test_key_names_gpu_shape_batch_and_dtype() -> None:
    config = preset("llama-3.2-1b")
    key = tuning.tuning_key(H100, config, 1, torch.bfloat16)
    assert key == f"{H100}|llama:l16:d2048:f8192:h32:kv8:hd64:v128256:tied|b1|bfloat16"
    # dtype spelled any supported way gives the same key
    for dtype in ("bfloat16", "torch.bfloat16", "bf16"):
        assert tuning.tuning_key(H100, config, 1, dtype) == key
    assert tuning.tuning_key(H100, config, 4, torch.bfloat16) != key
    assert tuning.tuning_key(H100, config, 1, torch.float16) != key
    assert tuning.tuning_key("NVIDIA A100-SXM4-80GB", config, 1, torch.bfloat16) != key


def test_shape_signature_separates_what_the_kernel_is_specialised_on() -> None:
    names = ["tiny", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen3-8b"]
    signatures = {tuning.shape_signature(preset(n)) for n in names}
    assert len(signatures) == len(names)
    assert "qknorm" in tuning.shape_signature(preset("qwen3-8b"))
    base = preset("tiny")
    # qkv bias (Qwen2) and tied embeddings change the kernel; EOS ids and RoPE do not.
    assert tuning.shape_signature(replace(base, family="qwen2", qkv_bias=True)) != (
        tuning.shape_signature(base))
    assert tuning.shape_signature(replace(base, tie_word_embeddings=True)) != (
        tuning.shape_signature(base))
    assert tuning.shape_signature(replace(base, eos_token_id=[5], rope_theta=1e6)) == (
        tuning.shape_signature(base))


def test_path_default_env_and_off(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(tuning.ENV_VAR, raising=False)
    assert tuning.tuning_path() == tuning.DEFAULT_PATH.expanduser()
    assert str(tuning.tuning_path()).endswith("flashformer_triton/tuning.json")
    monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path / "t.json"))
    assert tuning.tuning_path() == tmp_path / "t.json"
    assert tuning.tuning_path(tmp_path / "x.json") == tmp_path / "x.json"  # explicit wins
    for off in ("off", "0", "", "none"):
        monkeypatch.setenv(tuning.ENV_VAR, off)
        assert tuning.tuning_path() is None
        assert tuning.load_tuned_tiles(H100, preset("tiny"), 1, torch.bfloat16) is None


# The store.


def test_round_trip_through_the_json_file(store) -> None:
    one, eight = preset("llama-3.2-1b"), preset("llama-3.1-8b")
    assert tuning.load_tuned_tiles(H100, one, 1, torch.bfloat16) is None  # no file yet
    tiles = {"o_rows": 8, "down_rows": 8, "block_k": 1024, "pipeline_stages": 2}
    key = tuning.tuning_key(H100, one, 1, torch.bfloat16)
    assert tuning.save_entry(key, {"tiles": tiles, "ms": 1.3}) == store
    assert tuning.load_tuned_tiles(H100, one, 1, torch.bfloat16) == tiles
    assert tuning.load_tuned_tiles(H100, one, 1, "bfloat16") == tiles
    # other batch, dtype, GPU or shape: nothing
    assert tuning.load_tuned_tiles(H100, one, 4, torch.bfloat16) is None
    assert tuning.load_tuned_tiles(H100, one, 1, torch.float16) is None
    assert tuning.load_tuned_tiles("NVIDIA H200", one, 1, torch.bfloat16) is None
    assert tuning.load_tuned_tiles(H100, eight, 1, torch.bfloat16) is None
    # a second entry keeps the first; replacing an entry replaces it
    key8 = tuning.tuning_key(H100, eight, 1, torch.bfloat16)
    tuning.save_entry(key8, {"tiles": {"gate_up_rows": 8}})
    tuning.save_entry(key, {"tiles": {"o_rows": 16}})
    assert tuning.load_tuned_tiles(H100, eight, 1, torch.bfloat16) == {"gate_up_rows": 8}
    assert tuning.load_tuned_tiles(H100, one, 1, torch.bfloat16) == {"o_rows": 16}
    data = json.loads(store.read_text())
    assert data["version"] == tuning.FORMAT_VERSION and set(data["entries"]) == {key, key8}
    assert not list(store.parent.glob("*.tmp"))  # written atomically, nothing left over


def test_stored_tiles_are_accepted_by_make_plan(store) -> None:
    config = preset("llama-3.2-1b")
    tuning.save_entry(tuning.tuning_key(H100, config, 1, torch.bfloat16),
                      {"tiles": {"o_rows": 8, "block_k": 256, "programs_per_sm": 1}})
    tiles = tuning.load_tuned_tiles(H100, config, 1, torch.bfloat16)
    plan = make_plan(config, batch=1, max_seq_len=1088, gpu=GpuSpec(H100, 132), **tiles)
    assert (plan.tiles.o_rows, plan.tiles.block_k, plan.grid) == (8, 256, 132)


def test_unknown_fields_and_non_integers_are_dropped(store) -> None:
    config = preset("tiny")
    key = tuning.tuning_key(H100, config, 1, torch.bfloat16)
    tuning.save_entry(key, {"tiles": {"o_rows": 8, "no_such_tile": 3, "block_k": "512",
                                      "profile": True}})
    assert tuning.load_tuned_tiles(H100, config, 1, torch.bfloat16) == {"o_rows": 8}
    tuning.save_entry(key, {"tiles": {"gone": 1}})
    assert tuning.load_tuned_tiles(H100, config, 1, torch.bfloat16) is None


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 99, "entries": {}}),
                                     json.dumps([1, 2])])
def test_an_unusable_file_warns_and_is_ignored(store, content: str) -> None:
    store.parent.mkdir(parents=True)
    store.write_text(content)
    with pytest.warns(tuning.TuningWarning, match="ignoring the tuning file"):
        assert tuning.load_tuned_tiles(H100, preset("tiny"), 1, torch.bfloat16) is None


def test_an_edited_file_is_read_again(store) -> None:
    config = preset("tiny")
    key = tuning.tuning_key(H100, config, 1, torch.bfloat16)
    tuning.save_entry(key, {"tiles": {"o_rows": 8}})
    assert tuning.load_tuned_tiles(H100, config, 1, torch.bfloat16) == {"o_rows": 8}
    data = json.loads(store.read_text())
    data["entries"][key]["tiles"]["o_rows"] = 16
    store.write_text(json.dumps(data) + "  ")  # another size: a new mtime/size stamp
    assert tuning.load_tuned_tiles(H100, config, 1, torch.bfloat16) == {"o_rows": 16}


def test_save_refuses_when_tuning_is_off(monkeypatch) -> None:
    monkeypatch.setenv(tuning.ENV_VAR, "off")
    with pytest.raises(ValueError, match="turned off"):
        tuning.save_entry("k", {"tiles": {}})


# Candidates.


def test_candidate_space_at_batch_1_and_above() -> None:
    one = preset("llama-3.2-1b")
    space = tuning.candidate_space(one, 1)
    assert space == {
        "o_rows": (8, 16), "down_rows": (8, 16), "gate_up_rows": (8, 16), "qkv_rows": (8, 16),
        "block_k": (256, 512, 1024), "programs_per_sm": (1, 2), "pipeline_stages": (2, 3),
    }
    assert len(tuning.grid_candidates(space)) == 2**4 * 3 * 2 * 2
    # batch > 1 runs tl.dot: 16-row tiles only
    space4 = tuning.candidate_space(one, 4)
    assert all(space4[name] == (16,) for name in ("o_rows", "down_rows", "gate_up_rows",
                                                  "qkv_rows"))
    assert len(tuning.grid_candidates(space4)) == 3 * 2 * 2
    # qk-norm (Qwen3) heads are split over QKV tasks too (the last chunk norms the head)
    assert tuning.candidate_space(preset("qwen3-8b"), 1)["qkv_rows"] == (8, 16)


@pytest.mark.parametrize("name", ["tiny", "llama-3.2-1b", "qwen3-8b"])
@pytest.mark.parametrize("batch", [1, 4])
def test_every_coordinate_candidate_is_a_valid_plan(name: str, batch: int) -> None:
    config = preset(name)
    gpu = GpuSpec(H100, 132)
    base = make_plan(config, batch=batch, max_seq_len=1088, gpu=gpu).tiles
    space = tuning.candidate_space(config, batch)
    default = {field: getattr(base, field) for field in space}
    candidates = tuning.coordinate_candidates(space, default)
    assert candidates and all(c != default for c in candidates)
    assert len(candidates) == sum(len(v) - (default[k] in v) for k, v in space.items())
    for overrides in candidates:
        plan = make_plan(config, batch=batch, max_seq_len=1088, gpu=gpu, tiles=base,
                         **overrides)
        assert all(getattr(plan.tiles, k) == v for k, v in overrides.items())


# The search, with a fake timing function.

SPACE = {"o_rows": (8, 16), "block_k": (256, 512, 1024), "programs_per_sm": (1, 2)}
DEFAULT = {"o_rows": 16, "block_k": 512, "programs_per_sm": 2}


def separable(setting: dict[str, int]) -> float:
    """Fastest at o_rows 8, block_k 1024, programs_per_sm 2."""
    return (1.0 + 0.1 * (setting["o_rows"] == 16) + 0.05 * math.log2(1024 / setting["block_k"])
            + 0.2 * (setting["programs_per_sm"] == 1))


@pytest.mark.parametrize("strategy", ["coordinate", "grid"])
def test_search_finds_the_fastest(strategy: str) -> None:
    calls = []

    def fake(setting):
        calls.append(dict(setting))
        return separable(setting)

    result = tuning.search(SPACE, DEFAULT, fake, strategy=strategy)
    assert result.best == {"o_rows": 8, "block_k": 1024, "programs_per_sm": 2}
    assert result.best_ms == pytest.approx(1.0)
    assert result.default_ms == pytest.approx(separable(DEFAULT))
    assert result.speedup == pytest.approx(separable(DEFAULT))
    assert result.changed() == {"o_rows": 8, "block_k": 1024}
    assert calls[0] == DEFAULT  # the defaults are timed first
    assert len({tuple(sorted(c.items())) for c in calls}) == len(calls)  # nothing timed twice
    if strategy == "grid":
        assert len(calls) == 2 * 3 * 2
    else:
        assert len(calls) < 2 * 3 * 2
    assert not result.stopped


def test_coordinate_search_takes_a_second_pass_for_interactions() -> None:
    # o_rows 8 only pays off with one program per SM, a field visited after it: pass 1
    # takes programs_per_sm 1, pass 2 tries o_rows again.
    def coupled(s):
        if s["programs_per_sm"] == 1:
            return 0.5 if s["o_rows"] == 8 else 0.9
        return 1.1 if s["o_rows"] == 8 else 1.0

    result = tuning.search(SPACE, DEFAULT, coupled, passes=2)
    assert result.best == {"o_rows": 8, "block_k": 512, "programs_per_sm": 1}
    one_pass = tuning.search(SPACE, DEFAULT, coupled, passes=1)
    assert one_pass.best == {"o_rows": 16, "block_k": 512, "programs_per_sm": 1}


def test_noise_below_min_gain_keeps_the_defaults() -> None:
    result = tuning.search(SPACE, DEFAULT, lambda s: 1.0 if s == DEFAULT else 0.998)
    assert result.best == DEFAULT and result.changed() == {}


def test_failing_candidates_are_recorded_and_skipped() -> None:
    def flaky(s):
        if s["block_k"] == 1024:
            raise RuntimeError("out of shared memory")
        if s["programs_per_sm"] == 1:
            return float("nan")
        return separable(s)

    result = tuning.search(SPACE, DEFAULT, flaky)
    assert result.best == {"o_rows": 8, "block_k": 512, "programs_per_sm": 2}
    failed = [t for t in result.trials if t.ms is None]
    assert failed and any("out of shared memory" in t.error for t in failed)
    assert "failed" in tuning.format_trials(result.trials, result.default)


def test_failing_defaults_raise() -> None:
    with pytest.raises(RuntimeError, match="default tiles failed"):
        tuning.search(SPACE, DEFAULT, lambda s: 1 / 0)


def test_budget_trial_limit_and_abort_stop_early() -> None:
    result = tuning.search(SPACE, DEFAULT, separable, strategy="grid", max_trials=3)
    assert len(result.trials) == 3 and "max_trials" in result.stopped
    ticks = iter(range(100))
    result = tuning.search(SPACE, DEFAULT, separable, budget_s=2.5,
                           clock=lambda: float(next(ticks)))
    assert len(result.trials) <= 3 and "budget" in result.stopped

    def broken(s):
        if s != DEFAULT:
            raise tuning.SearchAborted("CUDA error: an illegal memory access")
        return 1.0

    result = tuning.search(SPACE, DEFAULT, broken)
    assert result.best == DEFAULT and result.stopped.startswith("aborted")


def test_search_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="strategy"):
        tuning.search(SPACE, DEFAULT, separable, strategy="random")
    with pytest.raises(ValueError, match="no value"):
        tuning.search(SPACE, {"o_rows": 16}, separable)


def test_autotune_with_a_fake_timer_and_the_stored_entry(store) -> None:
    config = preset("llama-3.2-1b")
    space = tuning.candidate_space(config, 1)
    default = {name: values[-1] if name != "block_k" else 512 for name, values in space.items()}
    messages: list[str] = []

    def fake(s):
        return 1.0 - 0.1 * (s["down_rows"] == 8) - 0.05 * (s["pipeline_stages"] == 2)

    result = tuning.autotune(config, batch=1, time_fn=fake, default=default, log=messages.append)
    assert result.changed() == {"down_rows": 8, "pipeline_stages": 2}
    assert messages and "defaults" in messages[0]
    entry = tuning.make_entry(result, gpu_name=H100, config=config, batch=1,
                              dtype=torch.bfloat16, pos=512, max_seq_len=1088,
                              strategy="coordinate")
    assert entry["speedup"] == pytest.approx(1.0 / 0.85)
    tuning.save_entry(tuning.tuning_key(H100, config, 1, torch.bfloat16), entry)
    assert tuning.load_tuned_tiles(H100, config, 1, torch.bfloat16) == result.best
    with pytest.raises(ValueError, match="default tiles"):
        tuning.autotune(config, batch=1, time_fn=fake)


# The command line.


@pytest.mark.skipif(HAS_CUDA, reason="checks the message when CUDA is absent")
def test_autotune_without_cuda_is_one_clear_line(capsys, store) -> None:
    assert main(["autotune", "--model", "llama-3.2-1b", "--batch", "1"]) == 1
    err = capsys.readouterr().err
    assert "autotune needs a CUDA GPU" in err and "Traceback" not in err
    assert not store.exists()


def test_autotune_list_needs_no_gpu(capsys) -> None:
    assert main(["autotune", "--model", "qwen3-8b", "--batch", "1", "4", "--list"]) == 0
    out = capsys.readouterr().out
    assert "qwen3:l36" in out and "block_k" in out and "qkv_rows" in out
    assert "192 combinations" in out  # 2^4 rows x 3 x 2 x 2 at batch 1
    assert "12 combinations" in out  # batch 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "17"], "outside the supported range"),
        (["--pos", "2000", "--max-seq-len", "1024"], "must be below"),
        (["--pos", "-1"], "must be >= 0"),
    ],
)
def test_autotune_argument_errors(args: list[str], message: str, capsys) -> None:
    assert main(["autotune", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_no_warning_when_nothing_is_stored(store) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning.load_tuned_tiles(H100, preset("tiny"), 1, torch.bfloat16) is None
