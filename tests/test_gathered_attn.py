"""gathered_sink_attention against fp64 softmax over explicitly concatenated KV."""

from __future__ import annotations

import math

import pytest
import torch

from dysink_kernels import gathered_sink_attention
from dysink_kernels.ops.gathered_sink_attention import gathered_sink_attention_general as gathered_attention

from conftest import assert_close


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
    out, st = gathered_attention(
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


@pytest.mark.parametrize("case", CASES)
def test_sdpa_backend_equals_naive(case):
    """The CPU fused-kernel backend against the oracle, statistics included."""
    B, Sq, Sk, P, S_e, H, D, n = case
    q, k, v, pk, pv, slots, k_len = make_inputs(B, Sq, Sk, P, S_e, H, D, n, torch.float32)
    if n:
        slots[0, 0] = -1
    k_len[-1] = 0
    got, gs = gathered_sink_attention(q, k, v, pk, pv, slots, k_len=k_len, return_stats=True,
                                      backend="sdpa")  # fmt: skip
    want, ws = gathered_sink_attention(q, k, v, pk, pv, slots, k_len=k_len, return_stats=True,
                                       backend="naive")  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for x, y in zip(gs, ws):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
