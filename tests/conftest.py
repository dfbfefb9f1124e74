"""Test setup: Triton interpreter without CUDA, the ``gpu`` marker, tiny HF checkpoints."""

import os


def _cuda_available() -> bool:
    # torch does not import triton, so asking torch is safe before the env var is set.
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


# Must happen before anything imports triton: without a GPU, kernels run in the interpreter.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import FAMILIES, HAS_CUDA, build_hf_model  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="gpu test: CUDA is not available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class HFCheckpoint(NamedTuple):
    path: Path  # directory written by save_pretrained (safetensors)
    model: torch.nn.Module  # the same model, fp32, eval mode


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: ``hf_checkpoint(family, sharded=False) -> (path, hf_model)``.

    Builds a tiny random transformers model of a family from ``helpers.FAMILIES``, saves
    it as safetensors (sharded in ~200 KB pieces with an index when ``sharded``) and
    caches it for the session. Do not modify the returned model or files; copy them.
    """
    cache: dict[tuple[str, bool], HFCheckpoint] = {}

    def make(family: str, sharded: bool = False) -> HFCheckpoint:
        if family not in FAMILIES:
            raise KeyError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
        key = (family, sharded)
        if key not in cache:
            seed = sorted(FAMILIES).index(family)
            model = build_hf_model(family, seed=seed)
            path = tmp_path_factory.mktemp(f"hf-{family}{'-sharded' if sharded else ''}")
            kwargs = {"max_shard_size": "200KB"} if sharded else {}
            model.save_pretrained(str(path), safe_serialization=True, **kwargs)
            cache[key] = HFCheckpoint(path, model)
        return cache[key]

    return make
