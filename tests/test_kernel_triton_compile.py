"""The Triton kernels compile for real GPU targets (sm_80, sm_90) on this GPU-less machine.

The interpreter runs the kernels as Python, so it cannot see what only the compiler checks (types,
layouts, shared memory of a tile config). Triton's own ptxas compiles ahead of time without a
device; this runs in a subprocess because the test session imported the kernels interpreted.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from cones2.kernels import triton_rectified as tr

    POINTERS = {"q_ptr", "k_ptr", "v_ptr", "o_ptr"}
    FLOAT_POINTERS = {"w_ptr", "coef_ptr", "sd_ptr", "part_ptr"}
    CONSTEXPRS = {"HAS_WEIGHT", "F32_DOT", "BLOCK_D", "BLOCK_N", "BLOCK_M", "BLOCK_P"}

    def arg_type(name, dtype):
        if name in POINTERS:
            return "*" + dtype
        if name in FLOAT_POINTERS:
            return "*fp32"
        if name in CONSTEXPRS:
            return "constexpr"
        return {"meta_ptr": "*i32", "qk_scale": "fp32"}.get(name, "i32")

    def signature(fn, dtype):
        return {name: arg_type(name, dtype) for name in fn.arg_names}

    def build(kernel, dtype, consts, config, arch):
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        src = triton.compiler.ASTSource(fn=fn, signature=signature(fn, dtype), constexprs={**consts, **config.kwargs})
        return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})

    attention = tr._attention_configs()
    prepass = tr._prepass_configs()
    assert len(attention) > 1 and len(prepass) > 1, "not the GPU config lists"
    for arch in (80, 90):
        for dtype, f32, head_dim in (("fp16", False, 64), ("bf16", False, 160), ("fp32", True, 40)):
            block_d = tr._block_d(head_dim)
            for has_weight in (True, False):
                k = build(tr._rectified_attention_kernel, dtype,
                          {"HAS_WEIGHT": has_weight, "F32_DOT": f32, "BLOCK_D": block_d}, attention[0], arch)
                assert k.metadata.shared > 0
            build(tr._logit_moments_kernel, dtype, {"F32_DOT": f32, "BLOCK_D": block_d}, prepass[0], arch)
        merge = triton.Config({"BLOCK_P": 1024}, num_warps=4, num_stages=1)
        build(tr._merge_moments_kernel, "fp32", {}, merge, arch)
    print("compiled")
""")


def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("Triton's ptxas is not available here")
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-4000:]
