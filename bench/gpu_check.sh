#!/usr/bin/env bash
# GPU check (issue 11 item 5): on a bare H100/H200 with PyTorch, Triton and CUDA preinstalled and no
# network, install this project from carried wheels, build the CUDA twin, check the kernels'
# numerics against SPEC 3 in fp32/fp16/bf16, run the gpu-marked kernel tests and bench/latency.py.
# Every step has its own timeout and log; all of it fits one deadline (default 450 s, under 8 min with the kill grace).
#
#   bench/gpu_check.sh OUTDIR            (or: make gpu-check OUT=OUTDIR)
#
# Needs .whl/ in the repository root with the project's wheel and the ones the machine lacks
# (diffusers, importlib_metadata; pytest, pluggy, iniconfig if pytest is absent). Make it on a
# machine with the registry:  pip wheel --no-deps -w .whl . diffusers importlib_metadata
# Writes to OUTDIR: gpu_check.log (this script), <step>.log per step, steps.jsonl (one JSON object
# per step as it finishes), summary.json, numerics.json, pytest-gpu.xml, latency_*.json.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (450), SD21_CONFIG (SD 2.1 configs folder).
set -uo pipefail

if [[ $# -ne 1 || "$1" == -* ]]; then
  echo "usage: bench/gpu_check.sh OUTDIR" >&2
  exit 2
fi
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$1" && OUT="$(cd "$1" && pwd)" || exit 2
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
DEADLINE=$((SECONDS + BUDGET_S))
SITE="$(mktemp -d)/site"                    # the project and carried wheels, installed --no-deps
LOG="$OUT/gpu_check.log"
: > "$OUT/steps.jsonl"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export CONES2_RCA_LIBRARY="$PWD/build/kernels/cuda/libcones2_rca.so"
FAILED=()

log() { echo "[gpu-check $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

# step NAME MAX_SECONDS COMMAND...: run under `timeout` (capped by the deadline), log to NAME.log,
# append {"step", "status", "rc", "seconds", "timeout_s", "log"} to steps.jsonl.
step() {
  local name="$1" cap="$2"; shift 2
  local left=$((DEADLINE - SECONDS)) limit status rc start
  limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    log "$name: SKIPPED (only ${left}s of the budget left)"
    printf '{"step": "%s", "status": "skipped", "rc": null, "seconds": 0, "timeout_s": %d, "log": null}\n' \
      "$name" "$limit" >> "$OUT/steps.jsonl"
    FAILED+=("$name"); return 1
  fi
  log "$name: start (timeout ${limit}s): $*"
  start=$SECONDS
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if (( rc == 0 )); then status=ok; elif (( rc == 124 || rc == 137 )); then status=timeout; else status=failed; fi
  [[ $status == ok ]] || FAILED+=("$name")
  printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %d, "timeout_s": %d, "log": "%s.log"}\n' \
    "$name" "$status" "$rc" $((SECONDS - start)) "$limit" "$name" >> "$OUT/steps.jsonl"
  log "$name: $status (rc $rc, $((SECONDS - start))s); last lines:"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$LOG"
  return "$rc"
}

sd21_config() {  # the SD 2.1 config folder for bench/latency.py --shape sd21, if one is here
  local c
  for c in "${SD21_CONFIG:-}" bench/configs/sd21 shared/sd21-configs ../shared/sd21-configs; do
    [[ -n "$c" && -f "$c/unet.json" ]] && { echo "$c"; return 0; }
  done
  return 1
}

log "output: $OUT; budget ${BUDGET_S}s; python: $PY; site: $SITE"

step environment 30 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name()); \
print(\"triton\", triton.__version__)'; command -v nvcc cmake; nvcc --version | tail -n 2; true"

# shellcheck disable=SC2086  # the glob is the point
if compgen -G ".whl/*.whl" > /dev/null; then
  step install 90 bash -c "$PY -m pip install --no-deps --no-index --disable-pip-version-check --target '$SITE' .whl/*.whl \
    && $PY -c 'import cones2, cones2.kernels, diffusers; print(\"cones2 from\", cones2.__file__); print(\"diffusers\", diffusers.__version__)'"
else
  log "install: FAILED: no .whl/*.whl in $PWD (see the header of this script)"
  printf '{"step": "install", "status": "failed", "rc": 1, "seconds": 0, "timeout_s": 0, "log": null}\n' \
    >> "$OUT/steps.jsonl"
  FAILED+=(install)
fi

step cuda-build 150 bash -c "cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j\"\$(nproc)\" \
  && test -f '$CONES2_RCA_LIBRARY'" || unset CONES2_RCA_LIBRARY

# Numerics first: the one result this check exists for (the CUDA twin's are otherwise unverified).
step numerics 150 "$PY" bench/kernel_numerics.py --require triton,cuda --out "$OUT"

step pytest-gpu 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs \
  tests/test_kernel_cuda.py tests/test_kernel_triton.py --junitxml "$OUT/pytest-gpu.xml"

# The xformers backend, where a wheel for this machine's torch was carried (its wheels pin one torch build).
if compgen -G ".whl/xformers-*.whl" > /dev/null; then
  step pytest-xformers 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_xformers_backend.py \
    --junitxml "$OUT/pytest-xformers.xml"
else
  log "pytest-xformers: not run (no .whl/xformers-*.whl carried)"
fi

if CONFIG="$(sd21_config)"; then
  step latency-paper-exact 300 "$PY" bench/latency.py --shape sd21 --sd21-config "$CONFIG" --dtype fp16 \
    --steps 50 --subjects 2 --warmup 1 --repeat 1 --no-progress --json "$OUT/latency_paper_exact.json"
  step latency-fast 120 "$PY" bench/latency.py --shape sd21 --sd21-config "$CONFIG" --dtype fp16 --mode fast \
    --subjects 2 --backends torch --no-attention --warmup 1 --repeat 3 --no-progress --json "$OUT/latency_fast.json"
  step latency-fast-compiled 180 "$PY" bench/latency.py --shape sd21 --sd21-config "$CONFIG" --dtype fp16 \
    --mode fast --compile --subjects 2 --backends torch --no-attention --warmup 1 --repeat 3 --no-progress \
    --json "$OUT/latency_fast_compiled.json"
else
  log "latency: FAILED: no SD 2.1 config folder (set SD21_CONFIG)"
  FAILED+=(latency-paper-exact)
fi

"$PY" - "$OUT" "$SECONDS" "${FAILED[@]}" <<'EOF' | tee -a "$LOG"
import json, sys
from pathlib import Path
out, seconds, failed = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
summary = {"ok": not failed, "failed": failed, "seconds": seconds, "steps": steps}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
log "done in ${SECONDS}s; failed steps: ${FAILED[*]:-none}"
(( ${#FAILED[@]} == 0 ))
