"""Ahead-of-time specs of the small per-block kernels, at the reference shape of Wan2.1-1.3B:
B=1, 64 bank slots, F=1024 features, H=12, D=128, Sq=4680, a 23,400-key window,
30 layers of 4,680-token entries in bf16. Block sizes follow each launcher, and the
integer arguments take their production values so that the report sees what Triton
specialises at run time (a value of 1 becomes a constant, multiples of 16 are
marked divisible, pointers are 16-byte aligned)."""

from __future__ import annotations

import torch
import triton

from ..ops.bank_insert import triton as ins
from ..ops.gathered_sink_attention import triton as att
from ..ops.select_sinks import triton as sel
from ..ops.sink_gate import triton as gate
from .kernel_report import KernelSpec, signature_for

B, P, F, M, K = 1, 64, 1024, 3, 2
H, D, SQ, SK, S_E, LAYERS = 12, 128, 4680, 23400, 4680, 30


def _strides(*shape: int) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def _spec(name, fn, pointers, constexprs, values, num_warps, config, floats=()):
    """A spec whose int arguments take ``values``: 1 -> constant, 16k -> divisible."""
    constexprs = dict(constexprs)
    divisible = list(pointers)
    for arg, value in values.items():
        if value == 1:
            constexprs[arg] = 1
        elif value % 16 == 0:
            divisible.append(arg)
    return KernelSpec(
        name=name, fn=fn, signature=signature_for(fn, pointers, constexprs, floats),
        constexprs=constexprs, num_warps=num_warps, num_stages=3, config=config,
        divisible=tuple(divisible),
    )  # fmt: skip


def _named(names: str, values) -> dict[str, int]:
    return dict(zip(names.split(), values))


def aot_specs(arch: int) -> list[KernelSpec]:
    """Every Triton kernel of the package at its production configurations."""
    specs = gathered_attention_specs(arch)
    block_p = min(triton.next_power_of_2(P), sel.MAX_BLOCK_P)
    block_f = min(triton.next_power_of_2(F), max(sel.TILE_ELEMS // block_p, 1))
    # One kernel, three variants: top-k, top-k with the usage prior (relevance_mix > 0),
    # and the scores alone (k > MAX_K). Arguments a variant does not read take 0.
    values = _named(
        "M F P k sink_frames stride_qb stride_qm stride_qf stride_sp stride_sf stride_owner "
        "stride_frame stride_lo stride_hi stride_prb stride_prp stride_ob stride_ok "
        "stride_cb stride_ck",
        (M, F, P, K, 0, *_strides(B, M, F), *_strides(P, F), 1, 1, 1, 1, 0, 0,
         *_strides(B, K), *_strides(B, K)),
    )  # fmt: skip
    pointers = {"qf_ptr": "*fp32", "sf_ptr": "*fp32", "owner_ptr": "*i32", "frame_ptr": "*i32",
                "lo_ptr": "*i32", "hi_ptr": "*i32", "prior_ptr": "*fp32",
                "slot_out_ptr": "*i32", "score_out_ptr": "*fp32"}  # fmt: skip
    blocks = dict(NORM_EPS=sel.NORM_EPS, BLOCK_M=triton.next_power_of_2(M), BLOCK_F=block_f,
                  BLOCK_P=block_p)  # fmt: skip
    top_k = dict(blocks, BLOCK_K=triton.next_power_of_2(K), TOPK=True)
    prior_values = dict(values, **_named("stride_prb stride_prp", _strides(B, P)))
    scores_values = dict(
        prior_values, k=0, stride_ob=0, stride_ok=0,
        **_named("stride_cb stride_ck", _strides(B, P)),
    )  # fmt: skip
    for name, constexprs, vals, config, ptrs in (
        ("select_sinks", dict(top_k, HAS_PRIOR=False), values, {"P": P, "F": F, "k": K},
         pointers),
        ("select_sinks.prior", dict(top_k, HAS_PRIOR=True), prior_values,
         {"P": P, "F": F, "k": K}, pointers),
        ("select_sinks.scores", dict(blocks, BLOCK_K=1, TOPK=False, HAS_PRIOR=True),
         scores_values, {"P": P, "F": F, "prior": True}, dict(pointers, slot_out_ptr="*fp32")),
    ):  # fmt: skip
        specs.append(_spec(name, sel._select_sinks_fwd, ptrs, constexprs, vals, sel.NUM_WARPS,
                           config, floats=("w_cos", "w_prior")))  # fmt: skip

    nq, nk = gate._split_rows(SQ, SK, B, H)
    rows_q, rows_k = -(-SQ // nq), -(-SK // nk)
    part = _strides(B, nq + nk, H, D)
    values = _named(
        "Sq D NQ rows_q rows_k stride_qb stride_qs stride_qh stride_qd stride_kb stride_ks "
        "stride_kh stride_kd stride_klen stride_pb stride_pc stride_ph",
        (SQ, D, nq, rows_q, rows_k, *_strides(B, SQ, H, D), *_strides(B, SK, H, D), 1,
         *part[:3]),
    )  # fmt: skip
    specs.append(_spec(
        "sink_gate.row_sums", gate._row_sums_fwd,
        {"q_ptr": "*bf16", "k_ptr": "*bf16", "k_len_ptr": "*i32", "part_ptr": "*fp32"},
        dict(BLOCK_S=gate.BLOCK_S, BLOCK_D=D, STAGES=gate.SUM_STAGES),
        values, gate.NUM_WARPS, {"Sq": SQ, "Sk": SK, "H": H, "D": D, "dtype": "bf16"},
    ))  # fmt: skip
    block_c = triton.next_power_of_2(max(nq, nk))
    block_n, block_h = triton.next_power_of_2(K), triton.next_power_of_2(H)
    block_d = min(triton.next_power_of_2(D), max(gate.VOTE_TILE_ELEMS // (block_n * block_h), 1))
    block_hd = min(triton.next_power_of_2(H * D), max(gate.VOTE_TILE_ELEMS // block_c, 1))
    means = _strides(B, 2, H, D)
    values = _named(
        "B H D P n NQ NK q_count stride_pb stride_pc stride_qb stride_qh stride_qd stride_kb "
        "stride_kh stride_kd stride_qk stride_klen stride_mp stride_mh stride_md stride_ib "
        "stride_in stride_ob stride_on stride_rb stride_rn",
        (B, H, D, P, K, nq, nk, SQ, part[0], part[1], means[0], means[2], means[3], means[0],
         means[2], means[3], H * D, 1, *_strides(P, H, D), *_strides(B, K), *_strides(B, K),
         *_strides(B, K)),
    )  # fmt: skip
    specs.append(_spec(
        "sink_gate.vote", gate._gate_vote_fwd,
        {"part_ptr": "*fp32", "qm_ptr": "*fp32", "km_ptr": "*fp32", "k_len_ptr": "*i32",
         "mk_ptr": "*fp32", "idx_ptr": "*i32", "kept_ptr": "*i32", "ratio_ptr": "*fp32"},
        dict(FROM_SUMS=True, SCOPE_BATCH=True, BLOCK_C=block_c, BLOCK_HD=block_hd,
             BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_D=block_d),
        values, gate.VOTE_NUM_WARPS, {"n": K, "H": H, "D": D, "scope": "batch"},
        floats=("tau",),
    ))  # fmt: skip

    values = _named(
        "H D P n stride_qb stride_qh stride_qd stride_kb stride_kh stride_kd stride_mp "
        "stride_mh stride_md stride_ib stride_in stride_vb stride_vn",
        (H, D, P, K, *_strides(B, H, D), *_strides(B, H, D), *_strides(P, H, D),
         *_strides(B, K), *_strides(B, K)),
    )  # fmt: skip
    specs.append(_spec(
        "sink_gate.votes", gate._gate_votes_fwd,
        {"qm_ptr": "*fp32", "km_ptr": "*fp32", "mk_ptr": "*fp32", "idx_ptr": "*i32",
         "votes_ptr": "*fp32"},
        dict(BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_D=block_d),
        values, gate.NUM_WARPS, {"n": K, "H": H, "D": D},
    ))  # fmt: skip

    block_cs = min(triton.next_power_of_2(P), ins.MAX_BLOCK_C)
    block_fs = min(triton.next_power_of_2(F), max(ins.DECIDE_TILE_ELEMS // block_cs, 1))
    values = _named(
        "F C limit stride_fb stride_ff stride_sp stride_sf stride_owner stride_frame stride_stamp",
        (F, P, P, *_strides(B, F), *_strides(B * P, F), 1, 1, 1),
    )
    specs.append(_spec(
        "bank_insert.choose", ins._choose_slot_fwd,
        {"feat_ptr": "*fp32", "sfeat_ptr": "*fp32", "owner_ptr": "*i32", "frame_ptr": "*i32",
         "stamp_ptr": "*i64", "clock_ptr": "*i64", "new_frame_ptr": "*i64",
         "store_ptr": "*i8", "slot_ptr": "*i64"},
        dict(HAS_DEDUP=True, NORM_EPS=ins.NORM_EPS, BLOCK_C=block_cs, BLOCK_F=block_fs),
        values, ins.NUM_WARPS, {"slots": P, "F": F}, floats=("dedup",),
    ))  # fmt: skip
    ring = 12 * 1560  # the window ring of the reference config, tokens
    src = _strides(LAYERS, B, ring, H, D)
    pool = _strides(LAYERS, B * P, S_E, H, D)
    values = _named(
        "B S_e D stride_skl stride_skb stride_skn stride_skh stride_skd stride_svl stride_svb "
        "stride_svn stride_svh stride_svd stride_pos stride_pkl stride_pkp stride_pkt "
        "stride_pkh stride_pkd stride_pvl stride_pvp stride_pvt stride_pvh stride_pvd "
        "stride_ml stride_mp stride_mh stride_md",
        (B, S_E, D, *src, *src, 1, *pool, *pool, *_strides(LAYERS, B * P, H, D)),
    )
    specs.append(_spec(
        "bank_insert.copy", ins._copy_block_fwd,
        {"src_k_ptr": "*bf16", "src_v_ptr": "*bf16", "pos_ptr": "*i64", "pool_k_ptr": "*bf16",
         "pool_v_ptr": "*bf16", "mean_ptr": "*fp32", "store_ptr": "*i8", "slot_ptr": "*i64",
         "clock_ptr": "*i64"},
        dict(BLOCK_T=ins.BLOCK_T, BLOCK_D=D),
        values, ins.COPY_NUM_WARPS,
        {"layers": LAYERS, "tokens": S_E, "H": H, "D": D, "dtype": "bf16"},
    ))  # fmt: skip
    return specs


# ----------------------------------------------------------------------------- AOT report
_CONSTEXPRS = ("D", "N_RANGES", "HAS_CUR", "STATS", "ROTATE", "QUANT", "N_SLOTS", "BLOCK_M",
               "BLOCK_N", "BLOCK_D", "PRECISION", "USE_TMA", "FP8_NATIVE")  # fmt: skip
_KV = ("PK", "PV", "LK", "LV", "CK", "CV")


def gathered_attention_specs(arch: int, head_dim: int = 128, dtype: str = "bf16") -> list:
    """Production configurations for the kernel report: the module's call (3 local
    ranges + current keys) and the public op's (1 range), with and without stats,
    re-positioned slots and an fp8 bank. On sm_90 K/V are tensor descriptors."""
    names = att._gathered_attn_fwd.arg_names
    tma = arch >= 90
    # Pointers are 16-byte aligned and strides of (tokens, heads, dim) tensors with
    # H * D a multiple of 16 are multiples of 16, as Triton specialises at run time.
    small = ("stride_sn", "stride_rr", "stride_sb", "stride_rb", "stride_rotb", "stride_rotn",
             "stride_scp")  # fmt: skip
    divisible = tuple(
        n for n in names
        if n in ("Q", "OUT", "LSE", "ENT", "MASS") or (not tma and n in ("QD", *_KV))
        or (n.startswith("stride") and n not in small)
    )  # fmt: skip
    specs = []
    variants = [
        ("module", 3, True, False, False, False), ("module+stats", 3, True, True, False, False),
        ("op", 1, False, False, False, False), ("op+stats", 1, False, True, False, False),
        ("module+stats+rotate", 3, True, True, True, False),
        ("module+stats+fp8", 3, True, True, False, True),
    ]  # fmt: skip
    for label, n_ranges, has_cur, stats, rotate, quant in variants:
        cfg = att.pick_config(
            torch.device("cuda"), head_dim, arch=arch // 10, stats=stats, rotate=rotate, quant=quant
        )
        sig = {}
        for name in names:
            kv_type = "u8" if quant and name in ("PK", "PV") else dtype
            if name in _KV:
                sig[name] = (
                    f"tensordesc<{kv_type}[1,{cfg.block_n},1,{head_dim}]>" if cfg.tma
                    else f"*{kv_type}"
                )  # fmt: skip
            elif name == "QD":
                sig[name] = (f"tensordesc<{dtype}[1,{cfg.block_m},1,{head_dim}]>" if cfg.tma
                             else f"*{dtype}")  # fmt: skip
            elif name in ("Q", "OUT"):
                sig[name] = f"*{dtype}"
            elif name in ("SLOT", "RANGES"):
                sig[name] = "*i32"
            elif name in ("LSE", "ENT", "MASS", "ROT_COS", "ROT_SIN", "K_SCALE", "V_SCALE"):
                sig[name] = "*fp32"
            elif name in _CONSTEXPRS:
                sig[name] = "constexpr"
            else:
                sig[name] = "fp32" if name == "qk_scale" else "i32"
        const = dict(
            D=head_dim, N_RANGES=n_ranges, HAS_CUR=has_cur, STATS=stats, ROTATE=rotate,
            QUANT=quant, N_SLOTS=2, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_D=head_dim, PRECISION="tf32", USE_TMA=cfg.tma, FP8_NATIVE=quant and arch >= 89,
        )  # fmt: skip
        specs.append(
            KernelSpec(
                name=f"gathered_sink_attention[{label}]",
                fn=att._gathered_attn_fwd,
                signature=sig,
                constexprs=const,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                config={"D": head_dim, "dtype": dtype, **cfg.as_dict()},
                divisible=divisible,
                needs_tensor_cores=True,
            )
        )
    return specs
