"""Bounded autotuning for the fused kernels: bucketed keys, a handful of pruned configs, none for fp32.

Autotuning per exact query count N benchmarked 24 + 12 configs for every new image size (minutes of
cold start on an H200). Here the autotuner keys on `n_bucket(N)` (4 buckets), M, the padded head
dim and the dtype; it benchmarks at most `MAX_TUNED_CONFIGS` candidates that fit the shape; fp32
(IEEE products, where tile choice hardly matters) takes a fixed config and is never benchmarked.
The kernels always mask with the real N, so the bucket only picks tiles, never changes results.
`autotune_key` and `benchmarked_configs` are what the launchers and the Triton autotuner use, so
tests can count the cold-start work of any shape set without a GPU.
"""
from __future__ import annotations

import inspect
import os

import torch
import triton

N_BUCKETS = (64, 256, 1024, 4096)   # query-count buckets; N above the last shares the last
MAX_TUNED_CONFIGS = 4               # at most this many configs are benchmarked per key
MIN_PREPASS_BLOCK_N = 32            # sizes the pre-pass partials buffer: no pre-pass config may use fewer rows
MAX_TILE = 128 * 128                # elements of one (rows x head dim) or (keys x head dim) tile

# Argument names the Triton autotuner keys on (it adds every tensor argument's dtype itself).
ATTENTION_KEY = ("N_BUCKET", "M", "BLOCK_D", "F32_DOT", "HAS_WEIGHT")
PREPASS_KEY = ("N_BUCKET", "M", "BLOCK_D", "F32_DOT")
KINDS = ("attention", "prepass")


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def n_bucket(n: int) -> int:
    """The bucket the autotuner keys N on: the smallest of N_BUCKETS >= n, else the last."""
    return next((b for b in N_BUCKETS if n <= b), N_BUCKETS[-1])


def block_d(d: int) -> int:
    """Head dim padded to a power of two (>= 16), the kernels' BLOCK_D."""
    return max(16, triton.next_power_of_2(d))


def f32_dot(dtype: torch.dtype) -> bool:
    """Products in IEEE fp32: always for fp32 inputs (no TF32); for bf16 under the interpreter,
    whose tl.dot multiplies bf16's raw uint16 storage (exact anyway: bf16 -> fp32 is lossless)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def is_tuned(dtype: torch.dtype) -> bool:
    """fp16/bf16 go through the autotuner; fp32 uses `fixed_config` and benchmarks nothing."""
    return dtype != torch.float32


def launch_meta(n: int, d: int, dtype: torch.dtype) -> dict:
    """Keyword arguments every launch passes besides the tensors: the bucket and the constexprs."""
    return {"N_BUCKET": n_bucket(n), "F32_DOT": f32_dot(dtype), "BLOCK_D": block_d(d)}


def autotune_key(kind: str, n: int, m: int, d: int, dtype: torch.dtype, has_weight: bool = True) -> tuple | None:
    """The autotuner's cache key for one launch (its key arguments, then the q dtype), or None for
    fp32, which is never autotuned. Shapes with equal keys share one tuning run."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not is_tuned(dtype):
        return None
    args = {**launch_meta(n, d, dtype), "M": m, "HAS_WEIGHT": has_weight}
    names = ATTENTION_KEY if kind == "attention" else PREPASS_KEY
    return tuple(args[name] for name in names) + (str(dtype),)


def _config(bn: int, bm: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=warps, num_stages=stages)


# Candidates, best guesses first (pruning keeps at most MAX_TUNED_CONFIGS that fit the shape). Each
# compiles for sm_80 and sm_90 without register spills (bench/kernel_resources.py, checked in CI by
# tests/test_kernel_triton_compile.py); 64x128/4w/1s, 128x128/8w/1s, 64x64/4w/1s and 32x128/4w/1s
# spill there and are not candidates.
_ATTENTION_CANDIDATES = ((64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2), (32, 64, 4, 1))
_PREPASS_CANDIDATES = ((64, 128, 4, 1), (128, 128, 8, 1), (64, 64, 4, 1), (32, 64, 4, 1))
_INTERPRETER = (64, 64, 4, 1)


def candidate_configs(kind: str, interpret: bool | None = None) -> list[triton.Config]:
    """All configs the autotuner of `kind` holds; one under the interpreter (nothing to tune)."""
    interpret = interpreting() if interpret is None else interpret
    if interpret:
        return [_config(*_INTERPRETER)]
    return [_config(*c) for c in (_ATTENTION_CANDIDATES if kind == "attention" else _PREPASS_CANDIDATES)]


def fixed_config(d: int) -> triton.Config:
    """The one config of fp32 launches (both kernels): 8 warps over narrow key blocks, because
    IEEE-fp32 operands take twice the registers of fp16 ones (64x64/4w spills KiBs); row tiles
    shrink for wider heads."""
    return _config(64 if block_d(d) <= 64 else 32, 32, 8, 1)


def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Triton's early_config_prune: drop tiles larger than the (bucketed) problem or too big for
    registers / shared memory at this head dim; keep at most MAX_TUNED_CONFIGS. Reads only key
    arguments, so every launch with one key benchmarks the same list."""
    args = {**named_args, **kwargs}
    bucket, m, bd = args["N_BUCKET"], args["M"], args["BLOCK_D"]
    keep = [c for c in configs
            if c.kwargs["BLOCK_N"] <= max(MIN_PREPASS_BLOCK_N, bucket)
            and c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m))
            and c.kwargs["BLOCK_N"] * bd <= MAX_TILE and c.kwargs["BLOCK_M"] * bd <= MAX_TILE]
    return (keep or configs[-1:])[:MAX_TUNED_CONFIGS]


def benchmarked_configs(kind: str, n: int, m: int, d: int, dtype: torch.dtype,
                        interpret: bool | None = None) -> list[triton.Config]:
    """The configs a first launch with this key benchmarks: none for fp32 or when the autotuner holds
    a single config (the interpreter); else the pruned list (counted even if one survives, as older
    Triton versions still time it)."""
    candidates = candidate_configs(kind, interpret)
    if not is_tuned(dtype) or len(candidates) == 1:
        return []
    return prune(candidates, {**launch_meta(n, d, dtype), "M": m})


def autotune(kind: str):
    """`triton.autotune` for `kind` with bucketed keys, pruning, the disk cache and short benchmarks."""
    options = {"configs": candidate_configs(kind), "key": list(ATTENTION_KEY if kind == "attention" else PREPASS_KEY),
               "prune_configs_by": {"early_config_prune": prune}, "cache_results": True}
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        options["do_bench"] = _short_bench
    return triton.autotune(**options)


def _short_bench(fn, quantiles=None):
    """Triton's do_bench with 5 ms warmup and 25 ms of timed runs (default 25 + 100) per config."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)
