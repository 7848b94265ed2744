"""The CPU backends of gathered attention (``sdpa`` in PyTorch, ``csrc`` in C++) against
the naive oracle.

General form (slots + up to three ranges of a local buffer + current keys), odd
shapes, fp32/fp16/bf16, ``-1`` slots, empty ranges, statistics, unused rows filled
with NaN, re-positioned slots, fp8 bank, empty inputs, output layout, query blocks,
no host reads, ``torch.compile(fullgraph=True)`` and ``opcheck``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dysink_kernels import (
    DySinkCache,
    DySinkConfig,
    SinkAttention,
    available_backends,
    gathered_sink_attention,
)
from dysink_kernels.fp8 import quantize
from dysink_kernels.ops.gathered_sink_attention import (
    gathered_sink_attention_general as gathered_attention,
)
from dysink_kernels.ops.gathered_sink_attention import sdpa as sdpa_mod
from dysink_kernels.ops.gathered_sink_attention.naive import ranges_to_mask

# The CPU backends present here: sdpa always, csrc when the extension is built.
CPU_BACKENDS = [
    b for b in ("sdpa", "csrc") if b in available_backends("gathered_sink_attention", "cpu")
]
pytestmark = pytest.mark.parametrize("backend", CPU_BACKENDS)

# Output tolerance by dtype (both backends compute in fp32 from the same inputs, so
# the output differs by summation order and one final rounding); statistics are fp32.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
STAT_TOL = 2e-5


def general_inputs(B, Sq, H, D, P, S_e, n_local, n_cur, slots, ranges, dtype, seed=0):
    """Arguments of ``gathered_attention`` (positional, up to ``cur_v``)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    q = r(B, Sq, H, D)
    pool_k, pool_v = r(P, S_e, H, D), r(P, S_e, H, D)
    local_k, local_v = r(B, n_local, H, D), r(B, n_local, H, D)
    cur = (r(B, n_cur, H, D), r(B, n_cur, H, D)) if n_cur is not None else (None, None)
    slot_idx = torch.tensor(slots, dtype=torch.int32)
    local_ranges = torch.tensor(ranges, dtype=torch.int32)
    return [q, pool_k, pool_v, slot_idx, local_k, local_v, local_ranges, *cur]


def run(args, backend, **kw):
    kw.setdefault("return_stats", True)
    return gathered_attention(*args, backend=backend, **kw)


def compare(args, dtype, backend, **kw):
    got, gs = run(args, backend, **kw)
    want, ws = run(args, "naive", **kw)
    q = args[0]
    assert got.dtype == q.dtype and got.shape == q.shape
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    for name in ("lse", "entropy", "slot_mass"):
        a, b = getattr(gs, name), getattr(ws, name)
        assert a.dtype == torch.float32 and a.is_contiguous(), name
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a, b, atol=STAT_TOL, rtol=STAT_TOL, msg=name)
    return got, gs


# B, Sq, H, D, P, S_e, n_local, n_cur, slots, ranges
CASES = {
    "module_like": (1, 37, 3, 32, 5, 19, 53, 19, [[4, -1, 1]],
                    [[[0, 0], [30, 53], [0, 11]]]),
    "batch_wrap": (2, 13, 2, 16, 4, 7, 40, 9, [[0, 3], [-1, 2]],
                   [[[0, 7], [21, 40], [0, 5]], [[0, 0], [33, 40], [0, 0]]]),
    "overlap_empty": (2, 5, 1, 48, 3, 11, 17, 3, [[2, 2], [-1, -1]],
                      [[[4, 4], [9, 3], [0, 17]], [[0, 0], [0, 0], [0, 0]]]),
    "no_slots": (3, 1, 2, 8, 2, 5, 9, 4, [[], [], []],
                 [[[0, 9]], [[2, 3]], [[5, 5]]]),
    "no_current": (2, 11, 3, 24, 4, 6, 30, None, [[1, -1, 3], [-1, -1, -1]],
                   [[[0, 10], [20, 30]], [[0, 0], [3, 3]]]),
    "outside_buffer": (1, 6, 2, 16, 3, 4, 12, 2, [[1, 1]], [[[-4, 3], [10, 40]]]),
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_naive(case, dtype, backend):
    args = general_inputs(*CASES[case], dtype=dtype)
    compare(args, dtype, backend, softmax_scale=1 / math.sqrt(args[0].shape[-1]))


def test_public_op_matches_naive_with_k_len_and_scale(backend):
    g = torch.Generator().manual_seed(4)
    B, Sq, Sk, H, D = 3, 21, 26, 2, 40
    r = lambda *s: torch.randn(*s, generator=g)
    q, k, v = r(B, Sq, H, D), r(B, Sk, H, D), r(B, Sk, H, D)
    pool_k, pool_v = r(6, 9, H, D), r(6, 9, H, D)
    slots = torch.tensor([[5, -1], [0, 0], [-1, -1]], dtype=torch.int32)
    k_len = torch.tensor([26, 3, 0], dtype=torch.int32)
    kw = dict(k_len=k_len, softmax_scale=0.2, return_stats=True)
    got, gs = gathered_sink_attention(q, k, v, pool_k, pool_v, slots, backend=backend, **kw)
    want, ws = gathered_sink_attention(q, k, v, pool_k, pool_v, slots, backend="naive", **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(gs, ws):
        torch.testing.assert_close(a, b, atol=STAT_TOL, rtol=STAT_TOL)
    # Sample 2 attends nothing: zeros, lse -inf, entropy and mass 0.
    assert (got[2] == 0).all() and torch.isneginf(gs.lse[2]).all()
    assert (gs.entropy[2] == 0).all() and (gs.slot_mass[2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unused_rows_do_not_leak(dtype, backend):
    """Pool rows outside the listed slots and local rows outside the ranges hold NaN
    (and Inf): the result equals that of the same call with those rows zeroed."""
    B, Sq, H, D, P, S_e, N, Nc = 2, 9, 2, 16, 5, 6, 24, 5
    slots = [[3, -1], [-1, -1]]
    ranges = [[[0, 4], [10, 16], [20, 20]], [[0, 0], [2, 3], [0, 0]]]
    clean = general_inputs(B, Sq, H, D, P, S_e, N, Nc, slots, ranges, dtype, seed=2)
    dirty = [t.clone() if isinstance(t, torch.Tensor) else t for t in clean]
    unused_slots = [p for p in range(P) if p != 3]
    for i, fill in ((1, "nan"), (2, "inf")):
        clean[i][unused_slots] = 0
        dirty[i][unused_slots] = float(fill)
    unused = ~ranges_to_mask(clean[6], N)
    for i in (4, 5):
        clean[i][unused] = 0
        dirty[i][unused] = float("nan")
    got, gs = run(dirty, backend)
    want, ws = run(clean, backend)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for a, b in zip(gs, ws):
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=False)
    ref, rs = run(clean, "naive")
    torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(gs.slot_mass, rs.slot_mass, atol=STAT_TOL, rtol=STAT_TOL)


def test_repositioned_slots(backend):
    args = general_inputs(*CASES["batch_wrap"], dtype=torch.float32)
    delta = torch.tensor([[3.0, -7.5], [12.0, 0.0]])
    compare(args, torch.float32, backend, slot_delta=delta, rope_theta=500.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_bank(dtype, backend):
    args = general_inputs(*CASES["module_like"], dtype=dtype)
    pk, k_scale = quantize(args[1].float(), reduce_dims=(1, 3))
    pv, v_scale = quantize(args[2].float(), reduce_dims=(1, 3))
    args[1], args[2] = pk, pv
    P = pk.shape[0]
    kw = dict(pool_k_scale=k_scale.view(P, -1), pool_v_scale=v_scale.view(P, -1))
    compare(args, dtype, backend, **kw)
    delta = torch.tensor([[2.0, 5.0, -1.0]])
    compare(args, dtype, backend, slot_delta=delta, **kw)


@pytest.mark.parametrize("return_stats", [True, False])
def test_query_blocks_and_no_stats_path(monkeypatch, return_stats, backend):
    """Queries split into several blocks give the same result as one block (sdpa: a
    small score budget; csrc: a score block of 2^18 elements, crossed by these keys);
    without statistics the output is the same."""
    if backend == "sdpa":
        args = general_inputs(*CASES["batch_wrap"], dtype=torch.float32)
    else:  # 2 heads x 1,400 keys: 93 queries per block, 200 queries make three
        args = general_inputs(2, 200, 2, 16, 3, 100, 1300, 40, [[0, 2], [-1, 1]],
                              [[[0, 700], [800, 1300]], [[5, 1205], [0, 0]]],
                              torch.float32)  # fmt: skip
    whole = run(args, backend, return_stats=return_stats)
    with_stats, _ = run(args, backend, return_stats=True)
    if backend == "sdpa":
        monkeypatch.setattr(sdpa_mod, "_SCORE_ELEMS", 200)
        split = run(args, backend, return_stats=return_stats)
    else:
        split = run(args, "naive", return_stats=return_stats)
    torch.testing.assert_close(split[0], whole[0], atol=1e-5, rtol=1e-5)
    if return_stats:
        for a, b in zip(split[1], whole[1]):
            torch.testing.assert_close(a, b, atol=STAT_TOL, rtol=STAT_TOL)
    else:
        assert whole[1] is None and split[1] is None
        torch.testing.assert_close(whole[0], with_stats, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("B", "Sq", "H", "Sk", "P", "n"),
    [(1, 5, 0, 7, 3, 2), (2, 0, 2, 7, 3, 2), (1, 5, 2, 0, 3, 0), (0, 5, 2, 7, 3, 2),
     (1, 4, 2, 0, 0, 2), (2, 3, 1, 0, 0, 0)],
)  # fmt: skip
def test_empty_inputs(B, Sq, H, Sk, P, n, backend):
    """Zero heads, queries, batch or keys: valid results (no key: zeros, lse -inf,
    entropy and mass 0), never a crash."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    D = 16
    q, k, v = r(B, Sq, H, D), r(B, Sk, H, D), r(B, Sk, H, D)
    pool_k, pool_v = r(P, 4, H, D), r(P, 4, H, D)
    slots = torch.full((B, n), -1 if P == 0 else 1, dtype=torch.int32)
    for return_stats in (True, False):
        out, st = gathered_sink_attention(q, k, v, pool_k, pool_v, slots,
                                          return_stats=return_stats, backend=backend)  # fmt: skip
        assert out.shape == q.shape and out.dtype == q.dtype
    assert st is None
    out, st = gathered_sink_attention(q, k, v, pool_k, pool_v, slots, return_stats=True,
                                      backend=backend)  # fmt: skip
    assert st.lse.shape == st.entropy.shape == (B, H, Sq) and st.slot_mass.shape == (B, H, n)
    if Sk == 0 and (P == 0 or n == 0):  # nothing to attend
        assert (out == 0).all() and torch.isneginf(st.lse).all()
        assert (st.entropy == 0).all() and (st.slot_mass == 0).all()
    if B * H > 0:
        want, ws = gathered_sink_attention(q, k, v, pool_k, pool_v, slots, return_stats=True,
                                           backend="naive")  # fmt: skip
        torch.testing.assert_close(out, want)
        for a, b in zip(st, ws):
            torch.testing.assert_close(a, b)


def test_output_layout_matches_the_fake(backend):
    """``out`` has the strides of ``torch.empty_like(q)`` (q may be a strided view, its
    last dim too) and the statistics are contiguous, as the op's fake promises."""
    g = torch.Generator().manual_seed(5)
    B, Sq, H, D = 2, 7, 3, 16
    k, v = (torch.randn(B, 9, H, D, generator=g) for _ in range(2))
    pool = torch.randn(3, 4, H, D, generator=g)
    slots = torch.tensor([[0, -1], [2, 1]], dtype=torch.int32)
    permuted = torch.randn(B, H, Sq, D, generator=g).transpose(1, 2)  # (B, Sq, H, D)
    last_strided = torch.randn(B, Sq, D, H, generator=g).transpose(2, 3)
    for q in (permuted, last_strided):
        for return_stats in (True, False):
            out, st = gathered_sink_attention(
                q, k, v, pool, pool, slots, return_stats=return_stats, backend=backend
            )
            assert out.stride() == torch.empty_like(q).stride()
            ref, _ = gathered_sink_attention(q.contiguous(), k, v, pool, pool, slots,
                                             backend="naive")  # fmt: skip
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            if st is not None:
                assert all(t.is_contiguous() for t in st)


class HostReads(TorchDispatchMode):
    """Records host reads of tensor values and data-dependent output sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(("aten._local_scalar_dense", "aten.nonzero", "aten.item")):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_no_host_reads(backend):
    for case in ("module_like", "no_current"):
        args = general_inputs(*CASES[case], dtype=torch.float32)
        with HostReads() as mode:
            run(args, backend)
            run(args, backend, return_stats=False, slot_delta=torch.ones(args[3].shape))
        assert mode.calls == [], mode.calls


def test_module_steady_state_has_no_host_reads(backend):
    """The cache on CPU (``backend="auto"``: csrc attention when built, else sdpa, with
    csrc small ops): 0 host reads."""
    if backend != CPU_BACKENDS[-1]:
        pytest.skip("the cache runs auto; once is enough")
    cfg = DySinkConfig(num_layers=2, num_heads=2, head_dim=16, tokens_per_frame=8,
                       max_entries=3, dedup=0.9)  # fmt: skip
    cache = DySinkCache(cfg, batch_size=2, dtype=torch.float32, backend="auto")
    attn = SinkAttention(cfg)
    g = torch.Generator().manual_seed(0)
    shape = (2, cfg.block_tokens, cfg.num_heads, cfg.head_dim)

    def block():
        cache.begin_block()
        for commit in (False, False, True):
            for layer in range(cfg.num_layers):
                qkv = (torch.randn(shape, generator=g) for _ in range(3))
                attn(*qkv, cache=cache, layer=layer, commit=commit)
        cache.end_block(torch.randn(2, 6, generator=g))

    for _ in range(5):
        block()
    with HostReads() as mode:
        for _ in range(3):
            block()
    assert mode.calls == [], mode.calls


def test_compile_fullgraph_matches_eager(backend):
    g = torch.Generator().manual_seed(6)
    B, Sq, H, D = 2, 6, 2, 16
    r = lambda *s: torch.randn(*s, generator=g)
    q, k, v = r(B, Sq, H, D), r(B, 10, H, D), r(B, 10, H, D)
    pool_k, pool_v = r(4, 5, H, D), r(4, 5, H, D)
    slots = torch.tensor([[3, -1], [0, 2]], dtype=torch.int32)
    k_len = torch.tensor([10, 4], dtype=torch.int32)

    def call(q, k, v, pool_k, pool_v, slots, k_len):
        out, st = gathered_sink_attention(q, k, v, pool_k, pool_v, slots, k_len=k_len,
                                          return_stats=True, backend=backend)  # fmt: skip
        return out, st.lse, st.entropy, st.slot_mass

    args = (q, k, v, pool_k, pool_v, slots, k_len)
    eager = call(*args)
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True)(*args)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_opcheck(backend):
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    B, Sq, H, D, P, S_e, N = 2, 5, 2, 16, 4, 3, 9
    common = (r(B, Sq, H, D), r(P, S_e, H, D), r(P, S_e, H, D), i32([[0, -1], [3, 3]]),
              r(B, N, H, D), r(B, N, H, D), i32([[[0, 4]], [[2, 9]]]))  # fmt: skip
    variants = [
        (r(B, 4, H, D), r(B, 4, H, D), 0.25, True, r(B, 2), 10000.0, None, None),
        (None, None, 0.25, False, None, 10000.0, None, None),
    ]
    for tail in variants:
        torch.library.opcheck(torch.ops.dysink.gathered_sink_attention, (*common, *tail, backend))
        if backend == "csrc":  # the C++ op the backend calls
            torch.library.opcheck(torch.ops.dysink_C.gathered_sink_attention,
                                  (*common, *tail))  # fmt: skip
