"""Reliability: property-based streams against the emulation with bank invariants,
checkpoint and resume, determinism, bad input that leaves the cache usable."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dysink_kernels import DySinkCache, DySinkConfig, SinkAttention, available_backends

from harness import compare, features, module_factory, run, tiny_config

MODULE_OPS = ("gathered_attention", "select_sinks", "sink_gate", "gate_from_means", "bank_insert")


def check_invariants(cache: DySinkCache, layer: int) -> None:
    """Bank invariants that must hold after every call."""
    c = cache.config
    bank = cache.bank
    B, C = cache.batch_size, bank.slots_per_sample
    owner = bank.owner.view(B, C)
    for b in range(B):
        mine = owner[b]
        assert set(mine.tolist()) <= {-1, b}, "a slot owned by another sample's region"
        n = int((mine >= 0).sum())
        assert n <= bank.limit, "budget exceeded"
        if c.dedup is not None and n > 1:
            feats = F.normalize(bank.feature.view(B, C, -1)[b][mine >= 0], dim=-1)
            cos = feats @ feats.T
            cos.fill_diagonal_(-1)
            assert float(cos.max()) <= c.dedup + 1e-6, "two stored entries closer than dedup"
        stamps = bank.stamp.view(B, C)[b][mine >= 0]
        assert len(set(stamps.tolist())) == n, "insertion stamps not unique"
    st_ = cache.stats(layer)
    for b in range(B):
        kept = [s for s in st_.kept_idx[b].tolist() if s >= 0]
        assert all(int(bank.owner[s]) == b for s in kept), "attended a slot the sample lost"
        frames = [int(bank.frame[s]) for s in st_.slot_idx[b].tolist() if s >= 0]
        assert frames == sorted(frames), "retrieval output not ordered by frame"


@settings(
    max_examples=14,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    batch=st.integers(1, 3),
    top_k=st.integers(0, 4),
    sinks=st.booleans(),
    gate_scope=st.sampled_from(["batch", "sample"]),
    window_scope=st.sampled_from(["batch", "sample"]),
    exclude=st.sampled_from(["reference", "window"]),
    spare=st.integers(0, 3),
    dedup=st.sampled_from([0.9, 0.95, None]),
    tau=st.sampled_from([0.3, 0.6, 0.8]),
    blocks=st.integers(5, 9),
    seed=st.integers(0, 10_000),
)
def test_random_streams_match_emulation(
    batch, top_k, sinks, gate_scope, window_scope, exclude, spare, dedup, tau, blocks, seed
):
    cfg = tiny_config(
        top_k=top_k,
        sink_frames=3 if sinks else 0,
        local_frames=12 if sinks else 9,
        gate_scope=gate_scope,
        window_scope=window_scope,
        exclude=exclude,
        dedup=dedup,
        tau=tau,
        max_entries=max(top_k, 1) + spare,
    )
    feats = features(batch, blocks, seed=seed)
    compare(cfg, batch=batch, blocks=blocks, feats=feats, on_call=check_invariants)


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    cfg = tiny_config(max_entries=4, sink_frames=3, local_frames=12)
    blocks = 12
    feats = features(2, blocks)
    log_full: list = []
    full = run(cfg, 2, blocks, module_factory(cfg, 2, log_full), feats)

    # Same run, but stop after block 7, save, load into a fresh cache, continue.
    holder: list = []
    log_a: list = []
    state = {}

    def factory():
        begin, attend, end = module_factory(cfg, 2, log_a, holder=holder)()
        calls = {"n": 0}

        def end_and_maybe_checkpoint(feat):
            out = end(feat)
            calls["n"] += 1
            if calls["n"] == 7:
                buf = io.BytesIO()
                torch.save(holder[0].state_dict(), buf)
                buf.seek(0)
                state["saved"] = torch.load(buf)
                fresh = DySinkCache(cfg, batch_size=2, dtype=torch.float32)
                fresh.load_state_dict(state["saved"])
                holder[0].__dict__.update(fresh.__dict__)  # continue on the restored cache
            return out

        return begin, attend, end_and_maybe_checkpoint

    resumed = run(cfg, 2, blocks, factory, feats)
    assert torch.equal(full, resumed)
    assert log_a == log_full


def test_load_state_from_another_config_is_refused():
    cfg = tiny_config()
    cache = DySinkCache(cfg, dtype=torch.float32)
    other = DySinkCache(tiny_config(tau=0.5), dtype=torch.float32)
    with pytest.raises(ValueError, match="tau"):
        other.load_state_dict(cache.state_dict())
    with pytest.raises(ValueError, match="batch_size"):
        DySinkCache(cfg, batch_size=2, dtype=torch.float32).load_state_dict(cache.state_dict())
    cache.begin_block()
    with pytest.raises(RuntimeError, match="after end_block"):
        cache.state_dict()


def module_backends() -> list[str]:
    names = set(available_backends(MODULE_OPS[0], "cpu"))
    for op in MODULE_OPS[1:]:
        names &= set(available_backends(op, "cpu"))
    return sorted(names)


@pytest.mark.parametrize("backend", module_backends())
def test_bitwise_deterministic(backend):
    cfg = tiny_config(sink_frames=3, local_frames=12, max_entries=3)
    feats = features(2, 8)
    results = []
    for _ in range(2):
        log: list = []
        holder: list = []
        out = run(cfg, 2, 8, module_factory(cfg, 2, log, holder=holder, backend=backend), feats)
        stats = holder[0].stats(1).attn
        results.append((out, stats, log))
    (a, sa, la), (b, sb, lb) = results
    assert torch.equal(a, b) and la == lb
    for x, y in zip(sa, sb):
        assert torch.equal(x, y)


def test_nan_feature_is_rejected_and_cache_stays_usable():
    cfg = tiny_config()
    cache = DySinkCache(cfg, dtype=torch.float32)
    attn = SinkAttention(cfg)

    def block(feat):
        cache.begin_block()
        for layer in range(cfg.num_layers):
            attn(
                *(torch.randn(1, 24, 2, 16) for _ in range(3)),
                cache=cache,
                layer=layer,
                commit=True,
            )
        return cache.end_block(feat)

    block(torch.randn(1, 5))
    bad = torch.randn(1, 5)
    bad[0, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        block(bad)
    assert int(cache.bank_size()[0]) == 1, "the NaN block was stored"
    assert (cache.recent_feat[0, 1] == 0).all(), "the NaN feature would be used as a query"
    for _ in range(3):  # still usable
        block(torch.randn(1, 5))
    assert cache.block == 5


def test_empty_bank_and_top_k_over_budget():
    cfg = tiny_config(max_entries=1)
    with pytest.raises(ValueError, match="exceeds the bank's capacity"):
        DySinkCache(cfg)
    with pytest.raises(ValueError, match="exceeds the bank's capacity"):
        DySinkCache(tiny_config(), bank_slots=1)
    cache = DySinkCache(tiny_config(), dtype=torch.float32)
    cache.begin_block()  # empty bank: nothing retrieved, no error
    assert (cache.slot_idx == -1).all()
    with pytest.raises(ValueError, match="top_k"):
        DySinkConfig(num_layers=2, num_heads=2, head_dim=16, tokens_per_frame=8, top_k=-1)
