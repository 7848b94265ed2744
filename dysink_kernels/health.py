"""Health of a cache: non-finite values caught on the device, checkpoints checked
before they are loaded.

``CacheHealth`` keeps three per-sample device flags for the block in progress:

* row 0: a call's ``q``, ``k`` or ``v`` held NaN or Inf (its output is not finite);
* row 1: the K/V committed by a clean pass held NaN or Inf;
* row 2: the block's feature held NaN or Inf.

The attention calls only fold the largest magnitude of their inputs (and of committed
K/V) into per-sample maxima, NaN or Inf exactly when a value was not finite, from which
rows 0 and 1 are read (device ops, no host read, safe inside a CUDA graph).
``end_block`` copies the flags into pinned host memory after an event and clears
them; the host reads a copy once its event has completed, at a later
``begin_block``/``attend``/``end_block``, and raises :class:`NonFiniteError`.
``check_health()`` waits for the copies and also reads the block in progress.

What the cache does with such a block: non-finite K/V elements of a clean pass are
written to the window as 0 (later blocks attend finite values), and the block is not
stored in the bank for that sample and its feature is not used for retrieval.

``check_cache_state`` validates a ``DySinkCache.state_dict()`` completely before a
load changes anything; ``check_device`` and ``bank_slots_for`` check the cache's
constructor arguments (devices that exist, a bank that fits).
"""

from __future__ import annotations

import math
import os
from collections import deque
from typing import TYPE_CHECKING

import torch

from . import _cuda
from ._validate import canonical_device

if TYPE_CHECKING:
    from .cache import DySinkCache
    from .config import DySinkConfig

__all__ = [
    "DEFAULT_BANK_SLOTS",
    "MAX_BANK_SLOTS",
    "CacheHealth",
    "NonFiniteError",
    "bank_slots_for",
    "check_cache_state",
    "check_device",
    "check_state_tensor",
]

DEFAULT_BANK_SLOTS = 32
MAX_BANK_SLOTS = 1 << 16  # per sample: 65,536 blocks, about 3.4 hours of 16 fps video

_CHUNK = 1 << 24  # elements per finiteness check (bounds the temporary's memory)

_WHAT = (
    "q, k or v of an attention call of block {block} held NaN or Inf for sample(s) {bad}: "
    "those calls' outputs are not finite",
    "the K/V committed in block {block} held NaN or Inf for sample(s) {bad}: those values "
    "were written to the window as 0 and the block was not stored in the bank",
    "the feature of block {block} holds NaN or Inf for sample(s) {bad}: that block was not "
    "stored in the bank and its feature is not used for retrieval",
)


class NonFiniteError(ValueError):
    """NaN or Inf reached the cache (call inputs, committed K/V or a block feature)."""


def _max_abs(x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` largest magnitude in each (non-empty) row of ``x``: NaN or +Inf exactly
    when the row holds a non-finite value (a max propagates NaN and cannot overflow)."""
    return x.abs().amax(dim=tuple(range(1, x.dim())))


def _not_finite(max_abs: torch.Tensor) -> torch.Tensor:
    """Whether each of ``_max_abs``'s magnitudes is NaN or Inf."""
    return (max_abs < math.inf).logical_not_()


def _bad_rows(x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: whether each row of ``x`` holds a non-finite value."""
    if math.prod(x.shape[1:]) == 0:  # empty rows hold nothing non-finite
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    return _not_finite(_max_abs(x))


class CacheHealth:
    """Per-sample non-finite flags of the block in progress and their reports."""

    def __init__(self, batch: int, device: torch.device) -> None:
        # Largest magnitude per sample in this block's call inputs and committed K/V.
        self._largest = torch.zeros(2, batch, dtype=torch.float32, device=device)
        self._call_largest, self._kv_largest = self._largest.unbind(0)
        self._flags = torch.zeros(3, batch, dtype=torch.bool, device=device)
        self._feature_flags = self._flags[2]
        self._pin = device.type == "cuda"
        # On CPU with the extension built: torch.ops.dysink_C.fold_max_abs, the running
        # maxima above updated in one pass per tensor (the same values as _max_abs and
        # torch.maximum, NaN kept).
        self._fold = (
            _cuda.ops().fold_max_abs if device.type == "cpu" and _cuda.available(device) else None
        )
        self._free: list[torch.Tensor] = []
        self._pending: deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = deque()

    @property
    def flags(self) -> torch.Tensor:
        """``(3, B)`` bool device flags of the block in progress (rows as in the module
        docstring), brought up to date at each read."""
        torch.logical_not(self._largest < math.inf, out=self._flags[:2])
        return self._flags

    def check_call(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, commit: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flag non-finite inputs of one call; a clean pass's K/V come back with
        non-finite elements set to 0 (what the window keeps). Every sample's ``q``,
        ``k`` and ``v`` must hold at least one element."""
        if self._fold is not None:  # one C++ pass per tensor (CPU)
            self._fold(self._call_largest, [q, k, v])
            if not commit:
                return k, v
            self._fold(self._kv_largest, [k, v])
        else:
            kv_max = torch.maximum(_max_abs(k), _max_abs(v))
            call_max = torch.maximum(_max_abs(q), kv_max)
            torch.maximum(self._call_largest, call_max, out=self._call_largest)
            if not commit:
                return k, v
            torch.maximum(self._kv_largest, kv_max, out=self._kv_largest)
        zero = dict(nan=0.0, posinf=0.0, neginf=0.0)
        return torch.nan_to_num(k, **zero), torch.nan_to_num(v, **zero)

    def refuse(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flag a non-finite block feature.

        Returns:
            The feature with the rows of samples whose committed K/V were not finite
            set to NaN (the bank does not store those), and ``(B,)`` bool: which of
            its rows are finite.
        """
        bad = _bad_rows(feature)
        self._feature_flags.copy_(bad)
        kv_bad = _not_finite(self._kv_largest)
        refused = torch.where(kv_bad[:, None], float("nan"), feature)
        return refused, bad.logical_or_(kv_bad).logical_not_()

    def report(self, block: int) -> None:
        """Send the block's flags to the host (no wait) and clear them."""
        host = self._free.pop() if self._free else torch.empty_like(self.flags, device="cpu")
        if self._pin and not host.is_pinned():
            host = host.pin_memory()
        host.copy_(self.flags, non_blocking=self._pin)
        event = None
        if self._pin:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((block, host, event))
        self._zero()

    def raise_if_reported(self, wait: bool = False) -> None:
        """Raise :class:`NonFiniteError` for the oldest completed report that found
        something; with ``wait``, wait for every report in flight."""
        if self._pin and not wait and torch.cuda.is_current_stream_capturing():
            return
        while self._pending:
            block, host, event = self._pending[0]
            if event is not None:
                if wait:
                    event.synchronize()
                elif not event.query():
                    return
            self._pending.popleft()
            self._free.append(host)
            message = _describe(host, block)
            if message:
                raise NonFiniteError(message)

    def raise_if_flagged(self, block: int) -> None:
        """Read the flags of the block in progress (a synchronisation) and raise."""
        message = _describe(self.flags.cpu(), block)  # ok: host (check_health only)
        if message:
            raise NonFiniteError(message + " (block in progress)")

    def _zero(self) -> None:
        self._largest.zero_()
        self._flags.zero_()

    def clear(self) -> None:
        """Forget the flags and any report in flight (after loading a checkpoint)."""
        self._zero()
        while self._pending:
            self._free.append(self._pending.popleft()[1])


def _describe(flags: torch.Tensor, block: int) -> str:
    rows = flags.numpy().tolist()  # ok: host
    parts = []
    for what, row in zip(_WHAT, rows):
        bad = [i for i, flag in enumerate(row) if flag]
        if bad:
            parts.append(what.format(block=block, bad=bad))
    return "; ".join(parts)


# ----------------------------------------------------------- checkpoint checks
def _all_finite(t: torch.Tensor) -> bool:
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        if part.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            part = part.float()
        if not bool(torch.isfinite(part).all()):  # ok: host (checkpoint load)
            return False
    return True


def check_state_tensor(
    name: str,
    value: object,
    like: torch.Tensor,
    *,
    finite: bool = False,
    optional: bool = False,
) -> torch.Tensor | None:
    """Check one state entry against the buffer it will be copied into: a tensor of
    the same shape and dtype, on the CPU or the buffer's device, finite if asked."""
    if value is None and optional:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state {name} must be a tensor, got {type(value).__name__}")
    if value.shape != like.shape:
        raise ValueError(
            f"state {name} has shape {tuple(value.shape)}, this cache needs {tuple(like.shape)}"
        )
    if value.dtype != like.dtype:
        raise TypeError(f"state {name} has dtype {value.dtype}, this cache needs {like.dtype}")
    if value.layout != torch.strided or value.device not in (torch.device("cpu"), like.device):
        raise ValueError(
            f"state {name} is on {value.device} ({value.layout}); load it on the CPU or on "
            f"{like.device} (torch.load(..., map_location=...))"
        )
    if finite and not _all_finite(value):
        raise ValueError(f"state {name} holds NaN or Inf")
    return value


def _host_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"state {name} must be an int >= {minimum}, got {value!r}")
    return value


def check_cache_state(cache: DySinkCache, state: object) -> None:
    """Validate ``state`` for ``cache.load_state_dict`` without changing anything:
    keys, config, shapes, dtypes, devices, finiteness, counters and the bank's
    invariants. Raises ``ValueError``/``TypeError`` naming the entry."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
    expected = set(cache.state_dict())
    missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unknown:
        raise ValueError(f"state keys differ: missing {missing}, unknown {unknown}")
    c = cache.config
    mine, theirs = c.to_dict(), state["config"]
    if not isinstance(theirs, dict):
        raise TypeError(f"state['config'] must be a dict, got {type(theirs).__name__}")
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        raise ValueError(
            "state was saved from another DySinkConfig; differing fields: "
            + ", ".join(f"{k} (saved {theirs.get(k)!r}, here {mine.get(k)!r})" for k in diff)
        )
    if state["batch_size"] != cache.batch_size or state["dtype"] != str(cache.dtype):
        raise ValueError(
            f"state has batch_size={state['batch_size']}, dtype={state['dtype']}; this cache "
            f"has batch_size={cache.batch_size}, dtype={cache.dtype}"
        )
    block = _host_int("['block']", state["block"], 0)
    frame = check_state_tensor("['frame_dev']", state["frame_dev"], cache.frame_dev)
    if int(frame) != block * c.frames_per_block:  # ok: host (checkpoint load)
        raise ValueError(
            f"state ['frame_dev'] is {int(frame)} but block {block} starts at frame "  # ok: host
            f"{block * c.frames_per_block}"
        )
    for name in ("local_k", "local_v", "frame_ksum"):
        check_state_tensor(f"[{name!r}]", state[name], getattr(cache, name), finite=True)
    tracker = cache.anomaly_tracker
    check_state_tensor("['ent_mean']", state["ent_mean"], tracker.mean, finite=True)
    var = check_state_tensor("['ent_var']", state["ent_var"], tracker.var, finite=True)
    if bool((var < 0).any()):  # ok: host (checkpoint load)
        raise ValueError("state ['ent_var'] holds negative variances")
    updates = state["ent_updates"]
    if not isinstance(updates, (list, tuple)) or len(updates) != c.num_layers:
        raise TypeError(f"state ['ent_updates'] must be a list of {c.num_layers} ints")
    for i, n in enumerate(updates):
        _host_int(f"['ent_updates'][{i}]", n, 0)
    feature_dim = cache.bank.check_state(state["bank"], frame_end=block * c.frames_per_block)
    recent = state["recent_feat"]
    if recent is not None:
        dim = recent.shape[-1] if isinstance(recent, torch.Tensor) and recent.dim() == 3 else 1
        if feature_dim is not None and dim != feature_dim:
            raise ValueError(
                f"state ['recent_feat'] has {dim} feature dims, its bank {feature_dim}"
            )
        like = cache.recent_feat
        if like is None:
            like = torch.empty(
                cache.batch_size, c.query_blocks, dim, dtype=torch.float32, device=cache.device
            )
        check_state_tensor("['recent_feat']", recent, like, finite=True)


# ------------------------------------------------------ constructor arguments
def check_device(name: str, device: object) -> torch.device | None:
    """``None``, or a CPU or present CUDA device in ``canonical_device`` form."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name}={device!r} is not a device: {err}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index or 0) >= count:
            raise ValueError(f"{name}={device!r}: this machine has {count} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"{name} must be a CPU or CUDA device, got {device!r}")
    return canonical_device(dev)


def bank_slots_for(
    config: DySinkConfig,
    batch_size: int,
    bank_slots: object,
    max_bank_bytes: object,
    bank_dtype: torch.dtype,
    storage: torch.device | None,
) -> int:
    """Slots per sample of a cache's bank from its arguments, checked: at most
    ``MAX_BANK_SLOTS`` and no more bytes than the memory of ``storage``. A budget in
    bytes gives at most ``config.max_entries`` slots (the cap never uses more)."""
    entry = 2 * config.num_layers * config.block_tokens * config.num_heads * config.head_dim
    entry *= torch.empty(0, dtype=bank_dtype).element_size()
    arg = "bank_slots" if bank_slots is not None else "config.max_entries"
    if max_bank_bytes is not None:
        if bank_slots is not None:
            raise ValueError("give bank_slots or max_bank_bytes, not both")
        if isinstance(max_bank_bytes, bool) or not isinstance(max_bank_bytes, (int, float)):
            raise ValueError(f"max_bank_bytes must be a number > 0, got {max_bank_bytes!r}")
        if not 0 < max_bank_bytes < float("inf"):
            raise ValueError(f"max_bank_bytes must be finite and > 0, got {max_bank_bytes!r}")
        arg = "max_bank_bytes"
        bank_slots = int(max_bank_bytes) // (entry * batch_size)
        if bank_slots < max(config.top_k, 1):
            raise ValueError(
                f"max_bank_bytes={max_bank_bytes} holds {bank_slots} entries per sample "
                f"({entry} bytes each, batch {batch_size}); top_k={config.top_k} needs more"
            )
        bank_slots = min(bank_slots, config.max_entries or bank_slots)
    if bank_slots is None:  # nothing retrieves from the bank when top_k == 0
        bank_slots = 0 if config.top_k == 0 else config.max_entries or DEFAULT_BANK_SLOTS
    if isinstance(bank_slots, bool) or not isinstance(bank_slots, int) or bank_slots < 0:
        raise ValueError(f"bank_slots must be an int >= 0, got {bank_slots!r}")
    if bank_slots > MAX_BANK_SLOTS:
        raise ValueError(
            f"{arg} gives {bank_slots} bank slots per sample, more than MAX_BANK_SLOTS="
            f"{MAX_BANK_SLOTS} (retrieval scans every slot at each block); set "
            "config.max_entries or a smaller value"
        )
    if storage is not None and storage.type == "cuda":
        total = torch.cuda.get_device_properties(storage).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if entry * batch_size * bank_slots > total:
        raise ValueError(
            f"{arg} gives a bank of {entry * batch_size * bank_slots / 2**30:.1f} GiB of K/V, "
            f"more than the {total / 2**30:.1f} GiB of {storage or 'the CPU'}"
        )
    if config.top_k > 0 and bank_slots == 0:
        raise ValueError("bank_slots must be > 0 when top_k > 0")
    cap = min(bank_slots, config.max_entries or bank_slots)
    if config.top_k > cap:
        raise ValueError(
            f"top_k ({config.top_k}) exceeds the bank's capacity per sample ({cap}): the "
            "window would stay widened forever; raise bank_slots/max_entries or lower top_k"
        )
    return bank_slots
