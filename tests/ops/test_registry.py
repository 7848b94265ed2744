"""The backend registry, the auto table, import hygiene and the direction of imports."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest
import torch

import dysink_kernels
from dysink_kernels import _backends, available_backends
from dysink_kernels._registry import registered_ops, resolve_backend

OPS = (
    "gathered_sink_attention",
    "select_sinks",
    "sink_gate",
    "gate_from_means",
    "gate_votes",
    "bank_insert",
)


def test_naive_everywhere_and_auto_resolves_on_cpu():
    for op in (*OPS, "apply_wan_rope", "rotate_temporal"):
        assert "naive" in available_backends(op)
        name, fn = resolve_backend(op, "auto", torch.device("cpu"))
        assert callable(fn) and name in available_backends(op, "cpu")


def test_one_name_per_op():
    """Registry name = torch.library op name = public or package entry name."""
    assert set(OPS) | {"apply_wan_rope", "rotate_temporal"} == set(registered_ops())
    for op in OPS:
        assert hasattr(torch.ops.dysink, op)
    for op in ("gathered_sink_attention", "select_sinks", "sink_gate", "apply_wan_rope"):
        assert callable(getattr(dysink_kernels, op))


def test_auto_follows_the_table():
    """auto takes the first usable backend of its row in _backends.AUTO, else naive."""
    cpu = torch.device("cpu")
    for op in OPS:
        usable = available_backends(op, cpu)
        want = next(n for n in _backends.auto_order(op, cpu) if n in usable)
        assert resolve_backend(op, "auto", cpu)[0] == want
    assert _backends.auto_order("apply_wan_rope", cpu) == ("naive",)
    assert _backends.auto_order("select_sinks", torch.device("cuda"))[0] == "triton"


def test_unknown_backend_and_op():
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("select_sinks", "fastest", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown op"):
        resolve_backend("no_such_op", "auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown op"):
        available_backends("gathered_attention")
    with pytest.raises(TypeError):
        resolve_backend("select_sinks", None, torch.device("cpu"))


def test_import_queries_no_device_and_loads_no_backend():
    """Importing the package must not import triton, initialise CUDA or compile."""
    code = (
        "import sys, torch\n"
        "import dysink_kernels, dysink_kernels.sink_attention\n"
        "assert 'triton' not in sys.modules, 'triton imported at import time'\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


PACKAGE = pathlib.Path(dysink_kernels.__file__).parent
# What an op or backend may import from the package: the registry, the availability
# rules, the input checks, the extension loader, its own folder and another op's
# tables (never another op's oracle, the cache, the bank or the tools).
ALLOWED = {"_registry", "_backends", "_validate", "_cuda", "fp8", "ops.rope.tables"}


def package_imports(path: pathlib.Path) -> list[str]:
    """Package modules ``path`` imports, as dotted names relative to the package."""
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[: len(rel) - node.level])
                mod = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            elif (node.module or "").startswith("dysink_kernels"):
                mod = node.module.removeprefix("dysink_kernels").strip(".")
            else:
                continue
            found += [f"{mod}.{a.name}".strip(".") if not node.module else mod for a in node.names]
        elif isinstance(node, ast.Import):
            found += [
                a.name.removeprefix("dysink_kernels").strip(".")
                for a in node.names
                if a.name.startswith("dysink_kernels")
            ]
    return found


# Files that still break the rule, with what must change (remove the entry then).


@pytest.mark.parametrize(
    "path",
    sorted((PACKAGE / "ops").rglob("*.py")),
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_ops_import_one_way(path):
    """Ops and backends never import the cache, the bank, the tools or another op's
    oracle: only shared infrastructure, their own folder and RoPE's tables."""
    name = str(path.relative_to(PACKAGE))
    parts = path.relative_to(PACKAGE).parts
    own = f"ops.{parts[1]}" if len(parts) > 2 else "ops"
    for mod in package_imports(path):
        if mod in ALLOWED or mod == own or mod.startswith(own + "."):
            continue
        if own == "ops" and mod.count(".") == 1:  # ops/__init__.py: each op's package
            continue
        raise AssertionError(f"{name} imports {mod}")


def test_auto_is_resolved_once_per_call(monkeypatch):
    """Each public call resolves its backend exactly once (in its op's ``run``)."""
    from dysink_kernels import _registry, gathered_sink_attention, select_sinks, sink_gate

    calls = []
    real = _registry.resolve_backend

    def counting(op, backend, device):
        calls.append(op)
        return real(op, backend, device)

    monkeypatch.setattr(_registry, "resolve_backend", counting)
    q = torch.randn(1, 3, 2, 16)
    pool = torch.randn(2, 4, 2, 16)
    slots = torch.tensor([[0, -1]], dtype=torch.int32)
    gathered_sink_attention(q, q, q, pool, pool, slots, return_stats=True)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    select_sinks(torch.randn(1, 2, 8), torch.randn(2, 8), i32([0, 0]), i32([0, 3]), k=1,
                 exclude_lo=i32([0]), exclude_hi=i32([0]))  # fmt: skip
    sink_gate(q, q, torch.randn(2, 2, 16), slots)
    assert calls == ["gathered_sink_attention", "select_sinks", "sink_gate"]


def test_resolution_is_remembered_until_a_backend_is_registered(monkeypatch):
    """resolve_backend remembers its choice per op, name and device; registering a
    backend makes it choose again."""
    from dysink_kernels import _registry

    tables = {op: dict(table) for op, table in _registry._REGISTRY.items()}
    monkeypatch.setattr(_registry, "_REGISTRY", tables)
    monkeypatch.setattr(_registry, "_RESOLVED", {})
    cpu = torch.device("cpu")
    first = resolve_backend("select_sinks", "naive", cpu)
    assert resolve_backend("select_sinks", "naive", cpu) == first

    def replacement(*args):
        raise AssertionError("not called")

    _registry.register_backend("select_sinks", "naive", replacement)
    assert resolve_backend("select_sinks", "naive", cpu) == ("naive", replacement)
    with pytest.raises(ValueError, match="unknown backend"):  # errors are not remembered
        resolve_backend("select_sinks", "fastest", cpu)
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("select_sinks", "fastest", cpu)


def test_plain_eager_calls_run_the_backend_at_once():
    """A plain eager call runs the backend without the custom op's Python layers; a call
    under a dispatch mode or with a tensor that records autograd goes through the op.
    Both give the same result."""
    from torch.profiler import profile
    from torch.utils._python_dispatch import TorchDispatchMode

    from dysink_kernels.ops.sink_gate import gate_votes

    class Seen(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    qbar, kbar, means = (torch.randn(s, generator=g) for s in ((2, 3, 8), (2, 3, 8), (5, 3, 8)))
    slots = torch.tensor([[0, -1], [4, 2]])

    def op_events(fn):
        with profile() as prof:
            out = fn()
        return out, [e.name for e in prof.events() if e.name.startswith("dysink::")]

    eager, events = op_events(lambda: gate_votes(qbar, kbar, means, slots))
    assert events == []
    with Seen() as mode:
        seen = gate_votes(qbar, kbar, means, slots)
    assert mode.ops == ["dysink.gate_votes.default"]
    traced, events = op_events(lambda: gate_votes(qbar.requires_grad_(), kbar, means, slots))
    assert events == ["dysink::gate_votes"]
    assert torch.equal(eager, seen) and torch.equal(eager, traced)
