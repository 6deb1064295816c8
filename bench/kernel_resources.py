#!/usr/bin/env python
"""Registers, spills and shared memory of every Triton kernel configuration, compiled for real GPU
targets on a machine without a GPU.

Each unit is one kernel in one launch configuration: every autotune candidate of the fused
attention kernel and of the std pre-pass (fp16/bf16), the fixed fp32 configuration of both, and the
merge kernel. Triton compiles it for `GPUTarget("cuda", arch, 32)` with its bundled ptxas (no
driver, no device); `cuobjdump --dump-resource-usage` reads the cubin: REG (registers per thread),
STACK (per-thread stack frame: register spills, the kernels keep no local arrays), LOCAL, static
SHARED, plus the dynamic shared memory Triton records. A unit passes with no stack/local bytes and
its shared memory within the architecture's per-block limit. Units compile in parallel; Triton's
on-disk cache makes a second run cheap.

    python bench/kernel_resources.py --json out/kernel_resources.json           # SD 2.1: d=64, sm_80 + sm_90
    python bench/kernel_resources.py --head-dims 40,80,160 --dtypes fp16       # SD 1.5 heads
Exit status: 0 all pass, 1 a unit spills or overflows shared memory, 3 ptxas/cuobjdump missing.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"    # real compilation, whatever the caller's environment says

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}   # opt-in bytes per block
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
SD21_HEAD_DIM = 64
MISSING_TOOL = 3


def cuobjdump() -> str | None:
    """Triton's bundled cuobjdump, else the CUDA toolkit's on PATH, else None."""
    import triton.backends.nvidia as nvidia

    bundled = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else shutil.which("cuobjdump")


def units(archs: list[int], dtypes: list[str], head_dims: list[int]) -> list[dict]:
    """Every (kernel, arch, dtype, head dim, config) to compile: each candidate of the tuned dtypes,
    the fixed config for fp32, the merge kernel once per arch."""
    import torch
    from cones2.kernels import tuning

    out = []
    for arch in archs:
        for name in dtypes:
            dtype = getattr(torch, DTYPES[name])
            for d in head_dims:
                for kind in tuning.KINDS:
                    configs = (tuning.candidate_configs(kind, interpret=False) if tuning.is_tuned(dtype)
                               else [tuning.fixed_config(d)])
                    out += [{"kernel": kind, "arch": arch, "dtype": name, "head_dim": d,
                             "block_n": c.kwargs["BLOCK_N"], "block_m": c.kwargs["BLOCK_M"],
                             "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]
        out.append({"kernel": "merge", "arch": arch, "dtype": "fp32", "head_dim": 0, "block_p": 1024,
                    "num_warps": 4, "num_stages": 1})
    return out


def _signature(fn, element: str) -> dict:
    pointers, float_pointers = {"q_ptr", "k_ptr", "v_ptr", "o_ptr"}, {"w_ptr", "coef_ptr", "sd_ptr", "part_ptr"}
    constexprs = {"HAS_WEIGHT", "F32_DOT", "BLOCK_D", "BLOCK_N", "BLOCK_M", "BLOCK_P"}

    def kind(name):
        if name in pointers:
            return "*" + element
        if name in float_pointers:
            return "*fp32"
        if name in constexprs:
            return "constexpr"
        return {"meta_ptr": "*i32", "qk_scale": "fp32"}.get(name, "i32")

    return {name: kind(name) for name in fn.arg_names}


def compile_unit(unit: dict) -> dict:
    """Compile one unit for its target; add registers, stack, local, shared, limit, seconds, ok."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from cones2.kernels import triton_rectified as tr, tuning

    start = time.perf_counter()
    if unit["kernel"] == "merge":
        fn, consts = tr._merge_moments_kernel, {"BLOCK_P": unit["block_p"]}
    else:
        dtype = getattr(torch, DTYPES[unit["dtype"]])
        consts = {"F32_DOT": tuning.f32_dot(dtype), "BLOCK_D": tuning.block_d(unit["head_dim"]),
                  "BLOCK_N": unit["block_n"], "BLOCK_M": unit["block_m"]}
        fn = tr._rectified_attention_kernel if unit["kernel"] == "attention" else tr._logit_moments_kernel
        if unit["kernel"] == "attention":
            consts["HAS_WEIGHT"] = True      # the guided launch: the larger of the two variants
    element = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}[unit["dtype"]]
    source = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, element), constexprs=consts)
    kernel = triton.compile(source, target=GPUTarget("cuda", unit["arch"], 32),
                            options={"num_warps": unit["num_warps"], "num_stages": unit["num_stages"]})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        dump = subprocess.run([cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    usage = {key.lower(): int(val) for key, val in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", dump)}
    shared = int(kernel.metadata.shared) + usage.get("shared", 0)
    limit = SHARED_LIMIT.get(unit["arch"], 48 * 1024)
    result = {**unit, "registers": usage["reg"], "stack_bytes": usage["stack"], "local_bytes": usage["local"],
              "shared_bytes": shared, "shared_limit": limit, "compile_s": round(time.perf_counter() - start, 2)}
    result["ok"] = result["stack_bytes"] == 0 and result["local_bytes"] == 0 and shared <= limit
    return result


def describe(u: dict) -> str:
    tiles = f"BLOCK_P={u['block_p']}" if u["kernel"] == "merge" else f"{u['block_n']}x{u['block_m']}"
    return (f"{u['kernel']:9} sm_{u['arch']} {u['dtype']} d={u['head_dim']:<3} {tiles:>11} {u['num_warps']}w/"
            f"{u['num_stages']}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/kernel_resources.py", description=__doc__.split("\n")[0])
    p.add_argument("--archs", default="80,90", help="compute capabilities (default: 80,90)")
    p.add_argument("--dtypes", default="fp16,bf16,fp32", help="comma list of fp16, bf16, fp32")
    p.add_argument("--head-dims", default=str(SD21_HEAD_DIM), help="comma list (default: 64, SD 2.1's)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    p.add_argument("--json", type=Path, default=None, help="write every unit's figures here")
    args = p.parse_args(argv)
    import triton

    if cuobjdump() is None:
        print("kernel_resources: SKIP: no cuobjdump (Triton's bundled one or the CUDA toolkit's)", file=sys.stderr)
        return MISSING_TOOL
    todo = units([int(a) for a in args.archs.split(",")], args.dtypes.split(","),
                 [int(d) for d in args.head_dims.split(",")])
    started = time.perf_counter()
    try:
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(compile_unit, todo))
    except Exception as exc:   # noqa: BLE001 - one line for the caller, whatever the compiler raised
        text = str(exc)
        if "ptxas" in text and ("not found" in text or "No such file" in text):
            print(f"kernel_resources: SKIP: Triton's ptxas is missing ({text.splitlines()[0]})", file=sys.stderr)
            return MISSING_TOOL
        raise
    for r in results:
        flag = "ok" if r["ok"] else "FAIL"
        print(f"{describe(r)}  regs {r['registers']:3}  spill/stack {r['stack_bytes']:5} B  local {r['local_bytes']} B"
              f"  shared {r['shared_bytes']:6} / {r['shared_limit']} B  {r['compile_s']:6.1f}s  {flag}")
    failed = [r for r in results if not r["ok"]]
    summary = {"triton": triton.__version__, "units": len(results), "failed": len(failed),
               "seconds": round(time.perf_counter() - started, 1), "command": " ".join(["python bench/kernel_resources.py"]
                                                                                       + sys.argv[1:])}
    print(json.dumps(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**summary, "results": results}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
