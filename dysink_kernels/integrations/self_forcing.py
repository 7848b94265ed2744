"""DySink inside Self-Forcing's ``CausalWanModel`` and its ``CausalInferencePipeline``.

One call patches the loaded model; the pipeline's code runs unchanged::

    from dysink_kernels.integrations import self_forcing

    handle = self_forcing.enable_dysink(pipeline.generator.model)  # Self-Forcing settings
    video = pipeline.inference(noise, prompts)                   # attends through DySink

* the layer index is each ``self_attn``'s position in ``model.blocks``;
* the clean pass is the forward whose timestep is ``<= clean_timestep`` (the
  pipeline's ``context_noise``, 0); ``with handle.clean_pass():`` says it without
  reading the timestep on the host;
* a second ``inference`` on the same pipeline (which replaces the index tensors of
  its KV dicts) starts a new stream on the same cache;
* ``independent_first_frame`` (a 1-frame first block, image-to-video) is read from
  the model;
* :func:`~dysink_kernels.integrations.kv_cache_adapter.tiny_kv_cache` assigned to
  ``pipeline.kv_cache1`` before the first ``inference`` keeps the upstream K/V
  buffers from being allocated (about 6 GB at 32,760 tokens x 30 layers in bf16).

With the default preset (``DySinkConfig.self_forcing``: ``top_k=0``) outputs equal
Self-Forcing's. Memory on (``top_k > 0``, e.g. ``DySinkConfig.dysink`` settings)
follows the package's protocol; blocks end by themselves with ``feature="mean_key"``,
otherwise call ``handle.end_block(feature)`` after each block's clean pass.
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
    bank_slots: int | None = None,
    cache_kwargs: dict | None = None,
    **config_overrides: Any,
) -> CausalWanHandle:
    """Patch a loaded Self-Forcing ``CausalWanModel`` to attend through a ``DySinkCache``.

    Args:
        model: the ``CausalWanModel`` (``pipeline.generator.model``).
        cache: a cache to use (its config must equal the derived one); default: built
            at the first forward from the KV list's batch, device and dtype.
        tokens_per_frame: latent tokens per frame (1560 at 480x832).
        clean_timestep: forwards whose timesteps are all ``<=`` this are clean passes.
        bank_slots, cache_kwargs: ``DySinkCache`` arguments when the cache is built here
            (``bank_dtype``, ``backend``, ...).
        config_overrides: ``DySinkConfig`` fields over ``DySinkConfig.self_forcing`` and
            what the model says (blocks, window, sinks).

    Returns the :class:`CausalWanHandle` (``.cache``, ``.clean_pass()``, ``.remove()``).
    """
    cfg, first = config_for_model(
        model, DySinkConfig.self_forcing, tokens_per_frame, **config_overrides
    )
    return CausalWanHandle(
        model, cfg, cache=cache, first_block_frames=first, clean_timestep=clean_timestep,
        bank_slots=bank_slots, cache_kwargs=cache_kwargs,
    )  # fmt: skip
