"""Adapters that put DySink into existing video models.

* :mod:`.diffusers_wan`: processors for diffusers' ``WanTransformer3DModel`` and a
  block-by-block few-step sampler (needs ``diffusers``, imported only by the caller).
* :mod:`.self_forcing`, :mod:`.longlive`: ``enable_dysink(model)`` patches a loaded
  Self-Forcing / LongLive ``CausalWanModel``; their pipelines run unchanged.
* :mod:`.kv_cache_adapter`: the list-of-dicts KV cache of Self-Forcing, LongLive and
  the DySink reference code, mapped onto ``DySinkCache``/``SinkAttention``.

Nothing here imports diffusers; import the submodules directly.
"""
