"""One registry that maps (op, backend name) to an implementation, and the custom ops.

Every public op takes ``backend=``. Its ``op.py`` checks the arguments and calls its
``torch.library`` custom op (:func:`define_op`), which resolves the name once per call
with :func:`resolve_backend` and calls that backend.

Backends register a *loader* (``"package.module:function"``) so that importing the
package never imports Triton or a compiled extension; the loader runs on first use.
``"auto"`` takes the first backend of the op's row in ``_backends.AUTO`` that is
usable on the tensors' device, else ``"naive"`` (always available).

The backend protocol: a backend of an op is a function that takes the op's schema
arguments, without the final ``backend``, positionally and in schema order, and
returns the schema's outputs (or what the op's ``call`` adapts into them).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, wraps

import torch

from ._backends import AVAILABLE, auto_order

__all__ = [
    "NAMESPACE",
    "available_backends",
    "define_op",
    "register_backend",
    "registered_ops",
    "resolve_backend",
]

NAMESPACE = "dysink"


@dataclass
class _Backend:
    name: str
    loader: str | Callable
    available: Callable[[torch.device], bool]
    _fn: Callable | None = None

    def present(self) -> bool:
        """Whether the loader's module exists (without importing it)."""
        if callable(self.loader) or self._fn is not None:
            return True
        return _module_exists(self.loader.partition(":")[0])

    def usable(self, device: torch.device) -> bool:
        return self.present() and self.available(device)

    def load(self) -> Callable:
        if self._fn is None:
            if callable(self.loader):
                self._fn = self.loader
            else:
                module, _, attr = self.loader.partition(":")
                self._fn = getattr(importlib.import_module(module), attr)
        return self._fn


_REGISTRY: dict[str, dict[str, _Backend]] = {}
# Successful resolutions: (op, backend, device type, device index) -> (name, backend).
# Availability does not change while the process runs; register_backend clears it.
_RESOLVED: dict[tuple[str, str, str, int | None], tuple[str, _Backend]] = {}


@cache
def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def register_backend(
    op: str,
    name: str,
    loader: str | Callable,
    *,
    available: Callable[[torch.device], bool] | None = None,
) -> None:
    """Register ``loader`` as backend ``name`` of ``op``.

    ``available(device)`` says whether it can run on a device; by default the rule
    of ``_backends.AVAILABLE`` for that backend name (always, for an unknown name).
    Whether ``"auto"`` may pick it is decided by ``_backends.AUTO`` alone.
    """
    if name == "auto":
        raise ValueError("'auto' is reserved")
    if available is None:
        available = AVAILABLE.get(name, AVAILABLE["naive"])
    _REGISTRY.setdefault(op, {})[name] = _Backend(name, loader, available)
    _RESOLVED.clear()


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def _table(op: str) -> dict[str, _Backend]:
    table = _REGISTRY.get(op)
    if table is None:
        raise ValueError(f"unknown op {op!r}; the ops are {registered_ops()}")
    return table


def available_backends(op: str, device: torch.device | str | None = None) -> list[str]:
    """Names of the backends of ``op`` usable on ``device`` (all registered if None).

    Raises ``ValueError`` for an op that is not registered.
    """
    table = _table(op)
    if device is None:
        return sorted(table)
    dev = torch.device(device)
    return sorted(n for n, b in table.items() if b.usable(dev))


def resolve_backend(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    """Return ``(name, fn)`` for ``backend`` of ``op`` on ``device``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when a named
    backend exists but cannot run on ``device``. The choice is made once per op,
    name and device and remembered (every op call resolves its backend).
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    key = (op, backend, device.type, device.index)
    resolved = _RESOLVED.get(key)
    if resolved is None:
        resolved = _RESOLVED[key] = _choose(op, backend, device)
    name, entry = resolved
    return name, entry.load()


def _choose(op: str, backend: str, device: torch.device) -> tuple[str, _Backend]:
    """The backend ``resolve_backend`` runs, or its errors."""
    table = _table(op)
    if backend == "auto":
        for name in auto_order(op, device):
            if name in table and table[name].usable(device):
                return name, table[name]
        raise RuntimeError(f"no backend of {op} can run on {device}")
    if backend not in table:
        raise ValueError(
            f"unknown backend {backend!r} for {op}; choose one of {['auto', *sorted(table)]}"
        )
    entry = table[backend]
    if not entry.usable(device):
        raise RuntimeError(f"backend {backend!r} of {op} is not available on {device}")
    return backend, entry


def define_op(
    name: str,
    schema: str,
    *,
    fake: Callable,
    call: Callable | None = None,
) -> Callable:
    """Define the custom op ``torch.ops.dysink.<name>`` that runs one registered backend.

    ``schema`` is the op's argument list and outputs in ``torch.library`` syntax; its
    last argument must be ``str backend="auto"``. Each call resolves ``backend`` once,
    on the device of the first argument of type Tensor, then runs ``call(fn, args)`` (by
    default ``fn(*args[:-1])``: the backend protocol above), where ``args`` is a named
    tuple of the schema's arguments, defaults filled in. ``call`` is where an op
    settles empty problems before any backend sees them and adapts what its
    backends return. ``fake(args)`` builds the outputs' metadata for
    ``torch.compile``. Arguments annotated ``(a!)`` in the schema are declared
    mutated. Returns the entry point (call it positionally or by argument name): plain
    eager calls run the backend directly (``_plain_eager``), every other call goes
    through the custom op ``torch.ops.dysink.<name>``.
    """
    parsed = torch._C.parse_schema(f"{NAMESPACE}::{name}{schema}")
    fields = [a.name for a in parsed.arguments]
    if fields[-1] != "backend":
        raise ValueError(f"the last argument of {name}'s schema must be 'str backend'")
    first_default = next(i for i, a in enumerate(parsed.arguments) if a.has_default_value())
    # The argument whose device picks the backend: the first one that is always a tensor.
    first_tensor = next(
        i for i, a in enumerate(parsed.arguments) if a.type == torch._C.TensorType.get()
    )
    defaults = [a.default_value for a in parsed.arguments[first_default:]]
    args_type = namedtuple(f"{name}_args", fields, defaults=defaults)
    mutated = tuple(
        a.name for a in parsed.arguments if a.alias_info is not None and a.alias_info.is_write
    )

    def run(*args, **kwargs):
        a = args_type(*args, **kwargs)
        _, fn = resolve_backend(name, a.backend, a[first_tensor].device)
        return fn(*a[:-1]) if call is None else call(fn, a)

    op = torch.library.custom_op(f"{NAMESPACE}::{name}", run, mutates_args=mutated, schema=schema)
    op.register_fake(lambda *args, **kwargs: fake(args_type(*args, **kwargs)))

    @wraps(run)
    def entry(*args, **kwargs):
        if _plain_eager(args, kwargs):
            return run(*args, **kwargs)
        return op(*args, **kwargs)

    return entry


def _plain_eager(args: tuple, kwargs: dict) -> bool:
    """Whether a call can skip the custom op's Python layers (about 15 us a call, more
    for ops that mutate) and run its backend at once, with the same result: eager
    execution (not traced by ``torch.compile``), no ``TorchDispatchMode`` active, plain
    tensors only (no fake tensor or subclass) and none that records autograd. Every
    other call goes through the op, which is what ``torch.compile``, fake tensors,
    dispatch modes and autograd see."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    grad = torch.is_grad_enabled()
    for a in (*args, *kwargs.values()):
        if not isinstance(a, torch.Tensor):
            continue
        if type(a) is not torch.Tensor or (grad and a.requires_grad):
            return False
    return True
