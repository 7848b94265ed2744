"""The package's ops, one folder each, named as the op and its public function.

Each folder holds ``naive.py`` (the plain PyTorch oracle), one file per other backend
(``sdpa.py``, ``triton.py``, ``csrc.py``) and ``op.py``: the argument checks, the
``torch.library`` custom op with its fake, and the one resolution of ``backend``.
Ops and backends import neither the cache, nor the tools, nor another op's oracle.
The public names are exported by ``dysink_kernels`` itself.
"""
