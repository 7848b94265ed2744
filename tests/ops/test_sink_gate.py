"""sink_gate and gate_from_means: every backend against explicit loops (both scopes,
strictness at equality), opcheck and torch.compile per backend, empty problems, bad
input."""

from __future__ import annotations

import pytest
import torch

from dysink_kernels import sink_gate
from dysink_kernels.ops.sink_gate import gate_from_means, gate_votes

from conftest import op_backends

BACKENDS = op_backends("sink_gate")
MEANS_BACKENDS = op_backends("gate_from_means")


def explicit(q, k, slot_mean_k, slots, k_len, tau, scope):
    B, _, H, _ = q.shape
    n = slots.shape[1]
    qbar = q.double().mean(1)
    s_loc = torch.zeros(B, H, dtype=torch.float64)
    for b in range(B):
        L = int(k_len[b])
        kb = k[b, :L].double().mean(0) if L > 0 else torch.zeros_like(qbar[b])
        for h in range(H):
            s_loc[b, h] = qbar[b, h] @ kb[h]
    votes = [[[False] * H for _ in range(n)] for _ in range(B)]
    for b in range(B):
        for j in range(n):
            s = int(slots[b, j])
            if s < 0:
                continue
            for h in range(H):
                votes[b][j][h] = bool(qbar[b, h] @ slot_mean_k[s, h].double() > s_loc[b, h])
    valid_counts = [sum(int(s) >= 0 for s in slots[b]) for b in range(B)]
    ratio = torch.zeros(B, n, dtype=torch.float64)
    uniform = len(set(valid_counts)) == 1
    for b in range(B):
        r = 0
        for j in range(n):
            if int(slots[b, j]) < 0:
                continue
            if scope == "batch" and uniform:
                total = 0
                for b2 in range(B):
                    js = [jj for jj in range(n) if int(slots[b2, jj]) >= 0]
                    total += sum(votes[b2][js[r]])
                ratio[b, j] = total / (B * H)
            else:
                ratio[b, j] = sum(votes[b][j]) / H
            r += 1
    kept = torch.where(ratio > tau, -1, slots)
    return kept.to(slots.dtype), ratio


def inputs(B, Sq, Sk, H, D, P, n, seed, slots=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g)
    k = torch.randn(B, Sk, H, D, generator=g)
    means = torch.randn(P, H, D, generator=g)
    if slots is None:
        slots = torch.randint(-1, P, (B, n), generator=g, dtype=torch.int32)
    k_len = torch.randint(0, Sk + 1, (B,), generator=g, dtype=torch.int32)
    return q, k, means, slots, k_len


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["batch", "sample"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tau", [0.0, 0.5, 0.8, 1.0])
def test_against_loops(scope, seed, tau, backend):
    q, k, means, slots, k_len = inputs(3, 7, 11, 5, 8, 6, 3, seed)
    kept, ratio = sink_gate(q, k, means, slots, k_len=k_len, tau=tau, scope=scope,
                            backend=backend)  # fmt: skip
    want_kept, want_ratio = explicit(q, k, means, slots, k_len, tau, scope)
    torch.testing.assert_close(ratio.double(), want_ratio, atol=1e-6, rtol=0)
    assert torch.equal(kept, want_kept)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_uniform_counts_judged_together(scope, backend):
    slots = torch.tensor([[0, 3, -1], [-1, 2, 4]], dtype=torch.int32)  # 2 valid each
    q, k, means, _, k_len = inputs(2, 5, 6, 4, 8, 5, 3, 11, slots=slots)
    kept, ratio = sink_gate(q, k, means, slots, k_len=k_len, scope=scope, backend=backend)
    want_kept, want_ratio = explicit(q, k, means, slots, k_len, 0.8, scope)
    torch.testing.assert_close(ratio.double(), want_ratio, atol=1e-6, rtol=0)
    assert torch.equal(kept, want_kept)
    if scope == "batch":  # rank-0 slots of both samples share one ratio
        assert ratio[0, 0] == ratio[1, 1] and ratio[0, 1] == ratio[1, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_strict_at_equality(backend):
    # One head; entry mean == local mean: score equal -> no vote; ratio 0.
    q = torch.ones(1, 2, 1, 4)
    k = torch.ones(1, 3, 1, 4)
    means = torch.ones(2, 1, 4)
    means[1] *= 2  # strictly larger score: votes against
    slots = torch.tensor([[0, 1]], dtype=torch.int32)
    kept, ratio = sink_gate(q, k, means, slots, tau=0.8, backend=backend)
    assert ratio.tolist() == [[0.0, 1.0]] and kept.tolist() == [[0, -1]]
    # tau = 1.0 keeps even a unanimous vote (drop needs ratio > tau)
    kept, _ = sink_gate(q, k, means, slots, tau=1.0, backend=backend)
    assert kept.tolist() == [[0, 1]]
    # Exactly at tau: 2 of 4 heads vote, ratio 0.5, tau 0.5 -> kept
    q4 = torch.ones(1, 1, 4, 2)
    k4 = torch.zeros(1, 1, 4, 2)
    m4 = torch.tensor([[[1.0, 0], [1, 0], [-1, 0], [-1, 0]]])
    one = torch.tensor([[0]], dtype=torch.int32)
    kept, ratio = sink_gate(q4, k4, m4, one, tau=0.5, backend=backend)
    assert ratio.item() == 0.5 and kept.tolist() == [[0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_one_ratio_zero_and_dtype_kept(backend):
    q, k, means, _, k_len = inputs(1, 4, 5, 3, 8, 4, 3, 3)
    slots = torch.tensor([[-1, 2, -1]], dtype=torch.int64)
    kept, ratio = sink_gate(q, k, means, slots, k_len=k_len, backend=backend)
    assert kept.dtype == torch.int64
    assert ratio[0, 0] == 0 and ratio[0, 2] == 0 and kept[0, 0] == -1


@pytest.mark.parametrize("backend", MEANS_BACKENDS)
@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_gate_from_means_equals_naive(scope, backend):
    g = torch.Generator().manual_seed(5)
    qbar, kbar = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    means = torch.randn(6, 4, 8, generator=g)
    slots = torch.tensor([[0, 5, -1], [2, -1, 1], [3, 3, 4]], dtype=torch.int32)
    got = gate_from_means(qbar, kbar, means, slots, 0.5, scope, backend)
    want = gate_from_means(qbar, kbar, means, slots, 0.5, scope, "naive")
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=0)


def gate_args():
    q, k, means, _, k_len = inputs(2, 5, 9, 2, 16, 4, 2, 2)
    return q, k, means, torch.tensor([[0, 2], [1, -1]], dtype=torch.int32), k_len


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    torch.library.opcheck(torch.ops.dysink.sink_gate.default, (*gate_args(), 0.5, "batch", backend))


@pytest.mark.parametrize("backend", MEANS_BACKENDS)
def test_opcheck_gate_from_means(backend):
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(2, 2, 16, generator=g), torch.randn(2, 2, 16, generator=g),
            torch.randn(4, 2, 16, generator=g), torch.tensor([[0, 2], [1, -1]]))  # fmt: skip
    torch.library.opcheck(torch.ops.dysink.gate_from_means.default, (*args, 0.5, "sample", backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    q, k, means, slots, k_len = gate_args()

    def call(q, k):
        return sink_gate(q, k, means, slots, k_len=k_len, tau=0.5, backend=backend)

    eager = call(q, k)
    compiled = torch.compile(call, fullgraph=True)(q, k)
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["batch", "heads", "queries", "slots", "pool"])
def test_empty_problem(what, backend):
    """Zero samples, heads, queries, listed slots or bank slots: every listed slot kept
    with ratio 0, on every backend (no backend runs)."""
    B, Sq, H, n, P = {
        "batch": (0, 3, 2, 2, 4), "heads": (2, 3, 0, 2, 4), "queries": (2, 0, 2, 2, 4),
        "slots": (2, 3, 2, 0, 4), "pool": (2, 3, 2, 2, 0),
    }[what]  # fmt: skip
    slots = torch.full((B, n), -1 if P == 0 else 1, dtype=torch.int32)
    kept, ratio = sink_gate(torch.randn(B, Sq, H, 8), torch.randn(B, 5, H, 8),
                            torch.randn(P, H, 8), slots, backend=backend)  # fmt: skip
    assert torch.equal(kept, slots) and ratio.shape == (B, n) and (ratio == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_zero_is_a_value_error(backend):
    q = torch.randn(1, 3, 2, 0)
    slots = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="head_dim"):
        sink_gate(q, q, torch.randn(2, 2, 0), slots, backend=backend)


@pytest.mark.parametrize(
    "key,val,exc,needle",
    [
        ("k", torch.randn(2, 4, 3, 8), ValueError, "k.shape[2]"),
        ("slot_mean_k", torch.randn(4, 2, 7), ValueError, "slot_mean_k.shape[2]"),
        ("slot_idx", torch.tensor([[4]], dtype=torch.int32).expand(2, 1), IndexError, "slot_idx"),
        ("k_len", torch.tensor([5, 0], dtype=torch.int32), IndexError, "k_len"),
        ("tau", 1.5, ValueError, "tau"),
        ("scope", "global", ValueError, "scope"),
        ("backend", "nope", ValueError, "unknown backend"),
    ],
)
def test_sink_gate_bad_input(key, val, exc, needle):
    a = dict(
        q=torch.randn(2, 3, 2, 8),
        k=torch.randn(2, 4, 2, 8),
        slot_mean_k=torch.randn(4, 2, 8),
        slot_idx=torch.zeros(2, 1, dtype=torch.int32),
    )
    a[key] = val
    with pytest.raises(exc) as info:
        sink_gate(a.pop("q"), a.pop("k"), a.pop("slot_mean_k"), a.pop("slot_idx"), **a)
    assert needle in str(info.value), str(info.value)


VOTES_BACKENDS = op_backends("gate_votes")


def votes_args(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, H, D, P = 3, 5, 8, 6
    qbar, kbar = torch.randn(B, H, D, generator=g), torch.randn(B, H, D, generator=g)
    means = torch.randn(P, H, D, generator=g)
    slots = torch.tensor([[0, 3], [5, -1], [-1, -1]], dtype=torch.int32)
    return qbar, kbar, means, slots


@pytest.mark.parametrize("backend", VOTES_BACKENDS)
@pytest.mark.parametrize("seed", range(3))
def test_gate_votes_count_heads(seed, backend):
    """Per slot, the heads whose mean query scores the slot above the window; 0 for -1."""
    qbar, kbar, means, slots = votes_args(seed)
    got = gate_votes(qbar, kbar, means, slots, backend)
    want = torch.zeros(slots.shape, dtype=torch.float32)
    for b in range(slots.shape[0]):
        for j in range(slots.shape[1]):
            s = int(slots[b, j])
            if s >= 0:
                above = (qbar[b] * means[s]).sum(-1) > (qbar[b] * kbar[b]).sum(-1)
                want[b, j] = float(above.sum())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("backend", VOTES_BACKENDS)
def test_opcheck_gate_votes(backend):
    torch.library.opcheck(torch.ops.dysink.gate_votes.default, (*votes_args(), backend))


@pytest.mark.parametrize("backend", VOTES_BACKENDS)
def test_gate_votes_empty(backend):
    qbar, kbar, means, slots = votes_args()
    got = gate_votes(qbar[:0], kbar[:0], means, slots[:0], backend)
    assert got.shape == (0, 2)
    got = gate_votes(qbar, kbar, means[:0], slots, backend)
    assert got.shape == slots.shape and (got == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_contiguous_for_strided_slots(backend):
    """The fake promises contiguous (B, n) outputs; a transposed slot_idx gets them too."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 3, 2, 8, generator=g), torch.randn(2, 4, 2, 8, generator=g)
    means = torch.randn(4, 2, 8, generator=g)
    slots = torch.tensor([[0, 2], [3, -1], [1, 1]], dtype=torch.int32).t()  # (2, 3), strided
    kept, ratio = sink_gate(q, k, means, slots, backend=backend)
    assert kept.is_contiguous() and ratio.is_contiguous() and ratio.dtype == torch.float32
    want = sink_gate(q, k, means, slots.contiguous(), backend="naive")
    assert torch.equal(kept, want[0]) and torch.equal(ratio, want[1])
