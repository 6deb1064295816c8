# cones2-engine: `make demo` and `make test` work on a fresh machine (CPU, no network but PyPI).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/cones2-engine
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow bench cuda clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Two-subject, layout-guided generation on the embedded default model -> out/demo.png (+ preview).
demo: setup
	$(CLI) generate --prompt "a dog and a mug on the beach" \
		--box dog=0.05,0.35,0.5,0.95 --box mug=0.55,0.45,0.95,0.95 \
		--steps 20 --seed 0 --out out/demo.png --preview --no-progress

# The CI suite (CPU; Triton kernels run under the interpreter).
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q

# Longer checks kept out of `make test` (full-size shapes, long training); run before releases.
test-slow: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/latency.py --steps 4

# CUDA twin of the fused kernel (needs nvcc; runs only on a GPU).
cuda:
	cmake -S . -B build && cmake --build build -j2

clean:
	rm -rf build out $(VENV)
