"""Ahead-of-time compile report of every Triton kernel in the package (no GPU needed).

``python -m dysink_kernels kernels --arch sm_90 [--json]`` compiles each kernel at its
production configurations with ``triton.compile`` for a ``GPUTarget`` and reads the
cubin with the ``cuobjdump`` that Triton ships: registers per thread, stack (spill)
bytes, shared memory, and the tensor-core instructions in the SASS (``HGMMA`` is
Hopper's wgmma, ``HMMA`` the mma.sync of Ampere and later).

Each kernel with a tensor-core key loop also gets ``loop_instructions``: the SASS
instructions of its worst steady-state key loop, scaled to 64 keys. A key loop is an
innermost natural loop of the control-flow graph (a backward branch to a block that
dominates it) whose body holds HGMMA/HMMA; it is counted from its head to its last
backward branch, without the out-of-line paths the compiler places after it (an
mbarrier wait's retry, a shuffle's divergent path). The same report compiles a
canonical flash-attention forward over one contiguous KV at each attention
configuration (``canonical_attention.py``), and every ``gathered_sink_attention`` row carries
the canonical loop and the ratio ours/canonical. At two warps per scheduler a
Hopper tile has ~1024 cycles of tensor-core work to hide the loop's issue slots in,
so every instruction beyond the canonical loop is likely paid in time.

Kernel modules contribute ``aot_specs(arch) -> list[KernelSpec]``. Must run in a
process where ``TRITON_INTERPRET`` was not set when Triton was imported.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

__all__ = [
    "ARCH_CHOICES",
    "LOOP_GATE_ARCHS",
    "LOOP_RATIO_PLAIN",
    "LOOP_RATIO_STATS",
    "LOOP_RATIO_VARIANT",
    "SHARED_LIMIT",
    "KernelSpec",
    "SassInstruction",
    "SassLoop",
    "arch_number",
    "check_report",
    "collect_specs",
    "compile_report",
    "format_table",
    "key_loops",
    "parse_sass",
    "worst_key_loop",
]

# Modules that define aot_specs(arch); the canonical attention first, so that the
# yardstick heads the attention rows in the table.
SPEC_MODULES = ["dysink_kernels.tools.canonical_attention", "dysink_kernels.tools.kernel_specs"]

# Shared memory a block may use (opt-in maximum), bytes: the archs the report knows.
# sm_89 (Ada) is there for its native fp8 conversions; it has 99 KB like sm_86.
SHARED_LIMIT = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# What ``--arch`` accepts (sm_90a is sm_90: Triton always emits the ``a`` target).
ARCH_CHOICES = ("sm_80", "sm_89", "sm_90", "sm_90a")

# Loop gates (ours / canonical loop instructions per 64 keys), on these archs only:
# the loop budget is derived from Hopper's issue rate against its wgmma throughput.
LOOP_GATE_ARCHS = (90,)
LOOP_RATIO_PLAIN = 1.08  # module, op
LOOP_RATIO_STATS = 1.20  # module+stats, op+stats
# Re-positioned slots and the fp8 bank: at most this times the plain row's loop
# (the row with the same call and no variant flags, e.g. module for module+stats+fp8).
LOOP_RATIO_VARIANT = 1.25
LOOP_KEYS = 64  # loop_instructions are per this many keys
LOOP_MIX_SHOWN = 12  # the most frequent opcodes of the worst loop, in --json
ATTENTION_PREFIX = "gathered_sink_attention"
CANONICAL_NAME = "canonical_attn"
# Flags in a gathered_sink_attention[...] name that select the variant gate.
_VARIANT_FLAGS = frozenset({"rotate", "fp8"})
_STATS_FLAG = "stats"
# FMA contraction as Triton <= 3.9 applies it by default (the launchers pass no
# option); stated so that the counts do not move with Triton's default.
FP_FUSION = True


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
    # keys one trip of the key loop consumes, when not BLOCK_N (a loop unrolled by 2)
    loop_keys: int | None = None


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
    """``"sm_90"``/``"sm_90a"``/``90`` -> 90; only the archs in ``ARCH_CHOICES``, those
    the report has a shared-memory limit for (others can crash the compiler: sm_99
    aborts inside LLVM)."""
    if isinstance(arch, int) and not isinstance(arch, bool) and arch in SHARED_LIMIT:
        return arch
    if isinstance(arch, str) and arch in ARCH_CHOICES:
        return int(arch[3:5])
    raise ValueError(
        f"arch must be one of {', '.join(ARCH_CHOICES)} (the archs the kernel report has "
        f"shared-memory limits for), got {arch!r}"
    )


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


# ----------------------------------------------------------------------------- SASS loops
# Tensor-core instructions: Hopper's wgmma (HGMMA; QGMMA for fp8, IGMMA for int8) and
# the mma.sync family (HMMA; IMMA for integers).
TENSOR_CORE_OPCODES = frozenset({"HGMMA", "QGMMA", "IGMMA", "HMMA", "IMMA"})
_BRANCH_OPCODES = frozenset({"BRA", "JMP"})
_PLAIN_BRANCHES = frozenset({"BRA", "BRA.U", "JMP"})
# Instructions after which control does not fall through (unless predicated); BRX/JMX
# jump through a register, to targets the listing does not name.
_END_OPCODES = frozenset({"EXIT", "RET", "BRX", "JMX", "KILL"})
_ADDRESS = re.compile(r"^/\*([0-9a-fA-F]+)\*/\s*")
_INSTRUCTION = re.compile(
    r"^(?:(@!?[A-Za-z0-9_]+)\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)([^;]*);"
)
_LABEL = re.compile(r"^([.$]?[A-Za-z_][\w.$]*):(?:\s*//.*)?$")
_FUNCTION = re.compile(r"^(?:Function\s*:\s*(\S+)|\.text\.(\S+?):)")
_TARGET_LABEL = re.compile(r"`\(([^)]+)\)|([.$][A-Za-z_][\w.$]*)\s*$")
_TARGET_ADDRESS = re.compile(r"(-?0x[0-9a-fA-F]+)\s*$")


@dataclass(frozen=True)
class SassInstruction:
    """One SASS instruction: ``address`` (None when the listing has none), the full
    ``opcode`` with its modifiers (``HGMMA.64x64x16.F32.BF16``), its guard
    ``predicate`` (``@!P0``, or ``""``), and for a branch its ``target``: an address
    (cuobjdump) or a label (nvdisasm); ``labels`` name this instruction."""

    address: int | None
    opcode: str
    predicate: str = ""
    target: int | str | None = None
    labels: tuple[str, ...] = ()
    operands: str = ""

    @property
    def base(self) -> str:
        """The opcode without modifiers: ``HGMMA``."""
        return self.opcode.split(".", 1)[0]


@dataclass(frozen=True)
class SassLoop:
    """A natural loop of one function: ``head`` is the index of its first instruction,
    ``end`` that of its backward branch (of the loop test, when the compiler puts the
    test at the bottom and enters the loop by jumping to it), ``members`` the indices
    of its instructions from the head down to ``end`` and ``opcodes`` theirs.
    Out-of-line blocks placed after the branch (the retry path of an mbarrier wait,
    a shuffle's divergent path, both jumping back into the loop) are not part of the
    steady state and are left out."""

    function: str
    head: int
    end: int
    members: tuple[int, ...]
    opcodes: tuple[str, ...]

    @property
    def instructions(self) -> int:
        """Instructions in the steady-state loop."""
        return len(self.members)

    @property
    def tensor_core_ops(self) -> int:
        """HGMMA/HMMA-family instructions in the loop."""
        return sum(op.split(".", 1)[0] in TENSOR_CORE_OPCODES for op in self.opcodes)

    def mix(self) -> Counter:
        """Instructions per opcode without modifiers (``MUFU.EX2`` kept whole)."""
        return Counter(op if op.startswith("MUFU") else op.split(".", 1)[0] for op in self.opcodes)


def parse_sass(text: str) -> dict[str, list[SassInstruction]]:
    """Instructions per function of a ``cuobjdump --dump-sass`` or ``nvdisasm``
    listing (label lines ``.L_x_12:`` attach to the next instruction; the second half
    of each encoding, a bare ``/* 0x... */``, is skipped)."""
    functions: dict[str, list[SassInstruction]] = {}
    current: list[SassInstruction] = functions.setdefault("", [])
    pending: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        fn = _FUNCTION.match(line)
        if fn:
            current = functions.setdefault(fn.group(1) or fn.group(2), [])
            pending = []
            continue
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        address = _ADDRESS.match(line)
        body = line[address.end() :] if address else line
        m = _INSTRUCTION.match(body)
        if not m:
            continue
        predicate, opcode, operands = m.group(1) or "", m.group(2), m.group(3).strip()
        target: int | str | None = None
        if opcode.split(".", 1)[0] in _BRANCH_OPCODES:
            named = _TARGET_LABEL.search(operands)
            number = _TARGET_ADDRESS.search(operands)
            if named:
                target = named.group(1) or named.group(2)
            elif number:
                target = int(number.group(1), 16)
        current.append(
            SassInstruction(
                address=int(address.group(1), 16) if address else None,
                opcode=opcode,
                predicate=predicate,
                target=target,
                labels=tuple(pending),
                operands=operands,
            )
        )
        pending = []
    return {name: instrs for name, instrs in functions.items() if instrs}


def _conditional(ins: SassInstruction) -> bool:
    """Whether control may also fall through: a guard predicate, or a branch with a
    condition of its own (``BRA.DIV ~URZ, target``: taken only when the warp has
    diverged; ``BRA.U !UP0, target``)."""
    if ins.predicate not in ("", "@PT"):
        return True
    return ins.base in _BRANCH_OPCODES and (
        ins.opcode not in _PLAIN_BRANCHES or "," in ins.operands
    )


def _flow_graph(instrs: list[SassInstruction]) -> tuple[list[int], list[list[int]]]:
    """Basic-block starts and each block's successors (block numbers)."""
    where: dict[int | str, int] = {}
    for i, ins in enumerate(instrs):
        if ins.address is not None:
            where.setdefault(ins.address, i)
        for label in ins.labels:
            where.setdefault(label, i)
    n = len(instrs)
    targets = [where.get(ins.target) if ins.target is not None else None for ins in instrs]
    leaders = {0}
    for i, ins in enumerate(instrs):
        if ins.base in _BRANCH_OPCODES or ins.base in _END_OPCODES:
            leaders.add(i + 1)
        if targets[i] is not None:
            leaders.add(targets[i])
    starts = sorted(x for x in leaders if x < n)
    block_of = {}
    for b, start in enumerate(starts):
        for i in range(start, starts[b + 1] if b + 1 < len(starts) else n):
            block_of[i] = b
    succs = []
    for b in range(len(starts)):
        last = (starts[b + 1] if b + 1 < len(starts) else n) - 1
        ins, out = instrs[last], []
        if ins.base in _BRANCH_OPCODES and targets[last] is not None:
            out.append(block_of[targets[last]])
        falls = _conditional(ins) or (
            ins.base not in _END_OPCODES
            and not (ins.base in _BRANCH_OPCODES and targets[last] is not None)
        )
        if falls and last + 1 < n:
            out.append(block_of[last + 1])
        succs.append(out)
    return starts, succs


def _dominators(succs: list[list[int]]) -> dict[int, int]:
    """Immediate dominators of the blocks reachable from block 0 (Cooper, Harvey and
    Kennedy's iteration over reverse postorder)."""
    post, seen, stack = [], {0}, [(0, iter(succs[0]))]
    while stack:
        node, it = stack[-1]
        nxt = next((s for s in it if s not in seen), None)
        if nxt is None:
            post.append(node)
            stack.pop()
        else:
            seen.add(nxt)
            stack.append((nxt, iter(succs[nxt])))
    order = {b: i for i, b in enumerate(post)}
    preds: dict[int, list[int]] = {b: [] for b in order}
    for b in order:
        for s in succs[b]:
            preds[s].append(b)
    idom = {0: 0}
    changed = True
    while changed:
        changed = False
        for b in reversed(post[:-1]):
            done = [p for p in preds[b] if p in idom]
            new = done[0]
            for p in done[1:]:
                x, y = p, new
                while x != y:
                    while order[x] < order[y]:
                        x = idom[x]
                    while order[y] < order[x]:
                        y = idom[y]
                new = x
            if idom.get(b) != new:
                idom[b], changed = new, True
    return idom


def _loops(name: str, instrs: list[SassInstruction]) -> list[SassLoop]:
    """Every natural loop of one function: a back edge ``u -> h`` where ``h``
    dominates ``u``; back edges into one head make one loop."""
    if not instrs:
        return []
    starts, succs = _flow_graph(instrs)
    idom = _dominators(succs)

    def dominates(h: int, u: int) -> bool:
        while u != h and u != 0:
            u = idom[u]
        return u == h

    latches: dict[int, list[int]] = {}
    for u in idom:
        for h in succs[u]:
            if dominates(h, u):
                latches.setdefault(h, []).append(u)
    ends = [*starts[1:], len(instrs)]
    preds: dict[int, list[int]] = {b: [] for b in idom}
    for p in idom:
        for b in succs[p]:
            preds[b].append(p)
    loops = []
    for h, us in sorted(latches.items()):
        body, work = {h}, [u for u in us if u != h]
        body.update(work)
        while work:
            for p in preds[work.pop()]:
                if p not in body:
                    body.add(p)
                    work.append(p)
        last = max(ends[b] - 1 for b in (*us, h))  # h last when the test is at the bottom
        members = tuple(
            i for b in sorted(body) if starts[b] <= last for i in range(starts[b], ends[b])
        )
        opcodes = tuple(instrs[i].opcode for i in members)
        loops.append(SassLoop(name, starts[h], last, members, opcodes))
    return loops


def key_loops(sass: str | dict[str, list[SassInstruction]]) -> list[SassLoop]:
    """The innermost loops whose body holds a tensor-core instruction: the key loops
    of an attention kernel (an outer loop around one of them is not a key loop)."""
    functions = parse_sass(sass) if isinstance(sass, str) else sass
    found = []
    for name, instrs in functions.items():
        mma = [lp for lp in _loops(name, instrs) if lp.tensor_core_ops]
        sets = {lp.head: set(lp.members) for lp in mma}
        found += [
            lp for lp in mma if not any(o is not lp and sets[o.head] <= sets[lp.head] for o in mma)
        ]
    return found


def worst_key_loop(sass: str | dict[str, list[SassInstruction]]) -> SassLoop | None:
    """The key loop with the most instructions, or None when there is none."""
    return max(key_loops(sass), key=lambda lp: lp.instructions, default=None)


def _disassemble(cubin: bytes) -> tuple[str, str]:
    """``cuobjdump``'s resource usage and SASS of a cubin."""
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
    return usage, sass


def _resource_usage(usage: str, sass: str) -> dict:
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {
        "registers": int(fields.get("REG", 0)),
        "spill_bytes": int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
        "static_shared": int(fields.get("SHARED", 0)),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "hmma": len(re.findall(r"\bHMMA\b", sass)),
        "local_memory_ops": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
    }


def _keys_per_iteration(spec: KernelSpec) -> int | None:
    """Keys one trip of the key loop consumes: the spec's ``loop_keys``, else
    ``BLOCK_N`` (or the config's block_n)."""
    if spec.loop_keys:
        return spec.loop_keys
    block_n = spec.constexprs.get("BLOCK_N", spec.config.get("block_n"))
    return int(block_n) if block_n else None


def _loop_fields(spec: KernelSpec, sass: str) -> dict:
    loop = worst_key_loop(sass)
    keys = _keys_per_iteration(spec)
    if loop is None or keys is None:
        return dict.fromkeys(("loop_instructions", "loop_body", "loop_keys",
                              "loop_tensor_core_ops", "loop_mix"))  # fmt: skip
    return {
        "loop_instructions": round(loop.instructions * LOOP_KEYS / keys, 1),
        "loop_body": loop.instructions,
        "loop_keys": keys,
        "loop_tensor_core_ops": loop.tensor_core_ops,
        "loop_mix": dict(loop.mix().most_common(LOOP_MIX_SHOWN)),
    }


def _pair_with_canonical(rows: list[dict]) -> None:
    """Give each attention row the canonical loop at its configuration and the ratio."""
    canonical = {
        (r["arch"], repr(sorted(r["config"].items()))): r.get("loop_instructions")
        for r in rows
        if r["name"] == CANONICAL_NAME and r.get("compiled")
    }
    for r in rows:
        if not r["name"].startswith(ATTENTION_PREFIX) or not r.get("compiled"):
            continue
        ref = canonical.get((r["arch"], repr(sorted(r["config"].items()))))
        ours = r.get("loop_instructions")
        r["canonical"] = ref
        r["ratio"] = round(ours / ref, 3) if ours and ref else None


def compile_report(arch: str | int) -> list[dict]:
    """Compile every spec for ``arch`` and return one row per (kernel, config)."""
    cc = arch_number(arch)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the kernel report needs TRITON_INTERPRET unset (it compiles for a GPU)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

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
                options={
                    "num_warps": spec.num_warps,
                    "num_stages": spec.num_stages,
                    "enable_fp_fusion": FP_FUSION,
                },
            )
        except Exception as exc:  # report, do not stop: the gate fails on it
            row.update(compiled=False, error=f"{type(exc).__name__}: {exc}"[:500])
            rows.append(row)
            continue
        usage_text, sass = _disassemble(k.asm["cubin"])
        usage = _resource_usage(usage_text, sass)
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
            **_loop_fields(spec, sass),
        )
        rows.append(row)
    _pair_with_canonical(rows)
    return rows


def _flags(name: str) -> tuple[str, frozenset[str]]:
    """``gathered_sink_attention[module+stats+fp8]`` -> ``("module", {"stats", "fp8"})``."""
    inner = name[name.find("[") + 1 : name.rfind("]")] if "[" in name else ""
    call, *flags = inner.split("+")
    return call, frozenset(flags)


def _loop_gate(r: dict, plain: dict[tuple[str, str], float | None]) -> str | None:
    """The loop budget of one attention row on a gated arch, or None when it holds."""
    ours = r.get("loop_instructions")
    if ours is None:
        return "no steady-state key loop (a backward branch around HGMMA/HMMA) in the SASS"
    call, flags = _flags(r["name"])
    if flags & _VARIANT_FLAGS:
        base = plain.get((r["arch"], call))
        if base is None:
            return f"no plain {ATTENTION_PREFIX}[{call}] row to compare the variant with"
        if ours > LOOP_RATIO_VARIANT * base:
            return (f"key loop {ours:g} instructions per {LOOP_KEYS} keys > "
                    f"{LOOP_RATIO_VARIANT} x the plain loop ({base:g})")  # fmt: skip
        return None
    if r.get("canonical") is None:
        return "no canonical loop at this configuration to compare with"
    limit = LOOP_RATIO_STATS if _STATS_FLAG in flags else LOOP_RATIO_PLAIN
    if r["ratio"] > limit:
        return (f"key loop {ours:g} instructions per {LOOP_KEYS} keys = {r['ratio']:.3f} x "
                f"the canonical {r['canonical']:g} > {limit}")  # fmt: skip
    return None


def check_report(rows: list[dict]) -> list[str]:
    """The CI gates: every kernel compiles, no spills, shared memory within the limit,
    on sm_90 the tensor-core kernels use HGMMA and every attention key loop keeps
    within its budget against the canonical loop (``LOOP_RATIO_*``). Returns the
    failures."""
    bad = []
    plain = {
        (r["arch"], _flags(r["name"])[0]): r.get("loop_instructions")
        for r in rows
        if r["name"].startswith(ATTENTION_PREFIX) and r.get("compiled") and not _flags(r["name"])[1]
    }
    for r in rows:
        tag = f"{r['name']} {r['arch']} {r['config']}"
        if not r.get("compiled"):
            bad.append(f"{tag}: does not compile ({r.get('error')})")
            continue
        cc = arch_number(r["arch"])
        if r["spill_bytes"] > 0 or r["local_memory_ops"] > 0:
            bad.append(f"{tag}: spills ({r['spill_bytes']} bytes, {r['local_memory_ops']} ops)")
        if r["shared_bytes"] > SHARED_LIMIT[cc]:
            bad.append(f"{tag}: {r['shared_bytes']} bytes of shared memory > {SHARED_LIMIT[cc]}")
        if cc >= 90 and r["needs_tensor_cores"] and r["hgmma"] == 0:
            bad.append(f"{tag}: no HGMMA (wgmma) in the SASS")
        if cc in LOOP_GATE_ARCHS and r["name"].startswith(ATTENTION_PREFIX):
            problem = _loop_gate(r, plain)
            if problem:
                bad.append(f"{tag}: {problem}")
    return bad


def _num(x: float | None, fmt: str = "g") -> str:
    return "-" if x is None else format(x, fmt)


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows; a config equal to the row above reads ``same``."""
    head = ["kernel", "arch", "config", "regs", "spill B", "smem B", "TC ops",
            f"loop instr / {LOOP_KEYS} keys", "canonical", "ratio"]  # fmt: skip
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    previous = None
    for r in rows:
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        shown = "same" if (r["arch"], cfg) == previous else cfg
        previous = (r["arch"], cfg)
        if not r.get("compiled"):
            lines.append(f"{r['name']} | {r['arch']} | {shown} | compile error" + " |" * 6)
            continue
        tc = f"{r['tensor_core_ops']} ({'HGMMA' if r['hgmma'] else 'HMMA' if r['hmma'] else '-'})"
        lines.append(
            f"{r['name']} | {r['arch']} | {shown} | {r['registers']} | {r['spill_bytes']} | "
            f"{r['shared_bytes']} | {tc} | {_num(r.get('loop_instructions'))} | "
            f"{_num(r.get('canonical'))} | {_num(r.get('ratio'), '.2f')}"
        )
    return "\n".join("| " + line + " |" for line in lines)
