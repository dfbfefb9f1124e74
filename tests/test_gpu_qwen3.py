"""Qwen3-8B on the GPU (random bf16 weights): qk-norm heads split over QKV tasks, logits
against the bf16 reference at batch 1 and 16. Its own module, so that the 8B models of
test_gpu_shapes are freed first. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers import GPU_ORACLE as ORACLE
from helpers import HAS_CUDA
from test_gpu_shapes import check_step

from flashformer_triton.config import preset
from flashformer_triton.loading import random_state_dict
from flashformer_triton.reference import ReferenceModel
from flashformer_triton.weights import pack_weights

pytestmark = pytest.mark.gpu

QWEN3_MAX_SEQ = 1024


@pytest.fixture(scope="module")
def qwen3():
    """Qwen3-8B (qk-norm heads split over QKV tasks), a short cache: up to batch 16."""
    if not HAS_CUDA:
        pytest.skip("needs CUDA")
    config = preset("qwen3-8b")
    state = random_state_dict(config, seed=0, dtype=torch.bfloat16, device="cuda")
    weights = pack_weights(config, state, dtype=torch.bfloat16, device="cuda")
    ref = ReferenceModel(config, state, max_batch_size=16, max_seq_len=QWEN3_MAX_SEQ,
                         dtype=torch.bfloat16, device="cuda")
    del state
    torch.cuda.empty_cache()
    yield config, weights, ref, ORACLE["llama-3.1-8b"][1]
    del weights, ref
    torch.cuda.empty_cache()


@pytest.mark.parametrize("batch", [1, 16])
def test_qwen3_8b_matches_reference(qwen3, batch: int) -> None:
    check_step(qwen3, batch, 512, QWEN3_MAX_SEQ)
