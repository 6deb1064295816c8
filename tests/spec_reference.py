"""Independent plain-PyTorch reference of the Cones 2 sampling math (docs/math.md sections 2, 3, 4).

Written from the math alone (docs/math.md, whose section numbers the SPEC n citations use), for tests
that check the optimised engine; it imports no product code.
Clarity over speed: materialised attention scores, one sample at a time, separate
conditional / unconditional UNet calls, explicit Python loops, float32 everywhere.

Public pieces:
  reference_generate(...)                      full sampling run (SPEC 2 + 3 + 4)
  subject_token_positions(tokenizer, prompt, word)
  subject_occurrences(tokenizer, prompt, word) start index of each occurrence
  encode_prompt(text_encoder, tokenizer, text) E(p), (1, 77, D)
  compose_embeddings(text_encoder, tokenizer, prompt, residuals, positions) -> (C, U)
  level_sizes_for(unet, height, width)         attention resolutions of the UNet
  weight_maps(tokenizer, prompt, regions, negative_weight, height, width, level_sizes)
  rectified_attention(q, k, v, weight, coef, scale)
  rectified_attention_probs(q, k, weight, coef, scale)
  train_sigmas / euler_sigmas / guidance_sigmas / guidance_coef   schedule helpers
  dpmpp_2m_sigmas / dpmpp_2m_update            `fast` mode's solver (DPM-Solver++ 2M), from its paper
  ReferenceAttnProcessor                       diffusers attention processor used by the UNet
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MAX_LENGTH = 77
HARD_MASK_THRESHOLD = -1e4

# Stable Diffusion training betas; the guidance sigma schedule always uses these (SPEC 3).
SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_BETA_SCHEDULE = "scaled_linear"
SD_NUM_TRAIN_TIMESTEPS = 1000


# --------------------------------------------------------------------------------------
# Tokens and embeddings (SPEC 2)
# --------------------------------------------------------------------------------------


def _prompt_ids(tokenizer, text: str) -> list[int]:
    """The 77-token (padded, truncated) ids of `text`."""
    ids = tokenizer(text, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    return list(ids)


def _word_ids(tokenizer, word: str) -> list[int]:
    ids = list(tokenizer(word, add_special_tokens=False).input_ids)
    if not ids:
        raise ValueError(f"subject word {word!r} tokenizes to no tokens")
    return ids


def subject_occurrences(tokenizer, prompt: str, word: str) -> list[int]:
    """Start index of every occurrence of the word's full token sequence in the 77-token prompt.

    Only the prompt's own tokens are searched: position 0 (start token) and the end token /
    padding are excluded. Occurrences are found left to right and do not overlap.
    """
    wid = _word_ids(tokenizer, word)
    k = len(wid)
    ids = _prompt_ids(tokenizer, prompt)
    # length of the real (unpadded) token sequence; its last token is the end token
    n_real = len(tokenizer(prompt, max_length=MAX_LENGTH, truncation=True).input_ids)
    last_content = n_real - 2  # index of the last token before the end token
    starts = []
    i = 1
    while i + k - 1 <= last_content:
        if ids[i:i + k] == wid:
            starts.append(i)
            i += k
        else:
            i += 1
    return starts


def subject_token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """All token positions of every occurrence of `word`'s full token sequence (token 0 = start)."""
    k = len(_word_ids(tokenizer, word))
    out = []
    for s in subject_occurrences(tokenizer, prompt, word):
        out.extend(range(s, s + k))
    return sorted(set(out))


@torch.no_grad()
def encode_prompt(text_encoder, tokenizer, text: str) -> torch.Tensor:
    """E(text): final hidden states (after the final layer norm), (1, 77, D) float32."""
    ids = torch.tensor([_prompt_ids(tokenizer, text)], dtype=torch.long, device=text_encoder.device)
    return text_encoder(ids).last_hidden_state.to(torch.float32)


@torch.no_grad()
def compose_embeddings(text_encoder, tokenizer, prompt: str, residuals: dict, positions: dict | None,
                       negative_prompt: str = ""):
    """SPEC 2: C = E(P) with each subject's residual added at its token positions; U = E("") (or
    E(negative_prompt): a negative prompt replaces the empty one in the unconditional branch).

    - Default positions: at every occurrence of the word's token sequence, residual row r is
      added at (occurrence start + r). A residual with fewer rows than the word has tokens is
      thus added at the first position(s) only; more rows than tokens is an error.
    - `positions[word]` (explicit override, like the reference's subject_list): a list of start
      positions; residual rows are added at p, p+1, ..., p+k_r-1 for every given p.
    """
    C = encode_prompt(text_encoder, tokenizer, prompt).clone()
    U = encode_prompt(text_encoder, tokenizer, negative_prompt)
    for word, R in residuals.items():
        R = torch.as_tensor(R).to(device=C.device, dtype=torch.float32)
        if R.ndim == 1:
            R = R[None]
        if R.ndim != 2 or R.shape[1] != C.shape[2]:
            raise ValueError(f"residual for {word!r} has shape {tuple(R.shape)}, want (k, {C.shape[2]})")
        k_r = R.shape[0]
        if positions is not None and word in positions:
            starts = [int(p) for p in positions[word]]
        else:
            k = len(_word_ids(tokenizer, word))
            if k_r > k:
                raise ValueError(f"residual for {word!r} has {k_r} rows but the word has {k} tokens")
            starts = subject_occurrences(tokenizer, prompt, word)
            if not starts:
                raise ValueError(f"subject word {word!r} not found in prompt {prompt!r}")
        for p in starts:
            if p < 1 or p + k_r > MAX_LENGTH:
                raise ValueError(f"position {p} (+{k_r} rows) out of range for {word!r}")
            for r in range(k_r):
                C[0, p + r] = C[0, p + r] + R[r]
    return C, U


# --------------------------------------------------------------------------------------
# Layout weights (SPEC 3)
# --------------------------------------------------------------------------------------


def level_sizes_for(unet, height: int, width: int) -> list[tuple[int, int]]:
    """Attention resolutions: latent (H/8, W/8), halved (stride-2 conv, ceil) per down block."""
    if height % 8 or width % 8:
        raise ValueError("height and width must be multiples of 8")
    h, w = height // 8, width // 8
    sizes = []
    for _ in range(len(unet.config.down_block_types)):
        sizes.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return sizes


def weight_maps(tokenizer, prompt: str, regions: dict, negative_weight: float, height: int, width: int,
                level_sizes) -> dict:
    """SPEC 3 weight map W (h*w, 77) per level (h, w).

    Per subject: {w+ inside, w- outside} at the full (height, width) resolution, resized directly
    to each level (bilinear, align_corners=True), flattened row-major, added at every token of
    every occurrence of the subject word. Non-subject tokens stay 0; coinciding subjects add.
    """
    out = {}
    for (h, w) in level_sizes:
        W = torch.zeros(h * w, MAX_LENGTH, dtype=torch.float32)
        for word, (mask, strength) in regions.items():
            mask = torch.as_tensor(mask).to("cpu").bool()
            if tuple(mask.shape) != (height, width):
                raise ValueError(f"mask for {word!r} has shape {tuple(mask.shape)}, want {(height, width)}")
            pos = subject_token_positions(tokenizer, prompt, word)
            if not pos:
                raise ValueError(f"subject word {word!r} not found in prompt {prompt!r}")
            full = torch.full((height, width), float(negative_weight), dtype=torch.float32)
            full[mask] = float(strength)
            small = F.interpolate(full[None, None], size=(h, w), mode="bilinear", align_corners=True)[0, 0]
            col = small.reshape(h * w)
            for p in pos:
                W[:, p] = W[:, p] + col
        out[(h, w)] = W
    return out


# --------------------------------------------------------------------------------------
# Attention (SPEC 3)
# --------------------------------------------------------------------------------------


def rectified_attention_probs(q, k, weight, coef: float, scale: float) -> torch.Tensor:
    """Attention probabilities (H, N, M) for one sample; q (H, N, d), k (H, M, d).

    weight None -> plain attention softmax(Q K^T * scale). Otherwise the literal SPEC 3 formula:
      S = Q K^T; sd = std(S) (unbiased, all heads/pixels/keys); S' = S + coef * W * sd;
      P = softmax(S' * scale), with the hard-mask rule: where W <= -1e4 and coef > 0, P = 0 exactly.
    """
    S = torch.matmul(q, k.transpose(-1, -2))
    if weight is not None:
        weight = weight.to(device=S.device, dtype=S.dtype)
        sd = torch.std(S)  # unbiased, over ALL elements of S
        S = S + coef * weight * sd
        if coef > 0:
            S = S.masked_fill(weight <= HARD_MASK_THRESHOLD, float("-inf"))
    return torch.softmax(S * scale, dim=-1)


def rectified_attention(q, k, v, weight, coef: float, scale: float) -> torch.Tensor:
    """Output (H, N, d) = P V for one sample, P from rectified_attention_probs."""
    return torch.matmul(rectified_attention_probs(q, k, weight, coef, scale), v)


class ReferenceAttnProcessor:
    """diffusers attention processor: plain attention, except cross-attention when `state`
    holds weights (conditional branch of a guided step), then rectified attention.

    state: dict with "weights_by_n" (N -> (N, 77) tensor, or None) and "coef" (float).
    """

    def __init__(self, state: dict):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("reference processor does not support attention masks")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        B, N, inner = query.shape
        M = key.shape[1]
        H = attn.heads
        d = inner // H
        scale = attn.scale  # = 1/sqrt(head_dim) for SD models (scale_qk=True)

        weight, coef = None, 0.0
        wbn = self.state.get("weights_by_n")
        if is_cross and wbn is not None:
            if N not in wbn:
                raise KeyError(f"no layout weight for a cross-attention layer with {N} query pixels")
            weight = wbn[N]
            if weight.shape != (N, M):
                raise ValueError(f"weight shape {tuple(weight.shape)} != {(N, M)}")
            coef = float(self.state["coef"])

        outs = []
        for b in range(B):
            q = query[b].reshape(N, H, d).transpose(0, 1)
            k = key[b].reshape(M, H, d).transpose(0, 1)
            v = value[b].reshape(M, H, d).transpose(0, 1)
            o = rectified_attention(q, k, v, weight, coef, scale)  # (H, N, d)
            outs.append(o.transpose(0, 1).reshape(N, H * d))
        hidden_states = torch.stack(outs, 0)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


# --------------------------------------------------------------------------------------
# Schedules (SPEC 3, 4)
# --------------------------------------------------------------------------------------


def train_sigmas(beta_start: float, beta_end: float, beta_schedule: str, num_train_timesteps: int) -> np.ndarray:
    """sigma(t) = sqrt((1 - alphas_cumprod) / alphas_cumprod) for t = 0..T-1 (float32 math)."""
    T = num_train_timesteps
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    else:
        raise ValueError(f"unsupported beta_schedule {beta_schedule!r}")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def euler_sigmas(steps: int, beta_start: float, beta_end: float, beta_schedule: str,
                 num_train_timesteps: int):
    """Returns (timesteps float64 numpy (N,), sigmas float32 torch (N+1,), last one 0).

    t_i = linspace(T-1, 0, N); sigmas = interp(t_i, arange(T), train sigmas), then a final 0.
    """
    T = num_train_timesteps
    ts = np.linspace(T - 1, 0, steps, dtype=np.float64)
    s = np.interp(ts, np.arange(T), train_sigmas(beta_start, beta_end, beta_schedule, T))
    s = np.concatenate([s, [0.0]])
    return ts, torch.from_numpy(s).to(torch.float32)


def guidance_sigmas(guidance_steps: int) -> torch.Tensor:
    """Guidance sigma schedule: same construction, always SD betas, G steps. (G+1,) float32."""
    return euler_sigmas(guidance_steps, SD_BETA_START, SD_BETA_END, SD_BETA_SCHEDULE, SD_NUM_TRAIN_TIMESTEPS)[1]


def guidance_coef(guidance_weight: float, guidance_steps: int, i: int) -> float:
    """coef_i = g * log(1 + sigma_i^2), sigma_i from guidance_sigmas(G)."""
    s = float(guidance_sigmas(guidance_steps)[i])
    return float(guidance_weight) * math.log(1.0 + s * s)


# --------------------------------------------------------------------------------------
# DPM-Solver++ 2M (the engine's `fast` mode): Lu et al. 2022, "DPM-Solver++: Fast Solver for
# Guided Sampling of Diffusion Probabilistic Models", Algorithm 2, written in its own VP variables
# --------------------------------------------------------------------------------------


def dpmpp_2m_sigmas(steps: int, beta_start: float, beta_end: float, beta_schedule: str,
                    num_train_timesteps: int):
    """`fast` mode's grid (docs/speed.md): integer timesteps round(linspace(0, T-1, N+1)) reversed,
    without the last (t = 0), the training sigmas there, then a final 0.

    Returns (timesteps float64 numpy (N,), sigmas float32 torch (N+1,))."""
    T = num_train_timesteps
    ts = np.round(np.linspace(0, T - 1, steps + 1))[::-1][:-1].astype(np.int64)
    s = train_sigmas(beta_start, beta_end, beta_schedule, T)[ts].astype(np.float64)
    s = np.concatenate([s, [0.0]])
    return ts.astype(np.float64), torch.from_numpy(s).to(torch.float32)


def _vp_alpha_sigma(sigma: float) -> tuple[float, float]:
    """The VP-SDE (alpha_t, sigma_t) of a noise level `sigma` of x = x0 + sigma * eps:
    x_vp = alpha_t * x = alpha_t * x0 + sigma_t * eps, alpha_t^2 + sigma_t^2 = 1."""
    alpha = 1.0 / math.sqrt(1.0 + sigma * sigma)
    return alpha, sigma * alpha


def dpmpp_2m_update(x, x0, prev_x0, sigma_prev: float | None, sigma: float, sigma_next: float):
    """One DPM-Solver++(2M) step from noise level `sigma` to `sigma_next`, in the x = x0 + sigma*eps scale.

    With lambda_t = log(alpha_t / sigma_t) and h = lambda_next - lambda (Algorithm 2):
        x_vp_next = (sigma_t_next / sigma_t) x_vp - alpha_next (exp(-h) - 1) D
        D = x0                                           first step (no history; = DPM-Solver++ 1 / DDIM)
        D = (1 + 1/(2r)) x0 - 1/(2r) prev_x0,  r = h_prev / h   otherwise
    where h_prev = lambda - lambda_prev. The step to sigma_next = 0 (lambda = +inf, h infinite,
    r -> 0) is the limit of the first-order step: x_next = x0.
    """
    if sigma_next == 0.0:
        return x0
    a, s = _vp_alpha_sigma(sigma)
    a_next, s_next = _vp_alpha_sigma(sigma_next)
    lam, lam_next = math.log(a / s), math.log(a_next / s_next)
    h = lam_next - lam
    if prev_x0 is None:
        D = x0
    else:
        a_prev, s_prev = _vp_alpha_sigma(sigma_prev)
        r = (lam - math.log(a_prev / s_prev)) / h
        D = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * prev_x0
    x_vp_next = (s_next / s) * (a * x) - a_next * (math.exp(-h) - 1.0) * D
    return x_vp_next / a_next


# --------------------------------------------------------------------------------------
# Sampler (SPEC 4)
# --------------------------------------------------------------------------------------


@torch.no_grad()
def reference_generate(*, unet, vae, text_encoder, tokenizer, prediction_type: str, prompt: str,
                       residuals: dict, positions: dict | None, regions: dict,
                       seed: int, steps: int, guidance_steps: int, guidance_weight: float,
                       cfg_scale: float, negative_weight: float, height: int, width: int,
                       beta_start: float, beta_end: float, beta_schedule: str,
                       num_train_timesteps: int, negative_prompt: str = "", solver: str = "euler") -> dict:
    """solver "euler": SPEC 4 to the letter (the engine's `paper-exact`). "dpmpp-2m": the same
    guidance, CFG and self-recurrence with DPM-Solver++ 2M steps (the engine's `fast` on the CPU):
    both passes of a guided step use the same history x0_{i-1}, and the second pass's x0_i becomes
    the history of step i+1 (docs/speed.md)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    if solver not in ("euler", "dpmpp-2m"):
        raise ValueError(f"unsupported solver {solver!r}")
    device = unet.device

    C, U = compose_embeddings(text_encoder, tokenizer, prompt, residuals, positions, negative_prompt)
    C, U = C.to(device), U.to(device)

    grid = euler_sigmas if solver == "euler" else dpmpp_2m_sigmas
    timesteps, sigmas = grid(steps, beta_start, beta_end, beta_schedule, num_train_timesteps)
    sigmas = sigmas.to(device)
    G = int(guidance_steps)
    gsig = guidance_sigmas(G) if G > 0 else None

    weights_by_n = None
    if regions:
        levels = level_sizes_for(unet, height, width)
        maps = weight_maps(tokenizer, prompt, regions, negative_weight, height, width, levels)
        weights_by_n = {h * w: W.to(device) for (h, w), W in maps.items()}

    gen = torch.Generator("cpu").manual_seed(int(seed))
    shape = (1, 4, height // 8, width // 8)
    x = sigmas[0] * torch.randn(shape, generator=gen, dtype=torch.float32).to(device)

    state = {"weights_by_n": None, "coef": 0.0}
    saved = unet.attn_processors
    unet.set_attn_processor(ReferenceAttnProcessor(state))
    prev_x0 = None
    try:
        for i in range(steps):
            t = float(timesteps[i])
            s = sigmas[i]
            s_next = sigmas[i + 1]
            guided = i < G
            coef = 0.0
            if guided:
                sg = float(gsig[i])
                coef = float(guidance_weight) * math.log(1.0 + sg * sg)

            def predict_x0(x):
                xin = x / torch.sqrt(s ** 2 + 1)
                state["weights_by_n"] = weights_by_n if guided else None
                state["coef"] = coef
                e_c = unet(xin, t, encoder_hidden_states=C).sample
                state["weights_by_n"] = None
                state["coef"] = 0.0
                e_u = unet(xin, t, encoder_hidden_states=U).sample
                e = e_u + cfg_scale * (e_c - e_u)
                if prediction_type == "epsilon":
                    return x - s * e
                return e * (-s / torch.sqrt(s ** 2 + 1)) + x / (s ** 2 + 1)

            def one_step(x):
                x0 = predict_x0(x)
                if solver == "euler":
                    return x + (s_next - s) * (x - x0) / s, x0
                s_prev = float(sigmas[i - 1]) if i > 0 else None
                return dpmpp_2m_update(x, x0, prev_x0, s_prev, float(s), float(s_next)), x0

            x, x0 = one_step(x)
            if guided:  # self-recurrence: re-noise back to sigma_i, repeat step i (same history)
                noise = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
                x = x + torch.sqrt(s ** 2 - s_next ** 2) * noise
                x, x0 = one_step(x)
            prev_x0 = x0
    finally:
        unet.set_attn_processor(saved)

    latents = x.to(torch.float32)
    img = vae.decode(latents / vae.config.scaling_factor).sample
    img = ((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    image = img[0].permute(1, 2, 0).cpu().numpy()
    return {"latents": latents, "cond_embeddings": C, "image": image}
