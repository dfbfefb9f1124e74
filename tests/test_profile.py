"""The timeline profiler: the summary maths on synthetic records (CPU) and a real profiled
step (GPU)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import HAS_CUDA, assert_close

from flashformer_triton.config import preset
from flashformer_triton.loading import random_state_dict
from flashformer_triton.plan import GpuSpec, Op, make_plan
from flashformer_triton.profile import bandwidth_profile, stage_windows, summarize
from flashformer_triton.quantize import QuantScheme
from flashformer_triton.runtime import DecodeRuntime
from flashformer_triton.weights import pack_weights


def test_summary_of_synthetic_timeline() -> None:
    plan = make_plan(preset("tiny"), batch=1, max_seq_len=64, gpu=GpuSpec("test", 2))
    n = plan.num_tasks
    idx = torch.arange(n, dtype=torch.int64)
    start = 10_000 + 1_000 * idx  # ns
    records = torch.stack([idx % 4, idx % 2, start, start + 200, start + 700], dim=1)
    summary = summarize(plan, records)
    assert summary.programs == 4
    assert summary.span_us == pytest.approx((1_000 * (n - 1) + 700) / 1e3)
    by_op = {t.op: t for t in summary.per_op}
    assert sum(t.tasks for t in summary.per_op) == n
    qkv = sum(1 for t in plan.tasks if t.op == Op.QKV)
    assert by_op["QKV"].tasks == qkv
    assert by_op["QKV"].wait_us == pytest.approx(0.2 * qkv)
    assert by_op["QKV"].mean_work_us == pytest.approx(0.5)
    assert summary.busy_fraction == pytest.approx(0.5 * n / (4 * summary.span_us))
    assert "QKV" in summary.format() and "working" in summary.format()


def _spaced_records(plan, spacing_ns: int = 1_000) -> torch.Tensor:
    """Task i starts at 10 us + i * spacing, is ready 200 ns later and ends 700 ns after its
    start, on program i % 4."""
    idx = torch.arange(plan.num_tasks, dtype=torch.int64)
    start = 10_000 + spacing_ns * idx
    return torch.stack([idx % 4, idx % 2, start, start + 200, start + 700], dim=1)


@pytest.mark.parametrize("weights", [None, QuantScheme(8)])
def test_stage_windows_of_synthetic_timeline(weights) -> None:
    config = preset("tiny")
    plan = make_plan(config, batch=1, max_seq_len=64, gpu=GpuSpec("test", 2), quant=weights)
    records = _spaced_records(plan)
    layer = 1
    windows = {w.op: w for w in stage_windows(plan, records, layers=[layer])}
    assert list(windows) == ["QKV", "ATTN", "OPROJ", "GATEUP", "DOWN"]
    first_qkv = min(i for i, t in enumerate(plan.tasks) if t.op == Op.QKV and t.layer == layer)
    for op in (Op.QKV, Op.OPROJ, Op.DOWN):
        mine = [i for i, t in enumerate(plan.tasks) if t.op == op and t.layer == layer]
        w = windows[op.name]
        assert w.tasks == len(mine)
        assert w.first_start_us == pytest.approx(mine[0] - first_qkv)  # 1 us apart
        assert w.first_ready_us == pytest.approx(mine[0] - first_qkv + 0.2)
        assert w.last_end_us == pytest.approx(mine[-1] - first_qkv + 0.7)
        assert w.mean_work_us == pytest.approx(0.5)
        layer_bytes = plan.weight_bytes_by_op[op] / config.num_layers
        assert w.weight_tbs == pytest.approx(layer_bytes / (len(mine) - 0.5) / 1e6)
    assert windows["ATTN"].weight_tbs == 0.0  # no weights (its cache reads are not counted)


def test_bandwidth_profile_spreads_each_task_over_its_work() -> None:
    config = preset("tiny")
    plan = make_plan(config, batch=1, max_seq_len=64, gpu=GpuSpec("test", 2))
    records = _spaced_records(plan)
    profile = bandwidth_profile(plan, records, 0, bin_us=0.25)
    layer0 = [i for i, t in enumerate(plan.tasks) if t.layer == 0 and t.op != Op.EMBED]
    assert len(profile) == math.ceil((layer0[-1] - layer0[0] + 0.7) / 0.25)
    # Every task of the layer lies inside the profile: the bins add up to its bytes.
    per_task = {op: plan.weight_bytes_by_op.get(op, 0) / sum(t.op == op for t in plan.tasks)
                for op in Op}
    expected = sum(per_task[plan.tasks[i].op] for i in layer0)
    assert sum(tbs * 0.25 * 1e6 for _, tbs, _, _ in profile) == pytest.approx(expected)
    # One task at a time: it waits 0.2 us, works 0.5 us, then 0.3 us nothing runs.
    assert max(working for _, _, working, _ in profile) == 1
    assert [p[2:] for p in profile[:4]] == [(1, 1), (1, 0), (1, 0), (0, 0)]
    with pytest.raises(ValueError, match="layer=5 must lie in"):
        bandwidth_profile(plan, records, 5)


def test_summary_refuses_records_of_another_plan_or_an_unrun_step() -> None:
    plan = make_plan(preset("tiny"), batch=1, max_seq_len=64, gpu=GpuSpec("test", 2))
    with pytest.raises(ValueError, match="build the plan with profile=1"):
        summarize(plan, torch.zeros(3, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="was the step run"):
        summarize(plan, torch.zeros(plan.num_tasks, 5, dtype=torch.int64))


@pytest.mark.skipif(HAS_CUDA, reason="the CPU refusal")
def test_profile_needs_a_gpu() -> None:
    config = preset("tiny")
    plan = make_plan(config, batch=1, max_seq_len=64, profile=1)
    weights = pack_weights(config, random_state_dict(config), dtype=torch.float32)
    cache = torch.zeros(2, 1, 2, 64, 16)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        DecodeRuntime(config, weights, plan, cache, cache.clone())


@pytest.mark.gpu
def test_profiled_step_records_every_task_and_changes_no_result() -> None:
    config = preset("tiny")
    weights = pack_weights(config, random_state_dict(config), dtype=torch.bfloat16,
                           device="cuda")
    cache = torch.randn(2, 1, 2, 64, 16, dtype=torch.bfloat16, device="cuda")
    ids = torch.tensor([5], dtype=torch.int32, device="cuda")
    pos = torch.tensor([20], dtype=torch.int32, device="cuda")
    outs = []
    for profile in (0, 1):
        plan = make_plan(config, batch=1, max_seq_len=64, dtype=torch.bfloat16,
                         profile=profile)
        runtime = DecodeRuntime(config, weights, plan, cache.clone(), cache.clone())
        outs.append(runtime.step(ids, pos).clone())
    assert_close(outs[1], outs[0], rtol_norm=1e-6, name="profiled logits")
    summary = summarize(plan, runtime.timeline)
    assert summary.span_us > 0 and 0 < summary.busy_fraction <= 1
