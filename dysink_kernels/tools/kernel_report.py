"""Ahead-of-time compile report of every Triton kernel in the package (no GPU needed).

``python -m dysink_kernels kernels --arch sm_90 [--json]`` compiles each kernel at its
production configurations with ``triton.compile`` for a ``GPUTarget`` and reads the
cubin with the ``cuobjdump`` that Triton ships: registers per thread, stack (spill)
bytes, shared memory, and the tensor-core instructions in the SASS (``HGMMA`` is
Hopper's wgmma, ``HMMA`` the mma.sync of Ampere and later).

Kernel modules contribute ``aot_specs(arch) -> list[KernelSpec]``. Must run in a
process where ``TRITON_INTERPRET`` was not set when Triton was imported.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

__all__ = ["SHARED_LIMIT", "KernelSpec", "check_report", "collect_specs", "compile_report"]

# Modules that define aot_specs(arch).
SPEC_MODULES = ["dysink_kernels.tools.kernel_specs"]

# Shared memory a block may use (opt-in maximum), bytes.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class KernelSpec:
    """One kernel at one configuration, ready for ``triton.compile``."""

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    config: dict = field(default_factory=dict)
    divisible: tuple[str, ...] = ()  # arguments known to be multiples of 16 (pointers too)
    needs_tensor_cores: bool = False


def signature_for(
    fn, pointers: dict[str, str], constexprs: dict, floats: tuple[str, ...] = ()
) -> dict[str, str]:
    """``triton.compile`` signature: the given pointer types, ``fp32`` for ``floats``,
    ``constexpr`` for the constexprs, ``i32`` for every other argument."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def arch_number(arch: str | int) -> int:
    """``"sm_90"``/``"sm_90a"``/``90`` -> 90."""
    if isinstance(arch, int):
        return arch
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise ValueError(f"arch must look like sm_80 or sm_90, got {arch!r}")
    return int(m.group(1))


def collect_specs(arch: int) -> list[KernelSpec]:
    specs: list[KernelSpec] = []
    for name in SPEC_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that backend is not part of this build
                continue
            raise
        if hasattr(mod, "aot_specs"):
            specs.extend(mod.aot_specs(arch))
    return specs


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        tool = _cuobjdump()
        usage = subprocess.run(
            [tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [tool, "--dump-sass", path], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {
        "registers": int(fields.get("REG", 0)),
        "spill_bytes": int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
        "static_shared": int(fields.get("SHARED", 0)),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "hmma": len(re.findall(r"\bHMMA\b", sass)),
        "local_memory_ops": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
    }


def compile_report(arch: str | int) -> list[dict]:
    """Compile every spec for ``arch`` and return one row per (kernel, config)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the kernel report needs TRITON_INTERPRET unset (it compiles for a GPU)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc = arch_number(arch)
    rows = []
    for spec in collect_specs(cc):
        names = spec.fn.arg_names
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible if a in names}
        src = ASTSource(spec.fn, spec.signature, spec.constexprs, attrs)
        row: dict = {"name": spec.name, "arch": f"sm_{cc}", "config": spec.config}
        try:
            k = triton.compile(
                src,
                target=GPUTarget("cuda", cc, 32),
                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
            )
        except Exception as exc:  # report, do not stop: the gate fails on it
            row.update(compiled=False, error=f"{type(exc).__name__}: {exc}"[:500])
            rows.append(row)
            continue
        usage = _resource_usage(k.asm["cubin"])
        row.update(
            compiled=True,
            registers=usage["registers"],
            spill_bytes=usage["spill_bytes"],
            shared_bytes=int(k.metadata.shared) + usage["static_shared"],
            tensor_core_ops=usage["hgmma"] + usage["hmma"],
            hgmma=usage["hgmma"],
            hmma=usage["hmma"],
            local_memory_ops=usage["local_memory_ops"],
            needs_tensor_cores=spec.needs_tensor_cores,
        )
        rows.append(row)
    return rows


def check_report(rows: list[dict]) -> list[str]:
    """The CI gates: every kernel compiles, no spills, shared memory within the limit,
    and on sm_90 the tensor-core kernels use HGMMA. Returns the failures."""
    bad = []
    for r in rows:
        tag = f"{r['name']} {r['arch']} {r['config']}"
        if not r.get("compiled"):
            bad.append(f"{tag}: does not compile ({r.get('error')})")
            continue
        cc = arch_number(r["arch"])
        if r["spill_bytes"] > 0 or r["local_memory_ops"] > 0:
            bad.append(f"{tag}: spills ({r['spill_bytes']} bytes, {r['local_memory_ops']} ops)")
        if r["shared_bytes"] > SHARED_LIMIT.get(cc, SHARED_LIMIT[80]):
            bad.append(f"{tag}: {r['shared_bytes']} bytes of shared memory")
        if cc >= 90 and r["needs_tensor_cores"] and r["hgmma"] == 0:
            bad.append(f"{tag}: no HGMMA (wgmma) in the SASS")
    return bad


def format_table(rows: list[dict]) -> str:
    head = ["kernel", "arch", "config", "regs", "spill B", "smem B", "TC ops"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        if not r.get("compiled"):
            lines.append(f"{r['name']} | {r['arch']} | {cfg} | compile error | | |")
            continue
        tc = f"{r['tensor_core_ops']} ({'HGMMA' if r['hgmma'] else 'HMMA' if r['hmma'] else '-'})"
        lines.append(
            f"{r['name']} | {r['arch']} | {cfg} | {r['registers']} | {r['spill_bytes']} | "
            f"{r['shared_bytes']} | {tc}"
        )
    return "\n".join("| " + line + " |" for line in lines)
