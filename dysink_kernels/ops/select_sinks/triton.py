"""Fused Triton select_sinks: mean-cosine relevance and top-k in one launch.

One program per sample ``b`` (grid ``(B,)``). The mean cosine is linear in the
normalised query rows, so with ``u_b = sum_m valid[b, m] * q[b, m] / max(|q[b, m]|, eps)``

    score[b, p] = (u_b . s_p) / max(|s_p|, eps) / count_b,

and one dot product per slot replaces ``M`` cosines. The program

1. reads its ``M`` query rows once for their norms (``M * F`` elements);
2. walks the slots in tiles of ``BLOCK_P`` (``F`` in tiles of ``BLOCK_F``): the
   candidate mask (owner, frame exclusions) comes first and masks the feature
   loads, so only the sample's own candidate rows are read from memory
   (``|cand_b| * F`` elements, plus ``u_b`` rebuilt from the queries per tile);
3. keeps a running top-k of ``BLOCK_K`` entries in registers, merged with each
   tile by ``k`` arg-max passes over (score desc, frame asc, slot asc): a pass
   takes the best remaining of the tile and of the running list, the winner is
   masked out. A slot's rank key is ``frame * P + slot``, unique per slot;
4. writes the chosen entries ordered by key (frame, then slot) ascending,
   ``-1`` / ``-inf`` padding after them.

With a usage prior the score of a candidate is
``(1 - prior_mix) * cosine + prior_mix * slot_prior[b, p]`` (``slot_prior`` is read
for the candidates only).

Cost: ``ceil(P / BLOCK_P) * k`` passes of two ``BLOCK_P``-wide reductions, which
is why the register top-k is bounded by ``MAX_K`` and a whole production bank
(``P <= MAX_BLOCK_P``) fits one tile. A larger ``k`` runs the same kernel without
the ranking (``TOPK=False``): it writes the masked ``(B, P)`` scores, and a device
sort ranks them (``_rank_scores``). ``HAS_PRIOR`` switches the blend in or out, so
each of the three variants compiles only the code it runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_BLOCK_P", "MAX_K", "select_sinks_triton"]

# Largest k of the register top-k; a larger k scores in the kernel and ranks by a device sort.
MAX_K = 64
# Slots scored and ranked per tile: a production bank (P <= 1024) is one tile, so
# the k arg-max passes run once.
MAX_BLOCK_P = 1024
# Elements of one (BLOCK_P, BLOCK_F) slot-feature tile held in registers.
TILE_ELEMS = 8192
# F.normalize's default eps: a zero vector normalises to zero.
NORM_EPS = 1e-12
# Eight warps keep the tile, the running top-k and the pipeline buffers in registers
# without spills up to BLOCK_K = 16.
NUM_WARPS = 8

KEY_NONE = tl.constexpr(9223372036854775807)  # int64 max: rank key of "no entry"


@triton.jit
def _merge_tile(b_score, b_key, r_score, r_key, k, BLOCK_K: tl.constexpr):
    """Merge a tile's ``(score, key)`` into the running top-k; pass ``i`` fixes rank ``i``."""
    o_k = tl.arange(0, BLOCK_K)

    n_score = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    n_key = tl.full([BLOCK_K], KEY_NONE, dtype=tl.int64)
    for i in range(k):
        t_best = tl.max(b_score, axis=0)
        t_key = tl.min(tl.where(b_score == t_best, b_key, KEY_NONE), axis=0)
        r_best = tl.max(r_score, axis=0)
        r_first = tl.min(tl.where(r_score == r_best, r_key, KEY_NONE), axis=0)
        take_tile = (t_best > r_best) | ((t_best == r_best) & (t_key < r_first))
        best = tl.where(take_tile, t_best, r_best)
        key = tl.where(take_tile, t_key, r_first)
        n_score = tl.where(o_k == i, best, n_score)
        n_key = tl.where(o_k == i, key, n_key)
        # Keys are unique, so this masks exactly the winner (or nothing new when
        # only padding is left).
        b_score = tl.where(b_key == key, float("-inf"), b_score)
        b_key = tl.where(b_key == key, KEY_NONE, b_key)
        r_score = tl.where(r_key == key, float("-inf"), r_score)
        r_key = tl.where(r_key == key, KEY_NONE, r_key)
    return n_score, n_key


@triton.jit
def _write_ranked(r_score, r_key, p_slot, stride_ok, p_score, stride_ck, P, k,
                  BLOCK_K: tl.constexpr):  # fmt: skip
    """Write the running top-k ordered by key (frame, then slot) ascending, padding last.

    Output position = entries before it in (key, index) order; positions >= k are
    not written.
    """
    o_k = tl.arange(0, BLOCK_K)
    m_chosen = r_score > float("-inf")
    r_key_row = r_key[:, None]
    r_key_col = r_key[None, :]
    before = (r_key_col < r_key_row) | ((r_key_col == r_key_row) & (o_k[None, :] < o_k[:, None]))
    pos = tl.sum(before.to(tl.int32), axis=1)
    slot = tl.where(m_chosen, r_key % P, -1)
    m_out = pos < k
    tl.store(p_slot + pos * stride_ok, slot.to(tl.int32), mask=m_out)
    tl.store(p_score + pos * stride_ck, r_score, mask=m_out)


@triton.jit
def _select_sinks_fwd(
    qf_ptr,
    sf_ptr,
    owner_ptr,
    frame_ptr,
    lo_ptr,
    hi_ptr,
    prior_ptr,
    slot_out_ptr,
    score_out_ptr,
    M,
    F,
    P,
    k,
    sink_frames,
    w_cos,
    w_prior,
    stride_qb,
    stride_qm,
    stride_qf,
    stride_sp,
    stride_sf,
    stride_owner,
    stride_frame,
    stride_lo,
    stride_hi,
    stride_prb,
    stride_prp,
    stride_ob,
    stride_ok,
    stride_cb,
    stride_ck,
    NORM_EPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    TOPK: tl.constexpr,
):
    """One program per sample ``i_b`` (grid ``(B,)``); see the module docstring.

    ``HAS_PRIOR``: blend ``w_cos * cosine + w_prior * prior[i_b, p]``. ``TOPK``: rank
    in registers and write ``k`` slots and scores. Otherwise write the masked scores
    (``-inf`` for non-candidates) to ``score_out[i_b, p]``, a ``(B, P)`` buffer.
    """
    i_b = tl.program_id(0).to(tl.int64)
    p_q = qf_ptr + i_b * stride_qb
    o_m = tl.arange(0, BLOCK_M)
    m_m = o_m < M

    # Query norms and validity (a row of zeros is padding; NaN != 0 counts as valid,
    # as in the oracle, and then poisons every score of the sample).
    b_qsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_qnz = tl.zeros([BLOCK_M], dtype=tl.int32)
    for f0 in range(0, F, BLOCK_F):
        o_f = f0 + tl.arange(0, BLOCK_F)
        m_qf = m_m[:, None] & (o_f < F)[None, :]
        b_q = tl.load(
            p_q + o_m[:, None] * stride_qm + o_f[None, :] * stride_qf, mask=m_qf, other=0.0
        ).to(tl.float32)
        b_qsq += tl.sum(b_q * b_q, axis=1)
        b_qnz = tl.maximum(b_qnz, tl.max((b_q != 0.0).to(tl.int32), axis=1))
    n_valid = tl.sum(b_qnz, axis=0)
    # Zero rows get a finite weight and contribute zeros; no valid row -> no candidate.
    b_qinv = 1.0 / tl.maximum(tl.sqrt(b_qsq), NORM_EPS)
    inv_count = 1.0 / tl.maximum(n_valid, 1).to(tl.float32)

    lo = tl.load(lo_ptr + i_b * stride_lo).to(tl.int64)
    hi = tl.load(hi_ptr + i_b * stride_hi).to(tl.int64)
    # "Has a valid query row" as a block: a comparison of two scalars splatted into a
    # mask reaches the 3.9 interpreter's loads as int32 ("mask has unsupported dtype").
    m_query = (tl.zeros([BLOCK_P], dtype=tl.int32) + n_valid) > 0

    r_score = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    r_key = tl.full([BLOCK_K], KEY_NONE, dtype=tl.int64)
    for p0 in range(0, P, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        m_p = o_p < P
        b_owner = tl.load(owner_ptr + o_p * stride_owner, mask=m_p, other=-1).to(tl.int64)
        b_frame = tl.load(frame_ptr + o_p * stride_frame, mask=m_p, other=0).to(tl.int64)
        m_cand = (
            m_p
            & (b_owner == i_b)
            & ((b_frame < lo) | (b_frame >= hi))
            & (b_frame >= sink_frames)
            & m_query
        )

        b_dot = tl.zeros([BLOCK_P], dtype=tl.float32)
        b_ssq = tl.zeros([BLOCK_P], dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            o_f = f0 + tl.arange(0, BLOCK_F)
            m_f = o_f < F
            b_q = tl.load(
                p_q + o_m[:, None] * stride_qm + o_f[None, :] * stride_qf,
                mask=m_m[:, None] & m_f[None, :],
                other=0.0,
            ).to(tl.float32)
            b_u = tl.sum(b_q * b_qinv[:, None], axis=0)  # (BLOCK_F,) of u_b
            # Non-candidate rows are never fetched.
            b_s = tl.load(
                sf_ptr + o_p[:, None] * stride_sp + o_f[None, :] * stride_sf,
                mask=m_cand[:, None] & m_f[None, :],
                other=0.0,
            ).to(tl.float32)
            b_dot += tl.sum(b_s * b_u[None, :], axis=1)
            b_ssq += tl.sum(b_s * b_s, axis=1)
        b_score = b_dot / tl.maximum(tl.sqrt(b_ssq), NORM_EPS) * inv_count
        if HAS_PRIOR:
            p_prior = prior_ptr + i_b * stride_prb + o_p * stride_prp
            b_prior = tl.load(p_prior, mask=m_cand, other=0.0).to(tl.float32)
            b_score = w_cos * b_score + w_prior * b_prior
        m_cand = m_cand & (b_score == b_score)  # a NaN score is never a candidate
        b_score = tl.where(m_cand, b_score, float("-inf"))
        if TOPK:
            b_key = tl.where(m_cand, b_frame * P + o_p, KEY_NONE)
            r_score, r_key = _merge_tile(b_score, b_key, r_score, r_key, k, BLOCK_K)
        else:
            tl.store(score_out_ptr + i_b * stride_cb + o_p * stride_ck, b_score, mask=m_p)

    if TOPK:
        _write_ranked(r_score, r_key, slot_out_ptr + i_b * stride_ob, stride_ok,
                      score_out_ptr + i_b * stride_cb, stride_ck, P, k, BLOCK_K)  # fmt: skip


def _rank_scores(
    score: torch.Tensor, slot_frame: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of masked ``(B, P)`` scores (``-inf`` = not a candidate) by (score desc,
    frame asc, slot asc), returned ordered by (frame, slot) ascending, ``-1`` padded.

    On the device: the slots are put in (frame, slot) order once, a stable
    descending sort of the scores in that order ranks them, and an ascending sort
    of the first ``min(k, P)`` positions puts the winners back in (frame, slot)
    order.
    """
    B, P = score.shape
    kk = min(k, P)
    by_key = torch.argsort(slot_frame.long(), stable=True)  # (P,) slots in (frame, slot) order
    keyed = score[:, by_key]
    _, rank = torch.sort(keyed, dim=1, descending=True, stable=True)
    top_pos = rank[:, :kk]  # positions in key order of the best kk
    top_score = keyed.gather(1, top_pos)
    chosen = top_score > float("-inf")
    # Padding goes last: its position sorts after every real one.
    top_pos = torch.where(chosen, top_pos, P)
    top_pos, _ = torch.sort(top_pos, dim=1)
    chosen = top_pos < P
    safe = top_pos.clamp(max=P - 1)
    slot_out = torch.full((B, k), -1, dtype=torch.int32, device=score.device)
    score_out = torch.full((B, k), float("-inf"), dtype=torch.float32, device=score.device)
    slot_out[:, :kk] = torch.where(chosen, by_key[safe], -1).to(torch.int32)
    score_out[:, :kk] = torch.where(chosen, keyed.gather(1, safe), float("-inf"))
    return slot_out, score_out


def select_sinks_triton(
    query_feat: torch.Tensor,
    slot_feat: torch.Tensor,
    slot_owner: torch.Tensor,
    slot_frame: torch.Tensor,
    k: int,
    exclude_lo: torch.Tensor,
    exclude_hi: torch.Tensor,
    sink_frames: int,
    slot_prior: torch.Tensor | None = None,
    prior_mix: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``select_sinks`` (see ``naive.py`` for the semantics).

    ``slot_prior (B, P)`` blends in with weight ``prior_mix`` (ignored when ``None``
    or ``prior_mix <= 0``). ``k <= MAX_K``: one launch (register top-k). A larger
    ``k``: the kernel writes the ``(B, P)`` scores and a device sort ranks them.
    """
    B, M, F = query_feat.shape
    P = slot_feat.shape[0]
    device = query_feat.device
    if k == 0 or P == 0 or B == 0:
        slot_out = torch.full((B, k), -1, dtype=torch.int32, device=device)
        return slot_out, torch.full((B, k), float("-inf"), dtype=torch.float32, device=device)
    has_prior = slot_prior is not None and prior_mix > 0
    block_p = min(triton.next_power_of_2(P), MAX_BLOCK_P)
    block_f = min(triton.next_power_of_2(max(F, 1)), max(TILE_ELEMS // block_p, 1))
    block_m = triton.next_power_of_2(max(M, 1))
    common = (
        query_feat.stride(0), query_feat.stride(1), query_feat.stride(2),
        slot_feat.stride(0), slot_feat.stride(1), slot_owner.stride(0), slot_frame.stride(0),
        exclude_lo.stride(0), exclude_hi.stride(0),
    )  # fmt: skip
    # The blend's weights as fp32 scalars, as torch multiplies an fp32 tensor by a float.
    w_prior = float(prior_mix) if has_prior else 0.0
    prior = slot_prior if has_prior else query_feat  # never read without the prior
    prior_strides = (prior.stride(0), prior.stride(1)) if has_prior else (0, 0)
    head = (query_feat, slot_feat, slot_owner, slot_frame, exclude_lo, exclude_hi, prior)
    meta = dict(NORM_EPS=NORM_EPS, BLOCK_M=block_m, BLOCK_F=block_f, BLOCK_P=block_p,
                HAS_PRIOR=has_prior, num_warps=NUM_WARPS)  # fmt: skip
    weights = (1.0 - w_prior, w_prior)
    if k > MAX_K:  # the masked scores alone (written through score_out), ranked by a sort
        score = torch.empty((B, P), dtype=torch.float32, device=device)
        _select_sinks_fwd[(B,)](
            *head, score, score, M, F, P, 0, sink_frames, *weights, *common, *prior_strides,
            0, 0, score.stride(0), score.stride(1), BLOCK_K=1, TOPK=False, **meta,
        )  # fmt: skip
        return _rank_scores(score, slot_frame, k)

    # Every position < k is written by the kernel (the positions are a permutation).
    slot_out = torch.empty((B, k), dtype=torch.int32, device=device)
    score_out = torch.empty((B, k), dtype=torch.float32, device=device)
    _select_sinks_fwd[(B,)](
        *head, slot_out, score_out, M, F, P, k, sink_frames, *weights, *common, *prior_strides,
        slot_out.stride(0), slot_out.stride(1), score_out.stride(0), score_out.stride(1),
        BLOCK_K=triton.next_power_of_2(k), TOPK=True, **meta,
    )  # fmt: skip
    return slot_out, score_out
