"""Tooling around the library: the demo, tiny models, diagnostics and the kernel report.

Nothing here is loaded by ``import dysink_kernels`` or ``dysink_kernels.sink_attention``.
"""
