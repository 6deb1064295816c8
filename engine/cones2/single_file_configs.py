"""The diffusers configs of Stable Diffusion 1.x and 2.x, shipped with the package so that a
single-file checkpoint (the original LDM key layout A1111 and ComfyUI use) loads fully offline.

Written from the published architectures: SD 1.x (UNet 320-640-1280-1280, 8 heads, CLIP ViT-L/14 text
encoder, D = 768, epsilon, 512 px) and SD 2.x (the same UNet with 64-wide heads and linear projections,
OpenCLIP ViT-H/14 text encoder, D = 1024; read as SD 2.1's v-prediction at 768 px).
"""
from __future__ import annotations

FAMILIES = ("sd1", "sd2")

_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3,
    "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "scaling_factor": 0.18215,
}
_TEXT = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
         "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407, "layer_norm_eps": 1e-5,
         "initializer_factor": 1.0, "initializer_range": 0.02, "attention_dropout": 0.0, "dropout": 0.0}
_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
              "timestep_spacing": "linspace"}

CONFIGS = {
    "sd1": {
        "unet": {**_UNET, "sample_size": 64, "attention_head_dim": 8, "cross_attention_dim": 768},
        "vae": {**_VAE, "sample_size": 512},
        "text_encoder": {**_TEXT, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu",
                         "pad_token_id": 49407},
        "scheduler": {**_SCHEDULER, "prediction_type": "epsilon"},
        "pad_token": None,        # SD 1.x pads with the end token
    },
    "sd2": {
        "unet": {**_UNET, "sample_size": 96, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                 "use_linear_projection": True},
        "vae": {**_VAE, "sample_size": 768},
        "text_encoder": {**_TEXT, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                         "num_attention_heads": 16, "projection_dim": 512, "hidden_act": "gelu", "pad_token_id": 0},
        "scheduler": {**_SCHEDULER, "prediction_type": "v_prediction"},
        "pad_token": "!",         # SD 2.x pads with "!" (token 0)
    },
}
