"""Host-offloaded bank: K/V in pinned host memory, only the chosen slots on the device.

With ``DySinkCache(..., bank_device="cpu")`` the bank's K/V live in (pinned) host
memory while everything the per-block decisions read (features, owners, frames,
mean keys) stays on the device. After retrieval, ``begin_block`` enqueues on a side
stream, layer by layer, a gather of just the retrieved slots into a small device
staging area (``layers x B x top_k`` entries) and records one event per layer; the
first attention call of a layer makes the compute stream wait for that event. The
host never waits: the slot ids stay on the device and the gather kernel reads the
pinned host memory directly (CUDA unified addressing). On a CPU-only machine the
same code path runs with plain tensor copies.
"""

from __future__ import annotations

from functools import cache

import torch

__all__ = ["SlotStager"]

# Elements copied per program of the gather kernel (16 KB of bf16 per program).
GATHER_BLOCK = 8192


@cache
def _gather_kernel():
    """The Triton gather kernel, built on first use (importing this module must not
    import Triton: CPU-only offload never needs it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_slots_fwd(
        SRC,
        DST,
        IDX,
        n_elem,
        stride_src_p,
        stride_dst_j,
        BLOCK: tl.constexpr,
    ):
        """``DST[j] = SRC[IDX[j]]`` for one layer, ``-1`` entries skipped without a read.

        ``SRC`` may be pinned host memory: each program streams ``BLOCK`` contiguous
        elements of one slot over the bus (read once, written once).
        """
        i_j = tl.program_id(0)
        i_c = tl.program_id(1)
        slot = tl.load(IDX + i_j)
        if slot >= 0:
            o = i_c * BLOCK + tl.arange(0, BLOCK)
            m = o < n_elem
            x = tl.load(SRC + slot.to(tl.int64) * stride_src_p + o, mask=m)
            tl.store(DST + i_j.to(tl.int64) * stride_dst_j + o, x, mask=m)

    return _gather_slots_fwd, triton.cdiv


class SlotStager:
    """Device staging area for the retrieved slots of a host-resident bank.

    Args:
        pool_k, pool_v: the bank's ``(L, P, S_e, H, D)`` K/V (host memory).
        n_stage: staged entries per layer (``B * top_k``).
        device: the compute device.
    """

    def __init__(
        self, pool_k: torch.Tensor, pool_v: torch.Tensor, n_stage: int, device: torch.device
    ) -> None:
        L, _, S_e, H, D = pool_k.shape
        self.device = device
        self.k = torch.zeros(L, n_stage, S_e, H, D, dtype=pool_k.dtype, device=device)
        self.v = torch.zeros_like(self.k)
        # Staging moves bytes: an fp8 bank is copied through uint8 views.
        byte = pool_k.element_size() == 1 and pool_k.dtype != torch.uint8
        self.pool_k = pool_k.view(torch.uint8) if byte else pool_k
        self.pool_v = pool_v.view(torch.uint8) if byte else pool_v
        self._k = self.k.view(torch.uint8) if byte else self.k
        self._v = self.v.view(torch.uint8) if byte else self.v
        self.slots = torch.full((n_stage,), -1, dtype=torch.int32, device=device)
        self.on_gpu = device.type == "cuda"
        if self.on_gpu:
            self.stream = torch.cuda.Stream(device)
            self.ready = [torch.cuda.Event() for _ in range(L)]

    def prefetch(self, slot_idx: torch.Tensor) -> None:
        """Stage ``slot_idx.flatten()`` (``-1`` = nothing) for every layer, in the background."""
        self.slots.copy_(slot_idx.flatten())
        if not self.on_gpu:
            idx = self.slots.long().clamp(min=0)
            keep = (self.slots >= 0).view(1, -1, 1, 1, 1)
            self._k.copy_(torch.where(keep, self.pool_k.index_select(1, idx), self._k))
            self._v.copy_(torch.where(keep, self.pool_v.index_select(1, idx), self._v))
            return
        kernel, cdiv = _gather_kernel()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        n_elem = self.k[0, 0].numel()
        grid = (self.slots.shape[0], cdiv(n_elem, GATHER_BLOCK))
        with torch.cuda.stream(self.stream):
            for layer in range(self.k.shape[0]):
                for src, dst in ((self.pool_k, self._k), (self.pool_v, self._v)):
                    kernel[grid](
                        src[layer], dst[layer], self.slots, n_elem,
                        src.stride(1), dst.stride(1), BLOCK=GATHER_BLOCK,
                    )  # fmt: skip
                self.ready[layer].record(self.stream)

    def wait(self, layer: int) -> None:
        """Make the compute stream wait (on the device) until ``layer`` is staged."""
        if self.on_gpu:
            torch.cuda.current_stream(self.device).wait_event(self.ready[layer])
