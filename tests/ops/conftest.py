"""Fixtures shared by the compiled-kernel tests: every instruction-set variant of the CPU kernels this CPU can
run, and 1 / 2 OpenMP threads."""
from __future__ import annotations

import pytest
import torch

ISAS = ("generic", "avx2", "avx512", "avx512_bf16")


def _supported_isas() -> list[str]:
    """The variants ``cpu_isa`` accepts here ([] without the compiled extension: those tests skip anyway)."""
    try:
        from fastinfer.ops import cpp_backend as cpp
    except ImportError:
        return []
    try:
        return [isa for isa in ISAS if cpp.cpu_isa(isa) == isa]
    finally:
        cpp.cpu_isa("auto")


SUPPORTED_ISAS = _supported_isas()


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request):
    """Force one kernel variant for the test, then restore automatic detection."""
    from fastinfer.ops import cpp_backend as cpp

    assert cpp.cpu_isa(request.param) == request.param
    yield request.param
    cpp.cpu_isa("auto")


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """1 thread runs work items inline; 2 threads also split work (long contexts, output rows) across threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)
