# cones2-engine: `make demo` and `make test` work on a fresh machine (CPU, no network but PyPI).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/cones2-engine
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-integration test-slow test-latest lock bench cuda gpu-check gpu-check-dry gpu-wheels clean

setup: $(STAMP)

# Installs exactly the locked set (constraints.txt: every package, direct and transitive, at the
# versions CI last passed with); the package itself declares ranges for users.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Re-resolve the lock with pip-tools (pip's own resolver and index settings): keeps today's pins where
# they still fit; `make lock LOCK_FLAGS=--upgrade` takes the newest versions the ranges allow.
LOCK_VENV := .venv-lock
LOCK_FLAGS ?=
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_VENV) && \
		$(LOCK_VENV)/bin/pip install -q --disable-pip-version-check pip-tools==7.7.0; }
	$(LOCK_VENV)/bin/pip-compile --quiet --extra dev --strip-extras --allow-unsafe --no-emit-find-links \
		--no-emit-index-url --no-emit-trusted-host --no-annotate --constraint constraints.in $(LOCK_FLAGS) \
		--output-file constraints.txt pyproject.toml
	sed -i -e '/^cones2-engine @ /d' -e '1i # The lock: every package `make setup` and CI install, at exact versions. Made by `make lock`; edit\n# constraints.in (machine pins) or pyproject.toml (ranges), never this file.' constraints.txt

# The same suite in a fresh venv without the lock (only the machine pins of constraints.in): the
# newest releases the package's ranges allow, so dependency drift is seen on purpose.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --disable-pip-version-check -c constraints.in -e '.[dev]'
	TRITON_INTERPRET=1 $(LATEST)/bin/python -m pytest -q

# Three subjects, layout-guided, on the embedded demo model: two trained residuals (a two-tone red|green
# heart, a two-tone purple|yellow triangle) composed with a plain blue star, each in its box
# -> out/demo.png + out/demo.preview.png (the layout drawn over the image). docs/demo_model.md.
DEMO_RESIDUALS := engine/cones2/data/demo_model/residuals
demo: setup
	$(CLI) generate --prompt "a heart, a triangle and a blue star on a sand background" \
		--subject heart=$(DEMO_RESIDUALS)/twotone_heart.safetensors \
		--subject triangle=$(DEMO_RESIDUALS)/twotone_triangle.safetensors \
		--box heart=0.05,0.05,0.45,0.45 --box star=0.55,0.05,0.95,0.45 --box triangle=0.3,0.55,0.7,0.95 \
		--steps 30 --guidance-steps 15 --seed 0 --out out/demo.png --preview

# The CI suite (CPU; Triton kernels run under the interpreter), on TEST_WORKERS pytest-xdist workers:
# most tests keep one core busy, so two workers on two cores take about 2/3 of one's time. One worker per
# usable core, at most 4 (each builds its own models and ONNX exports). Modules that share a costly resource
# (a Ray cluster, one ONNX export) run on one worker (tests/conftest.py).
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))" 2>/dev/null || echo 2)
test: setup
	TRITON_INTERPRET=1 CONES2_LOCKED=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Whole-script and one-off-export checks kept out of `make test` for its time; CI (.ci/run) runs them after it.
test-integration: setup
	TRITON_INTERPRET=1 CONES2_LOCKED=1 $(PY) -m pytest -q -m integration

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
# `make gpu-check-dry` runs every step's plumbing here on the CPU (tests/test_kernel_gpu_check.py).
OUT ?= out/gpu-check
gpu-check:
	bash bench/gpu_check.sh $(OUT)

gpu-check-dry: setup
	PYTHON=$(PY) bash bench/gpu_check.sh --dry-run $(OUT)-dry

# .whl/ for the GPU machine (no registry there): this project's wheel and every wheel of its closure
# except torch, Triton, NVIDIA's packages and what torch requires (bench/gpu_wheels.py), for the
# target's CPython $(GPU_PYTHON) on x86-64 Linux. GPU_PRESENT=FILE (the target's pip freeze, which
# gpu_check.sh's environment step writes) leaves out what the target has; WHEEL_DIR=... GPU_PYTHON=3.11
# makes a set for this machine, to rehearse the install in a bare interpreter (docs/kernels.md).
GPU_PYTHON ?= 3.12
GPU_PLATFORMS := $(foreach n,$(shell seq 17 39),--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64 \
	--platform manylinux1_x86_64
WHEEL_DIR ?= .whl
gpu-wheels: setup
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(WHEEL_DIR) .
	$(PY) bench/gpu_wheels.py list $(if $(GPU_PRESENT),--present $(GPU_PRESENT)) > $(WHEEL_DIR)/closure.txt
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		$(GPU_PLATFORMS) -d $(WHEEL_DIR) -r $(WHEEL_DIR)/closure.txt
	@du -sh $(WHEEL_DIR); ls $(WHEEL_DIR)/*.whl | wc -l

clean:
	rm -rf build out $(VENV)
