"""flashformer_triton: low-batch LLM decode as one persistent Triton kernel per step."""

from pathlib import Path as _Path

# kernels/ lives at the top of the repository and is installed as flashformer_triton.kernels.
# When the package runs straight from a checkout (PYTHONPATH=src, as on the GPU box) the
# repository root joins the package path so that the same import works.
_checkout_root = _Path(__file__).resolve().parents[2]
if (_checkout_root / "kernels" / "__init__.py").is_file() and str(_checkout_root) not in __path__:
    __path__.append(str(_checkout_root))

from flashformer_triton.config import ModelConfig, UnsupportedModelError, preset  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ModelConfig", "UnsupportedModelError", "preset", "__version__"]
