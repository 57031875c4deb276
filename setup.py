"""Builds the optional compiled extension ``fastinfer._C`` from csrc/ (everything else is in pyproject.toml).

    pip install -e . --no-build-isolation      # torch must be importable while building

Build isolation hides the installed torch, so a plain ``pip install .`` builds no extension and installs the
pure-Python package (the ops registry then falls back to the torch backend and says why). Environment:

- ``FASTINFER_BUILD_EXT=0``: never build the extension.
- ``FASTINFER_BUILD_EXT=1``: the extension is required; a compile error fails the install.
- unset: build it when torch is importable; a compile error only warns (pure-Python install).

CPU sources (csrc/cpu/*.cpp) are compiled for baseline x86-64 with OpenMP; the kernels pick their AVX2 /
AVX-512 variants at run time, so the build runs on any x86-64 CPU. CUDA sources (csrc/cuda/*.cu, none yet)
will be added only when torch is a CUDA build and nvcc is found.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


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

    sources = _rel("csrc/cpu/*.cpp") + ["csrc/bindings.cpp"]
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-math-errno"]  # -g0: Python's -g costs ~40% build time here
    # Find torch's libraries without `import torch` first (python -c "import fastinfer._C" works alone).
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    link = ["-fopenmp", f"-Wl,-rpath,{torch_lib}"]
    ext = CppExtension(
        "fastinfer._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
        optional=mode != "1",
    )
    # CUDA later: when torch.version.cuda and torch.utils.cpp_extension.CUDA_HOME (nvcc) exist, build
    # fastinfer._C as a CUDAExtension with csrc/cuda/*.cu added (and {"nvcc": [...]} compile args); the same
    # bindings.cpp then registers the CUDA impls too.

    class BuildExt(BuildExtension):
        def build_extension(self, ext):  # setuptools' `optional` misses BuildExtension's RuntimeError
            try:
                super().build_extension(ext)
            except Exception as e:
                if not getattr(ext, "optional", False):
                    raise
                print(f"fastinfer: WARNING: building {ext.name} failed ({e}); installing without it "
                      "(set FASTINFER_BUILD_EXT=1 to make this an error)", file=sys.stderr)

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
