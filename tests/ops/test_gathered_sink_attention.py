"""gathered_sink_attention: naive against fp64 softmax over explicitly concatenated KV,
every backend against naive, opcheck and torch.compile per backend, empty problems and
bad input at the boundary."""

from __future__ import annotations

import math

import pytest
import torch

from dysink_kernels import DySinkCache, DySinkConfig, SinkAttention, gathered_sink_attention
from dysink_kernels.ops.gathered_sink_attention import gathered_sink_attention_general

from conftest import assert_close, op_backends

BACKENDS = op_backends("gathered_sink_attention")


def reference(q, k, v, pool_k, pool_v, slot_idx, k_len, scale):
    """Per sample: cat([pool[s] for s in slots if s >= 0] + [k[:k_len]]), fp64 softmax."""
    B, Sq, H, D = q.shape
    n = slot_idx.shape[1]
    out = torch.zeros(B, Sq, H, D, dtype=torch.float64)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float64)
    ent = torch.zeros(B, H, Sq, dtype=torch.float64)
    mass = torch.zeros(B, H, n, dtype=torch.float64)
    S_e = pool_k.shape[1]
    for b in range(B):
        ks, vs, owners = [], [], []
        for j, s in enumerate(slot_idx[b].tolist()):
            if s >= 0:
                ks.append(pool_k[s].double())
                vs.append(pool_v[s].double())
                owners += [j] * S_e
        L = int(k_len[b])
        ks.append(k[b, :L].double())
        vs.append(v[b, :L].double())
        owners += [-1] * L
        K = torch.cat(ks)
        V = torch.cat(vs)
        if K.shape[0] == 0:
            continue
        owners = torch.tensor(owners)
        for h in range(H):
            s = q[b, :, h].double() @ K[:, h].T * scale  # (Sq, N)
            p = torch.softmax(s, dim=-1)
            out[b, :, h] = p @ V[:, h]
            lse[b, h] = torch.logsumexp(s, dim=-1)
            ent[b, h] = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
            for j in range(n):
                mass[b, h, j] = p[:, owners == j].sum(-1).mean()
    return out, lse, ent, mass


def make_inputs(B, Sq, Sk, P, S_e, H, D, n, dtype, slots=None, k_len=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    q, k, v = r(B, Sq, H, D), r(B, Sk, H, D), r(B, Sk, H, D)
    pool_k, pool_v = r(P, S_e, H, D), r(P, S_e, H, D)
    if slots is None:
        slots = torch.randint(-1, P, (B, n), generator=g, dtype=torch.int32)
    if k_len is None:
        k_len = torch.randint(0, Sk + 1, (B,), generator=g, dtype=torch.int32)
    return q, k, v, pool_k, pool_v, torch.as_tensor(slots, dtype=torch.int32), k_len


CASES = [
    # B, Sq, Sk, P, S_e, H, D, n
    (1, 37, 53, 5, 19, 3, 32, 3),
    (2, 5, 17, 4, 7, 2, 16, 4),
    (3, 1, 9, 2, 11, 1, 8, 1),
    (2, 13, 1, 3, 5, 3, 48, 0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_matches_fp64_concat(case, dtype):
    B, Sq, Sk, P, S_e, H, D, n = case
    q, k, v, pk, pv, slots, k_len = make_inputs(B, Sq, Sk, P, S_e, H, D, n, dtype)
    out, st = gathered_sink_attention(q, k, v, pk, pv, slots, k_len=k_len, return_stats=True)
    ref, lse, ent, mass = reference(q, k, v, pk, pv, slots, k_len, 1 / math.sqrt(D))
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, dtype)
    assert st.lse.dtype == st.entropy.dtype == st.slot_mass.dtype == torch.float32
    assert_close(st.lse, lse, dtype, scale=4)
    assert_close(st.entropy, ent, dtype, scale=4)
    assert_close(st.slot_mass, mass, dtype)


@pytest.mark.parametrize(
    "slots",
    [
        [[-1, 0, 2]],  # -1 first
        [[1, -1, 2]],  # -1 in the middle
        [[2, 1, -1]],  # -1 last
        [[-1, -1, -1]],  # nothing from the bank
        [[1, 1, 3]],  # a slot used twice
    ],
)
def test_slot_patterns(slots):
    q, k, v, pk, pv, s, k_len = make_inputs(1, 6, 10, 4, 5, 2, 16, 3, torch.float32, slots=slots)
    out, st = gathered_sink_attention(q, k, v, pk, pv, s, k_len=k_len, return_stats=True)
    ref, _lse, ent, mass = reference(q, k, v, pk, pv, s, k_len, 0.25)
    assert_close(out, ref, torch.float32)
    assert_close(st.slot_mass, mass, torch.float32)
    assert_close(st.entropy, ent, torch.float32, scale=4)
    skipped = s[0] < 0
    assert (st.slot_mass[0][:, skipped] == 0).all()
    if slots == [[1, 1, 3]]:
        torch.testing.assert_close(st.slot_mass[..., 0], st.slot_mass[..., 1])


def test_k_len_zero_with_slots_and_empty_rows():
    q, k, v, pk, pv, _, _ = make_inputs(2, 4, 6, 3, 5, 2, 16, 2, torch.float32)
    slots = torch.tensor([[0, 2], [-1, -1]], dtype=torch.int32)
    k_len = torch.tensor([0, 0], dtype=torch.int32)
    out, st = gathered_sink_attention(q, k, v, pk, pv, slots, k_len=k_len, return_stats=True)
    ref, _lse, _ent, _mass = reference(q, k, v, pk, pv, slots, k_len, 0.25)
    assert_close(out[0], ref[0], torch.float32)
    # Sample 1 attends no key at all: zeros, lse = -inf, entropy 0, no mass.
    assert (out[1] == 0).all()
    assert torch.isneginf(st.lse[1]).all()
    assert (st.entropy[1] == 0).all() and (st.slot_mass[1] == 0).all()


def test_k_len_none_and_full():
    q, k, v, pk, pv, s, _ = make_inputs(2, 5, 7, 3, 4, 2, 16, 2, torch.float32)
    full = torch.full((2,), 7, dtype=torch.int32)
    a, _ = gathered_sink_attention(q, k, v, pk, pv, s)
    b, _ = gathered_sink_attention(q, k, v, pk, pv, s, k_len=full)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_no_stats_by_default_and_custom_scale():
    q, k, v, pk, pv, s, k_len = make_inputs(1, 4, 6, 2, 3, 1, 16, 2, torch.float32)
    out, st = gathered_sink_attention(q, k, v, pk, pv, s, k_len=k_len, softmax_scale=0.1)
    assert st is None
    ref, *_ = reference(q, k, v, pk, pv, s, k_len, 0.1)
    assert_close(out, ref, torch.float32)


def test_lse_merge_identity():
    """Attending two disjoint key sets and merging by LSE equals attending both."""
    q, k, v, pk, pv, _, _ = make_inputs(2, 9, 12, 4, 6, 3, 16, 2, torch.float32)
    slots = torch.tensor([[0, 3], [2, -1]], dtype=torch.int32)
    none = torch.full((2, 2), -1, dtype=torch.int32)
    k_len = torch.tensor([12, 7], dtype=torch.int32)
    zero = torch.zeros(2, dtype=torch.int32)
    o_all, s_all = gathered_sink_attention(q, k, v, pk, pv, slots, k_len=k_len, return_stats=True)
    o_bank, s_bank = gathered_sink_attention(q, k, v, pk, pv, slots, k_len=zero, return_stats=True)
    o_loc, s_loc = gathered_sink_attention(q, k, v, pk, pv, none, k_len=k_len, return_stats=True)
    lse = torch.logaddexp(s_bank.lse, s_loc.lse)  # (B, H, Sq)
    w_bank = torch.exp(s_bank.lse - lse).transpose(1, 2)[..., None]
    w_loc = torch.exp(s_loc.lse - lse).transpose(1, 2)[..., None]
    merged = w_bank * o_bank + w_loc * o_loc
    torch.testing.assert_close(merged, o_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, s_all.lse, atol=1e-5, rtol=1e-5)


def test_general_form_ranges_and_current_keys():
    """The internal form (ranges of a local buffer + current keys) equals concatenation."""
    B, Sq, H, D, N, Sc = 2, 5, 2, 16, 20, 6
    q, buf_k, buf_v, pk, pv, slots, _ = make_inputs(B, Sq, N, 3, 4, H, D, 2, torch.float32)
    cur_k, cur_v = torch.randn(B, Sc, H, D), torch.randn(B, Sc, H, D)
    ranges = torch.tensor(
        [[[0, 3], [8, 12], [15, 20]], [[2, 2], [0, 5], [19, 20]]], dtype=torch.int32
    )
    out, st = gathered_sink_attention_general(
        q, pk, pv, slots, buf_k, buf_v, ranges, cur_k, cur_v, return_stats=True
    )
    # Build the same keys explicitly and use the k_len form.
    ks, vs = [], []
    for b in range(B):
        sel = torch.cat([torch.arange(lo, hi) for lo, hi in ranges[b].tolist() if hi > lo])
        ks.append(torch.cat([buf_k[b, sel], cur_k[b]]))
        vs.append(torch.cat([buf_v[b, sel], cur_v[b]]))
    lens = [t.shape[0] for t in ks]
    Lmax = max(lens)
    kk = torch.zeros(B, Lmax, H, D)
    vv = torch.zeros(B, Lmax, H, D)
    for b in range(B):
        kk[b, : lens[b]] = ks[b]
        vv[b, : lens[b]] = vs[b]
    k_len = torch.tensor(lens, dtype=torch.int32)
    ref, _lse, _ent, mass = reference(q, kk, vv, pk, pv, slots, k_len, 1 / math.sqrt(D))
    assert_close(out, ref, torch.float32)
    assert_close(st.slot_mass, mass, torch.float32)


def test_deterministic():
    args = make_inputs(2, 7, 9, 3, 5, 2, 16, 3, torch.float16)
    a = gathered_sink_attention(*args[:6], k_len=args[6], return_stats=True)
    b = gathered_sink_attention(*args[:6], k_len=args[6], return_stats=True)
    assert torch.equal(a[0], b[0])
    for x, y in zip(a[1], b[1]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_backend_equals_naive(case, backend):
    """Every backend against the oracle, statistics included, outputs pre-filled NaN-free."""
    B, Sq, Sk, P, S_e, H, D, n = case  # the triton backend hands D % 16 != 0 to sdpa's path
    q, k, v, pk, pv, slots, k_len = make_inputs(B, Sq, Sk, P, S_e, H, D, n, torch.float32)
    if n:
        slots[0, 0] = -1
    k_len[-1] = 0
    got, gs = gathered_sink_attention(q, k, v, pk, pv, slots, k_len=k_len, return_stats=True,
                                      backend=backend)  # fmt: skip
    want, ws = gathered_sink_attention(q, k, v, pk, pv, slots, k_len=k_len, return_stats=True,
                                       backend="naive")  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for x, y in zip(gs, ws):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_equals_naive_general_form(backend):
    """Ranges of a local buffer, current keys and re-positioned slots, against naive."""
    q, buf_k, buf_v, pk, pv, slots, _ = make_inputs(2, 5, 20, 3, 4, 2, 16, 2, torch.float32)
    cur_k, cur_v = torch.randn(2, 6, 2, 16), torch.randn(2, 6, 2, 16)
    ranges = torch.tensor([[[0, 3], [8, 12]], [[2, 2], [19, 20]]], dtype=torch.int32)
    delta = torch.tensor([[3.0, -6.0], [9.0, 0.0]])
    common = dict(return_stats=True, slot_delta=delta)
    args = (q, pk, pv, slots, buf_k, buf_v, ranges, cur_k, cur_v)
    got, gs = gathered_sink_attention_general(*args, backend=backend, **common)
    want, ws = gathered_sink_attention_general(*args, backend="naive", **common)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for x, y in zip(gs, ws):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_laid_out_like_q(backend):
    """``out`` has the layout of ``torch.empty_like(q)`` on every backend, as the fake
    promises (a (B, H, S, D) buffer seen as (B, S, H, D) here), statistics contiguous."""
    q, k, v, pk, pv, slots, _ = make_inputs(2, 5, 7, 3, 4, 2, 16, 2, torch.float32)
    q = q.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    out, st = gathered_sink_attention(q, k, v, pk, pv, slots, return_stats=True, backend=backend)
    assert out.stride() == torch.empty_like(q).stride()
    assert all(t.is_contiguous() for t in st)
    want, _ = gathered_sink_attention(q.contiguous(), k, v, pk, pv, slots, backend="naive")
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def opcheck_args(return_stats: bool) -> tuple:
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    B, Sq, H, D, P, S_e, N = 2, 5, 2, 16, 4, 3, 9
    return (
        r(B, Sq, H, D), r(P, S_e, H, D), r(P, S_e, H, D), i32([[0, -1], [3, 3]]),
        r(B, N, H, D), r(B, N, H, D), i32([[[0, 4]], [[2, 9]]]), r(B, 4, H, D), r(B, 4, H, D),
        0.25, return_stats, r(B, 2), 10000.0, None, None,
    )  # fmt: skip


@pytest.mark.parametrize("return_stats", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, return_stats):
    """Schema, fake (shapes and strides), AOT dispatch of the op on each backend."""
    op = torch.ops.dysink.gathered_sink_attention.default
    torch.library.opcheck(op, (*opcheck_args(return_stats), backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_op(backend):
    q, k, v, pk, pv, slots, k_len = make_inputs(2, 5, 9, 3, 4, 2, 16, 2, torch.float32)

    def call(q, k, v):
        out, st = gathered_sink_attention(q, k, v, pk, pv, slots, k_len=k_len,
                                          return_stats=True, backend=backend)  # fmt: skip
        return out, st.lse, st.entropy, st.slot_mass

    eager = call(q, k, v)
    compiled = torch.compile(call, fullgraph=True)(q, k, v)
    for x, y in zip(compiled, eager):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def module_backends() -> list[str]:
    """Cache backends: "auto" (sdpa attention with C++ small ops on CPU) and every
    backend that implements all the ops the cache runs."""
    names = set(BACKENDS)
    for op in ("select_sinks", "sink_gate", "gate_from_means", "bank_insert"):
        names &= set(op_backends(op))
    return ["auto", *sorted(names)]


@pytest.mark.parametrize("backend", module_backends())
def test_compile_fullgraph_module(backend):
    """torch.compile(fullgraph=True) of a denoising call of SinkAttention with a cache."""
    cfg = DySinkConfig(num_layers=2, num_heads=2, head_dim=16, tokens_per_frame=8, top_k=1,
                       local_frames=6)  # fmt: skip
    cache = DySinkCache(cfg, dtype=torch.float32, backend=backend)
    attn = SinkAttention(cfg)
    g = torch.Generator().manual_seed(1)
    qkv = lambda: tuple(torch.randn(1, 24, 2, 16, generator=g) for _ in range(3))
    for _ in range(3):
        cache.begin_block()
        for layer in range(2):
            attn(*qkv(), cache=cache, layer=layer, commit=True)
        cache.end_block(torch.randn(1, 6, generator=g))
    cache.begin_block()
    q, k, v = qkv()

    def step(q, k, v):
        return attn(q, k, v, cache=cache, layer=1)

    eager = step(q, k, v)
    compiled = torch.compile(step, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)


# Empty problems: (B, Sq, Sk, P, S_e, H, n); D = 16.
EMPTY = {
    "batch": (0, 4, 5, 3, 2, 2, 2),
    "heads": (2, 4, 5, 3, 2, 0, 2),
    "queries": (2, 0, 5, 3, 2, 2, 2),
    "keys": (2, 4, 0, 3, 2, 2, 0),
    "slots": (2, 4, 5, 3, 2, 2, 0),
    "pool": (2, 4, 5, 0, 2, 2, 2),
    "entry tokens": (2, 4, 5, 3, 0, 2, 2),
    "keys and pool": (2, 4, 0, 0, 2, 2, 2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", list(EMPTY))
def test_empty_problem(what, backend):
    """Zero batch, heads, queries, keys or slots: an empty or all-zero result on every
    backend (the op settles them before any backend runs), equal to the formula."""
    B, Sq, Sk, P, S_e, H, n = EMPTY[what]
    q, k, v = (torch.randn(B, S, H, 16) for S in (Sq, Sk, Sk))
    pk, pv = torch.randn(P, S_e, H, 16), torch.randn(P, S_e, H, 16)
    slots = torch.full((B, n), -1 if P == 0 else P - 1, dtype=torch.int32)
    out, st = gathered_sink_attention(q, k, v, pk, pv, slots, return_stats=True, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert st.lse.shape == st.entropy.shape == (B, H, Sq) and st.slot_mass.shape == (B, H, n)
    if what in ("slots", "pool", "entry tokens"):  # the local window alone is attended
        ref, lse, *_ = reference(q, k, v, pk, pv, slots, torch.full((B,), Sk), 0.25)
        assert_close(out, ref, torch.float32)
        assert_close(st.lse, lse, torch.float32, scale=4)
        assert (st.slot_mass == 0).all()
    else:  # nothing to attend: zeros, lse -inf
        assert (out == 0).all() and torch.isneginf(st.lse).all() and (st.entropy == 0).all()
        assert (st.slot_mass == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_zero_is_a_value_error(backend):
    q = torch.randn(1, 3, 2, 0)
    with pytest.raises(ValueError, match="head_dim"):
        gathered_sink_attention(q, q, q, torch.randn(2, 2, 2, 0), torch.randn(2, 2, 2, 0),
                                torch.zeros(1, 1, dtype=torch.int32), backend=backend)  # fmt: skip


# ----------------------------------------------------------------- bad input
def attn_args(**over):
    B, Sq, Sk, H, D, P, S_e, n = 2, 3, 5, 2, 8, 3, 4, 2
    a = dict(
        q=torch.randn(B, Sq, H, D),
        k=torch.randn(B, Sk, H, D),
        v=torch.randn(B, Sk, H, D),
        pool_k=torch.randn(P, S_e, H, D),
        pool_v=torch.randn(P, S_e, H, D),
        slot_idx=torch.zeros(B, n, dtype=torch.int32),
    )
    kw = {}
    for key, val in over.items():
        (a if key in a else kw)[key] = val
    return a, kw


def call_attn(**over):
    a, kw = attn_args(**over)
    return gathered_sink_attention(*a.values(), **kw)


@pytest.mark.parametrize(
    "over,exc,needle",
    [
        (dict(q=torch.randn(2, 3, 2)), ValueError, "q must have 4 dimensions"),
        (dict(k=torch.randn(3, 5, 2, 8)), ValueError, "k.shape[0]"),
        (dict(k=torch.randn(2, 5, 3, 8)), ValueError, "k.shape[2]"),
        (dict(v=torch.randn(2, 5, 2, 4)), ValueError, "v.shape[3]"),
        (dict(v=torch.randn(2, 6, 2, 8)), ValueError, "v must have the shape of k"),
        (dict(pool_k=torch.randn(3, 4, 2, 4)), ValueError, "pool_k.shape[3]"),
        (dict(pool_v=torch.randn(3, 5, 2, 8)), ValueError, "pool_v must have the shape"),
        (dict(k=torch.randn(2, 5, 2, 8, dtype=torch.float16)), TypeError, "k has dtype"),
        (dict(q=torch.randn(2, 3, 2, 8).double()), TypeError, "q must have dtype"),
        (dict(slot_idx=torch.zeros(2, 2)), TypeError, "slot_idx must have dtype"),
        (dict(slot_idx=torch.zeros(3, 2, dtype=torch.int32)), ValueError, "slot_idx.shape[0]"),
        (dict(slot_idx=torch.tensor([[0, 3], [0, 0]], dtype=torch.int32)), IndexError, "slot_idx"),
        (dict(slot_idx=torch.tensor([[0, -2], [0, 0]], dtype=torch.int32)), IndexError, "slot_idx"),
        (dict(k_len=torch.tensor([6, 1], dtype=torch.int32)), IndexError, "k_len"),
        (dict(k_len=torch.tensor([-1, 1], dtype=torch.int32)), IndexError, "k_len"),
        (dict(k_len=torch.tensor([1, 1, 1], dtype=torch.int32)), ValueError, "k_len.shape[0]"),
        (dict(backend="cudnn-magic"), ValueError, "unknown backend"),
        (dict(backend=None), TypeError, "backend"),
        (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
        (dict(softmax_scale=math.inf), ValueError, "softmax_scale"),
        (dict(rope_theta=0.0), ValueError, "rope_theta"),
        (dict(q="not a tensor"), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_gathered_attention_bad_input(over, exc, needle):
    with pytest.raises(exc, match=None) as info:
        call_attn(**over)
    assert needle in str(info.value), str(info.value)


def test_mixed_devices_meta():
    """A tensor on another device (meta stands in for a GPU) is named in the error."""
    with pytest.raises(ValueError, match="pool_k is on meta"):
        call_attn(pool_k=torch.randn(3, 4, 2, 8, device="meta"))
