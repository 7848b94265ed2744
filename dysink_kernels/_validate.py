"""Input checks for the public boundary.

Metadata checks (rank, shapes, dtypes, devices) cost nothing and always run.
Value checks (index ranges) read tensor contents: on CPU tensors they are plain
host comparisons and raise ``IndexError``; on accelerator tensors they are
enqueued as device-side asserts (``torch._assert_async``), so they never stall
the host; while ``torch.compile`` traces they are left out. Internal callers
(the module's per-block path) build indices themselves and skip them.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def canonical_device(device: torch.device | str | None) -> torch.device:
    """``"cuda"`` -> ``cuda:<current>``: tensors always report an index, so comparisons
    against a user-given device must use the same form. ``None`` means the CPU."""
    if device is None:
        return torch.device("cpu")
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        return torch.empty(0, device=device).device
    return device


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(
    t: object,
    name: str,
    ndim: int,
    dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of rank ``ndim`` with an allowed dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {dtype_name(t.dtype)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    return t


def check_dim(t: torch.Tensor, name: str, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name}.shape[{dim}] ({what}) must be {expected}, got {t.shape[dim]} "
            f"(shape {tuple(t.shape)})"
        )


def check_positive_number(x: object, name: str) -> None:
    """``x`` must be a finite real number ``> 0`` (not a bool)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")


def check_count(x: object, name: str) -> int:
    """``x`` must be an ``int >= 0`` (not a bool); returns it."""
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"{name} must be an int >= 0, got {x!r}")
    return x


def check_same_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    items = list(tensors.items())
    dtype = items[0][1].dtype
    for name, t in items[1:]:
        if t.dtype != dtype:
            raise TypeError(
                f"{name} has dtype {dtype_name(t.dtype)} but {items[0][0]} has "
                f"{dtype_name(dtype)}; all must match"
            )
    return dtype


def _values_checkable() -> bool:
    """Value checks run eagerly; under torch.compile they are left out of the graph."""
    return not torch.compiler.is_compiling()


def check_index_range(t: torch.Tensor, name: str, lo: int, hi: int) -> None:
    """Every element of ``t`` must lie in ``[lo, hi]`` (inclusive)."""
    if t.numel() == 0 or not _values_checkable():
        return
    if t.device.type == "cpu":
        t_min, t_max = int(t.min()), int(t.max())  # ok: host (CPU tensor, no device)
        if t_min < lo or t_max > hi:
            bad = t_min if t_min < lo else t_max
            raise IndexError(f"{name} holds {bad}, outside the valid range [{lo}, {hi}]")
    else:
        torch._assert_async(
            ((t >= lo) & (t <= hi)).all(), f"{name} holds a value outside [{lo}, {hi}]"
        )


def check_not_above(lo: torch.Tensor, hi: torch.Tensor, name_lo: str, name_hi: str) -> None:
    """Every ``lo[i] <= hi[i]`` (host check for CPU tensors, device assert otherwise)."""
    if lo.numel() == 0 or not _values_checkable():
        return
    ok = (lo <= hi).all()
    if lo.device.type == "cpu":
        if not bool(ok):  # ok: host (CPU tensor, no device)
            raise ValueError(f"{name_lo} must be <= {name_hi} element-wise")
    else:
        torch._assert_async(ok, f"{name_lo} must be <= {name_hi} element-wise")


def check_prefix_len(
    k_len: torch.Tensor | None, k: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """``k_len (B,)``: how many leading keys of ``k (B, Sk, ...)`` are valid, each in
    ``[0, Sk]``; ``None`` means all ``Sk`` (returned as an int32 tensor)."""
    B, Sk = k.shape[:2]
    if k_len is None:
        return torch.full((B,), Sk, dtype=torch.int32, device=device)
    check_tensor(k_len, "k_len", 1, INDEX_DTYPES, device=device)
    check_dim(k_len, "k_len", 0, B, "batch")
    check_index_range(k_len, "k_len", 0, Sk)
    return k_len


def check_finite(t: torch.Tensor, name: str) -> None:
    """``t`` must hold no NaN or Inf (device-side assert off the CPU)."""
    if t.numel() == 0 or not _values_checkable():
        return
    ok = torch.isfinite(t).all()
    if t.device.type == "cpu":
        if not bool(ok):  # ok: host (CPU tensor, no device)
            raise ValueError(f"{name} contains NaN or Inf")
    else:
        torch._assert_async(ok, f"{name} contains NaN or Inf")
