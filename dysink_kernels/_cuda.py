"""Lazy loader of the optional compiled extension ``dysink_kernels._C`` (csrc/).

Nothing is loaded when the package is imported: the first call of ``available``,
``build_info`` or ``ops`` imports the extension, which registers the
``torch.ops.dysink_C`` ops (C++ on CPU tensors, CUDA kernels on GPU tensors when it
was built with CUDA). A missing or unloadable extension is remembered, with why, and
the ``csrc`` backend is then simply unavailable.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

__all__ = ["available", "build_info", "ops"]

_MODULE = "dysink_kernels._C"
_loaded: tuple[ModuleType | None, str | None] | None = None


def _load() -> tuple[ModuleType | None, str | None]:
    """``(module, None)`` once loaded, or ``(None, reason)``; tried once per process."""
    global _loaded
    if _loaded is None:
        try:
            _loaded = (importlib.import_module(_MODULE), None)
        except ModuleNotFoundError as err:
            if err.name != _MODULE:
                _loaded = (None, f"failed to load: {err}")
            else:
                _loaded = (None, "not built (pip install --no-build-isolation with a C++ compiler)")
        except (ImportError, OSError) as err:
            # Typically an extension built against another torch (undefined symbols).
            _loaded = (None, f"failed to load: {err}")
    return _loaded


def available(device: torch.device | str) -> bool:
    """Whether the ``csrc`` backend runs on ``device``: CPU when the extension loaded,
    CUDA when it was also built with CUDA and a GPU is visible."""
    module, _ = _load()
    if module is None:
        return False
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return bool(module.WITH_CUDA) and torch.cuda.is_available()
    return False


def ops():
    """``torch.ops.dysink_C`` after loading the extension; RuntimeError if it is absent."""
    module, error = _load()
    if module is None:
        raise RuntimeError(f"the compiled extension {_MODULE} is unavailable: {error}")
    return torch.ops.dysink_C


def build_info() -> dict:
    """What was built: ``built``, ``with_cuda``, ``cuda_archs`` (e.g. ``["80", "90"]``),
    ``cuda_runtime`` (e.g. ``"13.0"``), ``path`` and ``error`` (why it is not loaded)."""
    module, error = _load()
    if module is None:
        return {"built": False, "with_cuda": False, "cuda_archs": [], "cuda_runtime": None,
                "path": None, "error": error}  # fmt: skip
    with_cuda = bool(module.WITH_CUDA)
    version = int(module.CUDA_RUNTIME_VERSION)
    return {
        "built": True,
        "with_cuda": with_cuda,
        "cuda_archs": [a.strip()[:-1] for a in module.CUDA_ARCHS.split(",") if a.strip()],
        "cuda_runtime": f"{version // 1000}.{version % 1000 // 10}" if with_cuda else None,
        "path": module.__file__,
        "error": None,
    }
