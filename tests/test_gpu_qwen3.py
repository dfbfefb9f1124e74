"""Qwen3-8B on the GPU (random bf16 weights): qk-norm heads split over QKV tasks, logits
against the bf16 reference at batch 1 and 16. Its own module, so that the 8B models of
test_gpu_shapes are freed first. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers import GPU_ORACLE as ORACLE
from test_gpu_shapes import check_step, random_model

pytestmark = pytest.mark.gpu

QWEN3_MAX_SEQ = 1024


@pytest.fixture(scope="module")
def qwen3():
    """Qwen3-8B (qk-norm heads split over QKV tasks), a short cache: up to batch 16."""
    config, weights, ref = random_model("qwen3-8b", max_batch=16, max_seq=QWEN3_MAX_SEQ,
                                        ref_dtype=torch.bfloat16)
    yield config, weights, ref, ORACLE["llama-3.1-8b"][1]
    del weights, ref
    torch.cuda.empty_cache()


@pytest.mark.parametrize("batch", [1, 16])
def test_qwen3_8b_matches_reference(qwen3, batch: int) -> None:
    check_step(qwen3, batch, 512, QWEN3_MAX_SEQ)
