"""The benchmark scripts' CPU-side logic: what fits in GPU memory, the result files and the
markdown report, the transformers peers on a tiny model (same weights, same tokens as the
reference), and that the pytest-benchmark suites stay out of the normal test run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import HAS_CUDA, assert_close

from flashformer_triton.config import preset
from flashformer_triton.loading import random_state_dict
from flashformer_triton.reference import ReferenceModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_decode  # noqa: E402
import report  # noqa: E402

GB = 10**9
H100_FREE = 84 * GB  # what torch.cuda.mem_get_info reports free on an idle H100 80GB


def test_benchmark_suites_are_not_part_of_the_normal_test_run() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.findall(r"^testpaths\s*=\s*(.*)$", pyproject, re.M) == ['["tests"]']
    assert sorted(p.name for p in (ROOT / "bench").glob("test_*.py")) == [
        "test_bench_decode.py", "test_bench_generate.py"]


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU this would run the benchmarks")
def test_benchmark_suites_skip_cleanly_without_cuda() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/",
         "--benchmark-only"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode in (0, 5), proc.stdout + proc.stderr  # 5: nothing left to run
    assert "2 skipped" in proc.stdout and "error" not in proc.stdout.lower()


# What fits.


def test_memory_estimates_of_the_8b_rows() -> None:
    config = preset("llama-3.1-8b")
    needs = bench_decode.memory_needs(config, 1, 512)
    weights = config.num_parameters() * 2
    assert needs["kernel"] == pytest.approx(weights, rel=0.03)
    assert needs["kernel_build"] == 2 * weights
    assert needs["hf-static"] == pytest.approx(2 * weights, rel=0.03)
    assert needs["compile"] > needs["hf-static"]  # fused QKV and gate/up copies
    # KV at 32k for 16 sequences alone is 69 GB: the row cannot run at all
    fatal, _ = bench_decode.fit_report(config, 16, 32768, list(bench_decode.PEERS), H100_FREE)
    assert fatal and "does not fit" in fatal
    # batch 4 at 32k (17 GB of KV per system): the kernel runs, transformers beside it too
    fatal, unfit = bench_decode.fit_report(config, 4, 32768, list(bench_decode.PEERS),
                                           H100_FREE)
    assert fatal is None and "hf-static" not in unfit and "hf-eager" not in unfit
    # the small rows fit with every peer
    for name in bench_decode.SHAPES:
        fatal, unfit = bench_decode.fit_report(preset(name), 1, 512,
                                               list(bench_decode.PEERS), H100_FREE)
        assert fatal is None and unfit == {}, name


def test_a_peer_that_does_not_fit_beside_the_kernel_is_named() -> None:
    config = preset("llama-3.2-3b")  # 16 x 32k: 60 GB of KV, the kernel fits alone
    fatal, unfit = bench_decode.fit_report(config, 16, 32768, ["compile", "hf-static"],
                                           H100_FREE)
    assert fatal is None
    assert set(unfit) == {"compile", "hf-static"}
    assert "next to the kernel" in unfit["compile"]


@pytest.mark.parametrize("scale_words", [0, 1])
def test_loop_bench_runs_the_kernels_int4_loop_right(scale_words: int) -> None:
    """bench/loop_bench.py times decode.py's int4 GEMV loop alone; its check runs that loop
    (the interpreter on a CPU) on tiles cycled over several programs and tasks."""
    import loop_bench

    device = torch.device("cuda" if HAS_CUDA else "cpu")
    assert loop_bench.check(device, scale_words=scale_words) < 1e-3


def test_gpu_slug() -> None:
    assert bench_decode.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert bench_decode.gpu_slug("NVIDIA H200") == "h200"


# Result files and the report.


def _row(system: str, peer: str | None, ms: float, **where) -> dict:
    where = {"shape": "llama-3.2-1b", "batch": 1, "pos": 512, **where}
    return dict(where, system=system, peer=peer, ms=ms, tok_s=where["batch"] * 1e3 / ms,
                gbs=2.5 / ms * 1e3, fraction=0.83 / ms, floor_ms=0.83, step_bytes=2.5 * GB)


def test_results_file_speedups_and_report(tmp_path) -> None:
    env = dict(gpu="NVIDIA H100 80GB HBM3", sms=132, torch="2.11", triton="3.6",
               transformers="4.57", date="2026-12-01T00:00:00+00:00")
    path = tmp_path / "decode.json"
    results = bench_decode.Results(path, env, 3.0e12, {"shapes": ["llama-3.2-1b"]})
    results.add(_row("flashformer (graph)", None, 1.0))
    results.add(_row("torch.compile reduce-overhead", "compile", 2.0))
    results.add(_row("transformers eager", "hf-eager", 10.0))
    results.add(_row("flashformer (graph)", None, 3.0, batch=4))  # another group: no peers
    results.skip("does not fit", shape="llama-3.1-8b", batch=16, pos=32768)
    results.skip("ImportError: no transformers", shape="llama-3.2-1b", batch=1, pos=512,
                 system="transformers static+compile")
    data = json.loads(path.read_text())
    assert data["gpu"] == env["gpu"] and data["bandwidth"] == 3.0e12 and data["kind"] == "decode"
    kernel = data["rows"][0]
    assert kernel["speedup"] == {"compile": 2.0, "hf-eager": 10.0}
    assert data["rows"][3]["speedup"] == {}
    assert len(data["skipped"]) == 2
    table = bench_decode.format_table(env, 3.0e12, data["rows"])
    assert "2.00x" in table and "10.00x" in table

    text = report.report([path])
    assert "| Llama-3.2-1B | 1 | 512 | flashformer (graph) | 1.000 | 1000 |" in text
    assert "2.00x" in text and "10.00x" in text
    assert "### Skipped" in text and "does not fit" in text and "whole row" in text
    assert "copy bandwidth 3.00 TB/s" in text


def test_report_of_a_generate_run_and_an_old_file(tmp_path) -> None:
    rows = [
        dict(shape="llama-3.2-1b", batch=1, prompt_len=128, new_tokens=256, system=s,
             peer=p, seconds=t, tok_s=256 / t, ms_per_token=t * 1e3 / 256, agree=a, runs=[t])
        for s, p, t, a in [("flashformer generate", None, 0.4, None),
                           ("transformers static+compile", "hf-static", 0.8, 256)]
    ]
    bench_decode.add_speedups(rows, ("shape", "batch", "prompt_len", "new_tokens"), "seconds")
    assert rows[0]["speedup"] == {"hf-static": 2.0}
    gen = tmp_path / "generate.json"
    gen.write_text(json.dumps(dict(gpu="G", kind="generate", rows=rows, skipped=[])))
    old = ROOT / "bench" / "results" / "2026-11-24-h100-llama-3.2-1b.json"
    text = report.report([old, gen])
    assert "### One decode step" in text and "### Greedy generation" in text
    assert "| 128 + 256 | transformers static+compile | 0.800 | 320.0 |" in text
    assert report.main([str(tmp_path / "missing.json")]) == 2


# The transformers peers on a tiny model: the same weights give the reference's numbers.

pytest.importorskip("transformers")
import peers  # noqa: E402

FAMILIES = {
    "llama-tied": dict(tie_word_embeddings=True),
    "qwen2": dict(family="qwen2", qkv_bias=True),
    "qwen3": dict(family="qwen3", qk_norm=True),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_model_from_our_state_dict(family: str) -> None:
    config = replace(preset("tiny"), eos_token_id=[], **FAMILIES[family])
    state = random_state_dict(config, seed=1)
    model = peers.hf_model(config, dict(state), device="cpu")
    # the tensors themselves, not copies
    embed = state["model.embed_tokens.weight"]
    assert model.model.embed_tokens.weight.data_ptr() == embed.data_ptr()
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = ReferenceModel(config, state, max_batch_size=2, max_seq_len=64)
    ids = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids, torch.zeros(2, dtype=torch.long))
        got = model(ids).logits.float()
    assert_close(got, want, rtol_norm=1e-5, name=family)


def test_decode_peers_step_at_the_position() -> None:
    config = replace(preset("tiny"), eos_token_id=[])
    state = random_state_dict(config, seed=2)
    model = peers.hf_model(config, dict(state), device="cpu")
    for key in peers.HF_PEERS:
        peer = peers.hf_decode_peer(key, model, config, batch=2, pos=30, max_seq_len=64,
                                    compile=False)
        first, second = peer.step(), peer.step()
        assert first.shape == (2, 1, config.vocab_size)
        assert torch.equal(first, second), key  # each step appends at the same position
        assert peer.system == peers.SYSTEMS[key]
    # many more steps than the static cache has room for (newer versions append at a
    # running count): the peer rewinds it instead of writing past the end
    peer = peers.hf_decode_peer("hf-static", model, config, batch=2, pos=30, max_seq_len=40,
                                compile=False)
    steps = [peer.step() for _ in range(50)]
    assert all(torch.isfinite(t).all() for t in steps)
    ref = peers.reference_decode_peer(config, state, batch=2, pos=30, max_seq_len=64,
                                      compile=False)
    assert ref.step().shape == (2, 1, config.vocab_size)


def test_generate_peers_give_the_reference_tokens() -> None:
    config = replace(preset("tiny"), eos_token_id=[])
    state = random_state_dict(config, seed=3)
    prompt = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    want = peers.reference_generate(config, dict(state), batch=2, prompt_len=9, new_tokens=7,
                                    compile=False)(prompt)
    assert want.shape == (2, 7)
    model = peers.hf_model(config, dict(state), device="cpu")
    for key in ("hf-eager", "hf-static"):  # eager first: static replaces forward
        run, info = peers.hf_generate(key, model, config, batch=2, prompt_len=9, new_tokens=7,
                                      compile=False)
        assert torch.equal(run(prompt), want), key
        assert torch.equal(run(prompt), want), f"{key}, second call"
        assert info["attn"] == "sdpa"


@pytest.mark.skipif(HAS_CUDA, reason="the CPU dry run; on a GPU run bench_generate itself")
def test_bench_generate_dry_run_on_the_cpu(tmp_path, monkeypatch) -> None:
    """The whole bench_generate flow on the tiny model in the interpreter, nothing compiled:
    one row per system, every peer's greedy tokens equal the kernel's."""
    import bench_generate

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(peers, "_compile", lambda fn, enabled: fn)
    monkeypatch.setattr(bench_generate, "DEVICE", "cpu")
    monkeypatch.setattr(bench_generate, "DTYPE", torch.float32)
    env = dict(gpu="cpu", sms=1, torch="t", triton="t", transformers="t", date="2026-01-01")
    path = tmp_path / "generate.json"
    results = bench_decode.Results(path, env, 0.0, {}, kind="generate")
    bench_generate.bench_generate(results, "tiny", 1, 4, 3, list(bench_decode.PEERS), 1,
                                  float("inf"), 100 * GB)
    data = json.loads(path.read_text())
    assert [r["system"] for r in data["rows"]] == [
        "flashformer generate", *(peers.SYSTEMS[p] for p in peers.PEERS)]
    assert data["skipped"] == []
    assert [r["agree"] for r in data["rows"]] == [None, 3, 3, 3]
    assert set(data["rows"][0]["speedup"]) == set(peers.PEERS)
    assert "Greedy generation" in report.report([path])


def test_kernel_sass_reads_the_loops_of_the_compiled_kernel() -> None:
    """bench/kernel_sass.py compiles the real kernel for sm_90a without a GPU (its own process:
    this one runs the interpreter) and finds the GEMV loops in the SASS."""
    env = {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'bench'}", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_sass.py"), "--shape",
                          "tiny", "--weights", "int8", "--min-len", "20"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, **env})
    if run.returncode != 0 and "ptxas" in run.stderr and "No such file" in run.stderr:
        pytest.skip("this triton build ships no ptxas")
    assert run.returncode == 0, run.stderr[-2000:]
    head, *loops = run.stdout.strip().splitlines()
    assert re.search(r"Used \d+ registers", head), head
    # An int8 GEMV loop on tensor cores: the fp16 converter's byte permutes and packed
    # subtracts (kernels/decode.py _int8_to_f16), no int->float converter.
    gemv = [line for line in loops if "HADD2" in line and "PRMT" in line]
    assert gemv, run.stdout
    assert all("I2F" not in line for line in gemv), run.stdout


def test_ncu_stall_report_finds_loops_and_hot_instructions(tmp_path) -> None:
    import ncu_stalls

    header = ["Address", "Source", ncu_stalls.SAMPLES, ncu_stalls.EXECUTED,
              "stall_long_sb", "stall_barrier", "stall_long_sb (Not Issued)"]
    code = [("0x100", "MOV R1, R2", 1, 1, 1, 0),
            ("0x110", "LDG.E R3, desc[UR4][R4.64]", 2, 8, 2, 0),
            ("0x120", "STS [R5], R3", 90, 8, 90, 0),
            ("0x130", "@P0 BRA 0x110", 5, 8, 0, 5),
            ("0x140", "EXIT", 2, 1, 0, 2)]
    rows = [["Kernel Name", "decode_step_kernel"], header]
    rows += [[a, f"      {t}", str(s), str(x), str(lsb), str(bar), "0"]
             for a, t, s, x, lsb, bar in code]
    path = tmp_path / "source.csv"
    path.write_text("\n".join(",".join(f'"{c}"' for c in r) for r in rows) + "\n")

    text = ncu_stalls.report(path, top=1)
    lines = text.splitlines()
    assert lines[0].startswith("5 instructions, 100 samples: long_sb 93.0% barrier 7.0%")
    assert lines[1].startswith("loop     1-    3 (   3 instructions, runs         8)  97.0%")
    assert lines[2].split()[:3] == ["2", "90.00%", "x8"] and "long_sb:90" in lines[2]

    bad = tmp_path / "details.csv"
    bad.write_text('"Metric Name","Value"\n')
    with pytest.raises(ValueError, match="--page source --csv --print-source sass"):
        ncu_stalls.read_source(bad)


def test_ab_kernels_loads_each_variant_where_the_runtime_launches_from(tmp_path,
                                                                      monkeypatch) -> None:
    import ab_kernels
    import flashformer_triton.kernels as package

    from flashformer_triton.runtime import kernel_module

    # Whatever the test does to the module, the original comes back afterwards.
    monkeypatch.setitem(sys.modules, ab_kernels.KERNEL_MODULE,
                        sys.modules[ab_kernels.KERNEL_MODULE])
    monkeypatch.setattr(package, "decode", package.decode)
    variant = tmp_path / "decode_variant.py"
    variant.write_text((ROOT / "kernels" / "decode.py").read_text() + "\nAB_VARIANT = 7\n")

    name, path, tiles = ab_kernels.parse_variant(f"probe2={variant}:early_probe=2,block_k=256")
    assert (name, path, tiles) == ("probe2", variant, {"early_probe": 2, "block_k": 256})
    assert ab_kernels.parse_variant("base=kernels/decode.py")[2] == {}
    module = ab_kernels.use_kernel_source(path)
    assert module.AB_VARIANT == 7
    assert kernel_module(torch.device("cpu")) is module
    for bad in ["kernels/decode.py", "=x.py", "a=x.py:block_k"]:
        with pytest.raises(ValueError, match="variant"):
            ab_kernels.parse_variant(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ab_kernels.use_kernel_source(tmp_path / "missing.py")

    lines = ab_kernels.summary({"base": [2.0, 2.2, 2.1], "new": [1.9, 2.0, 2.1]})
    assert lines[0].endswith("median 2.100 ms  +0.0%")
    assert lines[1].endswith("median 2.000 ms  -4.8%")
