"""CPU threads follow the CPUs the process may use (its affinity), not the host's core count."""
from __future__ import annotations

import os

import pytest
import torch

from fastinfer.worker.worker import fit_cpu_threads, usable_cpus


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux CPU affinity")
def test_threads_are_capped_at_the_affinity_mask_and_a_lower_choice_stays():
    old = torch.get_num_threads()
    try:
        assert usable_cpus() == len(os.sched_getaffinity(0))
        torch.set_num_threads(usable_cpus() + 3)  # what torch's host-core default does in a small container
        assert fit_cpu_threads() == usable_cpus()
        torch.set_num_threads(1)
        assert fit_cpu_threads() == 1
    finally:
        torch.set_num_threads(old)
