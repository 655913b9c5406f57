# Two commands do all set-up on a fresh machine (see README.md):
#   make demo   trains a small policy if needed, then serves it on the emulated UR5
#   make test   the full test suite (what CI runs)
PYTHON ?= python
PYTEST_ARGS ?=

.PHONY: setup demo test test-quick bench

# torch first, and only if missing: a bare `torch` requirement on a CPU machine would pull a
# multi-GB CUDA build, and a GPU machine already has the torch that matches its driver.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test]"

demo: setup
	$(PYTHON) -m dpag_engine.demo

# DPAG_REQUIRE_BUILT=1: the C++ module and Triton must import, so a broken build fails the run
# instead of turning into skipped tests (tests/conftest.py).
test: setup
	DPAG_REQUIRE_BUILT=1 $(PYTHON) -m pytest $(PYTEST_ARGS)

# The quick subset for the edit-test loop (a few minutes): everything not marked slow.
test-quick: setup
	DPAG_REQUIRE_BUILT=1 $(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PYTHON) -m pytest bench --benchmark-only $(PYTEST_ARGS)
