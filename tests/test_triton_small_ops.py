"""Triton backends of select_sinks, sink_gate / gate_from_means and bank_insert
against their PyTorch oracles (Triton's interpreter on CPU, or a GPU when present)."""

from __future__ import annotations

import pytest
import torch

from dysink_kernels import select_sinks, sink_gate
from dysink_kernels.ops.bank_insert import bank_insert
from dysink_kernels.ops.select_sinks import select_sinks_op
from dysink_kernels.ops.select_sinks import triton as select_triton
from dysink_kernels.ops.select_sinks.naive import select_sinks_naive
from dysink_kernels.ops.sink_gate import gate_from_means
from dysink_kernels.ops.sink_gate import naive as gate_naive
from dysink_kernels.ops.sink_gate.triton import gate_votes_triton
from dysink_kernels.ops.sink_gate.votes import decide_from_votes, gate_votes_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCORE_ATOL = 1e-5  # select_sinks scores against the oracle's
STATE_ATOL = 1e-6  # fp32 means and normalised features (summation order differs)


def i32(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int32, device=DEVICE)


# ----------------------------------------------------------------------------- select_sinks
def both_select(qf, sf, owner, frame, k, lo, hi, sink_frames=0):
    """Run the triton and naive backends; assert equal choices and close scores."""
    # Through the op (trusted callers), which also takes k above the slot count.
    args = (qf, sf, owner, frame, k, lo, hi, sink_frames)
    got = select_sinks_op(*args, backend="triton")
    want = select_sinks_op(*args, backend="naive")
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.float32
    assert got[0].shape == want[0].shape == (qf.shape[0], k)
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=SCORE_ATOL, rtol=0)
    return got


@pytest.mark.parametrize("seed", range(4))
def test_select_random_odd_sizes(seed):
    g = torch.Generator().manual_seed(seed)
    B, M, F, P = 3, 3, 19, 23
    qf = torch.randn(B, M, F, generator=g)
    qf[0, 2] = 0  # padding row
    sf = torch.randn(P, F, generator=g)
    owner = torch.randint(-1, B, (P,), generator=g, dtype=torch.int32)
    frame = torch.randint(0, 12, (P,), generator=g, dtype=torch.int32) * 3
    dt = (torch.float32, torch.float16, torch.bfloat16, torch.float32)[seed]
    for k in (1, 3, 16):
        both_select(
            qf.to(DEVICE, dt), sf.to(DEVICE), owner.to(DEVICE), frame.to(DEVICE), k,
            i32([6, 0, 30]), i32([15, 0, 33]), sink_frames=3 * (seed % 2),
        )  # fmt: skip


def test_select_ties_lower_frame_then_lower_slot():
    F = 5
    qf = torch.randn(2, 2, F, device=DEVICE)
    qf[0, 1] = qf[0, 0]
    # One-hot features: every tied cosine is exact in both backends.
    sf = torch.zeros(8, F, device=DEVICE)
    sf[:7, 1] = 1.0
    sf[7] = qf[0, 0]  # cosine 1: the best slot of sample 0
    frame = i32([12, 3, 9, 3, 0, 6, 15, 30])
    owner = i32([0, 0, 0, 0, 0, 0, 1, 0])
    lo, hi = i32([100, 100]), i32([100, 100])
    slots, _ = both_select(qf, sf, owner, frame, 4, lo, hi)
    # best slot 7, then the ties by frame (0, 3, 3) and slot (1 before 3)
    assert slots[0].tolist() == [4, 1, 3, 7]
    assert slots[1].tolist() == [6, -1, -1, -1]
    both_select(qf, sf, owner, frame, 2, lo, hi)


def test_select_empty_foreign_and_k_edges():
    B, M, F, P = 3, 2, 9, 11
    qf = torch.randn(B, M, F, device=DEVICE)
    sf = torch.randn(P, F, device=DEVICE)
    frame = i32(range(0, 3 * P, 3))
    lo = hi = i32([0, 0, 0])
    empty = i32([-1] * P)
    foreign = i32([5] * P)  # a sample that is not in the batch
    for k in (0, 1, 16):
        slots, score = both_select(qf, sf, owner=empty, frame=frame, k=k, lo=lo, hi=hi)
        assert (slots == -1).all() and (score == float("-inf")).all()
    # The public op refuses an owner outside the batch; the kernel itself ignores it.
    with pytest.raises(IndexError):
        select_sinks(qf, sf, foreign, frame, k=1, exclude_lo=lo, exclude_hi=hi, backend="triton")
    for k in (1, P):
        slots, score = both_select_prior(qf, sf, foreign, frame, k, lo, hi, 0, None, 0.0)
        assert (slots == -1).all() and (score == float("-inf")).all()
    owner = i32([1] * P)  # all slots belong to sample 1
    for k in (0, 5, 11, 16):  # k up to larger than the candidates
        slots, _ = both_select(qf, sf, owner, frame, k, lo, hi)
        assert (slots[[0, 2]] == -1).all()
        assert (slots[1] >= 0).sum() == min(k, P)
    # P = 0: an empty bank
    both_select(qf, sf[:0], owner[:0], frame[:0], 3, lo, hi)
    # k above the register top-k: kernel scores, device sort
    both_select(qf, sf, owner, frame, 70, lo, hi)


def test_select_nan_and_zero_queries_excluded():
    B, M, F, P = 3, 3, 7, 13
    qf = torch.randn(B, M, F, device=DEVICE)
    qf[0, 1, 2] = float("nan")  # a NaN query row makes every score of sample 0 NaN
    qf[1] = 0  # no valid query row: sample 1 retrieves nothing
    sf = torch.randn(P, F, device=DEVICE)
    sf[4, 0] = float("nan")  # a NaN slot feature is never a candidate
    owner = i32([0, 1, 2] * 4 + [2])
    owner[4] = 2
    frame = i32(range(P))
    slots, _ = both_select(qf, sf, owner, frame, 16, i32([0] * B), i32([0] * B))
    assert (slots[:2] == -1).all()
    assert 4 not in slots[2].tolist() and (slots[2] >= 0).sum() == 5


def test_select_several_slot_tiles(monkeypatch):
    # Tiles of 8 slots x 4 features: the running top-k is merged across 5 tiles, and
    # each tile's scores take two feature steps (the second one masked).
    monkeypatch.setattr(select_triton, "MAX_BLOCK_P", 8)
    monkeypatch.setattr(select_triton, "TILE_ELEMS", 32)
    g = torch.Generator().manual_seed(1)
    B, M, F, P = 2, 2, 6, 37
    qf = torch.randn(B, M, F, generator=g).to(DEVICE)
    sf = torch.randn(P, F, generator=g)
    tied = [3, 12, 20, 33]  # identical one-hot features in different tiles
    sf[tied] = torch.nn.functional.one_hot(torch.tensor(0), F).float()
    owner = torch.randint(0, B, (P,), generator=g, dtype=torch.int32)
    owner[tied] = 0
    frame = torch.randint(0, 9, (P,), generator=g, dtype=torch.int32)
    qf[0, :, 0] = 100.0  # make the tied slots the best ones of sample 0
    for k in (3, 16):
        both_select(qf, sf.to(DEVICE), owner.to(DEVICE), frame.to(DEVICE), k, i32([4, 0]),
                    i32([5, 0]))  # fmt: skip


def test_select_strided_inputs():
    g = torch.Generator().manual_seed(2)
    B, M, F, P = 2, 3, 10, 15
    qf = torch.randn(M, B, F, generator=g).to(DEVICE).transpose(0, 1)  # (B, M, F), strided
    sf = torch.randn(P, 2 * F, generator=g).to(DEVICE)[:, ::2]
    owner = torch.randint(-1, B, (2 * P,), generator=g).to(DEVICE)[::2]  # int64, strided
    frame = torch.arange(2 * P, device=DEVICE)[::2]
    lo = torch.tensor([2, 0], device=DEVICE)
    both_select(qf, sf, owner, frame, 4, lo, lo + 6)


def both_select_prior(qf, sf, owner, frame, k, lo, hi, sink_frames, prior, mix):
    """The Triton backend with a usage prior against the oracle."""
    args = (qf, sf, owner, frame, k, lo, hi, sink_frames)
    got = select_triton.select_sinks_triton(*args, prior, mix)
    want = select_sinks_naive(*args, slot_prior=prior, prior_mix=mix)
    assert got[0].shape == (qf.shape[0], k) and got[1].dtype == torch.float32
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=SCORE_ATOL, rtol=0)
    return got


@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
def test_select_usage_prior(mix, monkeypatch):
    """score = (1 - mix) * mean cosine + mix * prior on candidates; a NaN prior drops
    the slot (not read at mix 0); no valid query still retrieves nothing."""
    g = torch.Generator().manual_seed(11)
    B, M, F, P = 3, 3, 10, 21
    qf = torch.randn(B, M, F, generator=g).to(DEVICE)
    qf[2] = 0
    sf = torch.randn(P, F, generator=g).to(DEVICE)
    owner = torch.randint(-1, B, (P,), generator=g, dtype=torch.int32).to(DEVICE)
    frame = (torch.randint(0, 9, (P,), generator=g, dtype=torch.int32) * 3).to(DEVICE)
    prior = torch.rand(B, 2 * P, generator=g).to(DEVICE)[:, ::2]  # strided
    prior[0, ::3] = float("nan")
    lo, hi = i32([3, 0, 0]), i32([9, 0, 0])
    for k in (1, 4, 16):
        slots, _ = both_select_prior(qf, sf, owner, frame, k, lo, hi, 3, prior, mix)
        assert (slots[2] == -1).all()
        if mix > 0:
            assert not set(slots[0].tolist()) & set(range(0, P, 3))
    # the large-k path and several slot tiles take the prior too
    monkeypatch.setattr(select_triton, "MAX_K", 2)
    monkeypatch.setattr(select_triton, "MAX_BLOCK_P", 8)
    for k in (3, 30):
        both_select_prior(qf, sf, owner, frame, k, lo, hi, 3, prior, mix)


def test_select_prior_alone_at_full_mix():
    qf, sf = torch.randn(1, 2, 6, device=DEVICE), torch.randn(6, 6, device=DEVICE)
    prior = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2, 0.8]], device=DEVICE)
    zero = i32([0])
    slots, score = both_select_prior(qf, sf, i32([0] * 6), i32(range(6)), 3, zero, zero, 0,
                                     prior, 1.0)  # fmt: skip
    assert slots[0].tolist() == [1, 3, 5]
    assert score[0].tolist() == pytest.approx([0.9, 0.7, 0.8])


def test_select_large_k_device_sort(monkeypatch):
    """k above the register top-k: the kernel writes the scores (several tiles), a
    device sort ranks them; ties by frame then slot, padding last, k > P."""
    assert not hasattr(select_triton, "select_sinks_naive")  # no oracle on this path
    monkeypatch.setattr(select_triton, "MAX_K", 2)
    monkeypatch.setattr(select_triton, "MAX_BLOCK_P", 8)
    monkeypatch.setattr(select_triton, "TILE_ELEMS", 32)
    g = torch.Generator().manual_seed(12)
    B, M, F, P = 3, 2, 6, 27
    qf = torch.randn(B, M, F, generator=g).to(DEVICE)
    sf = torch.randn(P, F, generator=g)
    tied = [2, 9, 17, 25]
    sf[tied] = torch.nn.functional.one_hot(torch.tensor(1), F).float()
    sf = sf.to(DEVICE)
    owner = torch.randint(-1, B, (P,), generator=g, dtype=torch.int32)
    owner[tied] = 0
    frame = torch.randint(0, 5, (P,), generator=g, dtype=torch.int32)
    for k in (3, 5, 11, 40):
        both_select(qf, sf, owner.to(DEVICE), frame.to(DEVICE), k, i32([1, 0, 0]),
                    i32([2, 0, 0]), sink_frames=1)  # fmt: skip


# ----------------------------------------------------------------------------- sink_gate
def on_cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def both_gate(*args, **kw):
    """Triton against the oracle run on the CPU: ratios are exact quotients there (CUDA
    PyTorch divides by multiplying with a rounded reciprocal)."""
    got = sink_gate(*args, backend="triton", **kw)
    want = sink_gate(*map(on_cpu, args), backend="naive", **{n: on_cpu(v) for n, v in kw.items()})
    assert got[0].dtype == want[0].dtype and got[1].dtype == torch.float32
    assert torch.equal(got[0].cpu(), want[0]), (got[0], want[0])
    assert torch.equal(got[1].cpu(), want[1]), (got[1], want[1])
    return got


def both_means(*args):
    got = gate_from_means(*args, backend="triton")
    want = gate_from_means(*map(on_cpu, args), backend="naive")
    assert got[0].dtype == want[0].dtype
    assert torch.equal(got[0].cpu(), want[0]), (got[0], want[0])
    assert torch.equal(got[1].cpu(), want[1]), (got[1], want[1])
    return got


def slot_table(g, B, n, P, uniform):
    """``(B, n)`` int32 slots with ``-1`` anywhere; the same valid count per row if ``uniform``."""
    if not uniform:
        return torch.randint(-1, P, (B, n), generator=g, dtype=torch.int32)
    rows = []
    for _ in range(B):
        row = torch.randperm(P, generator=g)[:n]
        row[torch.randperm(n, generator=g)[:2]] = -1
        rows.append(row)
    return torch.stack(rows).to(torch.int32)


@pytest.mark.parametrize("scope", ["batch", "sample"])
@pytest.mark.parametrize("uniform", [True, False])
def test_gate_random(scope, uniform):
    g = torch.Generator().manual_seed(3 + uniform)
    B, Sq, Sk, H, D, P, n = 3, 5, 70, 3, 6, 7, 5
    q = torch.randn(B, Sq, H, D, generator=g).to(DEVICE)
    k = torch.randn(B, Sk, H, D, generator=g).to(DEVICE)
    means = torch.randn(P, H, D, generator=g).to(DEVICE)
    slots = slot_table(g, B, n, P, uniform).to(DEVICE)
    k_len = i32([0, Sk, 37])  # empty, full and partial local windows
    for tau in (0.0, 1 / 3, 0.5):
        both_gate(q, k, means, slots, k_len=k_len, tau=tau, scope=scope)
    both_gate(q, k, means, slots.long(), tau=0.5, scope=scope)  # k_len=None, int64 slots
    qbar, kbar = torch.randn(2, B, H, D, generator=g).to(DEVICE)
    for tau in (0.0, 0.5):
        both_means(qbar, kbar, means, slots, tau, scope)


def test_gate_half_precision_and_strided():
    g = torch.Generator().manual_seed(5)
    B, Sq, Sk, H, D, P, n = 2, 7, 33, 5, 10, 6, 3
    for dt in (torch.float16, torch.bfloat16):
        q = torch.randn(B, Sq, H, D, generator=g).to(DEVICE, dt)
        k = torch.randn(B, H, Sk, D, generator=g).to(DEVICE, dt).transpose(1, 2)  # strided
        means = torch.randn(P, H, D, generator=g).to(DEVICE)
        slots = torch.randint(-1, P, (n, B), generator=g).to(DEVICE).t()  # int64, strided
        for scope in ("batch", "sample"):
            both_gate(q, k, means, slots, k_len=i32([Sk, 20]), tau=0.5, scope=scope)


def test_gate_strict_at_equality():
    # Integer data: every dot product is exact, whatever the summation order.
    B, H, D = 2, 5, 4
    qbar = torch.zeros(B, H, D, device=DEVICE)
    qbar[..., 0] = 1.0
    kbar = torch.randint(-3, 4, (B, H, D), device=DEVICE).float()
    means = torch.cat([kbar, kbar]).clone()  # slots 0-1: equal to the local mean (no vote)
    means[2:, :4, 0] += 1.0  # slots 2-3: heads 0-3 vote, head 4 ties
    slots = i32([[2, -1, 0], [-1, 3, 1]])
    expected = torch.tensor([[0.8, 0.0, 0.0], [0.0, 0.8, 0.0]], device=DEVICE)
    for scope in ("batch", "sample"):
        kept, ratio = both_means(qbar, kbar, means, slots, 0.8, scope)
        # 4 of 5 voters (8 of 10 over the batch) is 0.8: not above tau = 0.8
        assert torch.equal(ratio, expected)
        assert torch.equal(kept, slots)
        kept, _ = both_means(qbar, kbar, means, slots, 0.79, scope)
        assert kept.tolist() == [[-1, -1, 0], [-1, -1, 1]]
    # the same through sink_gate: means of 4 integer rows are exact
    q = qbar[:, None].expand(B, 4, H, D).contiguous()
    k = kbar[:, None].expand(B, 4, H, D).contiguous()
    for scope in ("batch", "sample"):
        _, ratio = both_gate(q, k, means, slots, tau=0.8, scope=scope)
        assert torch.equal(ratio, expected)


def test_gate_edge_shapes():
    B, H, D = 2, 3, 4
    qbar, kbar = torch.randn(2, B, H, D, device=DEVICE)
    none = i32([[-1, -1], [-1, -1]])
    empty_pool = torch.zeros(0, H, D, device=DEVICE)
    for scope in ("batch", "sample"):
        kept, ratio = both_means(qbar, kbar, empty_pool, none, 0.5, scope)
        assert (kept == -1).all() and (ratio == 0).all()
        kept, ratio = both_means(qbar, kbar, empty_pool, none[:, :0], 0.5, scope)
        assert kept.shape == ratio.shape == (B, 0)
        both_means(qbar[:1], kbar[:1], torch.randn(4, H, D, device=DEVICE), i32([[3]]), 0.0, scope)


def test_gate_votes_backends():
    """The vote counts alone (head parallelism): Triton entry and the PyTorch production
    count against the oracle; decide_from_votes against the oracle's."""
    g = torch.Generator().manual_seed(13)
    for B, n, H, D, P in ((3, 5, 4, 7, 9), (1, 1, 1, 1, 1), (2, 3, 5, 3, 0), (2, 0, 3, 4, 5)):
        qbar, kbar = torch.randn(2, B, H, D, generator=g).to(DEVICE)
        means = torch.randn(P, H, D, generator=g).to(DEVICE)
        slots = torch.randint(-1, max(P, 1), (B, n), generator=g, dtype=torch.int32)
        slots = (slots.clamp(max=0) if P == 0 else slots).to(DEVICE)
        want = gate_naive.gate_votes(qbar, kbar, means, slots)
        for fn in (gate_votes_triton, gate_votes_torch):
            got = fn(qbar, kbar, means, slots)
            assert got.dtype == torch.float32 and torch.equal(got, want), (fn, got, want)
        for scope in ("batch", "sample"):
            for tau in (0.0, 0.5, 1.0):
                got = decide_from_votes(want, slots, H, tau, scope)
                ref = gate_naive.decide_from_votes(want, slots, H, tau, scope)
                assert got[0].dtype == ref[0].dtype
                assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # ties: integer data, entries equal to the local mean get no vote
    B, H, D = 2, 5, 4
    qbar = torch.zeros(B, H, D, device=DEVICE)
    qbar[..., 0] = 1.0
    kbar = torch.randint(-3, 4, (B, H, D), device=DEVICE).float()
    means = torch.cat([kbar, kbar]).clone()
    means[2:, :4, 0] += 1.0
    slots = i32([[2, -1, 0], [-1, 3, 1]])
    expected = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]], device=DEVICE)
    for fn in (gate_votes_triton, gate_votes_torch):
        assert torch.equal(fn(qbar, kbar, means, slots), expected)
    # the decision from votes split over heads equals the whole gate
    for scope in ("batch", "sample"):
        parts = sum(gate_votes_triton(qbar[:, h0:h1], kbar[:, h0:h1], means[:, h0:h1], slots)
                    for h0, h1 in ((0, 2), (2, 5)))  # fmt: skip
        got = decide_from_votes(parts, slots, H, 0.79, scope)
        want = gate_from_means(qbar, kbar, means, slots, 0.79, scope, backend="naive")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------- bank_insert
STATE = ("k", "v", "mean_k", "feature", "owner", "frame", "stamp", "clock")


def make_bank(L, B, C, S_e, H, D, F, dtype, seed=0):
    """Bank state with random pool contents (so that an unwritten change shows)."""
    g = torch.Generator().manual_seed(seed)
    P = B * C
    state = {
        "k": torch.randn(L, P, S_e, H, D, generator=g).to(DEVICE, dtype),
        "v": torch.randn(L, P, S_e, H, D, generator=g).to(DEVICE, dtype),
        "mean_k": torch.randn(L, P, H, D, generator=g).to(DEVICE),
        "feature": torch.zeros(P, F, device=DEVICE),
        "owner": torch.full((P,), -1, dtype=torch.int32, device=DEVICE),
        "frame": torch.full((P,), -1, dtype=torch.int32, device=DEVICE),
        "stamp": torch.zeros(P, dtype=torch.int64, device=DEVICE),
        "clock": torch.zeros((), dtype=torch.int64, device=DEVICE),
    }
    return state


def clone_state(state):
    return {name: t.clone() for name, t in state.items()}


def insert(state, backend, src_k, src_v, src_pos, feature, frame, C, limit, dedup):
    s = state
    return bank_insert(
        s["k"], s["v"], s["mean_k"], s["feature"], s["owner"], s["frame"], s["stamp"],
        s["clock"], src_k, src_v, src_pos, feature, torch.tensor(frame, device=DEVICE),
        C, limit, dedup, backend=backend,
    )  # fmt: skip


def assert_same_state(got, want, exact_means=False):
    for name in STATE:
        if name in ("mean_k", "feature") and not exact_means:
            torch.testing.assert_close(got[name], want[name], atol=STATE_ATOL, rtol=STATE_ATOL)
        else:
            assert torch.equal(got[name], want[name]), name


def both_insert(tri, ref, *args):
    """Insert into ``tri`` with triton and into ``ref`` with naive; compare everything."""
    got = insert(tri, "triton", *args)
    want = insert(ref, "naive", *args)
    assert got[0].dtype == torch.bool and got[1].dtype == torch.int64
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    assert torch.equal(got[1], want[1]), (got[1], want[1])
    assert_same_state(tri, ref)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_insert_sequence(dtype):
    # limit 3 < 4 slots per sample; src_pos runs around a ring of N tokens.
    L, B, C, limit, S_e, H, D, F, N = 2, 3, 4, 3, 5, 3, 6, 7, 11
    g = torch.Generator().manual_seed(7)
    tri = make_bank(L, B, C, S_e, H, D, F, dtype)
    ref = clone_state(tri)
    decisions = []
    for step in range(8):
        src_k = torch.randn(L, B, N, H, D, generator=g).to(DEVICE, dtype)
        src_v = torch.randn(L, B, N, H, D, generator=g).to(DEVICE, dtype)
        src_pos = (4 * step + torch.arange(S_e)) % N
        feature = torch.randn(B, F, generator=g).to(DEVICE)
        if step in (2, 5):  # sample 1 repeats its first entry: dedup rejects it
            feature[1] = 3.0 * tri["feature"][C]
        if step == 4:
            feature[2, 3] = float("nan")  # never stored
        stored, slot = both_insert(
            tri, ref, src_k, src_v, src_pos.to(DEVICE), feature, 3 * step, C, limit, 0.95
        )
        decisions.append((stored.tolist(), slot.tolist()))
    # fresh bank fills slots 0..2 of each region, then FIFO evicts the oldest
    assert decisions[0] == ([True] * 3, [0, 4, 8])
    assert decisions[2][0] == [True, False, True] and decisions[4][0] == [True, True, False]
    assert decisions[3][1][0] == 0  # sample 0 full at limit 3: its oldest entry goes
    assert (tri["owner"].view(B, C)[:, limit:] == -1).all()
    assert int(tri["clock"]) == 8 * B


# The interpreter's numpy warns on inf / inf while normalising the non-finite feature.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_insert_rejected_changes_nothing():
    L, B, C, S_e, H, D, F, N = 2, 3, 3, 4, 2, 8, 5, 9
    g = torch.Generator().manual_seed(8)
    tri = make_bank(L, B, C, S_e, H, D, F, torch.float16)
    src_k = torch.randn(L, B, N, H, D, generator=g).to(DEVICE, torch.float16)
    src_v = torch.randn(L, B, N, H, D, generator=g).to(DEVICE, torch.float16)
    src_pos = torch.tensor([7, 8, 0, 1], device=DEVICE)
    feature = torch.randn(B, F, generator=g).to(DEVICE)
    first = insert(tri, "triton", src_k, src_v, src_pos, feature, 0, C, C, 0.9)
    assert first[0].all()
    before = clone_state(tri)
    again = feature * 2.0  # the same directions: every sample is a duplicate
    again[1] = float("inf")  # and a non-finite one
    stored, slot = insert(tri, "triton", src_k + 1, src_v + 1, src_pos, again, 3, C, C, 0.9)
    assert not stored.any() and slot.tolist() == [1, 4, 7]
    before["clock"] += B  # the clock advances even when nothing is stored
    for name in STATE:
        assert torch.equal(tri[name], before[name]), name


def test_insert_no_dedup_fifo_and_strided_sources():
    L, B, C, S_e, H, D, F, N = 1, 2, 2, 6, 2, 5, 4, 8
    g = torch.Generator().manual_seed(9)
    tri = make_bank(L, B, C, S_e, H, D, F, torch.float32)
    ref = clone_state(tri)
    for step in range(5):
        # K/V as views of wider buffers (head_dim sliced out), positions not monotone
        src_k = torch.randn(L, B, N, H, 2 * D, generator=g).to(DEVICE)[..., :D]
        src_v = torch.randn(L, B, H, N, D, generator=g).to(DEVICE).transpose(2, 3)
        src_pos = torch.randperm(N, generator=g)[:S_e].to(DEVICE)
        feature = torch.randn(B, F, generator=g).to(DEVICE)
        feature[0] = 1.0  # the same feature every time: stored anyway without dedup
        stored, slot = both_insert(tri, ref, src_k, src_v, src_pos, feature, step, C, C, None)
        assert stored.all() and slot.tolist() == [step % C, C + step % C]


def test_insert_fp8_bytes_through_the_op():
    """An fp8 bank's uint8 views go through the op on every backend: bytes copied as
    they are (the mean keys of bytes are the caller's to replace)."""
    L, B, C, S_e, H, D, F, N = 2, 2, 3, 4, 2, 8, 5, 7
    g = torch.Generator().manual_seed(14)
    tri = make_bank(L, B, C, S_e, H, D, F, torch.float8_e4m3fn)
    for name in ("k", "v"):
        tri[name] = tri[name].view(torch.uint8)
    ref = clone_state(tri)
    for step in range(4):
        src = torch.randn(L, B, N, H, D, generator=g).to(torch.float8_e4m3fn)
        src = src.view(torch.uint8).to(DEVICE)
        feature = torch.randn(B, F, generator=g).to(DEVICE)
        pos = (torch.arange(S_e) + step) % N
        both_insert(tri, ref, src, src.flip(2), pos.to(DEVICE), feature, step, C, 2, 0.9)


def test_fp8_bank_inserts_through_the_op(monkeypatch):
    """FrameBank passes its backend to the insert op for fp8 banks too (no backend
    choice of its own)."""
    from dysink_kernels import bank as bank_module
    from dysink_kernels.fp8 import FP8_DTYPE

    seen = []
    real = bank_module.bank_insert

    def spy(*args, backend):
        seen.append((args[0].dtype, backend))
        return real(*args, backend=backend)

    monkeypatch.setattr(bank_module, "bank_insert", spy)
    fb = bank_module.FrameBank(1, 1, 2, 2, 1, 4, dtype=FP8_DTYPE, device=DEVICE)
    src = torch.randn(1, 1, 3, 1, 4, device=DEVICE)
    pos = torch.arange(2, device=DEVICE)
    feature = torch.ones(1, 3, device=DEVICE)
    stored, _ = fb.insert(src, src, pos, feature, torch.tensor(0, device=DEVICE), None,
                          backend="triton")  # fmt: skip
    assert seen == [(torch.uint8, "triton")] and stored.tolist() == [True]
    torch.testing.assert_close(fb.mean_k[0, 0], src[0, 0, :2].mean(0))


# ----------------------------------------------------------------------------- all ops
def test_unit_sizes():
    # Sizes of 1 are compile-time constants on a GPU (Triton specialises them).
    one = i32([1])
    both_select(torch.randn(1, 1, 1, device=DEVICE), torch.ones(1, 1, device=DEVICE), i32([0]),
                one, 1, one, one)  # fmt: skip
    q, k = torch.randn(2, 1, 1, 1, 1, device=DEVICE)
    for scope in ("batch", "sample"):
        both_gate(q, k, torch.randn(1, 1, 1, device=DEVICE), i32([[0]]), tau=0.0, scope=scope)
    tri = make_bank(1, 1, 1, 1, 1, 1, 1, torch.float32)
    ref = clone_state(tri)
    src = torch.randn(1, 1, 1, 1, 1, device=DEVICE)
    pos = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    for step in range(2):
        both_insert(tri, ref, src, src, pos, torch.ones(1, 1, device=DEVICE), step, 1, 1, 0.5)
