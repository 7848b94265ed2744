"""DySink inside LongLive's ``CausalWanModel`` (and the DySink code built on it).

One call patches the loaded model; LongLive's pipelines run unchanged::

    from dysink_kernels.integrations import longlive

    handle = longlive.enable_dysink(pipeline.generator.model)  # sink 3, window 12
    video = pipeline.inference(noise, prompts, ...)

Besides what :mod:`.self_forcing` does (layer index from module order, clean pass from
the timestep or ``handle.clean_pass()``, new streams, tiny upstream K/V dicts):

* each self-attention returns ``(x, (current_end, local_end_index, None))`` as
  LongLive's does; ``_apply_cache_updates`` then only moves the dicts' indices (the
  K/V live in the ``DySinkCache``);
* the prompt-switch recache (``_recache_after_switch``: one clean forward over the
  last ``min(local_attn_size, c)`` frames from an earlier frame) re-encodes the
  window: every recached frame attends all of them, as LongLive's KV-cache path does
  (it prepares a block-causal mask that this path does not apply;
  ``block_causal_recache=True`` applies it), and with ``sink_recache_after_switch``
  (``global_sink: false``, the default) the first ``sink_size`` recached frames
  become the static sinks, as in LongLive.

Defaults are LongLive's settings (``DySinkConfig.longlive``: ``sink_frames=3``,
``local_frames=12``, ``top_k=0``, the gate off because LongLive never gates its
sinks): outputs then equal LongLive's. ``top_k > 0`` (the DySink settings) follows
the package's protocol.
"""

from __future__ import annotations

from typing import Any

from ..cache import DySinkCache
from ..config import DySinkConfig
from ._causal_wan import CausalWanHandle, config_for_model

__all__ = ["CausalWanHandle", "enable_dysink"]


def enable_dysink(
    model: Any,
    cache: DySinkCache | None = None,
    *,
    tokens_per_frame: int = 1560,
    clean_timestep: float = 0.0,
    block_causal_recache: bool = False,
    bank_slots: int | None = None,
    cache_kwargs: dict | None = None,
    **config_overrides: Any,
) -> CausalWanHandle:
    """Patch a loaded LongLive ``CausalWanModel`` to attend through a ``DySinkCache``.

    Arguments as :func:`dysink_kernels.integrations.self_forcing.enable_dysink`, over
    ``DySinkConfig.longlive``; ``block_causal_recache`` makes the prompt-switch recache
    block-causal instead of LongLive's full attention among the recached frames.
    """
    cfg, first = config_for_model(
        model, DySinkConfig.longlive, tokens_per_frame, **config_overrides
    )
    return CausalWanHandle(
        model, cfg, cache=cache, first_block_frames=first, returns_indices=True,
        clean_timestep=clean_timestep, block_causal_recache=block_causal_recache,
        bank_slots=bank_slots, cache_kwargs=cache_kwargs,
    )  # fmt: skip
