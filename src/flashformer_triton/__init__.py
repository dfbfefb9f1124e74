"""flashformer_triton: low-batch LLM decode as one persistent Triton kernel per step."""

from pathlib import Path as _Path

# kernels/ lives at the top of the repository and is installed as flashformer_triton.kernels.
# When the package runs straight from a checkout (PYTHONPATH=src, as on the GPU box) the
# repository root joins the package path so that the same import works.
_checkout_root = _Path(__file__).resolve().parents[2]
if (_checkout_root / "kernels" / "decode.py").is_file() and str(_checkout_root) not in __path__:
    __path__.append(str(_checkout_root))

import os as _os  # noqa: E402

import torch as _torch  # noqa: E402

# Without CUDA the kernel can only run in the Triton interpreter, and that must be switched on
# before triton is first imported: do it here, so that importing flashformer_triton first is
# all a CPU user needs (see FlashFormer's error message for the other import order).
if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from flashformer_triton.config import ModelConfig, UnsupportedModelError, preset  # noqa: E402
from flashformer_triton.model import FlashFormer, InterpreterWarning  # noqa: E402
from flashformer_triton.runtime import KernelHangError  # noqa: E402
from flashformer_triton.sampling import SamplingConfig  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "FlashFormer",
    "InterpreterWarning",
    "KernelHangError",
    "ModelConfig",
    "SamplingConfig",
    "UnsupportedModelError",
    "preset",
    "__version__",
]
