"""Build script: the Python package plus the optional C++/CUDA extension in csrc/.

``dysink_kernels._C`` is built with torch's build helpers when torch is importable at
build time (``pip install --no-build-isolation``) and a C++ compiler is found: the C++
CPU ops always, the CUDA kernels too when torch has CUDA and ``nvcc`` is found. When
it cannot be built, or its build fails, a pure Python package is installed and the
reason is printed (``pip install -v`` shows it). Metadata and the version stay in
pyproject.toml (``dysink_kernels._version``).

Environment switches, like flash-attn's:
  DYSINK_FORCE_BUILD=1      a missing toolchain or a failed build is an error
  DYSINK_SKIP_CUDA_BUILD=1  build the C++ CPU extension only
  DYSINK_CUDA_ARCHS=80;90a  GPU architectures (the default), each compiled to SASS
  MAX_JOBS=N                parallel compile jobs (read by torch's ninja build)
No hardware is queried and nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from glob import glob

from setuptools import setup

EXT_NAME = "dysink_kernels._C"
CPU_SOURCES = ["csrc/bindings.cpp", "csrc/cpu_attention.cpp", "csrc/cpu_ops.cpp"]
CUDA_SOURCES = sorted(glob("csrc/*.cu"))
HEADERS = sorted(glob("csrc/*.h") + glob("csrc/*.cuh"))
DEFAULT_CUDA_ARCHS = "80;90a"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


FORCE_BUILD = env_flag("DYSINK_FORCE_BUILD")
SKIP_CUDA_BUILD = env_flag("DYSINK_SKIP_CUDA_BUILD")


def log(message: str) -> None:
    print(f"dysink_kernels setup: {message}", file=sys.stderr, flush=True)


def give_up(reason: str) -> None:
    """No extension: fatal under DYSINK_FORCE_BUILD, else a pure Python install."""
    if FORCE_BUILD:
        raise RuntimeError(f"DYSINK_FORCE_BUILD=1 but the extension cannot be built: {reason}")
    log(f"installing without the C++/CUDA extension: {reason}")


def gencode_flags(archs: str) -> list[str]:
    """``"80;90a"`` -> ``-gencode=arch=compute_80,code=sm_80 ...`` (``;`` or ``,``)."""
    flags = []
    for arch in re.split(r"[;,\s]+", archs.strip()):
        if not arch:
            continue
        if not re.fullmatch(r"\d+[af]?", arch):
            raise ValueError(f"DYSINK_CUDA_ARCHS: {arch!r} is not like 80, 90a or 100f")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    if not flags:
        raise ValueError("DYSINK_CUDA_ARCHS names no architecture")
    return flags


def cxx_found() -> bool:
    if os.name == "nt":
        return shutil.which("cl") is not None
    compiler = os.environ.get("CXX", "c++").split()
    return bool(compiler) and shutil.which(compiler[0]) is not None


def extension_setup() -> dict:
    """``ext_modules``/``cmdclass`` for setup(), or {} for a pure Python install."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:
        give_up(f"torch is not importable at build time ({err}); "
                "use pip install --no-build-isolation with torch installed")  # fmt: skip
        return {}
    if not cxx_found():
        give_up("no C++ compiler found (set CXX)")
        return {}

    cxx_flags = ["-O3"] if os.name == "nt" else ["-O3", "-fopenmp-simd"]
    cpu_ext = cpp_extension.CppExtension(
        EXT_NAME, CPU_SOURCES, extra_compile_args={"cxx": cxx_flags}, depends=HEADERS
    )
    ext = cpu_ext
    if SKIP_CUDA_BUILD:
        log("DYSINK_SKIP_CUDA_BUILD=1: building the C++ CPU extension only")
    elif torch.version.cuda is None:
        log(f"torch {torch.__version__} has no CUDA: building the C++ CPU extension only")
    elif cpp_extension.CUDA_HOME is None:
        reason = "nvcc not found (set CUDA_HOME)"
        if FORCE_BUILD:
            raise RuntimeError(f"DYSINK_FORCE_BUILD=1 but {reason}")
        log(f"{reason}: building the C++ CPU extension only")
    else:
        archs = os.environ.get("DYSINK_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        log(f"building the CUDA extension for {archs} with {cpp_extension.CUDA_HOME}")
        ext = cpp_extension.CUDAExtension(
            EXT_NAME,
            CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("DYSINK_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", *gencode_flags(archs)],
            },
            depends=HEADERS,
        )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Falls back from CUDA to CPU, then to no extension, unless DYSINK_FORCE_BUILD."""

        def run(self) -> None:
            # run() replaces the compiler option by a compiler object; a retry needs the option.
            compiler_option = self.compiler
            attempts = ["CUDA", "C++ CPU"] if ext is not cpu_ext else ["C++ CPU"]
            for i, what in enumerate(attempts):
                if what == "C++ CPU" and ext is not cpu_ext:
                    # Turn the prepared extension into the CPU one: setuptools keeps its
                    # own bookkeeping on the object given to setup().
                    ext.__dict__.update(
                        {k: v for k, v in vars(cpu_ext).items() if not k.startswith("_")}
                    )
                self.compiler = compiler_option
                try:
                    super().run()
                    return
                except Exception as err:
                    if FORCE_BUILD:
                        raise
                    log(f"building the {what} extension failed: {err}")
                    if i + 1 < len(attempts):
                        log("retrying with the C++ CPU extension alone")
            # A stale binary from an earlier build must not be packaged or imported.
            stale = self.get_ext_fullpath(EXT_NAME)
            if os.path.exists(stale):
                os.remove(stale)
            self.extensions = []
            give_up("the build failed (see above)")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt}}


setup(**extension_setup())
