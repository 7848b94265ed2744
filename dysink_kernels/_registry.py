"""One registry that maps (op, backend name) to an implementation.

Every public op takes ``backend=``; this module resolves the name. Implementations
register a *loader* (``"package.module:function"``) so that importing the package
never imports Triton or a compiled extension; the loader runs on first use.

``"auto"`` picks, among the backends whose ``available(device)`` is true, the one
with the highest priority for that device type. ``"naive"`` is always available.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import torch

__all__ = ["available_backends", "register_backend", "registered_ops", "resolve_backend"]


@dataclass
class _Backend:
    name: str
    loader: str | Callable
    available: Callable[[torch.device], bool]
    priority: dict[str, int] = field(default_factory=dict)
    _fn: Callable | None = None

    def present(self) -> bool:
        """Whether the loader's module exists (without importing it)."""
        if callable(self.loader) or self._fn is not None:
            return True
        return _module_exists(self.loader.partition(":")[0])

    def usable(self, device: torch.device) -> bool:
        return self.present() and self.available(device)

    def rank(self, device: torch.device) -> int | None:
        return self.priority.get(device.type, self.priority.get("*"))

    def load(self) -> Callable:
        if self._fn is None:
            if callable(self.loader):
                self._fn = self.loader
            else:
                module, _, attr = self.loader.partition(":")
                self._fn = getattr(importlib.import_module(module), attr)
        return self._fn


_REGISTRY: dict[str, dict[str, _Backend]] = {}


@cache
def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _always(device: torch.device) -> bool:
    return True


def register_backend(
    op: str,
    name: str,
    loader: str | Callable,
    *,
    available: Callable[[torch.device], bool] = _always,
    priority: dict[str, int] | None = None,
) -> None:
    """Register ``loader`` as backend ``name`` of ``op``.

    ``priority`` maps a device type (``"cuda"``, ``"cpu"``, or ``"*"`` for any) to a
    rank used by ``"auto"``; a device type missing from it means ``auto`` never
    picks this backend on that device (it can still be asked for by name).
    """
    if name == "auto":
        raise ValueError("'auto' is reserved")
    _REGISTRY.setdefault(op, {})[name] = _Backend(name, loader, available, dict(priority or {}))


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def available_backends(op: str, device: torch.device | str | None = None) -> list[str]:
    """Names of the backends of ``op`` usable on ``device`` (all registered if None)."""
    table = _REGISTRY.get(op, {})
    if device is None:
        return sorted(table)
    dev = torch.device(device)
    return sorted(n for n, b in table.items() if b.usable(dev))


def resolve_backend(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    """Return ``(name, fn)`` for ``backend`` of ``op`` on ``device``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when a named
    backend exists but cannot run on ``device``.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    table = _REGISTRY.get(op)
    if table is None:
        raise ValueError(f"unknown op {op!r}")
    if backend == "auto":
        ranked = [
            (b.rank(device), n)
            for n, b in table.items()
            if b.rank(device) is not None and b.usable(device)
        ]
        if not ranked:
            raise RuntimeError(f"no backend of {op} can run on {device}")
        name = max(ranked)[1]
        return name, table[name].load()
    if backend not in table:
        raise ValueError(
            f"unknown backend {backend!r} for {op}; choose one of {['auto', *sorted(table)]}"
        )
    entry = table[backend]
    if not entry.usable(device):
        raise RuntimeError(f"backend {backend!r} of {op} is not available on {device}")
    return backend, entry.load()
