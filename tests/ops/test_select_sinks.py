"""select_sinks: every backend against a brute-force Python loop, opcheck and
torch.compile per backend, empty problems, the bound on k and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from dysink_kernels import _registry, select_sinks
from dysink_kernels.ops.select_sinks import select_sinks_op

from conftest import op_backends

BACKENDS = op_backends("select_sinks")


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


def run(query_feat, slot_feat, owner, frame, k, lo, hi, sink_frames=0, backend="auto"):
    lo_t = torch.tensor(lo, dtype=torch.int32)
    hi_t = torch.tensor(hi, dtype=torch.int32)
    owner_t = torch.as_tensor(owner, dtype=torch.int32)
    frame_t = torch.as_tensor(frame, dtype=torch.int32)
    got = select_sinks(
        query_feat, slot_feat, owner_t, frame_t, k=k, exclude_lo=lo_t, exclude_hi=hi_t,
        sink_frames=sink_frames, backend=backend,
    )  # fmt: skip
    want = brute_force(query_feat, slot_feat, owner_t, frame_t, k, lo, hi, sink_frames)
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.float32
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    torch.testing.assert_close(got[1], want[1].float(), atol=1e-5, rtol=0)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(8))
def test_random_against_brute_force(seed, backend):
    g = torch.Generator().manual_seed(seed)
    B, M, F, P = 3, 3, 16, 23
    qf = torch.randn(B, M, F, generator=g)
    qf[0, 2] = 0  # padding row
    sf = torch.nn.functional.normalize(torch.randn(P, F, generator=g), dim=-1)
    owner = torch.randint(-1, B, (P,), generator=g)
    frame = torch.randint(0, 40, (P,), generator=g) * 3
    k = int(torch.randint(0, 6, (1,), generator=g))
    run(qf, sf, owner, frame, k, [6, 0, 30], [15, 0, 45], sink_frames=3 * (seed % 2),
        backend=backend)  # fmt: skip


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_bank_and_k_zero(backend):
    f = torch.randn(2, 1, 8)
    with pytest.raises(ValueError, match="k=2 is more than the 0 slots"):
        run(f, torch.zeros(0, 8), [], [], 2, [0, 0], [0, 0], backend=backend)
    lo = hi = torch.zeros(2, dtype=torch.int32)
    none = torch.zeros(0, dtype=torch.int32)
    slots, scores = select_sinks_op(f, torch.zeros(0, 8), none, none, 2, lo, hi, backend=backend)
    assert slots.shape == (2, 2) and (slots == -1).all() and torch.isneginf(scores).all()
    slots, _ = run(f, torch.randn(3, 8), [0, 1, 0], [0, 3, 6], 0, [0, 0], [0, 0], backend=backend)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["batch", "query rows", "features"])
def test_empty_problem(what, backend):
    """Zero samples, query rows or feature dims: all padding, (B, k), on every backend."""
    B, M, F = {"batch": (0, 2, 8), "query rows": (2, 0, 8), "features": (2, 2, 0)}[what]
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    owner = i32([0, 1, 0] if B else [-1, -1, -1])
    slots, scores = select_sinks(
        torch.randn(B, M, F), torch.randn(3, F), owner, i32([0, 3, 6]), k=2,
        exclude_lo=torch.zeros(B, dtype=torch.int32), exclude_hi=torch.zeros(B, dtype=torch.int32),
        backend=backend,
    )  # fmt: skip
    assert slots.shape == scores.shape == (B, 2)
    assert (slots == -1).all() and torch.isneginf(scores).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_above_slot_count_is_bounded_and_padded(backend, monkeypatch):
    """The public function refuses k > P before allocating anything; the op (trusted
    callers) asks its backend for at most P slots and pads to (B, k)."""
    seen = []
    entry = _registry._REGISTRY["select_sinks"][backend]
    fn = entry.load()

    def spy(*args):
        seen.append(args[4])
        return fn(*args)

    spy.__signature__ = __import__("inspect").signature(fn)
    monkeypatch.setattr(entry, "_fn", spy)
    f = torch.randn(1, 2, 8)
    sf = torch.randn(3, 8)
    with pytest.raises(ValueError, match="k=100000000 is more than the 3 slots"):
        run(f, sf, [0, 0, 0], [0, 3, 6], 10**8, [100], [100], backend=backend)
    assert seen == []
    owner = torch.zeros(3, dtype=torch.int32)
    frame = torch.tensor([0, 3, 6], dtype=torch.int32)
    lo = hi = torch.tensor([100], dtype=torch.int32)
    slots, scores = select_sinks_op(f, sf, owner, frame, 10**5, lo, hi, backend=backend)
    assert seen == [3]
    assert slots.shape == (1, 10**5) and sorted(slots[0, :3].tolist()) == [0, 1, 2]
    assert (slots[0, 3:] == -1).all() and torch.isneginf(scores[0, 3:]).all()


def select_args(k=2):
    g = torch.Generator().manual_seed(3)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    return (torch.randn(2, 2, 8, generator=g), torch.randn(4, 8, generator=g),
            i32([0, 1, 0, -1]), i32([0, 3, 6, 9]), k, i32([0, 0]), i32([3, 3]), 0)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    op = torch.ops.dysink.select_sinks.default
    torch.library.opcheck(op, (*select_args(), None, 0.0, backend))
    torch.library.opcheck(op, (*select_args(k=6), None, 0.0, backend))  # k above P: padded


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    qf, sf, owner, frame, k, lo, hi, s = select_args()

    def call(qf, sf):
        return select_sinks(qf, sf, owner, frame, k=k, exclude_lo=lo, exclude_hi=hi,
                            sink_frames=s, backend=backend)  # fmt: skip

    eager = call(qf, sf)
    compiled = torch.compile(call, fullgraph=True)(qf, sf)
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_slot_prior_blends_into_the_score(backend):
    """score = (1 - mix) * cosine + mix * prior: a strong prior on one slot picks it."""
    qf, sf, owner, frame, _, lo, hi, s = select_args()
    prior = torch.zeros(2, 4)
    prior[0, 2] = 1.0
    kw = dict(k=1, exclude_lo=lo, exclude_hi=hi, sink_frames=s, backend=backend)
    try:
        slots, scores = select_sinks(qf, sf, owner, frame, slot_prior=prior, prior_mix=0.9, **kw)
    except NotImplementedError:
        pytest.skip(f"the {backend} backend does not take slot_prior yet")
    cos = torch.nn.functional.cosine_similarity(qf[0][:, None], sf[None], dim=-1).mean(0)
    assert slots[0].tolist() == [2]
    torch.testing.assert_close(scores[0, 0], 0.1 * cos[2] + 0.9, atol=1e-5, rtol=0)
    plain, _ = select_sinks(qf, sf, owner, frame, slot_prior=prior, prior_mix=0.0, **kw)
    assert torch.equal(plain, select_sinks(qf, sf, owner, frame, **kw)[0])


# ----------------------------------------------------------------- bad input
def sel_args():
    return dict(
        query_feat=torch.randn(2, 3, 8),
        slot_feat=torch.randn(5, 8),
        slot_owner=torch.zeros(5, dtype=torch.int32),
        slot_frame=torch.zeros(5, dtype=torch.int32),
        k=2,
        exclude_lo=torch.zeros(2, dtype=torch.int32),
        exclude_hi=torch.zeros(2, dtype=torch.int32),
    )


@pytest.mark.parametrize(
    "key,val,exc,needle",
    [
        ("k", -1, ValueError, "k must be an int >= 0"),
        ("k", 1.5, ValueError, "k must be an int"),
        ("query_feat", torch.randn(2, 8), ValueError, "query_feat must have 3"),
        ("slot_feat", torch.randn(5, 7), ValueError, "slot_feat.shape[1]"),
        ("slot_owner", torch.zeros(4, dtype=torch.int32), ValueError, "slot_owner.shape[0]"),
        ("slot_frame", torch.zeros(5), TypeError, "slot_frame must have dtype"),
        ("exclude_lo", torch.zeros(3, dtype=torch.int32), ValueError, "exclude_lo.shape[0]"),
        ("backend", "nope", ValueError, "unknown backend"),
        ("sink_frames", -3, ValueError, "sink_frames"),
        ("slot_owner", torch.tensor([0, 0, 2, 0, 0], dtype=torch.int32), IndexError, "slot_owner"),
        ("slot_owner", torch.tensor([0, -2, 0, 0, 0], dtype=torch.int32), IndexError, "slot_owner"),
        ("exclude_lo", torch.tensor([0, 4], dtype=torch.int32), ValueError, "exclude_lo"),
        ("slot_prior", torch.zeros(2, 4), ValueError, "slot_prior.shape[1]"),
        ("prior_mix", 1.5, ValueError, "prior_mix"),
    ],
)
def test_select_sinks_bad_input(key, val, exc, needle):
    a = sel_args()
    a[key] = val
    with pytest.raises(exc) as info:
        select_sinks(
            a.pop("query_feat"), a.pop("slot_feat"), a.pop("slot_owner"), a.pop("slot_frame"), **a
        )
    assert needle in str(info.value), str(info.value)
