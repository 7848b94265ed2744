"""The compiled extension (csrc/).

* C++ CPU ops against the naive oracles, on odd sizes and edge cases;
* every csrc/*.cu compiled by nvcc for sm_80 and sm_90a, with no local memory;
* the CUDA ops against the oracles on a GPU (marked ``gpu``).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from dysink_kernels import _cuda
from dysink_kernels.ops.bank_insert.csrc import bank_insert_csrc
from dysink_kernels.ops.bank_insert.naive import bank_insert_naive
from dysink_kernels.ops.select_sinks.csrc import select_sinks_csrc
from dysink_kernels.ops.select_sinks.naive import select_sinks_naive
from dysink_kernels.ops.sink_gate.csrc import gate_from_means_csrc, gate_votes_csrc, sink_gate_csrc
from dysink_kernels.ops.sink_gate.naive import gate_from_means, gate_votes, sink_gate_naive

INFO = _cuda.build_info()
needs_ext = pytest.mark.skipif(
    not INFO["built"],
    reason=f"dysink_kernels._C is not built ({INFO['error']}); "
    "pip install --no-build-isolation -e . with a C++ compiler builds it",
)
needs_cuda_ext = pytest.mark.skipif(
    not (INFO["with_cuda"] and torch.cuda.is_available()),
    reason="needs a GPU and dysink_kernels._C built with CUDA",
)

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
INDEX = [torch.int32, torch.int64]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda_ext]),
]


# ---- select_sinks -------------------------------------------------------------


def select_both(device, qf, sf, owner, frame, k, lo, hi, sink_frames=0, index=torch.int32,
                prior=None, mix=0.0):  # fmt: skip
    def idx(x):
        return torch.as_tensor(x).to(device=device, dtype=index)

    args = (qf.to(device), sf.to(device), idx(owner), idx(frame), k, idx(lo), idx(hi), sink_frames)
    prior = None if prior is None else prior.to(device)
    got = select_sinks_csrc(*args, prior, mix)
    want = select_sinks_naive(*args, slot_prior=prior, prior_mix=mix)
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.float32
    assert got[0].shape == got[1].shape == (qf.shape[0], k)
    assert torch.equal(got[0].cpu(), want[0].cpu()), (got[0], want[0])
    torch.testing.assert_close(got[1].cpu(), want[1].cpu(), atol=2e-6, rtol=2e-6)
    return got[0].cpu(), got[1].cpu()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("qdtype", FLOATS)
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", INDEX)
def test_select_random(device, seed, qdtype, sdtype, index):
    g = torch.Generator().manual_seed(seed)
    B, M, F, P = 3, 5, 37, 29
    qf = torch.randn(B, M, F, generator=g).to(qdtype)
    qf[0, 1] = 0  # padding row
    sf = torch.randn(P, F, generator=g).to(sdtype)
    owner = torch.randint(-1, B, (P,), generator=g)
    frame = torch.randint(0, 12, (P,), generator=g) * 3  # repeated frames
    lo = torch.randint(0, 20, (B,), generator=g)
    hi = lo + torch.randint(0, 12, (B,), generator=g)
    for k in (1, 3, 7, 40):
        select_both(device, qf, sf, owner, frame, k, lo, hi, 3 * (seed % 2), index)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_select_ties(device):
    f = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)
    sf = f.repeat(7, 1)  # every slot equally relevant
    slots, _ = select_both(device, f[None], sf, [0] * 7, [12, 3, 9, 6, 3, 0, 3], 4, [100], [100])
    # frames 0, 3, 3, 3 win; among frame 3 the lower slots 1 and 4 first
    assert slots.tolist() == [[5, 1, 4, 6]]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_select_exclusion_edges_and_sinks(device):
    qf, sf = torch.randn(1, 2, 8), torch.randn(6, 8)
    frames = [0, 3, 6, 9, 12, 15]
    slots, _ = select_both(device, qf, sf, [0] * 6, frames, 6, [6], [12], sink_frames=3)
    assert {frames[s] for s in slots[0].tolist() if s >= 0} == {3, 12, 15}


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_select_empty_bank_foreign_slots_and_k(device):
    qf = torch.randn(2, 3, 8)
    select_both(device, qf, torch.randn(0, 8), [], [], 3, [0, 0], [0, 0])  # empty bank
    slots, score = select_both(device, qf, torch.randn(5, 8), [1, -1, 1, 1, -1], [0, 3, 6, 9, 12],
                               4, [0, 0], [0, 0])  # fmt: skip
    assert (slots[0] == -1).all() and torch.isinf(score[0]).all()  # all slots foreign
    assert slots[1].tolist() == [0, 2, 3, -1]  # k > candidates
    slots, score = select_both(device, qf, torch.randn(5, 8), [0] * 5, [0] * 5, 0, [0, 0], [0, 0])
    assert slots.shape == score.shape == (2, 0)  # k = 0


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_select_no_query_and_nan(device):
    qf = torch.randn(3, 2, 8)
    qf[0] = 0  # no valid query row: retrieves nothing
    qf[1, 0, 3] = float("nan")  # a NaN row makes every score NaN
    sf = torch.randn(6, 8)
    sf[4, 0] = float("nan")  # a NaN slot is never a candidate
    owner = [0, 1, 2, 2, 2, 0]
    slots, _ = select_both(device, qf, sf, owner, list(range(6)), 3, [0] * 3, [0] * 3)
    assert (slots[:2] == -1).all()
    assert slots[2].tolist() == [2, 3, -1]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.float16])
def test_select_usage_prior(device, mix, pdtype):
    """score = (1 - mix) * mean cosine + mix * prior, as the oracle; NaN priors drop the
    slot (unless mix is 0, where the prior is not read); large k included."""
    g = torch.Generator().manual_seed(7)
    B, M, F, P = 3, 4, 13, 31
    qf = torch.randn(B, M, F, generator=g)
    qf[2] = 0  # no query: nothing, whatever the prior says
    sf = torch.randn(P, F, generator=g)
    owner = torch.randint(-1, B, (P,), generator=g)
    frame = torch.randint(0, 10, (P,), generator=g) * 3
    prior = torch.rand(B, P, generator=g).to(pdtype)
    prior[0, ::4] = float("nan")
    for k in (1, 4, 40):
        slots, _ = select_both(device, qf, sf, owner, frame, k, [3, 0, 0], [9, 0, 0],
                               sink_frames=3, prior=prior, mix=mix)  # fmt: skip
        assert (slots[2] == -1).all()
        if mix > 0:
            assert not set(slots[0].tolist()) & set(range(0, P, 4))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_select_prior_decides_at_full_mix(device):
    """With prior_mix = 1 the prior alone ranks the candidates."""
    qf, sf = torch.randn(1, 2, 6), torch.randn(6, 6)
    prior = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2, 0.8]])
    slots, score = select_both(device, qf, sf, [0] * 6, list(range(6)), 3, [0], [0],
                               prior=prior, mix=1.0)  # fmt: skip
    assert slots[0].tolist() == [1, 3, 5]
    assert score[0].tolist() == pytest.approx([0.9, 0.7, 0.8])


@needs_ext
def test_select_prior_checks():
    i32 = torch.zeros(3, dtype=torch.int32)
    qf, sf = torch.randn(1, 2, 8), torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=r"slot_prior.shape\[1\] \(slots\)"):
        select_sinks_csrc(qf, sf, i32, i32, 1, i32[:1], i32[:1], 0, torch.rand(1, 4), 0.5)
    with pytest.raises(RuntimeError, match="prior_mix must be in"):
        select_sinks_csrc(qf, sf, i32, i32, 1, i32[:1], i32[:1], 0, torch.rand(1, 3), 1.5)


# ---- sink_gate / gate_from_means ----------------------------------------------


def gate_inputs(B, Sq, Sk, H, D, P, n, seed, dtype=torch.float32, index=torch.int32, slots=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    k = torch.randn(B, Sk, H, D, generator=g).to(dtype)
    means = torch.randn(P, H, D, generator=g)
    if slots is None:
        slots = torch.randint(-1, P, (B, n), generator=g)
    k_len = torch.randint(0, Sk + 1, (B,), generator=g)
    return q, k, means, torch.as_tensor(slots).to(index), k_len.to(index)


def gate_both(fn_csrc, fn_naive, device, *tensors, tau, scope):
    args = [t.to(device) for t in tensors]
    kept, ratio = fn_csrc(*args, tau, scope)
    want_kept, want_ratio = fn_naive(*args, tau, scope)
    assert kept.dtype == tensors[3].dtype and ratio.dtype == torch.float32
    assert torch.equal(kept.cpu(), want_kept.cpu()), (kept, want_kept)
    torch.testing.assert_close(ratio.cpu(), want_ratio.cpu(), atol=0, rtol=0)
    return kept.cpu(), ratio.cpu()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["batch", "sample"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("index", INDEX)
def test_sink_gate_random(device, scope, seed, dtype, index):
    q, k, means, slots, k_len = gate_inputs(3, 7, 11, 5, 9, 6, 4, seed, dtype, index)
    for tau in (0.0, 0.4, 0.8, 1.0):
        gate_both(sink_gate_csrc, sink_gate_naive, device, q, k, means, slots, k_len,
                  tau=tau, scope=scope)  # fmt: skip
    gate_both(sink_gate_csrc, sink_gate_naive, device, q, k, means.to(dtype), slots, k_len,
              tau=0.5, scope=scope)  # fmt: skip


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_sink_gate_uniform_and_ragged_counts(device, scope):
    uniform = torch.tensor([[0, 3, -1], [-1, 2, 4], [5, -1, 1]])  # 2 valid slots each
    ragged = torch.tensor([[0, 3, -1], [-1, -1, 4], [5, 2, 1]])
    for slots in (uniform, ragged):
        q, k, means, slots, k_len = gate_inputs(3, 5, 6, 4, 8, 6, 3, 11, slots=slots)
        _, ratio = gate_both(sink_gate_csrc, sink_gate_naive, device, q, k, means, slots,
                             k_len, tau=0.5, scope=scope)  # fmt: skip
        assert (ratio[slots < 0] == 0).all()
    q, k, means, slots, k_len = gate_inputs(3, 5, 6, 4, 8, 6, 3, 11, slots=uniform)
    _, ratio = sink_gate_csrc(q.to(device), k.to(device), means.to(device), slots.to(device),
                              k_len.to(device), 0.5, scope)  # fmt: skip
    if scope == "batch":  # the r-th valid slots of all samples share one ratio
        r = ratio.cpu()
        assert r[0, 0] == r[1, 1] == r[2, 0] and r[0, 1] == r[1, 2] == r[2, 2]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_sink_gate_empty_chunk_slots_and_pool(device):
    q, k, means, slots, k_len = gate_inputs(2, 0, 5, 3, 4, 4, 2, 0)  # Sq = 0: NaN means
    gate_both(sink_gate_csrc, sink_gate_naive, device, q, k, means, slots, k_len,
              tau=0.5, scope="batch")  # fmt: skip
    q, k, means, slots, k_len = gate_inputs(2, 3, 5, 3, 4, 4, 0, 0)  # n = 0
    gate_both(sink_gate_csrc, sink_gate_naive, device, q, k, means, slots, k_len,
              tau=0.5, scope="batch")  # fmt: skip
    qbar, kbar = torch.randn(2, 3, 4), torch.randn(2, 3, 4)  # empty pool: zero mean keys
    gate_both(gate_from_means_csrc, gate_from_means, device, qbar, kbar, torch.zeros(0, 3, 4),
              torch.tensor([[0, -1], [1, 0]]), tau=0.3, scope="sample")  # fmt: skip


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_gate_strict_at_equality(device, scope):
    """An entry whose mean key equals the local one gets no vote; ratio == tau keeps."""
    H, D = 5, 6
    for B in (1, 2):
        for votes in range(H + 1):
            qbar = torch.zeros(B, H, D)
            qbar[..., 0] = 1.0
            kbar = torch.randn(B, H, D)
            kbar[..., 0] = 0.0
            means = kbar[0:1].clone()  # slot 0: equal to sample 0's local mean key
            means = torch.cat([means, torch.zeros(1, H, D)])
            means[1, :votes, 0] = 1.0  # slot 1: `votes` heads score above the local
            means[1, votes:, 0] = -1.0
            slots = torch.tensor([[0, 1]] * B)
            for tau in (votes / H, votes / H - 1e-3, votes / H + 1e-3):
                _, ratio = gate_both(gate_from_means_csrc, gate_from_means, device, qbar, kbar,
                                     means, slots, tau=tau, scope=scope)  # fmt: skip
                if B == 1 or scope == "sample":
                    assert ratio[0, 0] == 0
                    assert ratio[0, 1] == torch.tensor(votes / H, dtype=torch.float32)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mdtype", FLOATS)
@pytest.mark.parametrize("index", INDEX)
def test_gate_votes(device, mdtype, index):
    """Per-slot vote counts (head parallelism's half of the gate) against the oracle,
    including -1 entries, an empty pool and ties at equality (no vote)."""
    g = torch.Generator().manual_seed(3)
    for B, n, H, D, P in ((3, 5, 4, 7, 9), (1, 1, 1, 1, 1), (2, 3, 5, 3, 0), (2, 0, 3, 4, 5),
                          (0, 2, 2, 2, 2)):  # fmt: skip
        qbar, kbar = torch.randn(B, H, D, generator=g), torch.randn(B, H, D, generator=g)
        means = torch.randn(P, H, D, generator=g).to(mdtype)
        slots = torch.randint(-1, max(P, 1), (B, n), generator=g).to(index)
        if P == 0:
            slots = slots.clamp(max=0)
        if P > 1 and B > 0 and n > 1:
            # Small integers: every dot is exact, so equal mean keys tie in any order.
            qbar[0] = torch.randint(-3, 4, (H, D), generator=g).float()
            kbar[0] = torch.randint(-3, 4, (H, D), generator=g).float()
            means[1] = kbar[0].to(mdtype)  # the local mean key itself: never a vote...
            slots[0, :2] = torch.tensor([1, -1])
        args = [t.to(device) for t in (qbar, kbar, means, slots)]
        got = gate_votes_csrc(*args)
        want = gate_votes(qbar, kbar, means, slots)
        assert got.dtype == torch.float32 and got.shape == (B, n)
        assert torch.equal(got.cpu(), want), (got, want)
        if P > 1 and B > 0 and n > 1:
            assert got[0, 0] == 0 and got[0, 1] == 0  # ...and -1 gets none


# ---- bank_insert --------------------------------------------------------------


def empty_bank(L, B, C, S_e, H, D, F, dtype, index=torch.int32):
    P = B * C
    return {
        "pool_k": torch.zeros(L, P, S_e, H, D, dtype=dtype),
        "pool_v": torch.zeros(L, P, S_e, H, D, dtype=dtype),
        "mean_k": torch.zeros(L, P, H, D),
        "feature": torch.zeros(P, F),
        "owner": torch.full((P,), -1, dtype=index),
        "frame": torch.full((P,), -1, dtype=index),
        "stamp": torch.zeros(P, dtype=torch.int64),
        "clock": torch.zeros((), dtype=torch.int64),
    }


def insert_both(banks, device, src_k, src_v, src_pos, feature, frame, C, limit, dedup):
    """Insert into (csrc bank, naive bank); the returned (stored, slot) must agree."""
    args = [t.to(device) for t in (src_k, src_v, src_pos, feature, torch.tensor(frame))]
    got = bank_insert_csrc(*banks[0].values(), *args, C, limit, dedup)
    want = bank_insert_naive(*banks[1].values(), *args, C, limit, dedup)
    assert got[0].dtype == torch.bool and got[1].dtype == torch.int64
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (got, want)
    return got


def assert_banks_equal(got, want):
    for name in got:
        if name in ("mean_k", "feature"):
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5,
                                       equal_nan=True, msg=name)  # fmt: skip
        else:
            assert torch.equal(got[name], want[name]), name


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("dedup", [0.95, None])
@pytest.mark.parametrize("index", INDEX)
def test_insert_sequence(device, dtype, dedup, index):
    """Batch 3, 8 blocks: first fill, dedup rejects, a NaN feature, FIFO eviction."""
    L, B, C, limit, S_e, N, H, D, F = 2, 3, 4, 3, 5, 21, 3, 6, 10
    g = torch.Generator().manual_seed(1)
    bank = {n: t.to(device) for n, t in empty_bank(L, B, C, S_e, H, D, F, dtype, index).items()}
    banks = (bank, copy.deepcopy(bank))
    # non-contiguous source layouts: strided positions, layers and batch swapped
    src_pos = torch.arange(4 * S_e).view(S_e, 4)[:, 1]
    assert not src_pos.is_contiguous()
    prev = None
    for step in range(8):
        src_k = torch.randn(B, L, N, H, D, generator=g).to(dtype).transpose(0, 1)
        src_v = torch.randn(L, B, N, H, D, generator=g).to(dtype)
        feature = torch.randn(B, F, generator=g)
        if step == 2:
            feature[1] = prev[1] * 3.0  # same direction: a dedup reject
        if step == 3:
            feature[2, 4] = float("nan")  # never stored
        stored, _ = insert_both(banks, device, src_k, src_v, src_pos, feature, 3 * step, C,
                                limit, dedup)  # fmt: skip
        assert_banks_equal(*banks)
        if step == 2:
            assert bool(stored[1]) == (dedup is None)
        if step == 3:
            assert not bool(stored[2])
        prev = feature
    owner = banks[0]["owner"].view(B, C).cpu()
    assert ((owner >= 0).sum(1) == limit).all()  # FIFO kept each sample at the limit
    assert (owner[:, limit:] == -1).all()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_insert_rejected_changes_nothing(device, dtype):
    L, B, C, S_e, N, H, D, F = 2, 3, 3, 4, 9, 2, 8, 16
    bank = {n: t.to(device) for n, t in empty_bank(L, B, C, S_e, H, D, F, dtype).items()}
    banks = (bank, copy.deepcopy(bank))
    src_k, src_v = torch.randn(L, B, N, H, D).to(dtype), torch.randn(L, B, N, H, D).to(dtype)
    feature, pos = torch.randn(B, F), torch.arange(S_e) + 2
    stored, _ = insert_both(banks, device, src_k, src_v, pos, feature, 0, C, C, 0.95)
    assert stored.all()
    before = {n: t.clone() for n, t in banks[0].items()}
    stored, _ = insert_both(banks, device, src_k * 2, src_v, pos, feature * 0.5, 3, C, C, 0.95)
    assert not stored.any()
    for name, t in banks[0].items():
        if name == "clock":  # the oracle advances the clock on every insert
            assert int(t) == int(before[name]) + B
        else:
            assert torch.equal(t, before[name]), name
    assert_banks_equal(*banks)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_insert_fifo_evicts_oldest(device):
    L, B, C, S_e, N, H, D, F = 1, 1, 3, 2, 4, 1, 4, 6
    bank = {n: t.to(device) for n, t in empty_bank(L, B, C, S_e, H, D, F, torch.float32).items()}
    banks = (bank, copy.deepcopy(bank))
    slots = []
    for step in range(6):
        feature = torch.eye(F)[step : step + 1]  # orthogonal: never a duplicate
        src = torch.randn(L, B, N, H, D)
        _, slot = insert_both(banks, device, src, src, torch.arange(S_e), feature, step, C, C, 0.9)
        slots.append(int(slot[0]))
    assert slots == [0, 1, 2, 0, 1, 2]
    assert banks[0]["frame"].tolist() == [3, 4, 5]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_insert_fp8_bytes(device):
    """An fp8 bank inserts its bytes (uint8 views): copied exactly, as the oracle."""
    L, B, C, S_e, N, H, D, F = 2, 2, 3, 4, 7, 2, 8, 6
    g = torch.Generator().manual_seed(4)
    bank = {n: t.to(device) for n, t in empty_bank(L, B, C, S_e, H, D, F, torch.uint8).items()}
    banks = (bank, copy.deepcopy(bank))
    for step in range(4):
        src = torch.randn(L, B, N, H, D, generator=g).to(torch.float8_e4m3fn).view(torch.uint8)
        feature = torch.randn(B, F, generator=g)
        stored, _ = insert_both(banks, device, src, src.flip(2), torch.arange(S_e) + 1, feature,
                                step, C, 2, 0.9)  # fmt: skip
        assert stored.all()
        for name in ("pool_k", "pool_v", "owner", "frame", "stamp", "clock"):
            assert torch.equal(banks[0][name], banks[1][name]), name


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_large_shapes(device):
    """Shapes past one CUDA block: select's scratch in global memory (P = 20000), the
    window means over several token chunks, the insert copy over several chunks."""
    g = torch.Generator().manual_seed(5)
    B, P = 2, 20000
    qf = torch.randn(B, 3, 64, generator=g)
    owner = torch.randint(-1, B, (P,), generator=g)
    frame = torch.randint(0, 3000, (P,), generator=g)
    select_both(device, qf, torch.randn(P, 64, generator=g), owner, frame, 9, [30, 0], [90, 0])
    q, k, means, slots, k_len = gate_inputs(2, 300, 1000, 4, 64, 8, 3, 2, dtype=torch.bfloat16)
    k_len = torch.tensor([1000, 517])
    for scope in ("batch", "sample"):
        gate_both(sink_gate_csrc, sink_gate_naive, device, q, k, means, slots, k_len,
                  tau=0.5, scope=scope)  # fmt: skip
    L, B, C, S_e, N, H, D, F = 2, 2, 2, 300, 700, 4, 64, 32
    for dtype in FLOATS:
        bank = {n: t.to(device) for n, t in empty_bank(L, B, C, S_e, H, D, F, dtype).items()}
        banks = (bank, copy.deepcopy(bank))
        src_k, src_v = torch.randn(L, B, N, H, D).to(dtype), torch.randn(L, B, N, H, D).to(dtype)
        pos = torch.randperm(N, generator=g)[:S_e]
        insert_both(banks, device, src_k, src_v, pos, torch.randn(B, F), 6, C, C, 0.95)
        assert_banks_equal(*banks)


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_graph_capture():
    """The CUDA ops record into a CUDA graph (no host sync, no data-dependent shapes)
    and its replay matches the oracles."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(7)
    qf = torch.randn(2, 3, 16, generator=g).to(dev)
    sf = torch.randn(12, 16, generator=g).to(dev)
    owner = torch.tensor([0, 1] * 6, dtype=torch.int32, device=dev)
    frame = torch.arange(12, dtype=torch.int32, device=dev) * 3
    lo = torch.tensor([9, 0], dtype=torch.int32, device=dev)
    q, k, means, slots, k_len = (t.to(dev) for t in gate_inputs(2, 5, 9, 3, 8, 12, 2, 3))
    L, B, C, S_e, N, H, D, F = 2, 2, 3, 4, 9, 3, 8, 16
    bank0 = {n: t.to(dev) for n, t in empty_bank(L, B, C, S_e, H, D, F, torch.bfloat16).items()}
    bank = copy.deepcopy(bank0)
    src = torch.randn(L, B, N, H, D, generator=g).to(device=dev, dtype=torch.bfloat16)
    pos, feat = torch.arange(S_e, device=dev) + 3, torch.randn(B, F, generator=g).to(dev)
    frame_t = torch.tensor(6, device=dev)

    def step():
        sel = select_sinks_csrc(qf, sf, owner, frame, 3, lo, lo + 6, 0)
        gate = sink_gate_csrc(q, k, means, slots, k_len, 0.5, "batch")
        ins = bank_insert_csrc(*bank.values(), src, src, pos, feat, frame_t, C, 2, 0.9)
        return sel, gate, ins

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sel, gate, ins = step()
    for name, t in bank.items():
        t.copy_(bank0[name])
    graph.replay()
    torch.cuda.synchronize()
    want_sel = select_sinks_naive(qf, sf, owner, frame, 3, lo, lo + 6, 0)
    want_gate = sink_gate_naive(q, k, means, slots, k_len, 0.5, "batch")
    want_bank = copy.deepcopy(bank0)
    want_ins = bank_insert_naive(*want_bank.values(), src, src, pos, feat, frame_t, C, 2, 0.9)
    assert torch.equal(sel[0], want_sel[0]) and torch.equal(gate[0], want_gate[0])
    assert torch.equal(ins[0], want_ins[0]) and torch.equal(ins[1], want_ins[1])
    assert_banks_equal(bank, want_bank)


@needs_ext
@pytest.mark.parametrize(
    ("name", "make_args"),
    [
        ("select_sinks", lambda: (torch.randn(2, 3, 8), torch.randn(7, 8),
                                  torch.tensor([0, 1, -1, 0, 1, 0, 0], dtype=torch.int32),
                                  torch.arange(7, dtype=torch.int32) * 3, 3,
                                  torch.zeros(2, dtype=torch.int32),
                                  torch.zeros(2, dtype=torch.int32), 0)),
        ("select_sinks", lambda: (torch.randn(2, 3, 8), torch.randn(7, 8),
                                  torch.tensor([0, 1, -1, 0, 1, 0, 0], dtype=torch.int32),
                                  torch.arange(7, dtype=torch.int32) * 3, 3,
                                  torch.zeros(2, dtype=torch.int32),
                                  torch.zeros(2, dtype=torch.int32), 0, torch.rand(2, 7), 0.5)),
        ("gate_votes", lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 4),
                                torch.randn(5, 3, 4), torch.tensor([[0, -1], [2, 4]]))),
        ("gate_from_means", lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 4),
                                     torch.randn(5, 3, 4), torch.tensor([[0, -1], [2, 4]]),
                                     0.5, "batch")),
        ("sink_gate", lambda: (torch.randn(2, 5, 3, 4), torch.randn(2, 6, 3, 4),
                               torch.randn(5, 3, 4), torch.tensor([[0, -1], [2, 4]]),
                               torch.tensor([3, 6]), 0.5, "sample")),
        ("bank_insert", lambda: (*empty_bank(2, 2, 3, 4, 3, 4, 8, torch.float32).values(),
                                 torch.randn(2, 2, 9, 3, 4), torch.randn(2, 2, 9, 3, 4),
                                 torch.arange(4), torch.randn(2, 8), torch.tensor(3), 3, 2,
                                 0.95)),
    ],
)  # fmt: skip
def test_opcheck(name, make_args):
    """Schema (mutation annotations), Meta kernels under fake tensors, AOT dispatch."""
    op = getattr(_cuda.ops(), name).default
    torch.library.opcheck(op, make_args())


@needs_ext
def test_checks_name_the_argument():
    i32 = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"slot_feat.shape\[1\] \(feature dim\)"):
        select_sinks_csrc(torch.randn(1, 2, 8), torch.randn(3, 5), i32, i32, 1, i32[:1], i32[:1], 0)
    with pytest.raises(RuntimeError, match="scope must be"):
        gate_from_means_csrc(torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.randn(3, 2, 4),
                             torch.zeros(1, 1, dtype=torch.int64), 0.5, "layer")  # fmt: skip


@needs_ext
def test_gathered_attention_checks():
    """The C++ attention reads indices itself: a slot outside [-1, P) is an IndexError,
    bad shapes and dtypes name the argument."""
    from dysink_kernels.ops.gathered_sink_attention.csrc import gathered_attention_csrc

    q, pool, loc = torch.randn(1, 4, 2, 16), torch.randn(3, 5, 2, 16), torch.randn(1, 6, 2, 16)
    ranges = torch.tensor([[[0, 6]]], dtype=torch.int32)
    slots = lambda *s: torch.tensor([s], dtype=torch.int32)

    def call(*args, **kw):
        a = dict(zip(("q", "pool_k", "pool_v", "slot_idx", "local_k", "local_v"),
                     (q, pool, pool, slots(0, -1), loc, loc)), **kw)  # fmt: skip
        return gathered_attention_csrc(*a.values(), ranges, None, None, 0.25, True, *args)

    for bad in (3, -2):
        with pytest.raises(IndexError, match=f"slot_idx holds {bad}"):
            call(slot_idx=slots(0, bad))
    with pytest.raises(RuntimeError, match=r"local_k.shape\[3\] \(head_dim\)"):
        call(local_k=loc[..., :8])
    with pytest.raises(RuntimeError, match="pool_k must be Float"):
        call(pool_k=pool.half(), pool_v=pool.half())
    fp8 = pool.to(torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="pool_k_scale and pool_v_scale"):
        call(pool_k=fp8, pool_v=fp8)
    scale = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="pool_k_scale and pool_v_scale"):
        call(None, 10000.0, scale, scale)  # scales with a float pool
    # An fp8 pool without scales is fine when no slot is listed (it is not read).
    out, _ = call(pool_k=fp8, pool_v=fp8, slot_idx=torch.zeros(1, 0, dtype=torch.int32))
    want, _ = call(slot_idx=torch.zeros(1, 0, dtype=torch.int32))
    assert torch.equal(out, want)
    out, stats = call()
    assert out.shape == q.shape and stats.slot_mass.shape == (1, 2, 2)


@needs_ext
@pytest.mark.parametrize("dtype", FLOATS)
def test_fold_max_abs(dtype):
    """acc = max(acc, largest |x| per row) over several tensors, as torch.maximum of
    abs().amax() (NaN kept, +-Inf as Inf), odd row lengths, a strided input."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 37, 5, generator=g).to(dtype), torch.randn(3, 1500, generator=g).to(dtype),
          torch.randn(3, 4, 9, generator=g).to(dtype).transpose(1, 2)]  # fmt: skip
    xs[0][1, 3, 2] = float("nan")
    xs[1][2, 1400] = -float("inf")
    acc = torch.tensor([0.5, 100.0, float("nan")])
    want = acc.clone()
    for x in xs:
        want = torch.maximum(want, x.float().abs().flatten(1).amax(1))
    _cuda.ops().fold_max_abs(acc, xs)
    torch.testing.assert_close(acc, want, atol=0, rtol=0, equal_nan=True)
    assert acc[0] > 0.5 and torch.isnan(acc[1:]).all()
    torch.library.opcheck(_cuda.ops().fold_max_abs.default, (torch.zeros(3), xs))
    with pytest.raises(RuntimeError, match="rows"):
        _cuda.ops().fold_max_abs(torch.zeros(2), xs)


@needs_ext
def test_health_check_through_the_extension_equals_torch():
    """CacheHealth.check_call on CPU (fold_max_abs) and its PyTorch path (used on GPUs)
    keep the same running maxima and return the same cleaned K/V."""
    from dysink_kernels.health import CacheHealth

    g = torch.Generator().manual_seed(1)
    fast, slow = CacheHealth(3, torch.device("cpu")), CacheHealth(3, torch.device("cpu"))
    assert fast._fold is not None
    slow._fold = None
    for step in range(4):
        q, k, v = (torch.randn(3, 6, 2, 8, generator=g) for _ in range(3))
        if step == 1:
            k[1, 2, 0, 3] = float("nan")
        if step == 2:
            q[2, 0, 1, 1] = float("inf")
        commit = step % 2 == 1
        got, want = fast.check_call(q, k, v, commit), slow.check_call(q, k, v, commit)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        torch.testing.assert_close(fast._largest, slow._largest, atol=0, rtol=0, equal_nan=True)
    assert torch.equal(fast.flags, slow.flags)
    assert fast.flags[0].tolist() == [False, True, True] and fast.flags[1].tolist()[1]


def test_build_info_and_availability():
    assert set(INFO) == {"built", "with_cuda", "cuda_archs", "cuda_runtime", "path", "error"}
    assert _cuda.available(torch.device("cpu")) == INFO["built"]
    assert (INFO["error"] is None) == INFO["built"]
    if not INFO["with_cuda"]:
        assert not _cuda.available(torch.device("cuda"))
    assert not _cuda.available(torch.device("meta"))


# ---- CUDA sources: nvcc compile and resource usage ------------------------------

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_SOURCES = sorted(CSRC.glob("*.cu"))
ARCHS = ("80", "90a")
# What torch's CUDAExtension adds to every nvcc call (the build's exact conditions).
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
CUOBJDUMP_FUNC = re.compile(
    r"Function (\w+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)"
)


def find_cuobjdump() -> str | None:
    """cuobjdump on PATH, else the copy Triton ships (it reads sm_80/sm_90a cubins)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / "backends" / "nvidia" / "bin" / "cuobjdump"
        if candidate.is_file():
            return str(candidate)
    return None


@pytest.fixture(scope="module")
def cubins(tmp_path_factory):
    """Each csrc/*.cu compiled once per arch to a cubin, with ptxas' verbose report."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compiled here")
    out = tmp_path_factory.mktemp("cubin")

    def compile_one(job):
        src, arch = job
        cubin = out / f"{src.stem}.sm_{arch}.cubin"
        gencode = f"-gencode=arch=compute_{arch},code=sm_{arch}"
        cmd = [nvcc, "-std=c++17", "-O3", *TORCH_NVCC_FLAGS, "-cubin", "-Xptxas", "-v", gencode,
               "-o", str(cubin), str(src)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return src.name, arch, cubin, proc

    jobs = [(src, arch) for src in CU_SOURCES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        return list(pool.map(compile_one, jobs))


def test_cuda_sources_compile(cubins):
    assert {name for name, *_ in cubins} >= {"select_sinks.cu", "sink_gate.cu", "bank_insert.cu"}
    for name, arch, cubin, proc in cubins:
        assert proc.returncode == 0, f"{name} sm_{arch}:\n{proc.stderr}"
        assert cubin.is_file()
        assert "warning" not in proc.stderr.lower(), f"{name} sm_{arch}:\n{proc.stderr}"


def test_ptxas_no_spills(cubins):
    """ptxas -v: every kernel has a 0-byte stack frame and no spill stores or loads."""
    kernels = 0
    for name, arch, _, proc in cubins:
        entries = PTXAS_ENTRY.findall(proc.stderr)
        frames = PTXAS_FRAME.findall(proc.stderr)
        assert len(entries) == len(frames), proc.stderr
        for (fn, sm), sizes in zip(entries, frames):
            assert sm == f"sm_{arch}"
            assert sizes == ("0", "0", "0"), f"{name} {sm} {fn}: stack/spill stores/loads {sizes}"
        kernels += len(entries)
    assert kernels > 0


def test_cuobjdump_no_local_memory(cubins):
    """cuobjdump --dump-resource-usage: STACK:0 and LOCAL:0 for every kernel, i.e. no
    register spills and no local arrays; registers within the 255 per-thread cap."""
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump is neither on PATH nor shipped with Triton")
    for name, arch, cubin, proc in cubins:
        if proc.returncode != 0:
            pytest.fail(f"{name} sm_{arch} did not compile")
        dump = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
        funcs = CUOBJDUMP_FUNC.findall(dump)
        assert len(funcs) == len(PTXAS_ENTRY.findall(proc.stderr)), dump
        for fn, reg, stack, _shared, local in funcs:
            assert stack == "0" and local == "0", f"{name} sm_{arch} {fn}: {stack=} {local=}"
            assert int(reg) <= 255
