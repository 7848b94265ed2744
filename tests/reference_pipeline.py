"""A test-local emulation of the published DySink pipeline, written the way it is:
lists of per-frame K/V, Python loops, host-side decisions, ``torch.cat``.

It shares no code with the package (beyond torch), so the module is checked
against an independent reading of the published pipeline's semantics.
"""

from __future__ import annotations

import math
from collections import deque

import torch


class ReferencePipeline:
    def __init__(self, cfg, batch_size: int, bank_slots: int | None = None):
        self.cfg = cfg
        self.B = batch_size
        self.banks: list[list[dict]] = [[] for _ in range(batch_size)]
        self.cap = cfg.max_entries or bank_slots  # per-sample cap (FIFO)
        self.frames_k = [dict() for _ in range(cfg.num_layers)]  # frame -> (B, T, H, D)
        self.frames_v = [dict() for _ in range(cfg.num_layers)]
        self.recent = deque(maxlen=max(1, cfg.local_frames // cfg.frames_per_block))
        self.block = 0
        self.retrieved: list[list[dict]] = [[] for _ in range(batch_size)]
        self.log: list[tuple] = []  # (block, layer, commit, kept frames per sample, sinks kept)

    # ---------------------------------------------------------------- helpers
    def _l_eff(self, n_entries: int) -> int:
        c = self.cfg
        return c.local_frames + max(0, c.top_k - n_entries) * c.frames_per_block

    def _window_frames(self, cur: int, b: int) -> list[int]:
        """Previous frames attended by sample b's window (not sinks, not current)."""
        c = self.cfg
        s = c.sink_frames
        if c.window_scope == "batch":
            l_eff = self._l_eff(min(len(bank) for bank in self.banks))
        else:
            l_eff = self._l_eff(len(self.banks[b]))
        start = max(s, cur + c.frames_per_block - (l_eff - s))
        return list(range(start, cur))

    # --------------------------------------------------------------- protocol
    def begin_block(self):
        c = self.cfg
        cur = self.block * c.frames_per_block
        self.cur = cur
        self.retrieved = [[] for _ in range(self.B)]
        if not self.recent or c.top_k == 0:
            return
        for b in range(self.B):
            bank = self.banks[b]
            if not bank:
                continue
            if c.exclude == "reference":
                l_eff = self._l_eff(len(bank))
                excluded = set(range(c.sink_frames)) | set(range(max(0, cur - l_eff), cur))
            else:
                excluded = set(range(c.sink_frames)) | set(self._window_frames(cur, b))
            queries = [f[b] for f in self.recent]
            scored = []
            for e in bank:
                if e["frame"] in excluded:
                    continue
                sims = [float(e["feature"] @ q) for q in queries]
                scored.append((sum(sims) / len(sims), e["frame"], e))
            scored.sort(key=lambda t: (-t[0], t[1]))
            self.retrieved[b] = sorted((t[2] for t in scored[: c.top_k]), key=lambda e: e["frame"])

    def _gate_group(self, qbar, kbar_local, groups):
        """groups: list over samples of list of (B-index-free) mean keys (H, D).

        Returns a list over samples of lists of booleans (True = dropped).
        """
        c = self.cfg
        H = qbar.shape[1]
        s_loc = (qbar * kbar_local).sum(-1)  # (B, H)
        counts = [len(g) for g in groups]
        dropped = [[False] * n for n in counts]
        if c.gate_scope == "batch" and len(set(counts)) == 1:
            for j in range(counts[0]):
                votes = 0
                for b in range(self.B):
                    votes += int(((qbar[b] * groups[b][j]).sum(-1) > s_loc[b]).sum().item())
                ratio = votes / (self.B * H)
                for b in range(self.B):
                    dropped[b][j] = ratio > c.tau
        else:
            for b in range(self.B):
                for j, m in enumerate(groups[b]):
                    ratio = ((qbar[b] * m).sum(-1) > s_loc[b]).float().mean().item()
                    dropped[b][j] = ratio > c.tau
        return dropped

    def attend(self, layer, q, k, v, commit):
        c = self.cfg
        cur, T, s = self.cur, c.tokens_per_frame, c.sink_frames
        B, Sq, H, D = q.shape
        qbar = q.double().mean(1)
        fk, fv = self.frames_k[layer], self.frames_v[layer]
        local_k, local_v = [], []
        for b in range(B):
            window = self._window_frames(cur, b)
            local_k.append(torch.cat([fk[f][b] for f in window] + [k[b]]).double())
            local_v.append(torch.cat([fv[f][b] for f in window] + [v[b]]).double())
        kbar_local = torch.stack([lk.mean(0) for lk in local_k])  # (B, H, D)

        sink_frames = list(range(min(s, cur)))
        sinks_kept = [True] * B
        if sink_frames and c.gate and cur >= s:
            sink_k = torch.cat([fk[f] for f in sink_frames], dim=1).double()
            groups = [[sink_k[b].mean(0)] for b in range(B)]
            sinks_kept = [not d[0] for d in self._gate_group(qbar, kbar_local, groups)]

        entries = [[] if commit else list(self.retrieved[b]) for b in range(B)]
        if not commit and c.gate and any(entries):
            groups = [[e["k"][layer].double().mean(0) for e in entries[b]] for b in range(B)]
            dropped = self._gate_group(qbar, kbar_local, groups)
            entries = [[e for e, d in zip(entries[b], dropped[b]) if not d] for b in range(B)]

        out = torch.empty(B, Sq, H, D, dtype=torch.float64)
        for b in range(B):
            ks = [e["k"][layer].double() for e in entries[b]]
            vs = [e["v"][layer].double() for e in entries[b]]
            if sink_frames and sinks_kept[b]:
                ks += [fk[f][b].double() for f in sink_frames]
                vs += [fv[f][b].double() for f in sink_frames]
            K = torch.cat([*ks, local_k[b]])
            V = torch.cat([*vs, local_v[b]])
            scale = c.softmax_scale or 1 / math.sqrt(D)
            p = torch.softmax(torch.einsum("qhd,khd->hqk", q[b].double(), K) * scale, dim=-1)
            out[b] = torch.einsum("hqk,khd->qhd", p, V)
        got = [[e["frame"] for e in es] for es in self.retrieved]
        kept = [[e["frame"] for e in es] for es in entries]
        self.log.append((self.block, layer, commit, got, kept, sinks_kept))
        if commit:
            for i in range(c.frames_per_block):
                fk[cur + i] = k[:, i * T : (i + 1) * T].clone()
                fv[cur + i] = v[:, i * T : (i + 1) * T].clone()
        return out.to(q.dtype)

    def block_mean_key(self):
        c = self.cfg
        layer = c.num_layers // 2 if c.feature_layer is None else c.feature_layer
        ks = torch.cat([self.frames_k[layer][self.cur + i] for i in range(c.frames_per_block)], 1)
        m = ks.double().mean(1).flatten(1)
        return m / m.norm(dim=-1, keepdim=True)

    def end_block(self, feature=None, latent=None):
        c = self.cfg
        cur, T = self.cur, c.tokens_per_frame
        if latent is not None:
            self.latents = getattr(self, "latents", {})
            self.latents[cur] = latent.clone()
        feats = self.block_mean_key() if feature is None else feature.double()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        for b in range(self.B):
            bank = self.banks[b]
            f = feats[b]
            if bank and c.dedup is not None:
                max_sim = max(float(e["feature"] @ f) for e in bank)
                if max_sim > c.dedup:
                    continue
            frames = range(cur, cur + c.frames_per_block)
            bank.append(
                {
                    "frame": cur,
                    "feature": f,
                    "latent": None if latent is None else latent[b : b + 1].clone(),
                    "k": [
                        torch.cat([self.frames_k[ly][fr][b] for fr in frames])
                        for ly in range(c.num_layers)
                    ],
                    "v": [
                        torch.cat([self.frames_v[ly][fr][b] for fr in frames])
                        for ly in range(c.num_layers)
                    ],
                }
            )
            if self.cap is not None and len(bank) > self.cap:
                bank.pop(0)
        self.recent.append(feats)
        self.block += 1
        del T

    # ------------------------------------------------------------- prompt switch
    def recache(self, run_block):
        """Recompute stored K/V with ``run_block(latent, first_frame, attend)``, where each
        block attends only itself (the published recache), explicitly."""
        c = self.cfg
        T, fpb = c.tokens_per_frame, c.frames_per_block

        def self_attend(store):
            def attend(layer, q, k, v, commit):
                store[layer] = (k.clone(), v.clone())
                p = torch.softmax(
                    torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5,
                    dim=-1,
                )
                return torch.einsum("bhqk,bkhd->bqhd", p, v.double()).to(q.dtype)

            return attend

        for bank in self.banks:
            for e in bank:
                store = {}
                run_block(e["latent"], e["frame"], self_attend(store))
                e["k"] = [store[ly][0][0] for ly in range(c.num_layers)]
                e["v"] = [store[ly][1][0] for ly in range(c.num_layers)]
        done = self.block * fpb
        held = set(range(min(c.sink_frames, done)))
        held |= set(range(max(c.sink_frames, done - c.ring_frames), done))
        for first in sorted({f // fpb * fpb for f in held}):
            store = {}
            run_block(self.latents[first], first, self_attend(store))
            for f in range(first, first + fpb):
                if f in held:
                    i = f - first
                    for ly in range(c.num_layers):
                        self.frames_k[ly][f] = store[ly][0][:, i * T : (i + 1) * T].clone()
                        self.frames_v[ly][f] = store[ly][1][:, i * T : (i + 1) * T].clone()
