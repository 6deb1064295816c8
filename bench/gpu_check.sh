#!/usr/bin/env bash
# GPU check (issue 24 item 5): on a bare H100/H200 with PyTorch, Triton and CUDA preinstalled and no
# network, install this project from carried wheels, build the CUDA twin, check the kernels' numerics
# against SPEC 3 in fp32/fp16/bf16 (Triton and the `cuda` backend), run the gpu-marked kernel tests and
# bench/latency.py (compiled fast mode first, on a budget of its own; then eager fast, paper-exact).
#
#   bench/gpu_check.sh [--dry-run] OUTDIR [BUNDLEDIR]        (or: make gpu-check OUT=OUTDIR)
#
# Before it (on a machine with the registry): `make gpu-wheels` fills .whl/ with this project's wheel
# and every other wheel it needs except torch, Triton, NVIDIA's packages and what torch requires
# (bench/gpu_wheels.py lists them; GPU_PYTHON picks the target's Python, default 3.12). With
# GPU_PRESENT=pip-freeze.txt (written by this script's environment step) it leaves out what the target
# already has; without a cones2_engine wheel the install step builds it from this tree.
# --dry-run: every step's plumbing on this CPU with tiny shapes (TRITON_INTERPRET=1, the CUDA build
# configured only, the project's wheel built here unless GPU_CHECK_WHEELS names carried ones); `make
# test` runs it (tests/test_kernel_gpu_check.py), so this script has run end to end before it meets a
# GPU. With PYTHON a bare interpreter (only torch and Triton) and GPU_CHECK_WHEELS, it proves the
# carried closure is complete (docs/kernels.md, "The GPU check").
# Each step has its own `timeout`; steps before the compiled-latency step may not touch its reserve.
# Writes, as it goes: OUTDIR/gpu_check.log, <step>.log, steps.jsonl (one JSON object per finished
# step), summary.json (rewritten after every step), numerics.json, pytest-gpu.xml, latency_*.json.
# BUNDLEDIR (e.g. the device tool's $OUT, which returns at most 8 files): after every step it gets
# summary.json, gpu_check.log and gpu_check.tar.gz (all of OUTDIR).
# Environment: PYTHON (python3), GPU_CHECK_BUDGET_S (480; dry run 1800), GPU_CHECK_COMPILED_S (the
# compiled step's reserve, 200), GPU_CHECK_CAP_SCALE (each step's timeout times this; 1, dry run 3),
# GPU_CHECK_WHEELS (.whl), SD21_CONFIG (SD 2.1 configs folder).
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -lt 1 || $# -gt 2 || "$1" == -* ]]; then
  echo "usage: bench/gpu_check.sh [--dry-run] OUTDIR [BUNDLEDIR]" >&2
  exit 2
fi
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$1" && OUT="$(cd "$1" && pwd)" || exit 2
BUNDLE=""
if [[ $# -eq 2 ]]; then mkdir -p "$2" && BUNDLE="$(cd "$2" && pwd)" || exit 2; fi
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-$(( DRY ? 1800 : 480 ))}"
RESERVE_S="${GPU_CHECK_COMPILED_S:-200}"        # held back for the compiled-latency step until it runs
CAP_SCALE="${GPU_CHECK_CAP_SCALE:-$(( DRY ? 3 : 1 ))}"   # step timeouts x this (a shared CPU is slower)
WHEELS="${GPU_CHECK_WHEELS:-.whl}"
DEADLINE=$((SECONDS + BUDGET_S))
WORK="$(mktemp -d)"
SITE="$WORK/site"                               # the project and carried wheels, installed --no-deps
LOG="$OUT/gpu_check.log"
: > "$OUT/steps.jsonl"; : > "$LOG"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# Explicit either way: a stray TRITON_INTERPRET=1 would run the "GPU" check in the CPU interpreter.
if (( DRY )); then export TRITON_INTERPRET=1 OMP_NUM_THREADS=1; else export TRITON_INTERPRET=0; fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
CUDA_BUILD="$PWD/build"; (( DRY )) && CUDA_BUILD="$WORK/build"
export CONES2_RCA_LIBRARY="$CUDA_BUILD/kernels/cuda/libcones2_rca.so"
FAILED=()
STEP_ENV=""   # shell functions and variables the `bash -c` steps need (set below)

log() { echo "[gpu-check $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

record() {  # record NAME STATUS RC SECONDS TIMEOUT LOG: one line of steps.jsonl, then summary + bundle
  printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %d, "timeout_s": %d, "log": %s}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" >> "$OUT/steps.jsonl"
  summarize
}

summarize() {  # summary.json from steps.jsonl (stdlib only: works before anything is installed)
  "$PY" - "$OUT" "$SECONDS" "$DRY" "${FAILED[@]}" <<'EOF' > /dev/null
import json, sys
from pathlib import Path
out, seconds, dry, failed = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
summary = {"ok": not failed, "dry_run": dry, "failed": failed, "seconds": seconds, "steps": steps}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
EOF
  if [[ -n "$BUNDLE" ]]; then
    cp "$OUT/summary.json" "$LOG" "$BUNDLE/" 2>/dev/null
    tar -czf "$BUNDLE/gpu_check.tar.gz" -C "$OUT" . 2>/dev/null
  fi
}

skip() {  # skip NAME WHY [failed]: a step that cannot run here; counts as failed when $3 says so
  log "$1: SKIPPED: $2"
  [[ "${3:-}" == failed ]] && FAILED+=("$1")
  record "$1" "skipped" null 0 0 "$(printf '"%s"' "${2//\"/\'}")"
}

# step NAME MAX_SECONDS COMMAND...: run under `timeout` (capped by the deadline, less the compiled
# step's reserve while it is held), log to NAME.log, record it.
step() {
  local name="$1" cap="$2"; shift 2
  local left=$((DEADLINE - SECONDS - RESERVE_S)) limit status rc start
  cap=$((cap * CAP_SCALE))
  limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    skip "$name" "only ${left}s of the budget left" failed; return 1
  fi
  local shown="$*"
  log "$name: start (timeout ${limit}s): ${shown//"$STEP_ENV; "/}"
  start=$SECONDS
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if (( rc == 0 )); then status=ok; elif (( rc == 124 || rc == 137 )); then status=timeout; else status=failed; fi
  [[ $status == ok ]] || FAILED+=("$name")
  log "$name: $status (rc $rc, $((SECONDS - start))s); last lines:"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$LOG"
  record "$name" "$status" "$rc" $((SECONDS - start)) "$limit" "\"$name.log\""
  return "$rc"
}

cuda_bin() {  # the first folder holding nvcc: PATH, $CUDA_HOME, /usr/local/cuda*, NVIDIA's pip wheel
  local d
  d="$(dirname "$(command -v nvcc 2>/dev/null)" 2>/dev/null)"
  [[ -n "$d" && -x "$d/nvcc" ]] && { echo "$d"; return 0; }
  for d in "${CUDA_HOME:-}/bin" "${CUDA_PATH:-}/bin" /usr/local/cuda/bin $(ls -d /usr/local/cuda-*/bin 2>/dev/null | sort -rV) \
           /opt/cuda/bin "$("$PY" -c 'import nvidia.cuda_nvcc as n, os; print(os.path.dirname(n.__file__) + "/bin")' 2>/dev/null)"; do
    [[ -n "$d" && -x "$d/nvcc" ]] && { echo "$d"; return 0; }
  done
  return 1
}

sd21_config() {  # the SD 2.1 config folder for bench/latency.py --shape sd21, if one is here
  local c
  for c in "${SD21_CONFIG:-}" bench/configs/sd21 shared/sd21-configs ../shared/sd21-configs; do
    [[ -n "$c" && -f "$c/unet.json" ]] && { echo "$c"; return 0; }
  done
  return 1
}

log "output: $OUT; budget ${BUDGET_S}s (compiled-latency reserve ${RESERVE_S}s, step timeouts x$CAP_SCALE); dry run: $DRY; python: $PY; site: $SITE"

# ---- environment: the tools each later step needs; CUDA's bin folder on PATH ----------------------
if CUDA_BIN="$(cuda_bin)"; then
  export PATH="$CUDA_BIN:$PATH" CUDACXX="$CUDA_BIN/nvcc" CUDA_HOME="${CUDA_HOME:-$(dirname "$CUDA_BIN")}"
fi
env_check() {  # environment step: exit 1 when a tool a later step cannot do without is missing
  local missing=() tool
  if command -v nvidia-smi > /dev/null; then nvidia-smi; elif (( ! DRY )); then missing+=(nvidia-smi); fi
  # Triton's interpreter needs numpy, which the install step brings: import it compiled here
  TRITON_INTERPRET=0 "$PY" - "$DRY" <<'EOF_PY' || missing+=("python with torch and triton, a CUDA device, or Python.h")
import os, sys, sysconfig
import torch, triton
print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("triton", triton.__version__)
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")   # Triton compiles its launcher with it
print("Python.h", header, os.path.isfile(header))
sys.exit(0 if os.path.isfile(header) and (sys.argv[1] == "1" or torch.cuda.is_available()) else 1)
EOF_PY
  if command -v gcc > /dev/null; then gcc --version | head -n 1; else missing+=(gcc); fi
  for tool in nvcc cmake; do   # the CUDA twin only: without them its build step is skipped
    if command -v "$tool" > /dev/null; then echo "$tool: $(command -v "$tool"): $("$tool" --version | grep -iE 'release|version' | head -n 1)"
    else echo "$tool: NOT FOUND (the CUDA twin will not be built)"; fi
  done
  echo "PATH=$PATH"
  "$PY" -c 'import importlib.metadata as m
print(*sorted({d.metadata["Name"] + "==" + d.version for d in m.distributions()}), sep=chr(10))' > "$OUT/pip-freeze.txt"
  echo "installed distributions: $OUT/pip-freeze.txt (for make gpu-wheels GPU_PRESENT=...)"
  (( ${#missing[@]} == 0 )) || { echo "missing: ${missing[*]}"; return 1; }
}

install_wheels() {  # install_wheels DIR: its wheels (plus the project's, built from this tree when DIR has
  # none) into $SITE, no index, no dependency resolution (pip, else unzip); then the closure check
  local wheels=()
  compgen -G "$1/*.whl" > /dev/null && wheels=("$1"/*.whl)
  if ! compgen -G "$1/cones2_engine-*.whl" > /dev/null; then
    echo "no cones2_engine wheel in $1: building it from this tree"
    "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$WORK/wheels" . || return 1
    wheels+=("$WORK"/wheels/*.whl)
  fi
  echo "installing ${#wheels[@]} wheels into $SITE"
  if "$PY" -m pip --version > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-index --no-compile --target "$SITE" "${wheels[@]}" || return 1
  else
    echo "no pip here: unpacking the wheels"
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" \
      "${wheels[@]}" || return 1
  fi
  "$PY" bench/gpu_wheels.py check \
    && "$PY" -c 'import cones2, cones2.kernels.tuning, diffusers, pytest; print("cones2 from", cones2.__file__)'
}

STEP_ENV="$(declare -f env_check install_wheels); PY='$PY' DRY=$DRY SITE='$SITE' WORK='$WORK' OUT='$OUT'"
step environment 60 bash -c "$STEP_ENV; env_check"

# ---- install: the project and its whole closure, from wheels, no index ---------------------------
# The dry run without GPU_CHECK_WHEELS installs only the project's wheel (its closure is this environment).
if (( DRY )) && [[ -z "${GPU_CHECK_WHEELS:-}" ]]; then WHEELS="$WORK/none"; fi
step install 300 bash -c "$STEP_ENV; install_wheels '$WHEELS'"

# ---- the CUDA twin: CMake build (dry run: configure only) ----------------------------------------
if ! command -v nvcc >/dev/null || ! command -v cmake >/dev/null; then
  skip cuda-build "nvcc or cmake not found (see environment.log)" "$( (( DRY )) || echo failed)"
  unset CONES2_RCA_LIBRARY
elif (( DRY )); then
  step cuda-build 120 cmake -S . -B "$CUDA_BUILD" -DCMAKE_CUDA_ARCHITECTURES=90
  unset CONES2_RCA_LIBRARY
else
  step cuda-build 150 bash -c "cmake -S . -B '$CUDA_BUILD' -DCMAKE_BUILD_TYPE=Release \
    && cmake --build '$CUDA_BUILD' -j\"\$(nproc)\" && test -f '$CONES2_RCA_LIBRARY'" || unset CONES2_RCA_LIBRARY
fi

# ---- numerics first: the one result this check exists for ----------------------------------------
if (( DRY )); then
  step numerics 300 "$PY" bench/kernel_numerics.py --tiny --dtypes fp32 --impls triton,reference --require triton \
    --device cpu --out "$OUT"
else
  step numerics 150 "$PY" bench/kernel_numerics.py --require "triton${CONES2_RCA_LIBRARY:+,cuda}" --out "$OUT"
fi

# gpu-marked tests: the CUDA library and the `cuda` backend against SPEC 3, Triton compiled for real.
# On a CPU they skip: the dry run checks that they are collected and the command works.
step pytest-gpu 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs \
  tests/test_kernel_cuda.py tests/test_kernel_triton.py --junitxml "$OUT/pytest-gpu.xml"

# ---- latency: the compiled fast mode on its own budget, then eager fast, then paper-exact ----------
if (( DRY )); then   # the default (tiny) model, fp32 on the CPU, two steps at 64 px
  SHAPE=(--device cpu --dtype fp32 --resolution 64 --steps 2 --threads 1 --no-official-fp32)
  WARMUP=0; REPEAT=1; FAST=(--backends sdpa); EXACT=(--backends sdpa); COMPILER=(--compiler aot_eager)
elif CONFIG="$(sd21_config)"; then   # SD 2.1 at 768 px, fp16; fast on the default CUDA backend; paper-exact
  # on the fused kernels and sdpa (with the paper style and its fp32 weights beside them, always)
  SHAPE=(--shape sd21 --sd21-config "$CONFIG" --dtype fp16)
  WARMUP=1; REPEAT=3; FAST=(--backends torch); EXACT=(--steps 50 --backends triton,cuda,sdpa); COMPILER=()
else
  SHAPE=()
fi
if (( ${#SHAPE[@]} )); then
  RESERVE_S=0   # the compiled step's turn: its reserve is its own
  step latency-fast-compiled 300 "$PY" bench/latency.py "${SHAPE[@]}" --mode fast --compile "${COMPILER[@]}" \
    "${FAST[@]}" --subjects 2 --no-attention --warmup "$WARMUP" --repeat "$REPEAT" --no-progress \
    --json "$OUT/latency_fast_compiled.json"
  step latency-fast 120 "$PY" bench/latency.py "${SHAPE[@]}" --mode fast "${FAST[@]}" --subjects 2 --no-attention \
    --warmup "$WARMUP" --repeat "$REPEAT" --no-progress --json "$OUT/latency_fast.json"
  step latency-paper-exact 300 "$PY" bench/latency.py "${SHAPE[@]}" "${EXACT[@]}" --subjects 2 --warmup "$WARMUP" \
    --repeat 1 --no-progress --json "$OUT/latency_paper_exact.json"
else
  skip latency "no SD 2.1 config folder (set SD21_CONFIG)" failed
fi

# The xformers backend, where a wheel for this machine's torch was carried (its wheels pin one torch build).
if (( ! DRY )) && compgen -G "$WHEELS/xformers-*.whl" > /dev/null; then
  step pytest-xformers 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_xformers_backend.py \
    --junitxml "$OUT/pytest-xformers.xml"
fi

summarize
log "done in ${SECONDS}s; failed steps: ${FAILED[*]:-none}"
cat "$OUT/summary.json" >> "$LOG"
rm -rf "$WORK"
(( ${#FAILED[@]} == 0 ))
