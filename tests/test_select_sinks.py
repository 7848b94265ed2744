"""select_sinks against a brute-force Python loop."""

from __future__ import annotations

import math

import pytest
import torch

from dysink_kernels import select_sinks


def brute_force(query_feat, slot_feat, owner, frame, k, lo, hi, sink_frames):
    B, M, _ = query_feat.shape
    P = slot_feat.shape[0]
    slots_out, scores_out = [], []
    for b in range(B):
        queries = [query_feat[b, m].double() for m in range(M) if query_feat[b, m].abs().sum() > 0]
        cands = []
        for p in range(P):
            f = int(frame[p])
            if int(owner[p]) != b or lo[b] <= f < hi[b] or f < sink_frames or not queries:
                continue
            e = slot_feat[p].double()
            cos = [float(qq @ e / (qq.norm() * e.norm())) for qq in queries]
            cands.append((sum(cos) / len(cos), f, p))
        cands.sort(key=lambda t: (-t[0], t[1], t[2]))
        chosen = sorted(cands[:k], key=lambda t: (t[1], t[2]))
        slots_out.append([p for _, _, p in chosen] + [-1] * (k - len(chosen)))
        scores_out.append([s for s, _, _ in chosen] + [-math.inf] * (k - len(chosen)))
    return torch.tensor(slots_out, dtype=torch.int32).view(B, k), torch.tensor(scores_out).view(
        B, k
    )


def run(query_feat, slot_feat, owner, frame, k, lo, hi, sink_frames=0):
    lo_t = torch.tensor(lo, dtype=torch.int32)
    hi_t = torch.tensor(hi, dtype=torch.int32)
    owner_t = torch.as_tensor(owner, dtype=torch.int32)
    frame_t = torch.as_tensor(frame, dtype=torch.int32)
    got = select_sinks(
        query_feat, slot_feat, owner_t, frame_t, k=k, exclude_lo=lo_t, exclude_hi=hi_t,
        sink_frames=sink_frames,
    )  # fmt: skip
    want = brute_force(query_feat, slot_feat, owner_t, frame_t, k, lo, hi, sink_frames)
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.float32
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    torch.testing.assert_close(got[1], want[1].float(), atol=1e-5, rtol=0)
    return got


@pytest.mark.parametrize("seed", range(8))
def test_random_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    B, M, F, P = 3, 3, 16, 23
    qf = torch.randn(B, M, F, generator=g)
    qf[0, 2] = 0  # padding row
    sf = torch.nn.functional.normalize(torch.randn(P, F, generator=g), dim=-1)
    owner = torch.randint(-1, B, (P,), generator=g)
    frame = torch.randint(0, 40, (P,), generator=g) * 3
    k = int(torch.randint(0, 6, (1,), generator=g))
    run(qf, sf, owner, frame, k, [6, 0, 30], [15, 0, 45], sink_frames=3 * (seed % 2))


def test_ties_go_to_lower_frame():
    f = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)
    sf = f.repeat(5, 1)  # all slots equally relevant
    got = run(f[None], sf, [0] * 5, [12, 3, 9, 6, 0], 3, [100], [100])
    assert got[0].tolist() == [[4, 1, 3]]  # frames 0, 3, 6


def test_exclusion_edges_and_sinks():
    f = torch.randn(1, 1, 8)
    sf = torch.randn(6, 8)
    frames = [0, 3, 6, 9, 12, 15]
    # lo is excluded (inclusive), hi is allowed (exclusive); sinks [0, 3) excluded
    slots, _ = run(f, sf, [0] * 6, frames, 6, [6], [12], sink_frames=3)
    chosen = {frames[s] for s in slots[0].tolist() if s >= 0}
    assert chosen == {3, 12, 15}


def test_fewer_candidates_pad_and_foreign_owners():
    f = torch.randn(2, 2, 8)
    sf = torch.randn(4, 8)
    slots, scores = run(f, sf, [0, 1, 1, -1], [0, 3, 6, 9], 3, [50, 50], [60, 60])
    assert slots[0].tolist() == [0, -1, -1]
    assert set(slots[1].tolist()[:2]) == {1, 2} and slots[1, 2] == -1
    assert torch.isneginf(scores[0, 1:]).all()


def test_empty_bank_and_k_zero():
    f = torch.randn(2, 1, 8)
    slots, scores = run(f, torch.zeros(0, 8), [], [], 2, [0, 0], [0, 0])
    assert (slots == -1).all() and torch.isneginf(scores).all()
    slots, _ = run(f, torch.randn(3, 8), [0, 1, 0], [0, 3, 6], 0, [0, 0], [0, 0])
    assert slots.shape == (2, 0)


def test_no_valid_query_retrieves_nothing():
    slots, _ = run(torch.zeros(1, 2, 8), torch.randn(3, 8), [0, 0, 0], [0, 3, 6], 2, [0], [0])
    assert (slots == -1).all()


def test_ordering_by_frame():
    f = torch.randn(1, 1, 8)
    sf = torch.randn(10, 8)
    slots, _ = run(f, sf, [0] * 10, list(range(27, -3, -3)), 4, [0], [0])
    frames = [list(range(27, -3, -3))[s] for s in slots[0].tolist()]
    assert frames == sorted(frames)
