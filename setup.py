"""Builds the optional compiled extension ``fastinfer._C`` from csrc/ (everything else is in pyproject.toml).

    pip install -e . --no-build-isolation      # torch must be importable while building

Build isolation hides the installed torch, so a plain ``pip install .`` builds no extension and installs the
pure-Python package (the ops registry then falls back to the torch backend and says why). Environment:

- ``FASTINFER_BUILD_EXT=0``: never build the extension.
- ``FASTINFER_BUILD_EXT=1``: the extension is required; a compile error fails the install.
- unset: build it when torch is importable; a compile error only warns (pure-Python install).

CPU sources (csrc/cpu/*.cpp) are compiled for baseline x86-64 with OpenMP; the kernels pick their AVX2 /
AVX-512 variants at run time, so the build runs on any x86-64 CPU. The CUDA kernels (csrc/cuda/*.cu and their
binding csrc/cuda/bindings_cuda.cpp) are a second extension, ``fastinfer._C_cuda``, built when torch is a CUDA
build and nvcc is found (CUDA_HOME), for the architectures in ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0");
``FASTINFER_BUILD_CUDA=0`` leaves it out. ``fastinfer.ops.registry.compiled_tiers()`` says which were built.
csrc/cuda/checks.cpp (the CUDA launchers' argument checks) is in both: ``fastinfer._C`` exposes it as the ops
``fastinfer::cuda_check_*`` so CPU tests prove it.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_home() -> str | None:
    """torch's CUDA_HOME (where nvcc lives), or None; imported only here, after torch is known to import."""
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) else None


def _extensions() -> tuple[list, dict]:
    mode = os.environ.get("FASTINFER_BUILD_EXT", "")
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        if mode == "1":
            raise
        print("fastinfer: torch is not importable at build time, so no compiled extension is built "
              "(install with --no-build-isolation to build it)", file=sys.stderr)
        return [], {}

    sources = _rel("csrc/cpu/*.cpp") + ["csrc/bindings.cpp", "csrc/cuda/checks.cpp", "csrc/cuda/check_ops.cpp"]
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-math-errno"]  # -g0: Python's -g costs ~40% build time here
    # Find torch's libraries without `import torch` first (python -c "import fastinfer._C" works alone).
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    link = ["-fopenmp", f"-Wl,-rpath,{torch_lib}"]
    common = dict(include_dirs=[os.path.join(ROOT, "csrc", "include")], extra_link_args=link,
                  optional=mode != "1")
    exts = [CppExtension("fastinfer._C", sources, extra_compile_args={"cxx": cxx}, **common)]
    cuda_home = _cuda_home()
    if torch.version.cuda and cuda_home and os.environ.get("FASTINFER_BUILD_CUDA", "1") != "0":
        from torch.utils.cpp_extension import CUDAExtension

        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"fastinfer: building the CUDA kernels (fastinfer._C_cuda) with {cuda_home} for "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
        cuda_sources = _rel("csrc/cuda/*.cu") + ["csrc/cuda/checks.cpp", "csrc/cuda/bindings_cuda.cpp"]
        nvcc = ["-O3", "--threads", "2"]  # the language standard is torch's choice
        exts.append(CUDAExtension("fastinfer._C_cuda", cuda_sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                  **common))
    else:
        why = "torch is a CPU-only build" if not torch.version.cuda else "nvcc (CUDA_HOME) was not found"
        print(f"fastinfer: CUDA kernels not built ({why}); building the CPU extension only", file=sys.stderr)

    class BuildExt(BuildExtension):
        def build_extension(self, ext):  # setuptools' `optional` misses BuildExtension's RuntimeError
            try:
                super().build_extension(ext)
            except Exception as e:
                if not getattr(ext, "optional", False):
                    raise
                print(f"fastinfer: WARNING: building {ext.name} failed ({e}); installing without it "
                      "(set FASTINFER_BUILD_EXT=1 to make this an error)", file=sys.stderr)

    return exts, {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
