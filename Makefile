# cones2-engine: `make demo` and `make test` work on a fresh machine (CPU, no network but PyPI).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/cones2-engine
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow bench cuda gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Three-subject, layout-guided generation on the embedded demo model, with a trained residual
# (the striped star) -> out/demo.png + out/demo.preview.png (layout drawn over the image).
DEMO_RESIDUAL := engine/data/demo_model/residuals/striped_star.safetensors
demo: setup
	$(CLI) generate --prompt "a star and a blue ring and a green heart on a sand background" \
		--subject star=$(DEMO_RESIDUAL) \
		--box star=0.05,0.05,0.45,0.45 --box ring=0.55,0.5,0.95,0.9 --box heart=0.05,0.55,0.45,0.95 \
		--steps 30 --seed 0 --out out/demo.png --preview --no-progress

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

# On a bare H100/H200 (torch, Triton, CUDA preinstalled; wheels carried in .whl/): CUDA twin build,
# kernel numerics vs SPEC 3, gpu-marked tests, bench/latency.py; logs and JSON in $(OUT), < 8 min.
OUT ?= out/gpu-check
gpu-check:
	bash bench/gpu_check.sh $(OUT)

clean:
	rm -rf build out $(VENV)
