"""Fused Triton kernel for layout-rectified cross-attention (SPEC 3), without materialising scores.

    out_b = softmax((S_b + coef_b * W_b * sd_b) * scale) V_b,  S_b = Q_b K_b^T,  sd_b = std(S_b)

Two steps per call:
1. `logit_std` - the per-sample std needs a reduction over every head, query and key before any
   softmax can start, so it is a light pre-pass: one program per (head, block of query rows)
   computes its S tile on chip (never written to memory) and stores three numbers - count, mean
   and sum of squared deviations about that mean; a second one-program-per-sample kernel merges
   them with Chan's parallel-variance formula. Cost: one extra read of Q and K plus the Q K^T
   FLOPs, i.e. roughly half of the main kernel's memory traffic, and nothing at all for samples
   with coef == 0 (the unconditional half of a CFG batch skips its loads). Merging centred
   partials keeps the variance exact where E[S^2] - E[S]^2 would cancel; the closed form from
   Q/K Gram matrices (`cones2.attention.stats.logit_std`) costs about the same reads but
   (d x d) Gram FLOPs and that cancellation, so the pre-pass is the default here.
2. `rectified_cross_attention` - one fused kernel per block of query rows of one head: Q K^T,
   rectification, hard mask, softmax and the value product, streaming over key blocks with an
   online softmax (M = 77 is one block). Grid order puts the heads of one row block next to each
   other so the sample's weight tile (shared by all heads) is read from DRAM once and then from L2.

Hard mask: weight <= -1e4 with coef > 0 gives probability exactly 0 (the logit is -inf before the
exponential), in fp32, fp16 and bf16; a fully masked row (impossible with a start token) gives 0,
never NaN. All arithmetic after the loads is fp32; fp32 inputs use IEEE (not TF32) products.
Tiles: fp16/bf16 launches autotune over at most a handful of configs per bucketed key (N rounded
up to one of 4 buckets, M, padded d, dtype; the choice is cached on disk in Triton's cache); fp32
launches take one fixed config; under TRITON_INTERPRET=1 everything runs one config (`tuning`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .errors import KernelArgumentError
from .tuning import MIN_PREPASS_BLOCK_N, interpreting

HARD_MASK = tl.constexpr(-1e4)  # weight <= HARD_MASK with coef > 0: probability exactly 0 (SPEC 3)
MAX_HEAD_DIM = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- std pre-pass ---------------------------------------------------------------------------------
@triton.jit
def _logit_moments_kernel(q_ptr, k_ptr, coef_ptr, part_ptr, meta_ptr,
                          sqb, sqh, sqn, sqd, skb, skh, skm, skd, spart_b, SLOTS_PER_HEAD,
                          H, N, M, D, N_BUCKET, F32_DOT: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per (head, row block): count, mean and centred sum of squares of its S tile -> part (3, B, H * SLOTS_PER_HEAD),
    slot h * SLOTS_PER_HEAD + row block; meta <- the used BLOCK_N, so the merge knows the used slots.
    N_BUCKET is read by the autotuner only (its key); rows are masked with the real N."""
    h, nb, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    active = tl.load(coef_ptr + b) != 0.0          # coef == 0: std never used, skip the loads
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_n < N
    d_load = offs_d < tl.where(active, D, 0)
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_load[None, :], other=0.0)
    rows = tl.minimum(N - nb * BLOCK_N, BLOCK_N).to(tl.float32)
    count = rows * 0.0
    mean = rows * 0.0
    m2 = rows * 0.0
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        col_ok = offs_m < M
        k = tl.load(k_ptr + b * skb + h * skh + offs_m[:, None] * skm + offs_d[None, :] * skd,
                    mask=col_ok[:, None] & d_load[None, :], other=0.0)
        if F32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        valid = row_ok[:, None] & col_ok[None, :]
        bcount = rows * tl.minimum(M - start, BLOCK_M).to(tl.float32)
        bmean = tl.sum(tl.sum(tl.where(valid, s, 0.0), axis=1), axis=0) / bcount
        dev = tl.where(valid, s - bmean, 0.0)
        bm2 = tl.sum(tl.sum(dev * dev, axis=1), axis=0)
        total = count + bcount
        delta = bmean - mean
        mean = mean + delta * (bcount / total)
        m2 = m2 + bm2 + delta * delta * (count * bcount / total)
        count = total
    count = tl.where(active, count, 0.0)
    slot = h * SLOTS_PER_HEAD + nb
    tl.store(meta_ptr, BLOCK_N, mask=(h + nb + b) == 0)
    tl.store(part_ptr + b * spart_b + slot, count)
    tl.store(part_ptr + (tl.num_programs(2) + b) * spart_b + slot, mean)
    tl.store(part_ptr + (2 * tl.num_programs(2) + b) * spart_b + slot, m2)


_logit_moments_tuned = tuning.autotune("prepass")(_logit_moments_kernel)


@triton.jit
def _merge_moments_kernel(part_ptr, meta_ptr, sd_ptr, spart_b, B, N, SLOTS_PER_HEAD, P, BLOCK_P: tl.constexpr):
    """One program per sample: Chan-merge the used partials into the unbiased std (0 if skipped)."""
    b = tl.program_id(0)
    block_n = tl.load(meta_ptr)
    used = (N + block_n - 1) // block_n                      # row blocks per head the pre-pass wrote
    offs = tl.arange(0, BLOCK_P)
    total_c = tl.zeros([BLOCK_P], tl.float32)
    total_s = tl.zeros([BLOCK_P], tl.float32)
    for start in range(0, P, BLOCK_P):
        ok = (start + offs < P) & ((start + offs) % SLOTS_PER_HEAD < used)
        c = tl.load(part_ptr + b * spart_b + start + offs, mask=ok, other=0.0)
        mu = tl.load(part_ptr + (B + b) * spart_b + start + offs, mask=ok, other=0.0)
        total_c += c
        total_s += c * mu
    count = tl.sum(total_c, axis=0)
    gmean = tl.sum(total_s, axis=0) / tl.maximum(count, 1.0)
    acc = tl.zeros([BLOCK_P], tl.float32)
    for start in range(0, P, BLOCK_P):
        ok = (start + offs < P) & ((start + offs) % SLOTS_PER_HEAD < used)
        c = tl.load(part_ptr + b * spart_b + start + offs, mask=ok, other=0.0)
        mu = tl.load(part_ptr + (B + b) * spart_b + start + offs, mask=ok, other=0.0)
        m2 = tl.load(part_ptr + (2 * B + b) * spart_b + start + offs, mask=ok, other=0.0)
        acc += m2 + c * (mu - gmean) * (mu - gmean)
    var = tl.sum(acc, axis=0) / tl.maximum(count - 1.0, 1.0)
    tl.store(sd_ptr + b, tl.sqrt(tl.maximum(var, 0.0)))


# ---- fused attention ------------------------------------------------------------------------------
@triton.jit
def _rectified_attention_kernel(q_ptr, k_ptr, v_ptr, w_ptr, coef_ptr, sd_ptr, o_ptr,
                                sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                                swb, swn, swm, sob, soh, son, sod,
                                H, N, M, D, qk_scale, N_BUCKET,
                                HAS_WEIGHT: tl.constexpr, F32_DOT: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """One (head, block of BLOCK_N query rows, sample): streams all M keys, writes (BLOCK_N, d).
    N_BUCKET is read by the autotuner only (its key); rows are masked with the real N."""
    h, nb, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_n < N
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_WEIGHT:
        coef = tl.load(coef_ptr + b)
        bias_scale = coef * tl.load(sd_ptr + b)   # logits get + coef * sd * W before scaling
        m_guided = tl.where(coef != 0.0, M, 0)      # coef == 0: no weight loads at all
        hard_at = tl.where(coef > 0.0, HARD_MASK, float("-inf"))   # hard masks only when guiding

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        col_ok = offs_m < M
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * skb + h * skh + offs_m[:, None] * skm + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        if F32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if HAS_WEIGHT:
            w = tl.load(w_ptr + b * swb + offs_n[:, None] * swn + offs_m[None, :] * swm,
                        mask=row_ok[:, None] & (offs_m < m_guided)[None, :], other=0.0)
            s = s + bias_scale * w
            s = tl.where(w <= hard_at, float("-inf"), s)
        s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))          # log2 domain
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)             # all -inf so far: keep 0s
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b * svb + h * svh + offs_m[:, None] * svm + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if F32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + b * sob + h * soh + offs_n[:, None] * son + offs_d[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


_rectified_attention_tuned = tuning.autotune("attention")(_rectified_attention_kernel)


# ---- launchers ------------------------------------------------------------------------------------
def _launch(tuned, kernel, grid, args, n: int, d: int, dtype: torch.dtype, **constexprs) -> None:
    """fp16/bf16: through the bounded autotuner; fp32: the fixed config, nothing benchmarked."""
    meta = {**tuning.launch_meta(n, d, dtype), **constexprs}
    if tuning.is_tuned(dtype):
        tuned[grid](*args, **meta)
    else:
        config = tuning.fixed_config(d)
        kernel[grid(config.kwargs)](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                    num_stages=config.num_stages)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise KernelArgumentError("must be a 4-D tensor (B, H, tokens, d)", name)
        if t.dtype not in DTYPES:
            raise KernelArgumentError(f"dtype {t.dtype} is not supported (float32, float16, bfloat16)", name)
        if t.dtype != q.dtype or t.device != q.device:
            raise KernelArgumentError(f"must match q's dtype and device ({q.dtype}, {q.device})", name)
    B, H, _, d = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != d:
        raise KernelArgumentError(f"shape {tuple(k.shape)} does not fit q {tuple(q.shape)}: expected ({B}, {H}, M, {d})", "k")
    if v is not None and v.shape != k.shape:
        raise KernelArgumentError(f"shape {tuple(v.shape)} must equal k's {tuple(k.shape)}", "v")
    if d > MAX_HEAD_DIM:
        raise KernelArgumentError(f"head dim {d} is larger than the kernel's {MAX_HEAD_DIM}", "q")
    if k.shape[2] < 1:
        raise KernelArgumentError("needs at least one key", "k")
    if q.device.type != "cuda" and not interpreting():
        raise KernelArgumentError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                                  f"interpreter); got tensors on {q.device}", "q")


def logit_std(q: torch.Tensor, k: torch.Tensor, coef: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased std of S_b = q_b k_b^T over (H, N, M) per sample, without materialising S.

    q: (B, H, N, d), k: (B, H, M, d). coef: optional (B,); samples with coef == 0 are skipped and
    get 0 (their std is never used). Returns (B,) float32.
    """
    _check(q, k)
    B, H, N, d = q.shape
    M = k.shape[2]
    coef = _coef(coef, B, q.device) if coef is not None else torch.ones(B, dtype=torch.float32, device=q.device)
    # Slots for the smallest row block of any config; the tuned config may use fewer per head.
    per_head = triton.cdiv(N, MIN_PREPASS_BLOCK_N)
    part = torch.empty((3, B, H * per_head), dtype=torch.float32, device=q.device)
    meta = torch.empty(1, dtype=torch.int32, device=q.device)
    sd = torch.empty(B, dtype=torch.float32, device=q.device)

    def grid(meta_args):
        return (H, triton.cdiv(N, meta_args["BLOCK_N"]), B)

    _launch(_logit_moments_tuned, _logit_moments_kernel, grid,
            (q, k, coef, part, meta, *q.stride(), *k.stride(), part.stride(1), per_head, H, N, M, d), N, d, q.dtype)
    _merge_moments_kernel[(B,)](part, meta, sd, part.stride(1), B, N, per_head, H * per_head,
                                BLOCK_P=128 if interpreting() else 1024)
    return sd


def _coef(coef, B: int, device) -> torch.Tensor:
    coef = torch.as_tensor(coef, dtype=torch.float32, device=device)
    if coef.shape != (B,):
        raise KernelArgumentError(f"shape {tuple(coef.shape)} must be ({B},), one coefficient per sample", "coef")
    return coef.contiguous()


def rectified_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor | None,
                              coef: torch.Tensor | None, scale: float | None = None, *,
                              sd: torch.Tensor | None = None) -> torch.Tensor:
    """SPEC 3 rectified attention, fused.

    q: (B, H, N, d); k, v: (B, H, M, d), float32/float16/bfloat16, any strides.
    weight: (B, N, M) float32 (W of this attention resolution) or None for plain attention.
    coef: (B,) float32, g * log(1 + sigma^2); 0 = plain attention for that sample.
    scale: logit scale, default d ** -0.5. sd: optional precomputed (B,) std (else `logit_std`).
    Returns (B, H, N, d) in q's dtype, laid out (B, N, H, d) in memory so that merging heads
    (`out.transpose(1, 2).reshape(B, N, H * d)`) is free.
    """
    _check(q, k, v)
    B, H, N, d = q.shape
    M = k.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    out = torch.empty((B, N, H, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    if N == 0:
        return out
    has_weight = weight is not None
    if has_weight:
        if coef is None:
            raise KernelArgumentError("is required when a weight is given", "coef")
        coef = _coef(coef, B, q.device)
        if not isinstance(weight, torch.Tensor) or weight.shape != (B, N, M):
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise KernelArgumentError(f"shape {got} must be ({B}, {N}, {M})", "weight")
        weight = weight.to(device=q.device, dtype=torch.float32)
        if sd is None:
            sd = logit_std(q, k, coef)
        elif sd.shape != (B,):
            raise KernelArgumentError(f"shape {tuple(sd.shape)} must be ({B},)", "sd")
        sd = sd.to(device=q.device, dtype=torch.float32).contiguous()
        w_strides = weight.stride()
    else:
        coef = sd = out  # never read
        weight, w_strides = out, (0, 0, 0)

    def grid(meta):
        return (H, triton.cdiv(N, meta["BLOCK_N"]), B)

    _launch(_rectified_attention_tuned, _rectified_attention_kernel, grid,
            (q, k, v, weight, coef, sd, out, *q.stride(), *k.stride(), *v.stride(), *w_strides, *out.stride(),
             H, N, M, d, scale * 1.4426950408889634), N, d, q.dtype, HAS_WEIGHT=has_weight)
    return out
