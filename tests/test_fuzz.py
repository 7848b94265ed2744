"""Hypothesis fuzzing of the public ops and the cache protocol, each group in its own
subprocess (a crash by a signal is a failure, not a lost run).

Every case either raises a documented exception (ValueError, TypeError, IndexError or
RuntimeError with a message) or equals the naive oracle: each op on every CPU backend
against its ``"naive"`` backend, the cache on its default backends against the same
calls on ``backend="naive"``. Shapes include zeros, dtypes vary, slot lists hold
``-1``, out-of-range and repeated slots, and protocol calls come in random order.
Values are seeded normal draws (ties have probability 0; all-zero inputs tie the same
way on every backend). Run one group by hand: ``python tests/test_fuzz.py attention``
(``DYSINK_FUZZ_SKIP=op:backend,...`` skips backends to explore past a crash,
``DYSINK_FUZZ_EXPLORE=1`` prints every failing case instead of stopping at the first).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest

DOCUMENTED = (ValueError, TypeError, IndexError, RuntimeError)
GROUPS = ("attention", "small_ops", "rope", "cache")
EXAMPLES = {"attention": 60, "small_ops": 80, "rope": 40, "cache": 25}
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("group", GROUPS)
def test_fuzz_group_in_a_subprocess(group):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONHASHSEED": "0"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), HERE, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), group],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode >= 0, f"the {group} fuzz died by signal {-proc.returncode}:\n{tail}"
    assert proc.returncode == 0, tail


# ---------------------------------------------------------------- the fuzz itself
def _run(group: str) -> None:  # pragma: no cover - runs in the subprocess
    import torch
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import dysink_kernels as dk
    from dysink_kernels import available_backends

    torch.set_num_threads(1)
    fuzz = settings(
        max_examples=EXAMPLES[group],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 4e-2, torch.float64: 1e-9}

    def outcome(fn, *args, **kw):
        """``("ok", result)`` or ``("error", exception)`` for a documented exception."""
        try:
            return "ok", fn(*args, **kw)
        except DOCUMENTED as err:
            assert str(err), f"{type(err).__name__} without a message"
            return "error", err

    def same(a, b, dtype, what):
        if a is None or b is None:
            assert a is None and b is None, what
            return
        if isinstance(a, (tuple, list)):
            assert len(a) == len(b), what
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, dtype, f"{what}[{i}]")
            return
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} vs {b.shape}"
        if a.is_floating_point():
            t = tol.get(dtype, 1e-4)
            torch.testing.assert_close(a.float(), b.float(), atol=t, rtol=t, equal_nan=True)
        else:
            assert torch.equal(a, b), f"{what}: {a.tolist()} vs {b.tolist()}"

    def describe(args, kw):
        show = lambda x: (
            f"{x.dtype}{list(x.shape)}{x.tolist() if not x.is_floating_point() else ''}"
            if isinstance(x, torch.Tensor) else repr(x)
        )  # fmt: skip
        return ", ".join([*map(show, args), *(f"{k}={show(v)}" for k, v in kw.items())])

    explore = os.environ.get("DYSINK_FUZZ_EXPLORE") == "1"
    skip = os.environ.get("DYSINK_FUZZ_SKIP", "").split(",")

    def against_naive(op: str, fn, dtype, *args, **kw):
        for backend in available_backends(op, "cpu"):
            if backend == "naive" or (backend == "triton" and dtype == torch.bfloat16):
                continue  # the interpreter's bf16 dot is not exact
            if f"{op}:{backend}" in skip:
                continue
            # The last line before a crash by a signal names the case.
            case = f"{op}[{backend}]({describe(args, kw)})"
            print(f"case {case}", file=sys.stderr, flush=True)
            try:
                want = outcome(fn, *args, backend="naive", **kw)
                got = outcome(fn, *args, backend=backend, **kw)
                if got[0] == "error" and want[0] == "ok" and "backend" in str(got[1]):
                    continue  # a backend's documented limit (e.g. triton's head_dim)
                if want[0] == "error" or got[0] == "error":
                    assert got[0] == want[0] and type(got[1]) is type(want[1]), (
                        f"{backend}: {got[1]!r}, naive: {want[1]!r}"
                    )
                else:
                    same(got[1], want[1], dtype, backend)
            except Exception as err:
                if not explore:
                    raise
                print(f"FAIL {case}: {type(err).__name__}: {err}"[:800], flush=True)

    dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])

    def randn(g, *shape, dtype=torch.float32, zero=False):
        x = torch.randn(*shape, generator=g)
        return (x * 0 if zero else x).to(dtype)

    # ------------------------------------------------------------------ attention
    @fuzz
    @given(
        B=st.integers(0, 3), Sq=st.integers(0, 5), H=st.integers(0, 3),
        D=st.sampled_from([0, 1, 2, 6, 16]), Sk=st.integers(0, 6), P=st.integers(0, 4),
        S_e=st.integers(0, 3), n=st.integers(0, 3), dtype=dtypes, seed=st.integers(0, 2**16),
        slots=st.lists(st.integers(-2, 5), min_size=0, max_size=12),
        k_len=st.one_of(st.none(), st.lists(st.integers(-1, 7), min_size=0, max_size=4)),
        stats=st.booleans(), rotate=st.booleans(), zero=st.booleans(),
        scale=st.sampled_from([None, 0.5, 0.0, float("nan")]),
    )  # fmt: skip
    def attention(B, Sq, H, D, Sk, P, S_e, n, dtype, seed, slots, k_len, stats, rotate, zero,
                  scale):  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        q = randn(g, B, Sq, H, D, dtype=dtype, zero=zero)
        k, v = randn(g, B, Sk, H, D, dtype=dtype), randn(g, B, Sk, H, D, dtype=dtype)
        pk, pv = randn(g, P, S_e, H, D, dtype=dtype), randn(g, P, S_e, H, D, dtype=dtype)
        idx = (slots + [-1] * (B * n))[: B * n]
        slot_idx = torch.tensor(idx, dtype=torch.int32).view(B, n)
        kl = None if k_len is None else torch.tensor(k_len[:B] + [Sk] * (B - len(k_len)))
        rot = randn(g, B, n) * 8 if rotate else None
        against_naive(
            "gathered_sink_attention", dk.gathered_sink_attention, dtype, q, k, v, pk, pv, slot_idx,
            k_len=kl, softmax_scale=scale, return_stats=stats, slot_rotate=rot,
        )  # fmt: skip

    # ------------------------------------------------------------------ small ops
    @fuzz
    @given(
        B=st.integers(0, 3), M=st.integers(0, 3), F=st.integers(0, 5), P=st.integers(0, 7),
        owners=st.lists(st.integers(-2, 3), min_size=0, max_size=7),
        frames=st.lists(st.integers(-1, 14), min_size=0, max_size=7),
        k=st.integers(0, 9), lo=st.integers(-2, 15), span=st.integers(-3, 9),
        sinks=st.integers(0, 6), seed=st.integers(0, 2**16), zero=st.booleans(),
        dtype=st.sampled_from([torch.float32, torch.float16]),
    )  # fmt: skip
    def select(B, M, F, P, owners, frames, k, lo, span, sinks, seed, zero, dtype):
        g = torch.Generator().manual_seed(seed)
        query = randn(g, B, M, F, dtype=dtype, zero=zero)
        feat = randn(g, P, F, dtype=dtype)
        owner = torch.tensor((owners + [-1] * P)[:P], dtype=torch.int32)
        frame = torch.tensor((frames + [0] * P)[:P], dtype=torch.int32)
        ex_lo = torch.full((B,), lo, dtype=torch.int32)
        against_naive(
            "select_sinks", dk.select_sinks, dtype, query, feat, owner, frame, k=k,
            exclude_lo=ex_lo, exclude_hi=ex_lo + span, sink_frames=sinks,
        )  # fmt: skip

    @fuzz
    @given(
        B=st.integers(0, 3), Sq=st.integers(0, 4), Sk=st.integers(0, 5), H=st.integers(0, 3),
        D=st.sampled_from([0, 1, 4, 16]), P=st.integers(0, 4), n=st.integers(0, 3),
        slots=st.lists(st.integers(-2, 5), min_size=0, max_size=12),
        k_len=st.one_of(st.none(), st.lists(st.integers(-1, 6), min_size=0, max_size=4)),
        tau=st.sampled_from([0.0, 0.5, 0.8, 1.0, 1.5, float("nan")]),
        scope=st.sampled_from(["batch", "sample", "bogus"]), dtype=dtypes,
        seed=st.integers(0, 2**16), zero=st.booleans(),
    )  # fmt: skip
    def gate(B, Sq, Sk, H, D, P, n, slots, k_len, tau, scope, dtype, seed, zero):
        g = torch.Generator().manual_seed(seed)
        q, k = randn(g, B, Sq, H, D, dtype=dtype, zero=zero), randn(g, B, Sk, H, D, dtype=dtype)
        means = randn(g, P, H, D)
        slot_idx = torch.tensor((slots + [-1] * (B * n))[: B * n], dtype=torch.int64).view(B, n)
        kl = None if k_len is None else torch.tensor(k_len[:B] + [Sk] * (B - len(k_len)))
        against_naive(
            "sink_gate", dk.sink_gate, dtype, q, k, means, slot_idx, k_len=kl, tau=tau,
            scope=scope,
        )  # fmt: skip

    # ------------------------------------------------------------------------ rope
    @fuzz
    @given(
        B=st.integers(0, 2), grid=st.tuples(st.integers(0, 3), st.integers(0, 2),
        st.integers(0, 2)), H=st.integers(0, 2), D=st.sampled_from([0, 2, 6, 8, 12, 16, 5]),
        offset=st.tuples(st.integers(-3, 50), st.integers(0, 4), st.integers(0, 4)),
        extra=st.integers(-1, 1), dtype=dtypes, seed=st.integers(0, 2**16),
        delta=st.one_of(st.floats(-1e3, 1e3), st.just(float("nan")), st.lists(
            st.floats(-50, 50), min_size=0, max_size=3)),
        theta=st.sampled_from([10000.0, 1.0, 0.0, -1.0]),
    )  # fmt: skip
    def rope(B, grid, H, D, offset, extra, dtype, seed, delta, theta):
        g = torch.Generator().manual_seed(seed)
        S = max(grid[0] * grid[1] * grid[2] + extra, 0)
        x = randn(g, B, S, H, D, dtype=dtype)
        against_naive("apply_wan_rope", dk.apply_wan_rope, dtype, x, grid, offset, theta)
        if isinstance(delta, list):
            delta = torch.tensor((delta + [0.0] * B)[:B]).view(B, 1) if B else torch.zeros(0, 1)
        against_naive("rotate_temporal", dk.rotate_temporal, dtype, x, delta, theta)

    # ----------------------------------------------------------------------- cache
    call = st.one_of(
        st.tuples(st.just("begin")),
        st.tuples(st.just("attend"), st.integers(-1, 2), st.booleans(),
                  st.sampled_from(["ok", "ok", "ok", "nan", "short", "dtype"])),
        st.tuples(st.just("commit_all")),
        st.tuples(st.just("end"), st.sampled_from(["ok", "ok", "nan", "none", "wide"])),
        st.tuples(st.just("save")), st.tuples(st.just("load")), st.tuples(st.just("reset")),
        st.tuples(st.just("health")),
    )  # fmt: skip

    @fuzz
    @given(
        calls=st.lists(call, min_size=1, max_size=40), B=st.integers(1, 2),
        top_k=st.integers(0, 2), sinks=st.booleans(), feature=st.sampled_from(
            ["external", "mean_key"]), gate_mode=st.sampled_from(["consensus", "both"]),
        relative=st.booleans(), seed=st.integers(0, 2**16),
    )  # fmt: skip
    def cache(calls, B, top_k, sinks, feature, gate_mode, relative, seed):
        cfg = dk.DySinkConfig(
            num_layers=2, num_heads=2, head_dim=8, tokens_per_frame=2, top_k=top_k,
            sink_frames=3 if sinks else 0, local_frames=9 if not sinks else 12,
            feature=feature, gate_mode=gate_mode, max_entries=3, anomaly_warmup=1,
            sink_rope="relative" if relative else "original",
        )  # fmt: skip
        caches = [
            dk.DySinkCache(cfg, batch_size=B, dtype=torch.float32, backend=backend)
            for backend in ("naive", "auto")
        ]
        attn = dk.SinkAttention(cfg)
        saved: list = [None, None]
        g = torch.Generator().manual_seed(seed)
        shape = (B, cfg.block_tokens, 2, 8)

        def step(c, i, op, qkv, feat):
            if op[0] == "begin":
                return c.begin_block()
            if op[0] == "attend":
                layer, commit, how = op[1:]
                args = list(qkv)
                if how == "nan":
                    args[1] = args[1].clone()
                    args[1][0, 0, 0, 0] = float("nan")
                elif how == "short":
                    args = [a[:, :-1] for a in args]
                elif how == "dtype":
                    args = [a.double() for a in args]
                return attn(*args, cache=c, layer=layer, commit=commit)
            if op[0] == "commit_all":
                if not c._in_block:
                    c.begin_block()
                for layer in range(cfg.num_layers):
                    if not c._committed[layer]:
                        attn(*qkv, cache=c, layer=layer, commit=True)
                return None
            if op[0] == "end":
                f = None if feature == "mean_key" else feat
                if op[1] == "nan" and f is not None:
                    f = f.clone()
                    f[0, 1] = float("nan")
                elif op[1] == "none":
                    f = feat if f is None else None
                elif op[1] == "wide" and f is not None:
                    f = torch.randn(B, 5)
                return c.end_block(f)
            if op[0] == "save":
                saved[i] = copy.deepcopy(c.state_dict())
                return None
            if op[0] == "load":
                if saved[i] is None:
                    raise RuntimeError("nothing saved yet")
                return c.load_state_dict(saved[i])
            if op[0] == "reset":
                return c.reset()
            return c.check_health()

        for op in [*calls, ("commit_all",), ("end", "ok"), ("begin",), ("commit_all",),
                   ("end", "ok")]:  # fmt: skip
            qkv = [torch.randn(shape, generator=g) for _ in range(3)]
            feat = torch.randn(B, 4, generator=g)
            results = [outcome(step, c, i, op, qkv, feat) for i, c in enumerate(caches)]
            (kind_a, a), (kind_b, b) = results
            assert kind_a == kind_b and type(a) is type(b), f"{op}: naive {a!r}, auto {b!r}"
            if kind_a == "ok" and isinstance(a, torch.Tensor):
                same(a, b, torch.float32, str(op))
            assert caches[0].block == caches[1].block
        for c in caches:  # still usable, and finite
            c.check_health()
            assert torch.isfinite(c.local_k).all() and torch.isfinite(c.bank.k).all()

    groups = {
        "attention": [attention],
        "small_ops": [select, gate],
        "rope": [rope],
        "cache": [cache],
    }
    for fn in groups[group]:
        fn()
        print(f"{group}: {fn.__name__} passed", flush=True)


if __name__ == "__main__":  # pragma: no cover
    _run(sys.argv[1])
