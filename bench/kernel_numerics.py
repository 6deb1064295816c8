#!/usr/bin/env python
"""Numerics of the fused kernels against SPEC 3's plain-PyTorch formula, in fp32, fp16 and bf16.

For each dtype and SD 2.1 cross-attention shape (768 px) a batch of three samples - guided with
-1e8 outside the subjects' regions, unconditional (coef 0), guided at the hard-mask threshold -1e4
with a tiny coef - runs through the fused Triton kernel, the CUDA twin (when its library loads; set
CONES2_RCA_LIBRARY) and the engine's `reference` backend. Each is compared with the float64 formula
of `cones2.kernels.reference` (computed from the same rounded inputs): max abs error against a per-dtype tolerance, the
std pre-pass against torch.std, hard-masked probabilities exactly 0, everything finite, and the
time of the first call per shape (compile + bounded autotuning). Results go to OUT/numerics.json, a
results record (bench/harness/results.py; the rows are its payload), rewritten after every row so a
timeout keeps what was done; exit 1 if any check fails, a call
raises, or an implementation named by --require cannot run here.

    python bench/kernel_numerics.py --out out/gpu                            # a CUDA machine
    TRITON_INTERPRET=1 python bench/kernel_numerics.py --tiny --out /tmp/n    # CPU smoke run
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from cones2.kernels.reference import hard_mask, rectified_attention  # noqa: E402
from harness.results import write_result  # noqa: E402

M_KEYS = 77
SUBJECT_TOKENS = (2, 5)
SD21_SHAPES = ((9216, 5, 64), (2304, 10, 64), (576, 20, 64), (144, 20, 64))   # (N, heads, head dim) at 768 px
TINY_SHAPES = ((70, 2, 64),)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ATOL = {"fp32": 2e-5, "fp16": 3e-3, "bf16": 2.5e-2}     # same bounds as tests/test_kernel_*.py
STD_RTOL = {"fp32": 1e-5, "fp16": 1e-4, "bf16": 1e-4}


def layout_inputs(n: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """q, k, v, weight (3, n, 77), coef (3,): guided at -1e8, unconditional, guided at -1e4 / 1e-5."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, heads, rows, dim, generator=g).to(device, dtype) for rows in (n, M_KEYS, M_KEYS))
    weight = torch.zeros(3, n, M_KEYS)
    for b, negative in enumerate((-1e8, -1e8, -1e4)):
        a, z = SUBJECT_TOKENS
        weight[b, :, a] = weight[b, :, z] = negative
        weight[b, : n // 2, a] = 2.5
        weight[b, n // 3:, z] = 2.5
        weight[b, n // 2, a] = negative / 2          # a bilinear boundary blend: still a hard mask
    coef = torch.tensor([0.08 * math.log1p(14.6 ** 2), 0.0, 1e-5])
    return q, k, v, weight.to(device), coef.to(device)


def mask_probe(q, k, weight, coef, call) -> dict:
    """Run `call` with V = one-hot columns of the subject tokens, so the output holds their
    probabilities; every hard-masked one (guided samples) must be exactly 0."""
    v = torch.zeros(*k.shape, dtype=k.dtype, device=k.device)
    for j, tok in enumerate(SUBJECT_TOKENS):
        v[:, :, tok, j] = 1
    probs = call(v)[..., : len(SUBJECT_TOKENS)].float()                         # (B, H, N, 2)
    w = weight[:, :, list(SUBJECT_TOKENS)]                                         # (B, N, 2)
    hard = hard_mask(w, coef)[:, None].expand_as(probs)
    return {"hard_masked": int(hard.sum()), "hard_mask_nonzero": int((probs[hard] != 0).sum()),
            "finite": bool(torch.isfinite(probs).all()), "allowed_positive": bool((probs[~hard] > 0).any())}


def implementations(names: list[str], device: torch.device) -> tuple[dict, dict]:
    """({name: call(q, k, v, weight, coef, scale)}, {name: why skipped})."""
    calls, skipped = {}, {}
    if "triton" in names:
        try:
            from cones2.kernels.triton_rectified import interpreting, rectified_cross_attention
            if device.type != "cuda" and not interpreting():
                skipped["triton"] = "needs CUDA (or TRITON_INTERPRET=1)"
            else:
                calls["triton"] = rectified_cross_attention
        except ImportError as exc:
            skipped["triton"] = f"cannot import the Triton kernel: {exc}"
    if "cuda" in names:
        from cones2.kernels.errors import KernelUnavailableError
        from cones2.kernels import cuda_loader
        try:
            if device.type != "cuda":
                raise KernelUnavailableError("needs a CUDA device")
            cuda_loader.load_library()
            calls["cuda"] = cuda_loader.rectified_cross_attention
        except KernelUnavailableError as exc:
            skipped["cuda"] = str(exc)
    if "reference" in names:
        from cones2.attention import get_backend

        calls["reference"] = get_backend("reference").cross
    return calls, skipped


def check_std(q, k, coef, sd64, dtype_name: str) -> dict:
    """The Triton pre-pass std against the float64 std (guided samples; coef 0 ones must be 0)."""
    from cones2.kernels.triton_rectified import logit_std

    sd = logit_std(q, k, coef).double().cpu()
    guided = coef.cpu() != 0
    rel = ((sd[guided] - sd64.cpu()[guided]).abs() / sd64.cpu()[guided]).max().item()
    return {"std_max_rel_err": rel, "std_rtol": STD_RTOL[dtype_name],
            "std_ok": rel <= STD_RTOL[dtype_name] and bool((sd[~guided] == 0).all())}


def run_case(name, call, q, k, v, weight, coef, expected, dtype_name, device) -> dict:
    scale = q.shape[-1] ** -0.5
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    out = call(q, k, v, weight, coef, scale)
    sync()
    first_s = time.perf_counter() - start
    err = (out.double() - expected).abs().max().item() if torch.isfinite(out).all() else math.inf
    probe = mask_probe(q, k, weight, coef, lambda probe_v: call(q, k, probe_v, weight, coef, scale))
    ok = err <= ATOL[dtype_name] and probe["hard_mask_nonzero"] == 0 and probe["finite"] and probe["allowed_positive"]
    return {"impl": name, "max_abs_err": err, "atol": ATOL[dtype_name], "first_call_s": first_s, **probe, "ok": ok}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/kernel_numerics.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for numerics.json")
    p.add_argument("--tiny", action="store_true", help=f"one small shape {TINY_SHAPES[0]} (CPU smoke run)")
    p.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma list of fp32, fp16, bf16")
    p.add_argument("--impls", default="triton,cuda,reference", help="comma list of triton, cuda, reference")
    p.add_argument("--require", default="", help="comma list of implementations that must run (else exit 1)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    if any(d not in DTYPES for d in dtypes):
        p.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    calls, skipped = implementations([i.strip() for i in args.impls.split(",")], device)
    shapes = TINY_SHAPES if args.tiny else SD21_SHAPES
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "numerics.json"
    settings = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                else "cpu", "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
                "shapes": [list(s) for s in shapes], "dtypes": dtypes, "impls": args.impls, "require": args.require}
    result = {"skipped": skipped, "rows": [], "ok": None}

    def save():
        write_result(path, settings, result, argv=argv, script="bench/kernel_numerics.py")

    for dtype_name in dtypes:
        for n, heads, dim in shapes:
            q, k, v, weight, coef = layout_inputs(n, heads, dim, DTYPES[dtype_name], device)
            expected, sd64 = rectified_attention(q, k, v, weight, coef, dim ** -0.5)
            for name, call in calls.items():
                row = {"dtype": dtype_name, "shape": f"B=3 H={heads} N={n} M={M_KEYS} d={dim}", "impl": name}
                try:
                    row.update(run_case(name, call, q, k, v, weight, coef, expected, dtype_name, device))
                    if name == "triton":
                        row.update(check_std(q, k, coef, sd64, dtype_name))
                        row["ok"] = row["ok"] and row["std_ok"]
                    print(f"{dtype_name} {row['shape']:<26} {name:<9} max|err| {row['max_abs_err']:.2e} "
                          f"(atol {row['atol']:.0e}) hard-mask nonzero {row['hard_mask_nonzero']}/"
                          f"{row['hard_masked']} first call {row['first_call_s']:.2f}s {'ok' if row['ok'] else 'FAIL'}",
                          flush=True)
                except Exception as exc:  # one broken case must not hide the others' results
                    row.update({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
                    print(f"{dtype_name} {row['shape']:<26} {name:<9} ERROR {row['error']}", flush=True)
                result["rows"].append(row)
                save()
            del q, k, v, weight, coef, expected
    missing = [name for name in args.require.split(",") if name.strip() and name.strip() not in calls]
    result["missing_required"] = missing
    result["ok"] = bool(result["rows"]) and all(r["ok"] for r in result["rows"]) and not missing
    save()
    print(f"{'all checks passed' if result['ok'] else 'SOME CHECKS FAILED'}; skipped: {skipped or 'none'}; "
          f"required but missing: {missing or 'none'}; wrote {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
