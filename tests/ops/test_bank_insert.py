"""bank_insert: every backend against naive over a sequence of inserts (free slots, dedup,
FIFO eviction, a non-finite feature), opcheck and torch.compile per backend, no sample."""

from __future__ import annotations

import pytest
import torch

from dysink_kernels.ops.bank_insert import bank_insert

from conftest import op_backends

BACKENDS = op_backends("bank_insert")
L, B, C, S_e, H, D, F, N = 2, 2, 2, 3, 2, 16, 8, 9


def empty_bank() -> list[torch.Tensor]:
    """pool_k, pool_v, pool_mean_k, slot_feat, slot_owner, slot_frame, slot_stamp, clock."""
    P = B * C
    return [
        torch.zeros(L, P, S_e, H, D),
        torch.zeros(L, P, S_e, H, D),
        torch.zeros(L, P, H, D),
        torch.zeros(P, F),
        torch.full((P,), -1, dtype=torch.int32),
        torch.full((P,), -1, dtype=torch.int32),
        torch.zeros(P, dtype=torch.int64),
        torch.zeros((), dtype=torch.int64),
    ]


def blocks(n: int) -> list[tuple]:
    """``n`` inserts: (src_k, src_v, src_pos, feature, frame); block 2 repeats block 0's
    features (dedup), block 3 has a NaN feature for sample 1."""
    g = torch.Generator().manual_seed(7)
    feats = [torch.randn(B, F, generator=g) for _ in range(n)]
    if n > 3:
        feats[2] = feats[0].clone()
        feats[3][1, 0] = float("nan")
    pos = torch.tensor([4, 5, 6])
    return [
        (torch.randn(L, B, N, H, D, generator=g), torch.randn(L, B, N, H, D, generator=g), pos,
         feats[i], torch.tensor(3 * i))
        for i in range(n)
    ]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_equals_naive(backend):
    got_bank, want_bank = empty_bank(), empty_bank()
    for blk in blocks(6):
        got = bank_insert(*got_bank, *blk, C, C, 0.95, backend)
        want = bank_insert(*want_bank, *blk, C, C, 0.95, "naive")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        for x, y in zip(got_bank, want_bank):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    assert (want_bank[4] >= 0).all()  # the bank filled up (then evicted)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    args = (*empty_bank(), *blocks(1)[0], C, C, 0.95, backend)
    torch.library.opcheck(torch.ops.dysink.bank_insert.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    blk = blocks(1)[0]
    eager_bank, compiled_bank = empty_bank(), empty_bank()

    def call(bank, src_k, src_v):
        return bank_insert(*bank, src_k, src_v, *blk[2:], C, C, None, backend)

    eager = call(eager_bank, blk[0], blk[1])
    compiled = torch.compile(call, fullgraph=True)(compiled_bank, blk[0], blk[1])
    assert all(torch.equal(x, y) for x, y in zip(compiled, eager))
    assert all(torch.equal(x, y) for x, y in zip(compiled_bank, eager_bank))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_sample_inserts_nothing(backend):
    bank = empty_bank()
    before = [t.clone() for t in bank]
    src = torch.randn(L, 0, N, H, D)
    stored, slot = bank_insert(*bank, src, src, torch.tensor([4, 5, 6]), torch.randn(0, F),
                               torch.tensor(0), C, C, 0.95, backend)  # fmt: skip
    assert stored.shape == slot.shape == (0,) and stored.dtype == torch.bool
    assert all(torch.equal(x, y) for x, y in zip(bank, before))
