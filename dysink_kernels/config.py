"""DySinkConfig: every knob of the DySink protocol, with the paper's defaults."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["DySinkConfig"]

GATE_SCOPES = ("batch", "sample")
FEATURES = ("external", "mean_key")
EXCLUDES = ("reference", "window")
WINDOW_SCOPES = ("batch", "sample")
SINK_ROPES = ("original", "relative")
GATE_MODES = ("consensus", "entropy", "both")
EVICTIONS = ("fifo", "least_relevant")
GATE_PRECISIONS = ("fp32", "input")


def _positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _number(
    name: str,
    value: object,
    lo: float,
    hi: float = math.inf,
    *,
    open_lo: bool = False,
    open_hi: bool = False,
) -> None:
    """Refuse anything but a finite real number in ``[lo, hi]`` (open ends on request)."""
    span = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi or hi == math.inf else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in {span}, got {value!r}")
    x = float(value)
    below = x < lo or (open_lo and x == lo)
    above = x > hi or (open_hi and x == hi)
    if not math.isfinite(x) or below or above:
        raise ValueError(f"{name} must be a finite number in {span}, got {value!r}")


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class DySinkConfig:
    """Configuration of the DySink per-block protocol (README: protocol and Configuration).

    Model shape (no defaults, nothing hard-coded to Wan2.1-1.3B):
        num_layers, num_heads, head_dim: attention layers and their head layout.
        tokens_per_frame: latent tokens per frame (Wan2.1 at 480x832: 1560).

    Protocol (paper defaults):
        frames_per_block: latent frames generated per block (3).
        local_frames: ``L``, frames of the attention window including the current
            block (9). With static sinks the sink frames count against it, as
            LongLive's ``local_attn_size`` does (``sink_frames=3, local_frames=12``
            attends 3 sink frames and 9 window frames).
        sink_frames: static sink frames pinned from the start of the video (0 in
            DySink; LongLive uses 3). Must be a multiple of ``frames_per_block``.
        top_k: bank entries retrieved per block (2); 0 gives a pure window.
        tau: gate threshold: an entry is dropped when the fraction of voting
            heads that prefer it over the window is ``> tau`` (0.8).
        dedup: a block is not stored when its feature's max cosine against the
            sample's stored entries is ``> dedup`` (0.95); in ``[0, 1]``; ``None`` (or 1)
            stores all.
        max_entries: per-sample bank cap with FIFO eviction (``None``: the
            cache's slot capacity is the cap).
        gate: run the sink anomaly gate (the reference's ``sink_anomaly_gate``).
        gate_scope: ``"batch"`` (reference) or ``"sample"``; see ``sink_gate``.
        window_scope: how the window widens while banks hold fewer than
            ``top_k`` entries: ``"batch"`` (reference: one window for the batch,
            from its smallest bank) or ``"sample"`` (each sample from its own bank;
            with ``gate_scope="sample"`` a batch then equals separate runs).
        exclude: ``"reference"`` excludes frames ``[c - L_eff, c)`` from retrieval
            (one block more than the window holds, as the published code does);
            ``"window"`` excludes only the frames the window holds.
        feature: ``"external"`` (the caller passes a feature per block to
            ``end_block``) or ``"mean_key"`` (the L2-normalised per-head mean keys
            of ``feature_layer``, no encoder needed).
        feature_layer: layer whose mean keys form the ``"mean_key"`` feature
            (default ``num_layers // 2``).
        stats: compute ``lse``/``entropy``/``slot_mass`` on every call.
        softmax_scale: attention scale (default ``1/sqrt(head_dim)``).

    Beyond the paper (README: "Beyond the paper"):
        sink_rope: ``"original"`` (retrieved keys keep their RoPE phases, as the paper)
            or ``"relative"``: they are attended as if their block sat ``sink_distance``
            frames before the current block (the kernel turns their temporal RoPE
            pairs while loading; the bank is not rewritten).
        sink_distance: frames between the current block's first frame and a
            re-positioned entry's first frame (default ``local_frames - sink_frames``:
            just before the steady window).
        rope_theta: RoPE base of the model (Wan: 10000), finite and ``> 0``.
        gate_mode: ``"consensus"`` (the paper's vote, default), ``"entropy"`` (the
            entropy-anomaly gate alone) or ``"both"`` (drop when either says so).
            The entropy gate drops a slot for the next denoising call of a layer when
            the heads' attention entropy falls below its running mean minus
            ``anomaly_z`` standard deviations while the slot draws at least
            ``anomaly_min_mass`` of the attention, or when the heads' sink mass
            collapses onto the slot (mean ``> anomaly_min_mass`` with a coefficient
            of variation across heads ``< anomaly_min_cv``). Needs ``stats``.
        anomaly_z, anomaly_decay, anomaly_warmup, anomaly_min_mass, anomaly_min_cv:
            parameters of the entropy gate (EMA decay of the per-head entropy
            statistics, calls before the z-test is trusted).
        eviction: when a sample's bank is full, evict its oldest entry (``"fifo"``, the
            reference) or the one with the least usage (``"least_relevant"``; ties go to
            the oldest). Usage is each entry's attention mass (mean over heads and
            queries of ``slot_mass``) summed over the calls that attended it, multiplied
            by ``usage_decay`` at every block.
        relevance_mix: blends the normalised usage into retrieval scores:
            ``(1 - mix) * cosine + mix * usage / max_usage_of_the_sample`` (0 = paper).
        usage_decay: per-block decay of the usage (``(0, 1]``).

    Precision:
        gate_precision: ``"fp32"`` (default): the gate's mean query, mean keys and
            scores in fp32; ``"input"``: rounded to the run dtype at each of those
            stages, as the published code computes them in bf16 (near-equal scores
            round equal and do not vote). Equal to ``"fp32"`` in fp32 runs.

    Presets: :meth:`self_forcing`, :meth:`longlive` and :meth:`dysink` hold the
    published settings of each code base (see the README's table).
    """

    num_layers: int
    num_heads: int
    head_dim: int
    tokens_per_frame: int
    frames_per_block: int = 3
    local_frames: int = 9
    sink_frames: int = 0
    top_k: int = 2
    tau: float = 0.8
    dedup: float | None = 0.95
    max_entries: int | None = None
    gate: bool = True
    gate_scope: str = "batch"
    window_scope: str = "batch"
    exclude: str = "reference"
    feature: str = "external"
    feature_layer: int | None = None
    stats: bool = True
    softmax_scale: float | None = None
    sink_rope: str = "original"
    sink_distance: int | None = None
    rope_theta: float = 10000.0
    gate_mode: str = "consensus"
    anomaly_z: float = 2.0
    anomaly_decay: float = 0.9
    anomaly_warmup: int = 8
    anomaly_min_mass: float = 0.1
    anomaly_min_cv: float = 0.05
    eviction: str = "fifo"
    relevance_mix: float = 0.0
    usage_decay: float = 0.9
    gate_precision: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "head_dim", "tokens_per_frame", "frames_per_block"):
            _positive_int(name, getattr(self, name))
        _positive_int("local_frames", self.local_frames)
        _positive_int("sink_frames", self.sink_frames, 0)
        _positive_int("top_k", self.top_k, 0)
        if self.sink_frames % self.frames_per_block:
            raise ValueError(
                f"sink_frames ({self.sink_frames}) must be a multiple of frames_per_block "
                f"({self.frames_per_block})"
            )
        if self.local_frames - self.sink_frames < self.frames_per_block:
            raise ValueError(
                f"local_frames ({self.local_frames}) must leave at least one block "
                f"({self.frames_per_block} frames) beyond sink_frames ({self.sink_frames})"
            )
        _number("tau", self.tau, 0.0, 1.0)
        if self.dedup is not None:  # a cosine threshold; 1 never deduplicates
            _number("dedup", self.dedup, 0.0, 1.0)
        _flag("gate", self.gate)
        _flag("stats", self.stats)
        if self.max_entries is not None:
            _positive_int("max_entries", self.max_entries)
        if self.gate_scope not in GATE_SCOPES:
            raise ValueError(f"gate_scope must be one of {GATE_SCOPES}, got {self.gate_scope!r}")
        if self.window_scope not in WINDOW_SCOPES:
            raise ValueError(
                f"window_scope must be one of {WINDOW_SCOPES}, got {self.window_scope!r}"
            )
        if self.exclude not in EXCLUDES:
            raise ValueError(f"exclude must be one of {EXCLUDES}, got {self.exclude!r}")
        if self.feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {self.feature!r}")
        if self.feature_layer is not None and not (
            isinstance(self.feature_layer, int)
            and not isinstance(self.feature_layer, bool)
            and 0 <= self.feature_layer < self.num_layers
        ):
            raise ValueError(
                f"feature_layer must be in [0, {self.num_layers}), got {self.feature_layer!r}"
            )
        if self.sink_rope not in SINK_ROPES:
            raise ValueError(f"sink_rope must be one of {SINK_ROPES}, got {self.sink_rope!r}")
        if self.sink_distance is not None:
            _positive_int("sink_distance", self.sink_distance, 0)
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {self.gate_mode!r}")
        if self.gate_mode != "consensus" and not self.stats:
            raise ValueError(f'gate_mode="{self.gate_mode}" needs stats=True (it reads entropy)')
        _number("rope_theta", self.rope_theta, 0.0, open_lo=True)
        _number("anomaly_z", self.anomaly_z, 0.0)
        _number("anomaly_decay", self.anomaly_decay, 0.0, 1.0, open_hi=True)
        _number("anomaly_min_mass", self.anomaly_min_mass, 0.0, 1.0)
        _number("anomaly_min_cv", self.anomaly_min_cv, 0.0)
        _positive_int("anomaly_warmup", self.anomaly_warmup, 0)
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        _number("relevance_mix", self.relevance_mix, 0.0, 1.0)
        _number("usage_decay", self.usage_decay, 0.0, 1.0, open_lo=True)
        if (self.eviction != "fifo" or self.relevance_mix > 0) and not self.stats:
            raise ValueError("usage-aware eviction/relevance needs stats=True (it reads slot_mass)")
        if self.softmax_scale is not None:
            _number("softmax_scale", self.softmax_scale, 0.0, open_lo=True)
        if self.gate_precision not in GATE_PRECISIONS:
            raise ValueError(
                f"gate_precision must be one of {GATE_PRECISIONS}, got {self.gate_precision!r}"
            )

    # ------------------------------------------------------------------ presets
    @classmethod
    def self_forcing(
        cls, num_layers: int = 30, num_heads: int = 12, head_dim: int = 128,
        tokens_per_frame: int = 1560, **overrides,
    ) -> DySinkConfig:  # fmt: skip
        """Self-Forcing (Wan2.1-T2V-1.3B): blocks of 3 frames, no sinks, no memory.

        Its default ``local_attn_size=-1`` attends the whole 32,760-token KV buffer:
        21 frames at 1560 tokens per frame (``local_frames=21``); pass the model's
        ``local_attn_size`` as ``local_frames`` when it sets one. ``top_k=0`` (a pure
        window), gate off; ``feature="mean_key"`` so blocks end without an encoder.
        """
        base = dict(
            frames_per_block=3, local_frames=max(3, 32760 // tokens_per_frame), sink_frames=0,
            top_k=0, gate=False, feature="mean_key",
        )  # fmt: skip
        return cls(num_layers, num_heads, head_dim, tokens_per_frame, **{**base, **overrides})

    @classmethod
    def longlive(
        cls, num_layers: int = 30, num_heads: int = 12, head_dim: int = 128,
        tokens_per_frame: int = 1560, **overrides,
    ) -> DySinkConfig:  # fmt: skip
        """LongLive: ``sink_size=3`` static sink frames, ``local_attn_size=12`` (sinks
        included), blocks of 3 frames, no memory. Its static sinks are never gated,
        so ``gate=False``."""
        base = dict(
            frames_per_block=3, local_frames=12, sink_frames=3, top_k=0, gate=False,
            feature="mean_key",
        )  # fmt: skip
        return cls(num_layers, num_heads, head_dim, tokens_per_frame, **{**base, **overrides})

    @classmethod
    def dysink(
        cls, num_layers: int = 30, num_heads: int = 12, head_dim: int = 128,
        tokens_per_frame: int = 1560, **overrides,
    ) -> DySinkConfig:  # fmt: skip
        """The published DySink run (``inference_sink0_topk2``): ``local_attn_size=9``,
        no static sinks, ``top_k=2``, gate threshold 0.8, dedup 0.95, unbounded bank
        (here: the cache's ``bank_slots``), external (PE-Core) features, and the gate
        computed in the run dtype (``gate_precision="input"``) as the published code."""
        base = dict(
            frames_per_block=3, local_frames=9, sink_frames=0, top_k=2, tau=0.8, dedup=0.95,
            gate=True, gate_scope="batch", exclude="reference", feature="external",
            gate_precision="input",
        )  # fmt: skip
        return cls(num_layers, num_heads, head_dim, tokens_per_frame, **{**base, **overrides})

    @property
    def block_tokens(self) -> int:
        """Tokens of one block (= one bank entry): ``frames_per_block * tokens_per_frame``."""
        return self.frames_per_block * self.tokens_per_frame

    @property
    def query_blocks(self) -> int:
        """Recent blocks whose features query the bank: ``max(1, L // frames_per_block)``."""
        return max(1, self.local_frames // self.frames_per_block)

    @property
    def ring_frames(self) -> int:
        """Frames the window ring holds besides sinks: the widest window before the block."""
        widest = self.local_frames + self.frames_per_block * self.top_k
        return max(widest - self.sink_frames - self.frames_per_block, self.frames_per_block)

    @property
    def repositioning_distance(self) -> int:
        """Frames from the current block back to a re-positioned entry's first frame."""
        if self.sink_distance is not None:
            return self.sink_distance
        return self.local_frames - self.sink_frames

    @property
    def mean_key_layer(self) -> int:
        return self.num_layers // 2 if self.feature_layer is None else self.feature_layer

    def to_dict(self) -> dict:
        return asdict(self)
