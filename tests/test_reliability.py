"""Reliability: property-based streams against the emulation with bank invariants,
checkpoint and resume, determinism, bad input that leaves the cache usable."""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dysink_kernels import DySinkCache, DySinkConfig, SinkAttention, available_backends

from harness import compare, features, module_factory, run, tiny_config

MODULE_OPS = (
    "gathered_sink_attention",
    "select_sinks",
    "sink_gate",
    "gate_from_means",
    "bank_insert",
)


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


# --------------------------------------------------------------- reset, state loads
def test_reset_keeps_every_constructor_option():
    """Each constructor argument, set to a non-default value, survives ``reset()``."""
    from dysink_kernels.fp8 import FP8_DTYPE

    cfg = tiny_config(max_entries=3)
    entry = 2 * cfg.num_layers * cfg.block_tokens * cfg.num_heads * cfg.head_dim * 4  # fp32
    parallel = object()  # stored as given (only the attention calls use it)
    variants = [
        dict(batch_size=2, device="cpu", dtype=torch.float16, bank_slots=5, backend="naive",
             feature_dim=5, parallel=parallel, bank_device="cpu", store_latents=True,
             bank_dtype=FP8_DTYPE),
        dict(config=tiny_config(max_entries=None), dtype=torch.float32,
             max_bank_bytes=entry * 7 + 3),
    ]  # fmt: skip
    covered = {"config"} | set(variants[0]) | set(variants[1])
    params = set(inspect.signature(DySinkCache.__init__).parameters) - {"self"}
    assert params == covered, f"options not walked by this test: {sorted(params - covered)}"

    def options(cache):
        return dict(
            config=cache.config, batch=cache.batch_size, device=cache.device,
            dtype=cache.dtype, backend=cache.backend, parallel=cache.parallel,
            slots=cache.bank.slots_per_sample, bank_dtype=cache.bank.k.dtype,
            storage=cache.bank.storage_device, staged=cache.stager is not None,
            latents=cache.store_latents, quantized=cache.bank.quantized,
            feature=None if cache.bank.feature is None else tuple(cache.bank.feature.shape),
            recent=None if cache.recent_feat is None else tuple(cache.recent_feat.shape),
        )  # fmt: skip

    for kw in variants:
        cache = DySinkCache(**{"config": cfg, **kw})
        before = options(cache)
        cache.frame_dev.fill_(6)
        cache.block = 2
        cache.bank.owner[0] = 0
        cache.reset()
        assert options(cache) == before
        assert cache.block == 0 and int(cache.frame_dev) == 0 and int(cache.bank_size().sum()) == 0
    assert before["slots"] == 7


def _stream(cache, blocks, seed):
    """Run ``blocks`` blocks of random K/V through ``cache`` (external features)."""
    cfg = cache.config
    attn = SinkAttention(cfg)
    g = torch.Generator().manual_seed(seed)
    shape = (cache.batch_size, cfg.block_tokens, cfg.num_heads, cfg.head_dim)
    for _ in range(blocks):
        cache.begin_block()
        for layer in range(cfg.num_layers):
            attn(*(torch.randn(shape, generator=g) for _ in range(3)), cache=cache, layer=layer)
        for layer in range(cfg.num_layers):
            qkv = (torch.randn(shape, generator=g) for _ in range(3))
            attn(*qkv, cache=cache, layer=layer, commit=True)
        cache.end_block(torch.randn(cache.batch_size, 6, generator=g))


def _snapshot(cache):
    """Every buffer and host counter of a cache, by value and by identity."""
    tensors = {k: v for k, v in vars(cache).items() if isinstance(v, torch.Tensor)}
    tensors.update({f"bank.{k}": v for k, v in cache.bank.state_dict().items() if v is not None})
    tensors["ent_mean"], tensors["ent_var"] = cache.anomaly_tracker.mean, cache.anomaly_tracker.var
    values = {k: v.clone() for k, v in tensors.items()}
    ids = {k: v.data_ptr() for k, v in tensors.items()}
    return values, ids, (cache.block, list(cache.anomaly_tracker.updates))


def _assert_same(a, b):
    (va, ia, ha), (vb, ib, hb) = a, b
    assert ia == ib and ha == hb and va.keys() == vb.keys()
    for k in va:
        x, y = va[k].flatten(), vb[k].flatten()
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), f"{k} changed"


def _set(path, value):
    def corrupt(state):
        *head, last = path
        d = state
        for key in head:
            d = d[key]
        d[last] = value(d[last]) if callable(value) else value

    return corrupt


def _poke(path, index, value):
    def corrupt(state):
        d = state
        for key in path:
            d = d[key]
        d[index] = value

    return corrupt


NAN = float("nan")
CORRUPTIONS = {
    "missing key": (lambda s: s.pop("block"), ValueError, "missing"),
    "unknown key": (_set(("extra",), 1), ValueError, "unknown"),
    "bank missing key": (lambda s: s["bank"].pop("usage"), ValueError, "missing"),
    "not a dict": (None, TypeError, "dict"),
    "truncated local_k": (_set(("local_k",), lambda t: t[:, :, :-1]), ValueError, "local_k"),
    "local_k dtype": (_set(("local_k",), lambda t: t.double()), TypeError, "dtype"),
    "local_k on meta": (_set(("local_k",), lambda t: t.to("meta")), ValueError, "local_k"),
    "truncated bank k": (_set(("bank", "k"), lambda t: t[:, :-1]), ValueError, "'k'"),
    "negative block": (_set(("block",), -1), ValueError, "block"),
    "block as str": (_set(("block",), "3"), ValueError, "block"),
    "frame_dev off": (_set(("frame_dev",), lambda t: t + 1), ValueError, "frame_dev"),
    "frame_dev dtype": (_set(("frame_dev",), lambda t: t.float()), TypeError, "frame_dev"),
    "owner above batch": (_poke(("bank", "owner"), 0, 5), ValueError, "owner"),
    "owner below -1": (_poke(("bank", "owner"), 0, -2), ValueError, "owner"),
    "owner of another sample": (_poke(("bank", "owner"), 0, 1), ValueError, "owner"),
    "float owner": (_set(("bank", "owner"), lambda t: t.float()), TypeError, "owner"),
    "too many entries": (_poke(("bank", "owner"), slice(0, 5), 0), ValueError, "entries"),
    "negative frame": (_poke(("bank", "frame"), 0, -3), ValueError, "frame"),
    "frame in the future": (_poke(("bank", "frame"), 0, 10**6), ValueError, "frame"),
    "stamp past clock": (_poke(("bank", "stamp"), 0, 10**6), ValueError, "stamp"),
    "NaN bank k": (_poke(("bank", "k"), (0, 0, 0, 0, 0), NAN), ValueError, "NaN"),
    "Inf bank v": (_poke(("bank", "v"), (1, 0, 0, 0, 0), float("inf")), ValueError, "NaN"),
    "NaN mean_k": (_poke(("bank", "mean_k"), (0, 0, 0, 0), NAN), ValueError, "NaN"),
    "NaN feature": (_poke(("bank", "feature"), (0, 0), NAN), ValueError, "NaN"),
    "feature dims": (_set(("bank", "feature"), lambda t: t[:, :-1]), ValueError, "feature"),
    "negative usage": (_poke(("bank", "usage"), 0, -1.0), ValueError, "usage"),
    "NaN local_v": (_poke(("local_v",), (0, 0, 0, 0, 0), NAN), ValueError, "NaN"),
    "NaN frame_ksum": (_poke(("frame_ksum",), (0, 0, 0, 0, 0), NAN), ValueError, "NaN"),
    "NaN recent_feat": (_poke(("recent_feat",), (0, 0, 0), NAN), ValueError, "NaN"),
    "anomaly mean size": (_set(("ent_mean",), lambda t: t[:, :1]), ValueError, "ent_mean"),
    "negative variance": (_poke(("ent_var",), (0, 0, 0), -1.0), ValueError, "ent_var"),
    "ent_updates str": (_set(("ent_updates",), "abc"), TypeError, "ent_updates"),
    "ent_updates short": (_set(("ent_updates",), [0]), TypeError, "ent_updates"),
    "ent_updates float": (_set(("ent_updates",), [1.5, 0]), ValueError, "ent_updates"),
    "ent_updates negative": (_set(("ent_updates",), [0, -1]), ValueError, "ent_updates"),
    "other config": (_poke(("config",), "tau", 0.5), ValueError, "tau"),
    "batch size": (_set(("batch_size",), 3), ValueError, "batch_size"),
}


@pytest.fixture(scope="module")
def two_states():
    """States of two different streams (6 and 4 blocks) of one configuration."""
    states = []
    for blocks, seed in ((6, 1), (4, 2)):
        cache = DySinkCache(tiny_config(max_entries=3), 2, dtype=torch.float32, bank_slots=5)
        _stream(cache, blocks, seed=seed)
        states.append(copy.deepcopy(cache.state_dict()))
    return states


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_rejected_load_leaves_the_cache_bit_identical(name, two_states):
    good, other = copy.deepcopy(two_states)
    target = DySinkCache(tiny_config(max_entries=3), 2, dtype=torch.float32, bank_slots=5)
    target.load_state_dict(other)
    corrupt, exc, needle = CORRUPTIONS[name]
    state = copy.deepcopy(good)
    if corrupt is None:
        state = list(state.items())
    else:
        corrupt(state)
    before = _snapshot(target)
    with pytest.raises(exc, match=needle):
        target.load_state_dict(state)
    _assert_same(before, _snapshot(target))
    target.load_state_dict(good)  # the intact state still loads, in place
    after = _snapshot(target)
    assert after[1] == before[1], "a buffer was replaced (captured CUDA graphs would break)"
    now = target.state_dict()
    for key, value in [*good.items(), *good["bank"].items()]:
        mine = now[key] if key in now else now["bank"][key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(mine, value), key
        elif key != "bank":
            assert mine == value, key


def test_nonfinite_committed_kv_is_reported_and_not_kept():
    """NaN/Inf in the K/V of a clean pass: flagged on the device, reported at end_block
    (on the CPU; one call later on a GPU), the block is not stored for that sample and
    the window keeps 0 instead, so later blocks stay finite."""
    from dysink_kernels.health import NonFiniteError

    cfg = tiny_config(top_k=1, dedup=None)
    cache = DySinkCache(cfg, batch_size=2, dtype=torch.float32)
    attn = SinkAttention(cfg)
    _stream(cache, 2, seed=3)
    sizes = cache.bank_size().tolist()
    cache.begin_block()
    for layer in range(cfg.num_layers):
        q, k, v = (torch.randn(2, 24, 2, 16) for _ in range(3))
        if layer == 1:
            k[1, 3, 0, 2] = float("nan")
            v[1, 5, 1, 1] = float("inf")
        attn(q, k, v, cache=cache, layer=layer, commit=True)
    with pytest.raises(NonFiniteError, match=r"K/V committed in block 2 .*sample\(s\) \[1\]"):
        cache.end_block(torch.randn(2, 6))
    assert cache.bank_size().tolist() == [sizes[0] + 1, sizes[1]]
    assert torch.isfinite(cache.local_k).all() and torch.isfinite(cache.local_v).all()
    assert torch.isfinite(cache.frame_ksum).all()
    assert (cache.recent_feat[1, 2] == 0).all(), "the refused block's feature is a query"
    cache.check_health()  # reported once
    for _ in range(3):
        cache.begin_block()
        for layer in range(cfg.num_layers):
            q, k, v = (torch.randn(2, 24, 2, 16) for _ in range(3))
            assert torch.isfinite(attn(q, k, v, cache=cache, layer=layer)).all()
            attn(q, k, v, cache=cache, layer=layer, commit=True)
        cache.end_block(torch.randn(2, 6))


def test_nonfinite_denoising_input_is_flagged_without_a_sync():
    from dysink_kernels.health import NonFiniteError

    cfg = tiny_config()
    cache = DySinkCache(cfg, batch_size=2, dtype=torch.float32)
    attn = SinkAttention(cfg)
    _stream(cache, 2, seed=4)
    cache.begin_block()
    q, k, v = (torch.randn(2, 24, 2, 16) for _ in range(3))
    q[0, 0, 0, 0] = float("nan")
    attn(q, k, v, cache=cache, layer=0)
    assert cache._health.flags[0].tolist() == [True, False]  # device flag, nothing raised
    with pytest.raises(NonFiniteError, match=r"q, k or v .* block 2 .*\[0\].*in progress"):
        cache.check_health()
    for layer in range(cfg.num_layers):
        attn(*(torch.randn(2, 24, 2, 16) for _ in range(3)), cache=cache, layer=layer, commit=True)
    with pytest.raises(NonFiniteError, match=r"q, k or v of an attention call of block 2"):
        cache.end_block(torch.randn(2, 6))
    assert cache.block == 3 and cache.last_stored.all(), "clean K/V: the block is stored"
    _stream(cache, 1, seed=5)
    cache.check_health()
