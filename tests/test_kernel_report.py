"""The ahead-of-time kernel report and its CI gates (compiles for sm_80/sm_90, no GPU):
the SASS loop parser on synthetic and real listings, the canonical flash-attention
forward against SDPA in the interpreter, and the loop budget of the attention kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dysink_kernels._backends import triton_installed
from dysink_kernels.tools import kernel_report as kr
from dysink_kernels.tools.kernel_report import (
    LOOP_RATIO_PLAIN,
    LOOP_RATIO_STATS,
    LOOP_RATIO_VARIANT,
    arch_number,
    check_report,
    key_loops,
    parse_sass,
    worst_key_loop,
)

from conftest import assert_close

needs_triton = pytest.mark.skipif(not triton_installed(), reason="triton is not installed")
ARCHS = ["sm_90", "sm_80"]


def _no_interpreter_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run_report(arch: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "dysink_kernels", "kernels", "--arch", arch, "--json"],
        capture_output=True, text=True, env=_no_interpreter_env(), check=False, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module", params=ARCHS)
def report(request):
    if not triton_installed():
        pytest.skip("triton is not installed")
    return request.param, _run_report(request.param)


# ----------------------------------------------------------------------------- SASS parser
def _cuobjdump_listing(lines: list[str], name: str = "k") -> str:
    """cuobjdump's layout: an address comment per instruction, the encoding's second
    half on its own line."""
    out = ["\tcode for sm_90a", f"\t\tFunction : {name}", '\t.headerflags\t@"EF_CUDA_SM90"']
    for i, text in enumerate(lines):
        out.append(f"        /*{i * 16:04x}*/                   {text} ;   /* 0x000000000000 */")
        out.append("                                        /* 0x000fe20000000a00 */")
    return "\n".join(out) + "\n"


# Nested loops with tensor cores in both: the outer (segments) around the inner
# (key tiles); a predicated backward branch; an mbarrier retry placed after EXIT that
# jumps back into the inner loop; a divergence branch; a loop without MMA.
_SYNTHETIC = [
    "S2R R0, SR_TID.X",  # 0
    "MOV R1, RZ",  # 1   outer head
    "HMMA.16816.F32.BF16 R4, R8, R12, R4",  # 2   (outer loop's own MMA)
    "IADD3 R2, R2, 0x1, RZ",  # 3   inner head
    "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], RZ",  # 4
    "@!P0 BRA 0x100",  # 5   -> retry (index 16)
    "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24",  # 6
    "BRA.DIV ~URZ, 0x130",  # 7   -> divergent path (index 19)
    "SHFL.BFLY PT, R3, R2, 0x1, 0x1f",  # 8
    "FMUL R3, R3, R3",  # 9
    "ISETP.GE.AND P1, PT, R2, R5, PT",  # 10
    "@!P1 BRA 0x30",  # 11  inner back edge -> 3
    "ISETP.GE.AND P2, PT, R1, R6, PT",  # 12
    "@!P2 BRA 0x10",  # 13  outer back edge -> 1
    "EXIT",  # 14
    "BRA 0xf0",  # 15  trap loop after EXIT (unreachable)
    "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], RZ",  # 16  retry
    "@!P0 BRA 0x100",  # 17
    "BRA 0x60",  # 18  back into the inner loop, not to its head
    "SHFL.BFLY PT, R3, R2, 0x1, 0x1f",  # 19  divergent path
    "BRA 0x90",  # 20
]


def test_parser_reads_cuobjdump_layout():
    fns = parse_sass(_cuobjdump_listing(_SYNTHETIC, "attn"))
    assert list(fns) == ["attn"]
    ins = fns["attn"]
    assert len(ins) == len(_SYNTHETIC)
    assert ins[5].predicate == "@!P0" and ins[5].base == "BRA" and ins[5].target == 0x100
    assert ins[6].opcode == "HGMMA.64x64x16.F32.BF16" and ins[6].base == "HGMMA"
    assert ins[7].opcode == "BRA.DIV" and ins[7].target == 0x130
    assert ins[0].address == 0 and ins[20].address == 20 * 16


def test_innermost_mma_loop_excludes_cold_paths():
    loops = key_loops(_cuobjdump_listing(_SYNTHETIC))
    assert len(loops) == 1, loops  # the outer loop holds the inner one: not a key loop
    (inner,) = loops
    # head 3 .. back edge 11, the divergent/retry paths after EXIT left out
    assert (inner.head, inner.end, inner.instructions, inner.tensor_core_ops) == (3, 11, 9, 1)
    every = kr._loops("k", parse_sass(_cuobjdump_listing(_SYNTHETIC))["k"])
    spans = {(lp.head, lp.end) for lp in every}
    assert (1, 13) in spans and (3, 11) in spans  # outer and inner found as loops
    assert all(lp.head != 18 for lp in every)  # the retry's jump back is no back edge


def test_parser_reads_nvdisasm_labels():
    listing = textwrap.dedent("""\
        //--------------------- .text.attn --------------------------
            .section    .text.attn,"ax",@progbits
        attn:
        .text.attn:
                /*0000*/                   S2R R0, SR_TID.X ;
        .L_x_0:
                /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        .L_x_1:
                /*0020*/                   FMUL R3, R3, R3 ;
                /*0030*/              @P1 BRA `(.L_x_1) ;
                /*0040*/                   FADD R3, R3, R3 ;
                /*0050*/              @!P0 BRA `(.L_x_0) ;
        .L_x_2:
                /*0060*/                   HMMA.16816.F32.F16 R4, R8, R12, R4 ;
                /*0070*/                   MOV R1, R2 ;
                /*0080*/                   IADD3 R2, R2, 0x1, RZ ;
                /*0090*/                   ISETP.NE.AND P2, PT, R2, R5, PT ;
                /*00a0*/                   FMUL R9, R9, R9 ;
                /*00b0*/              @P2 BRA `(.L_x_2) ;
                /*00c0*/                   EXIT ;
        """)  # fmt: skip
    fns = parse_sass(listing)
    assert list(fns) == ["attn"]
    ins = fns["attn"]
    assert ins[1].labels == (".L_x_0",) and ins[3].target == ".L_x_1"
    loops = sorted((lp.head, lp.end, lp.instructions) for lp in key_loops(fns))
    # .L_x_1's loop has no MMA, the loop around it does: two key loops, the worst has 6
    assert loops == [(1, 5, 5), (6, 11, 6)]
    assert worst_key_loop(listing).instructions == 6
    assert worst_key_loop("no code here") is None


def test_loop_entered_at_its_bottom_test():
    """``BRA test; body: ...; test: @P0 BRA body``: the test block heads the loop."""
    listing = _cuobjdump_listing(
        ["S2R R0, SR_TID.X", "BRA 0x40", "HMMA.16816.F32.BF16 R4, R8, R12, R4", "FADD R1, R1, R2",
         "ISETP.NE.AND P0, PT, R1, R3, PT", "@P0 BRA 0x20", "EXIT"]
    )  # fmt: skip
    (loop,) = key_loops(listing)
    assert (loop.head, loop.end, loop.members) == (4, 5, (2, 3, 4, 5))
    assert loop.tensor_core_ops == 1 and loop.mix()["HMMA"] == 1


def test_loop_fields_scale_to_64_keys():
    sass = _cuobjdump_listing(_SYNTHETIC)
    spec = kr.KernelSpec("k", fn=None, signature={}, constexprs={"BLOCK_N": 32}, num_warps=4,
                         num_stages=1)  # fmt: skip
    fields = kr._loop_fields(spec, sass)
    assert (fields["loop_body"], fields["loop_keys"], fields["loop_instructions"]) == (9, 32, 18)
    assert fields["loop_tensor_core_ops"] == 1 and fields["loop_mix"]["HGMMA"] == 1
    spec.loop_keys = 128  # a loop unrolled over two 64-key tiles
    assert kr._loop_fields(spec, sass)["loop_instructions"] == 4.5
    spec.loop_keys, spec.constexprs = None, {}
    assert kr._loop_fields(spec, sass)["loop_instructions"] is None


# ----------------------------------------------------------------------------- arch
def test_arch_number_accepts_only_supported_archs():
    assert arch_number("sm_90") == arch_number("sm_90a") == arch_number(90) == 90
    assert arch_number("sm_80") == 80 and arch_number("sm_89") == 89
    for bad in ("sm_99", "sm_100", "sm_75", 99, "90", "sm90", True):
        with pytest.raises(ValueError, match="sm_80, sm_89, sm_90"):
            arch_number(bad)
    assert set(kr.SHARED_LIMIT) == {arch_number(a) for a in kr.ARCH_CHOICES}


@needs_triton
def test_compile_report_rejects_unsupported_arch_before_compiling():
    with pytest.raises(ValueError, match="sm_99"):
        kr.compile_report("sm_99")


# ----------------------------------------------------------------------------- canonical
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("use_tma", [True, False])
def test_canonical_attention_matches_sdpa(dtype, use_tma):
    from dysink_kernels.tools.canonical_attention import canonical_attention

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or the Triton interpreter")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    b, sq, sk, h, d = 2, 37, 45, 3, 32  # neither length a multiple of the tiles
    q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=dtype) for s in (sq, sk, sk))
    out = canonical_attention(q, k, v, block_m=16, block_n=16, num_stages=1, use_tma=use_tma)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.double().transpose(1, 2) for x in (q, k, v))
    ).transpose(1, 2)
    assert_close(out, ref, dtype, scale=4)
    one = canonical_attention(q, k[:, :16], v[:, :16], scale=0.3, block_m=16, block_n=16)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.double().transpose(1, 2) for x in (q, k[:, :16], v[:, :16])), scale=0.3
    ).transpose(1, 2)
    assert_close(one, ref, dtype, scale=4)  # whole tiles only: no masked tail


# ----------------------------------------------------------------------------- report
def test_every_kernel_compiles_without_spills_and_fits(report):
    arch, rows = report
    assert rows, "no kernel in the report"
    assert check_report(rows) == [], check_report(rows)
    for r in rows:
        assert r["arch"] == arch
        for key in ("name", "config", "registers", "spill_bytes", "shared_bytes",
                    "tensor_core_ops", "loop_instructions"):  # fmt: skip
            assert key in r


def test_attention_production_configs_present(report):
    arch, rows = report
    attn = [r for r in rows if r["name"].startswith("gathered_sink_attention")]
    names = {r["name"] for r in attn}
    assert {"gathered_sink_attention[module]", "gathered_sink_attention[module+stats]"} <= names
    for r in attn:
        assert r["config"]["D"] == 128 and r["config"]["dtype"] == "bf16"
        assert r["tensor_core_ops"] > 0
        if arch == "sm_90":
            assert r["hgmma"] > 0, "no wgmma on Hopper"


def test_every_attention_row_has_its_canonical_loop(report):
    arch, rows = report
    canonical = [r for r in rows if r["name"] == kr.CANONICAL_NAME]
    assert canonical and all(r["compiled"] for r in canonical)
    for c in canonical:
        # the textbook loop: both matmuls of one tile, a few hundred instructions
        assert 150 <= c["loop_instructions"] <= 1000, c
        assert c["loop_body"] * 64 / c["loop_keys"] == pytest.approx(c["loop_instructions"])
        if arch == "sm_90":
            assert c["hgmma"] > 0
    for r in rows:
        if r["name"].startswith("gathered_sink_attention"):
            assert r["loop_instructions"] is not None, r["name"]
            assert r["canonical"] in {c["loop_instructions"] for c in canonical}
            assert r["ratio"] == pytest.approx(r["loop_instructions"] / r["canonical"], abs=1e-3)


def test_attention_loop_within_canonical_budget(report):
    """ours / canonical key-loop instructions on sm_90 (on sm_80 reported only)."""
    arch, rows = report
    if arch_number(arch) not in kr.LOOP_GATE_ARCHS:
        pytest.skip(f"the loop budget is gated on {kr.LOOP_GATE_ARCHS} only")
    attn = {r["name"]: r for r in rows if r["name"].startswith("gathered_sink_attention")}
    over = []
    for name, r in attn.items():
        call, flags = kr._flags(name)
        if flags & {"rotate", "fp8"}:
            base = attn[f"gathered_sink_attention[{call}]"]["loop_instructions"]
            if r["loop_instructions"] > LOOP_RATIO_VARIANT * base:
                over.append(f"{name}: {r['loop_instructions']} > {LOOP_RATIO_VARIANT} x {base}")
        else:
            limit = LOOP_RATIO_STATS if "stats" in flags else LOOP_RATIO_PLAIN
            if r["ratio"] > limit:
                over.append(f"{name}: {r['ratio']} x canonical {r['canonical']} > {limit}")
    assert not over, over


def _row(name, loop, canonical=300.0, **extra):
    row = {"name": name, "arch": "sm_90", "config": {}, "compiled": True, "registers": 128,
           "spill_bytes": 0, "local_memory_ops": 0, "shared_bytes": 1024, "hgmma": 12,
           "hmma": 0, "tensor_core_ops": 12, "needs_tensor_cores": True,
           "loop_instructions": loop, "canonical": canonical,
           "ratio": loop / canonical if loop and canonical else None}  # fmt: skip
    row.update(extra)
    return row


def test_gate_catches_problems():
    rows = [
        _row("k", None, spill_bytes=8, local_memory_ops=2, shared_bytes=300_000, hgmma=0,
             tensor_core_ops=0),
        {"name": "j", "arch": "sm_80", "config": {}, "compiled": False, "error": "boom"},
    ]  # fmt: skip
    problems = " ".join(check_report(rows))
    assert "spills" in problems and "shared memory" in problems and "HGMMA" in problems
    assert "does not compile" in problems


def test_loop_gates_per_variant():
    ok = [
        _row("gathered_sink_attention[module]", 300 * LOOP_RATIO_PLAIN - 0.5),
        _row("gathered_sink_attention[module+stats]", 300 * LOOP_RATIO_STATS - 0.5),
        _row(
            "gathered_sink_attention[module+stats+rotate]",
            (300 * LOOP_RATIO_PLAIN - 0.5) * LOOP_RATIO_VARIANT,
        ),
        _row("gathered_sink_attention[op+stats+fp8]", 300.0),
        _row("gathered_sink_attention[op]", 290.0),
    ]
    assert check_report(ok) == []
    bad = [
        _row("gathered_sink_attention[module]", 300 * LOOP_RATIO_PLAIN + 3),
        _row("gathered_sink_attention[module+stats]", 300 * LOOP_RATIO_STATS + 3),
        _row(
            "gathered_sink_attention[module+stats+fp8]",
            300 * LOOP_RATIO_PLAIN * LOOP_RATIO_VARIANT + 9,
        ),
        _row("gathered_sink_attention[op+stats]", None),
        _row("gathered_sink_attention[op+rotate]", 300.0),  # no plain op row
        _row("gathered_sink_attention[module]", 300.0, canonical=None, arch="sm_90"),
    ]
    problems = check_report(bad)
    assert len(problems) == len(bad), problems
    assert "no steady-state key loop" in problems[3] and "no plain" in problems[4]
    assert "no canonical" in problems[5]
    # sm_80 is reported, not gated
    assert (
        check_report([_row("gathered_sink_attention[module]", 900.0, arch="sm_80", hgmma=0)]) == []
    )


# ----------------------------------------------------------------------------- real SASS
@needs_triton
def test_loop_count_agrees_between_cuobjdump_and_nvdisasm(tmp_path):
    """Compile the canonical kernel for sm_90 in a clean process and read its cubin
    both ways: the two listings must give the same key loop."""
    script = textwrap.dedent("""\
        import sys
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from dysink_kernels.tools.canonical_attention import aot_specs
        spec = aot_specs(90)[0]
        names = spec.fn.arg_names
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible}
        k = triton.compile(ASTSource(spec.fn, spec.signature, spec.constexprs, attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                    "enable_fp_fusion": True})
        open(sys.argv[1], "wb").write(k.asm["cubin"])
        """)  # fmt: skip
    cubin = tmp_path / "canonical.cubin"
    out = subprocess.run([sys.executable, "-c", script, str(cubin)], capture_output=True,
                         text=True, env=_no_interpreter_env(), timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    tools = os.path.dirname(kr._cuobjdump())
    sass = subprocess.run([kr._cuobjdump(), "--dump-sass", str(cubin)], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    nvdisasm = os.path.join(tools, "nvdisasm")
    if not os.path.exists(nvdisasm):
        pytest.skip("nvdisasm is not shipped with this Triton")
    listing = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    a, b = worst_key_loop(sass), worst_key_loop(listing)
    assert a is not None and b is not None
    assert (a.head, a.end, a.instructions) == (b.head, b.end, b.instructions)
    assert a.opcodes == b.opcodes
    mix = a.mix()
    # the textbook Hopper loop at 128x64x128: 8 HGMMA for Q K^T and 4 for P V, K and
    # V by TMA, one exp2 per score per thread (32) plus the two row rescales, the
    # scale folded into one FFMA per exp2
    assert a.tensor_core_ops == mix["HGMMA"] == 12
    assert mix["UTMALDG"] == 2 and mix["LDGSTS"] == 0
    assert mix["MUFU.EX2"] == 34 and mix["FFMA"] >= 32
