"""Triton gathered-sink attention against the naive oracle (Triton's interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from dysink_kernels import gathered_sink_attention
from dysink_kernels._backends import triton_available
from dysink_kernels.ops.gathered_sink_attention import (
    gathered_sink_attention_general as gathered_attention,
)

pytestmark = pytest.mark.skipif(
    not triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    reason="triton backend unavailable (needs a GPU or TRITON_INTERPRET=1)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """Every output buffer the kernel writes starts as NaN: an unwritten element fails."""
    from dysink_kernels.ops.gathered_sink_attention import triton as tmod

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tmod, "_empty", nan_empty)


def make(B, Sq, Sk, P, S_e, H, D, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEVICE)
    q, k, v = r(B, Sq, H, D), r(B, Sk, H, D), r(B, Sk, H, D)
    pk, pv = r(P, S_e, H, D), r(P, S_e, H, D)
    slots = torch.randint(-1, P, (B, n), generator=g, dtype=torch.int32).to(DEVICE)
    k_len = torch.randint(0, Sk + 1, (B,), generator=g, dtype=torch.int32).to(DEVICE)
    return q, k, v, pk, pv, slots, k_len


def compare(args, dtype, k_len=None, scale=None):
    q, k, v, pk, pv, slots, kl = args
    kl = kl if k_len is None else k_len
    got, gs = gathered_sink_attention(
        q, k, v, pk, pv, slots, k_len=kl, return_stats=True, softmax_scale=scale, backend="triton"
    )
    want, ws = gathered_sink_attention(
        q, k, v, pk, pv, slots, k_len=kl, return_stats=True, softmax_scale=scale, backend="naive"
    )
    tol = TOL[dtype]
    assert got.dtype == dtype and not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    for name in ("lse", "entropy", "slot_mass"):
        a, b = getattr(gs, name), getattr(ws, name)
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a, b, atol=4 * tol, rtol=tol, msg=name)
    return got, gs


@pytest.mark.parametrize("D", [16, 32, 48, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_odd_shapes(D, dtype):
    # Sq, Sk, S_e are not multiples of any block size; H = 3.
    compare(make(2, 37, 53, 5, 19, 3, D, 3, dtype, seed=D), dtype)


@pytest.mark.parametrize(
    "slots",
    [[[-1, 0, 2]], [[1, -1, 2]], [[2, 1, -1]], [[-1, -1, -1]], [[1, 1, 3]], [[3, 3, 3]]],
)
def test_slot_patterns(slots):
    args = list(make(1, 9, 21, 4, 13, 2, 32, 3, torch.float32))
    args[5] = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    compare(args, torch.float32)


def test_no_slots_and_k_len_range():
    args = make(2, 11, 40, 3, 7, 2, 16, 0, torch.float32)
    for kl in ([0, 0], [1, 40], [33, 17], [40, 40]):
        compare(args, torch.float32, k_len=torch.tensor(kl, dtype=torch.int32, device=DEVICE))


def test_nothing_to_attend():
    args = list(make(2, 5, 6, 3, 4, 2, 16, 2, torch.float32))
    args[5] = torch.tensor([[-1, -1], [0, -1]], dtype=torch.int32, device=DEVICE)
    out, st = compare(args, torch.float32, k_len=torch.tensor([0, 0], dtype=torch.int32))
    assert (out[0] == 0).all() and torch.isneginf(st.lse[0]).all()


def test_batch_with_different_slots_and_scale():
    args = list(make(2, 20, 30, 6, 17, 3, 32, 4, torch.float16, seed=7))
    args[5] = torch.tensor([[5, -1, 0, 2], [1, 1, -1, -1]], dtype=torch.int32, device=DEVICE)
    compare(args, torch.float16, scale=0.3)


def test_general_form_ranges_and_current_keys():
    g = torch.Generator().manual_seed(3)
    B, Sq, H, D, N, Sc = 2, 19, 2, 32, 70, 24
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)
    q, bk, bv, ck, cv = r(B, Sq, H, D), r(B, N, H, D), r(B, N, H, D), r(B, Sc, H, D), r(B, Sc, H, D)
    pk, pv = r(3, 9, H, D), r(3, 9, H, D)
    slots = torch.tensor([[0, -1], [2, 2]], dtype=torch.int32, device=DEVICE)
    ranges = torch.tensor(
        [[[0, 24], [40, 70], [5, 5]], [[10, 12], [0, 9], [69, 70]]], dtype=torch.int32
    ).to(DEVICE)
    a = gathered_attention(
        q, pk, pv, slots, bk, bv, ranges, ck, cv, return_stats=True, backend="triton"
    )
    b = gathered_attention(
        q, pk, pv, slots, bk, bv, ranges, ck, cv, return_stats=True, backend="naive"
    )
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, atol=4e-5, rtol=1e-5)


def test_no_stats_path_and_determinism():
    args = make(2, 13, 29, 3, 11, 2, 16, 2, torch.float16, seed=5)
    q, k, v, pk, pv, slots, kl = args
    a, none = gathered_sink_attention(q, k, v, pk, pv, slots, k_len=kl, backend="triton")
    assert none is None
    b, st1 = gathered_sink_attention(
        q, k, v, pk, pv, slots, k_len=kl, return_stats=True, backend="triton"
    )
    c, st2 = gathered_sink_attention(
        q, k, v, pk, pv, slots, k_len=kl, return_stats=True, backend="triton"
    )
    assert torch.equal(a, b) and torch.equal(b, c)
    for x, y in zip(st1, st2):
        assert torch.equal(x, y)


def test_non_contiguous_views():
    g = torch.Generator().manual_seed(9)
    B, S, H, D = 2, 17, 2, 32
    qkv = torch.randn(B, S, 3, H, D, generator=g).to(DEVICE)
    q, k, v = qkv.unbind(2)  # strided views, as a fused qkv projection gives
    pool = torch.randn(2, 4, 5, H, D, generator=g).to(DEVICE)  # (layers, P, S_e, H, D)
    slots = torch.tensor([[3, 0], [-1, 1]], dtype=torch.int32, device=DEVICE)
    a, _ = gathered_sink_attention(q, k, v, pool[1], pool[0], slots, backend="triton")
    b, _ = gathered_sink_attention(q, k, v, pool[1], pool[0], slots, backend="naive")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_head_dim_not_multiple_of_16_takes_the_matrix_product_path():
    """Head dims the tensor-core tiles cannot take still work (the sdpa path), so `auto`
    on a GPU never fails on them."""
    args = make(1, 3, 4, 2, 3, 1, 24, 1, torch.float32)
    got = gathered_sink_attention(*args[:6], k_len=args[6], backend="triton", return_stats=True)
    want = gathered_sink_attention(*args[:6], k_len=args[6], backend="naive", return_stats=True)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for x, y in zip(got[1], want[1]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- general form
def _poisoned_inputs(dtype, seed=11, D=32):
    """General-form inputs whose every row outside the attended set is NaN: pool rows
    of unlisted slots and local-buffer rows outside the ranges. Returns the poisoned
    inputs and clean copies (NaN -> 0) for the oracle, whose masked product would
    turn 0 * NaN into NaN."""
    from dysink_kernels.ops.gathered_sink_attention.naive import ranges_to_mask

    g = torch.Generator().manual_seed(seed)
    B, Sq, H, N, Sc, P, S_e = 2, 37, 3, 75, 23, 6, 37
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEVICE)
    q, lk, lv, ck, cv = r(B, Sq, H, D), r(B, N, H, D), r(B, N, H, D), r(B, Sc, H, D), r(B, Sc, H, D)
    pk, pv = r(P, S_e, H, D), r(P, S_e, H, D)
    slots = torch.tensor([[0, -1, 4], [2, 2, 5]], dtype=torch.int32, device=DEVICE)
    # odd lengths, an empty range, a range of one key, full tiles and tails
    ranges = torch.tensor(
        [[[0, 33], [40, 75], [5, 5]], [[10, 12], [17, 50], [74, 75]]], dtype=torch.int32
    ).to(DEVICE)
    used = torch.zeros(P, dtype=torch.bool)
    used[slots.clamp(min=0).flatten().cpu()] = True
    used[0] = True  # slot 0 is listed by sample 0
    for t in (pk, pv):
        t[~used.to(DEVICE)] = float("nan")
    local_used = ranges_to_mask(ranges, N)
    for t in (lk, lv):
        t[~local_used] = float("nan")
    clean = [t.nan_to_num() for t in (pk, pv, lk, lv)]
    return (q, pk, pv, slots, lk, lv, ranges, ck, cv), (
        q,
        *clean[:2],
        slots,
        *clean[2:],
        ranges,
        ck,
        cv,
    )


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_filled_unused_rows_and_both_load_paths(tma, dtype):
    """Full tiles run unmasked, the last tile of each segment masked: no tile may read
    another slot's rows or let NaN from unused rows into the product, through pointer
    loads or tensor descriptors (the interpreter runs both)."""
    from dysink_kernels.ops.gathered_sink_attention import naive
    from dysink_kernels.ops.gathered_sink_attention import triton as tmod

    poisoned, clean = _poisoned_inputs(dtype)
    cfg = tmod.KernelConfig(32, 16, 4, 1, tma=tma)
    out, st = tmod.gathered_attention_triton(*poisoned, 0.3, True, config=cfg)
    want, ws = naive.gathered_attention_naive(*clean, 0.3, True)
    tol = TOL[dtype]
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
    for name in ("lse", "entropy", "slot_mass"):
        a, b = getattr(st, name), getattr(ws, name)
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a, b, atol=4 * tol, rtol=tol, msg=name)
    plain, none = tmod.gathered_attention_triton(*poisoned, 0.3, False, config=cfg)
    assert none is None
    torch.testing.assert_close(plain, out, atol=tol, rtol=tol)


@pytest.mark.parametrize("tma", [False, True])
def test_repositioned_slots_turn_the_queries(tma):
    """Turning each slot's queries by -angle equals turning its keys by +angle."""
    from dysink_kernels.ops.gathered_sink_attention import naive
    from dysink_kernels.ops.gathered_sink_attention import triton as tmod

    poisoned, clean = _poisoned_inputs(torch.float32, seed=4, D=48)
    delta = torch.tensor([[3.0, -2.0, 11.0], [0.5, -7.0, 1.0]], device=DEVICE)
    cfg = tmod.KernelConfig(32, 16, 4, 1, tma=tma)
    got = tmod.gathered_attention_triton(*poisoned, 0.25, True, delta, config=cfg)
    want = naive.gathered_attention_naive(*clean, 0.25, True, delta)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for x, y in zip(got[1], want[1]):
        torch.testing.assert_close(x, y, atol=4e-5, rtol=1e-5)


def test_interpreter_config_uses_pointer_loads_and_sm90_descriptors():
    from dysink_kernels.ops.gathered_sink_attention import triton as tmod

    assert not tmod.pick_config(torch.device("cpu"), 128).tma
    assert tmod.pick_config(torch.device("cuda"), 128, arch=9).tma
    assert not tmod.pick_config(torch.device("cuda"), 128, arch=8).tma
    for arch in (8, 9):
        for kw in ({}, {"stats": True}, {"rotate": True}, {"quant": True}):
            cfg = tmod.pick_config(torch.device("cuda"), 128, arch=arch, **kw)
            assert cfg.block_m >= 64 and cfg.block_n >= 16


def test_row_offsets_beyond_int32_are_refused():
    """A pool whose one (slot, head) spans 2^31 elements or more: the launcher refuses it
    (shapes and strides only: meta tensors, nothing is allocated)."""
    from dysink_kernels.ops.gathered_sink_attention import triton as tmod

    meta = torch.device("meta")
    H, D = 16, 128
    q = torch.empty(1, 8, H, D, device=meta)
    pool = torch.empty(2, 2**20 + 1, H, D, device=meta)  # (2^20) * H * D = 2^31
    local = torch.empty(1, 8, H, D, device=meta)
    slots = torch.zeros(1, 1, dtype=torch.int32, device=meta)
    ranges = torch.zeros(1, 1, 2, dtype=torch.int32, device=meta)
    with pytest.raises(ValueError, match="2\\^31"):
        tmod.gathered_attention_triton(
            q, pool, pool, slots, local, local, ranges, None, None, 0.1, False
        )
    # an expanded view: stride 0 along the rows spans nothing
    small = torch.empty(2, 1, H, D, device=meta).expand(2, 2**21, H, D)
    tmod._check_offsets(pool_k=small)


def _fma_chain_kernel():
    """A one-program kernel around the kernel's ``_fma_chain`` (built on first use)."""
    import triton
    import triton.language as tl

    from dysink_kernels.ops.gathered_sink_attention.triton import _fma_chain

    @triton.jit
    def kernel(A, B, ACC, OUT, M: tl.constexpr, W: tl.constexpr):
        o_m = tl.arange(0, M)
        o_w = tl.arange(0, W)
        o_4 = tl.arange(0, 4)
        a = tl.load(A + o_m[:, None] * W + o_w[None, :])
        b = tl.load(B + o_m[:, None] * W + o_w[None, :])
        acc = tl.load(ACC + o_m[:, None] * 4 + o_4[None, :])
        tl.store(OUT + o_m[:, None] * 4 + o_4[None, :], _fma_chain(acc, a, b, M, W))

    kernel.fn.__globals__["_fma_chain"] = _fma_chain
    return kernel


@pytest.mark.parametrize("width", [4, 8, 16, 32, 64, 128])
def test_fma_chain_sums_rows_in_four_column_groups(width):
    """The statistics' row moment: the four partial sums add up to ``sum(acc_i) +
    sum_j a_ij b_ij`` at every tile width the kernel uses."""
    gen = torch.Generator().manual_seed(width)
    a, b = (torch.randn(16, width, generator=gen) for _ in range(2))
    acc = torch.randn(16, 4, generator=gen)
    out = torch.full((16, 4), float("nan"), device=DEVICE)
    _fma_chain_kernel()[(1,)](a.to(DEVICE), b.to(DEVICE), acc.to(DEVICE), out, M=16, W=width)
    want = acc.sum(1) + (a * b).sum(1)
    torch.testing.assert_close(out.cpu().sum(1), want, atol=1e-5, rtol=1e-5)
