"""The timeline profiler: the summary maths on synthetic records (CPU) and a real profiled
step (GPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import HAS_CUDA, assert_close

from flashformer_triton.config import preset
from flashformer_triton.loading import random_state_dict
from flashformer_triton.plan import GpuSpec, Op, make_plan
from flashformer_triton.profile import summarize
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
