"""A reference-style per-block pipeline: what the published DySink code does for one
sample, written the way it is written, as the baseline of the benchmarks.

Read from yebo0216best/DySink (``pipeline/memory_causal_inference_eb.py``,
``utils/memory_bank.py``, ``wan/modules/causal_model.py``); no code is copied. Per
block:

* retrieval: a Python set of excluded frames and a Python loop over the bank entries
  to mask them, cosine scores on the host (each query feature copied ``.cpu()``),
  ``.item()`` to size top-k and to pick each entry, then every chosen entry's K/V of
  every layer copied host -> device from pageable memory (``.to(device)``) and
  ``torch.cat``-ed, then concatenated again over the batch;
* every attention call (4 denoising steps + 1 clean pass, every layer): the cache's
  indices read with ``.item()``, the layer's whole KV cache cloned, rolled and written,
  the window sliced; during denoising each retrieved entry is gated (mean query . mean
  key, votes over heads) with an ``.item()`` decision and the kept entries
  ``torch.cat``-ed with the window; dense attention (flash-attn when installed, else
  SDPA); then the update applied to the cache itself;
* storing: dedup on the host (feature ``.cpu()``, ``.max().item()``), the block's K/V
  sliced and cloned twice on the device, then ``.cpu().clone()``-ed into host memory.

Left out here and in the package's path alike: projections, RoPE, cross-attention,
the VAE decode and vision encoder behind the feature (the caller's feature is given),
and the logging. Host<->device bytes are counted where the copies happen; on a CPU run
the same copies stay in host memory and the counts are what a GPU run moves.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F

from attention import dense_attention
from plans import PipelineShape, Workload

__all__ = ["ReferenceStylePipeline"]

# Synthetic bank entries share one zero buffer beyond this many bytes (only the
# retrieved entries are ever read, so the copies cost the same).
DISTINCT_PREFILL_BYTES = 4 << 30


class ReferenceStylePipeline:
    """Per-block baseline with the same interface as ``pipelines.OursPipeline``:
    ``prepare()`` (untimed), ``run_block()``, ``moved_bytes()``, and the per-block
    protocol a model drives: ``begin_block()``, ``attend(layer, q, k, v, commit)``,
    ``end_block(feature)``.

    ``entries`` old bank entries are prefilled synthetically (features on the host,
    zero K/V), all outside the excluded window. The bank is unbounded (the reference's
    default); every block stores its own entry (paid for in the block's time) and
    ``prepare()`` drops it again before the next block, so each block sees the same
    ``entries`` retrievable entries.
    """

    name = "reference_style"

    def __init__(
        self,
        shape: PipelineShape,
        device: torch.device | str,
        work: Workload,
        *,
        entries: int = 0,
        tau: float = 0.8,
        dedup: float = 0.95,
    ) -> None:
        if shape.batch != 1:
            raise ValueError("reference_style emulates one sample (batch 1)")
        self.shape, self.device, self.work = shape, torch.device(device), work
        self.entries = entries
        self.tau, self.dedup = tau, dedup
        self.max_entries = None  # the reference's default: unbounded
        s = shape
        self.frame_seq_length = s.tokens_per_frame
        # Sized for the widest window (memory_entries=0); DySink runs have no static sink.
        self.sink_tokens = 0
        size = (s.local_frames + s.top_k * s.frames_per_block) * s.tokens_per_frame
        cache_shape = (1, size, s.heads, s.head_dim)
        self.kv_cache = [
            {
                "k": torch.zeros(cache_shape, dtype=s.dtype, device=self.device),
                "v": torch.zeros(cache_shape, dtype=s.dtype, device=self.device),
                "global_end_index": torch.tensor([0], dtype=torch.long, device=self.device),
                "local_end_index": torch.tensor([0], dtype=torch.long, device=self.device),
            }
            for _ in range(s.layers)
        ]
        self.bank: list[dict] = []  # frame_idx, feature (host), kv_cache (host, per layer)
        self.feature_matrix: torch.Tensor | None = None
        self.recent: deque = deque(maxlen=max(1, s.local_frames // s.frames_per_block))
        self.h2d_bytes = 0
        self.d2h_bytes = 0
        self.block = 0
        self._call = 0
        self._retrieval: list[dict] | None = None
        self._local_attn = s.local_frames
        self._current_start = 0
        self._prefill(entries)

    # ------------------------------------------------------------------ state
    def _prefill(self, n: int) -> None:
        s, T = self.shape, self.frame_seq_length
        self.block = s.start_block(n)
        start = self.block * s.frames_per_block * T
        for kv in self.kv_cache:  # a full window, as after many blocks
            kv["global_end_index"].fill_(start)
            kv["local_end_index"].fill_(kv["k"].shape[1])
        entry_shape = (1, s.block_tokens, s.heads, s.head_dim)
        shared = n * s.entry_bytes() > DISTINCT_PREFILL_BYTES
        zero = torch.zeros(entry_shape, dtype=s.dtype) if shared else None
        g = torch.Generator().manual_seed(1)
        for j in range(n):
            end = (j + 1) * s.block_tokens
            kv = [
                {
                    "k": zero if shared else torch.zeros(entry_shape, dtype=s.dtype),
                    "v": zero if shared else torch.zeros(entry_shape, dtype=s.dtype),
                    "global_end_index": torch.tensor([end]),
                    "local_end_index": torch.tensor([end]),
                }
                for _ in range(s.layers)
            ]
            feature = F.normalize(torch.randn(s.feature_dim, generator=g), dim=-1)
            self.bank.append({"frame_idx": j * s.frames_per_block, "feature": feature, "kv": kv})
        if self.bank:
            self.feature_matrix = torch.stack([e["feature"] for e in self.bank])
        for i in range(self.recent.maxlen):
            self.recent.append(self.work.feature(self.block - self.recent.maxlen + i))

    def prepare(self) -> None:
        """Untimed, before each block: drop what the last block stored."""
        del self.bank[self.entries :]
        if self.feature_matrix is not None:
            self.feature_matrix = self.feature_matrix[: self.entries] if self.entries else None

    def moved_bytes(self) -> tuple[int, int]:
        return self.h2d_bytes, self.d2h_bytes

    def _h2d(self, t: torch.Tensor) -> torch.Tensor:
        self.h2d_bytes += t.numel() * t.element_size()
        return t.to(device=self.device, dtype=self.shape.dtype)

    def _d2h(self, t: torch.Tensor) -> torch.Tensor:
        self.d2h_bytes += t.numel() * t.element_size()
        return t.detach().cpu()

    def _to_1d_feature(self, feature: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._d2h(feature).float().reshape(-1), dim=-1)

    def _adjusted_local_attn_size(self, n_entries: int) -> int:
        s = self.shape
        return s.local_frames + max(0, s.top_k - n_entries) * s.frames_per_block

    # ------------------------------------------------------------------ retrieval
    def _retrieve(self, queries: list[torch.Tensor], current_frame: int) -> list[dict] | None:
        s = self.shape
        local_attn = self._adjusted_local_attn_size(len(self.bank))
        exclude = set()
        for frame in range(max(0, current_frame - local_attn), current_frame):
            exclude.add(frame)
        mask = torch.ones(len(self.bank), dtype=torch.bool)
        for idx in list(exclude):
            for i, entry in enumerate(self.bank):
                if entry["frame_idx"] == idx:
                    mask[i] = False
        sims = torch.stack([self.feature_matrix @ self._to_1d_feature(q) for q in queries])
        sims = sims.mean(dim=0).masked_fill(~mask, float("-inf"))
        k = min(s.top_k, torch.isfinite(sims).sum().item())
        if k == 0:
            return None
        values, indices = torch.topk(sims, k)
        valid = torch.isfinite(values)
        values, indices = values[valid], indices[valid]
        chosen = sorted((self.bank[i.item()] for i in indices), key=lambda e: e["frame_idx"])
        merged = []
        for layer in range(s.layers):
            k_parts, v_parts, seq_lens, meta = [], [], [], {}
            for entry in chosen:
                for key, value in entry["kv"][layer].items():
                    if key == "k":
                        k_parts.append(self._h2d(value))
                        seq_lens.append(value.shape[1])
                    elif key == "v":
                        v_parts.append(self._h2d(value))
                    elif key not in meta:
                        meta[key] = self._h2d(value)
            block = dict(meta)
            block["k"] = torch.cat(k_parts, dim=1)
            block["v"] = torch.cat(v_parts, dim=1)
            if len(seq_lens) > 1:
                block["entry_seq_lens"] = seq_lens
            merged.append(block)
        values.tolist()  # the similarities the reference returns for its log
        return merged

    @staticmethod
    def _merge_batch(per_sample: list[list[dict] | None]) -> list[dict] | None:
        """Same-shape samples are concatenated over the batch (a copy even for one)."""
        if all(kv is None for kv in per_sample):
            return None
        merged = []
        for layer in range(len(per_sample[0])):
            block = {
                "k": torch.cat([kv[layer]["k"] for kv in per_sample], dim=0),
                "v": torch.cat([kv[layer]["v"] for kv in per_sample], dim=0),
            }
            if "entry_seq_lens" in per_sample[0][layer]:
                block["entry_seq_lens"] = per_sample[0][layer]["entry_seq_lens"]
            merged.append(block)
        return merged

    # ------------------------------------------------------------------ attention
    def _gate(self, q, k_local, v_local, retrieval_k, retrieval_v, seq_lens):
        """Per-entry anomaly gate; every decision is read on the host."""
        lens = seq_lens or [retrieval_k.shape[1]]
        k_entries = torch.split(retrieval_k, lens, dim=1)
        v_entries = torch.split(retrieval_v, lens, dim=1)
        q_mean = q.mean(dim=1, keepdim=True)
        local = torch.einsum("bqnd,bknd->bnqk", q_mean, k_local).mean(dim=-1).mean(dim=-1)
        kept_k, kept_v = [], []
        for k_entry, v_entry in zip(k_entries, v_entries):
            score = torch.einsum("bqnd,bknd->bnqk", q_mean, k_entry).mean(dim=-1).mean(dim=-1)
            ratio = (score > local).float().mean().item()
            if not ratio > self.tau:
                kept_k.append(k_entry)
                kept_v.append(v_entry)
        if not kept_k:
            return k_local, v_local
        return torch.cat([*kept_k, k_local], dim=1), torch.cat([*kept_v, v_local], dim=1)

    def _attend(self, layer, q, k, v, current_start, local_attn, retrieval):
        kv = self.kv_cache[layer]
        sink = self.sink_tokens
        max_attention = local_attn * self.frame_seq_length
        current_end = current_start + q.shape[1]
        size = kv["k"].shape[1]
        n_new = q.shape[1]
        is_recompute = current_end <= kv["global_end_index"].item() and current_start > 0
        rolled = evicted = 0
        if current_end > kv["global_end_index"].item() and (
            n_new + kv["local_end_index"].item() > size
        ):
            evicted = n_new + kv["local_end_index"].item() - size
            rolled = kv["local_end_index"].item() - evicted - sink
            local_end = (
                kv["local_end_index"].item() + current_end - kv["global_end_index"].item() - evicted
            )
            temp_k, temp_v = kv["k"].clone(), kv["v"].clone()
            temp_k[:, sink : sink + rolled] = temp_k[
                :, sink + evicted : sink + evicted + rolled
            ].clone()
            temp_v[:, sink : sink + rolled] = temp_v[
                :, sink + evicted : sink + evicted + rolled
            ].clone()
        else:
            local_end = kv["local_end_index"].item() + current_end - kv["global_end_index"].item()
            temp_k, temp_v = kv["k"].clone(), kv["v"].clone()
        local_start = local_end - n_new
        write_start = max(local_start, sink) if is_recompute else local_start
        offset = max(0, write_start - local_start)
        write_len = max(0, local_end - write_start)
        new_k, new_v = k[:, offset : offset + write_len], v[:, offset : offset + write_len]
        if write_len > 0:
            temp_k[:, write_start:local_end] = new_k
            temp_v[:, write_start:local_end] = new_v
        window_start = max(0, local_end - max_attention)
        k_win, v_win = temp_k[:, window_start:local_end], temp_v[:, window_start:local_end]
        if retrieval is None:
            out = dense_attention(q, k_win, v_win)
        else:
            rk = retrieval["k"].to(device=k_win.device, dtype=k_win.dtype)
            rv = retrieval["v"].to(device=v_win.device, dtype=v_win.dtype)
            k_cat, v_cat = self._gate(q, k_win, v_win, rk, rv, retrieval.get("entry_seq_lens"))
            out = dense_attention(q, k_cat, v_cat)
        # The cache update, applied after the forward as the reference does.
        if rolled:
            kv["k"][:, sink : sink + rolled] = kv["k"][
                :, sink + evicted : sink + evicted + rolled
            ].clone()
            kv["v"][:, sink : sink + rolled] = kv["v"][
                :, sink + evicted : sink + evicted + rolled
            ].clone()
        if write_len > 0 and new_k.shape[1] == local_end - write_start:
            kv["k"][:, write_start:local_end] = new_k
            kv["v"][:, write_start:local_end] = new_v
        if not is_recompute:
            kv["global_end_index"].fill_(current_end)
            kv["local_end_index"].fill_(local_end)
        return out

    # ------------------------------------------------------------------ storing
    def _check_similarity(self, feature: torch.Tensor) -> float:
        query = self._to_1d_feature(feature)
        max_sim = 0.0
        if self.bank and self.feature_matrix is not None:
            max_sim = max(max_sim, (self.feature_matrix @ query).max().item())
        return max_sim

    def _store(self, frame: int, feature: torch.Tensor) -> None:
        s, T = self.shape, self.frame_seq_length
        local_end = self.kv_cache[0]["local_end_index"].item()
        start = max(0, local_end - s.frames_per_block * T)
        extracted = []
        for layer_cache in self.kv_cache:
            extracted.append(
                {
                    key: value[:, start:local_end].clone() if key in ("k", "v") else value
                    for key, value in layer_cache.items()
                }
            )
        # Sliced "for the sample": another clone of every tensor.
        extracted = [{key: value.clone() for key, value in blk.items()} for blk in extracted]
        kv_host = [
            {key: self._d2h(value).clone() for key, value in blk.items()} for blk in extracted
        ]
        feature_host = self._to_1d_feature(feature)
        self.bank.append({"frame_idx": frame, "feature": feature_host, "kv": kv_host})
        if self.feature_matrix is None:
            self.feature_matrix = feature_host.unsqueeze(0)
        else:
            self.feature_matrix = torch.cat([self.feature_matrix, feature_host.unsqueeze(0)], dim=0)
        if self.max_entries is not None and len(self.bank) > self.max_entries:
            self.bank.pop(0)
            self.feature_matrix = self.feature_matrix[1:]

    # ------------------------------------------------------------------ one block
    @torch.no_grad()
    def begin_block(self) -> None:
        """Retrieval for the block: the chosen entries' K/V copied to the device."""
        s = self.shape
        frame = self.block * s.frames_per_block
        self._local_attn = self._adjusted_local_attn_size(len(self.bank))
        retrieval = None
        if self.recent:
            per_sample = [None]
            if self.bank:
                per_sample[0] = self._retrieve([f[0] for f in self.recent], frame)
            retrieval = self._merge_batch(per_sample)
        self._retrieval = retrieval
        self._current_start = frame * self.frame_seq_length

    @torch.no_grad()
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, commit: bool = False
    ) -> torch.Tensor:
        """One self-attention call; the clean pass (``commit``) attends no retrieved entry."""
        retrieval = None if commit or self._retrieval is None else self._retrieval[layer]
        return self._attend(layer, q, k, v, self._current_start, self._local_attn, retrieval)

    @torch.no_grad()
    def end_block(self, feature: torch.Tensor) -> None:
        """Dedup on the host, then store the block's K/V in host memory."""
        frame = self.block * self.shape.frames_per_block
        max_sim = self._check_similarity(feature[0])
        if not (self.bank and max_sim > self.dedup):
            self._store(frame, feature[0])
        self.recent.append(feature)
        self.block += 1

    def block_feature(self) -> torch.Tensor:
        """The caller's feature of the current block (the workload's)."""
        return self.work.feature(self.block)

    def first_frame(self) -> int:
        """First frame of the current block."""
        return self.block * self.shape.frames_per_block

    def run_block(self) -> None:
        """One block on the workload's synthetic q/k/v."""
        s = self.shape
        self.begin_block()
        for _ in range(s.steps):
            for layer in range(s.layers):
                self.attend(layer, *self.work.qkv(self._call))
                self._call += 1
        for layer in range(s.layers):
            self.attend(layer, *self.work.qkv(self._call), commit=True)
            self._call += 1
        self.end_block(self.block_feature())
