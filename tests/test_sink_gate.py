"""sink_gate against explicit loops, both scopes, strictness at equality."""

from __future__ import annotations

import pytest
import torch

from dysink_kernels import sink_gate


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


@pytest.mark.parametrize("scope", ["batch", "sample"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tau", [0.0, 0.5, 0.8, 1.0])
def test_against_loops(scope, seed, tau):
    q, k, means, slots, k_len = inputs(3, 7, 11, 5, 8, 6, 3, seed)
    kept, ratio = sink_gate(q, k, means, slots, k_len=k_len, tau=tau, scope=scope)
    want_kept, want_ratio = explicit(q, k, means, slots, k_len, tau, scope)
    torch.testing.assert_close(ratio.double(), want_ratio, atol=1e-6, rtol=0)
    assert torch.equal(kept, want_kept)


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_uniform_counts_judged_together(scope):
    slots = torch.tensor([[0, 3, -1], [-1, 2, 4]], dtype=torch.int32)  # 2 valid each
    q, k, means, _, k_len = inputs(2, 5, 6, 4, 8, 5, 3, 11, slots=slots)
    kept, ratio = sink_gate(q, k, means, slots, k_len=k_len, scope=scope)
    want_kept, want_ratio = explicit(q, k, means, slots, k_len, 0.8, scope)
    torch.testing.assert_close(ratio.double(), want_ratio, atol=1e-6, rtol=0)
    assert torch.equal(kept, want_kept)
    if scope == "batch":  # rank-0 slots of both samples share one ratio
        assert ratio[0, 0] == ratio[1, 1] and ratio[0, 1] == ratio[1, 2]


def test_strict_at_equality():
    # One head; entry mean == local mean: score equal -> no vote; ratio 0.
    q = torch.ones(1, 2, 1, 4)
    k = torch.ones(1, 3, 1, 4)
    means = torch.ones(2, 1, 4)
    means[1] *= 2  # strictly larger score: votes against
    slots = torch.tensor([[0, 1]], dtype=torch.int32)
    kept, ratio = sink_gate(q, k, means, slots, tau=0.8)
    assert ratio.tolist() == [[0.0, 1.0]] and kept.tolist() == [[0, -1]]
    # tau = 1.0 keeps even a unanimous vote (drop needs ratio > tau)
    kept, _ = sink_gate(q, k, means, slots, tau=1.0)
    assert kept.tolist() == [[0, 1]]
    # Exactly at tau: 2 of 4 heads vote, ratio 0.5, tau 0.5 -> kept
    q4 = torch.ones(1, 1, 4, 2)
    k4 = torch.zeros(1, 1, 4, 2)
    m4 = torch.tensor([[[1.0, 0], [1, 0], [-1, 0], [-1, 0]]])
    kept, ratio = sink_gate(q4, k4, m4, torch.tensor([[0]], dtype=torch.int32), tau=0.5)
    assert ratio.item() == 0.5 and kept.tolist() == [[0]]


def test_minus_one_ratio_zero_and_dtype_kept():
    q, k, means, _, k_len = inputs(1, 4, 5, 3, 8, 4, 3, 3)
    slots = torch.tensor([[-1, 2, -1]], dtype=torch.int64)
    kept, ratio = sink_gate(q, k, means, slots, k_len=k_len)
    assert kept.dtype == torch.int64
    assert ratio[0, 0] == 0 and ratio[0, 2] == 0 and kept[0, 0] == -1
