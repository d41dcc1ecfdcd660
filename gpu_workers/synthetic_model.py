"""The `sdxl-synthetic` preset: the full SDXL architecture with random weights, built on the device.

It exists so that a GPU benchmark runs exactly the compute of the real model (SDXL base's UNet, which
SDXL-Lightning keeps unchanged, both CLIP text encoders, the VAE) without downloading 7 GB or needing
a Hugging Face token. The configurations below are the public `config.json` files of
stabilityai/stable-diffusion-xl-base-1.0 (unet, text_encoder, text_encoder_2, scheduler) and of
madebyollin/sdxl-vae-fp16-fix (vae), written out here so that nothing is fetched. Images are noise.

Every model is constructed under `with torch.device(device)`, so its parameters are allocated and
initialised (each class's own default init: finite, small values) on the device itself, one
component at a time in float32 and then cast, with a fixed seed per component. On the meta device
the same code allocates nothing, which is how the tests count parameters and FLOPs on a CPU.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from gpu_workers.tiny_model import _make_tokenizers

_SEED = 20261125

# stabilityai/stable-diffusion-xl-base-1.0/unet/config.json (the SDXL-Lightning UNet uses it as is)
UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + text_encoder_2's 1280
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# .../text_encoder/config.json: OpenAI CLIP ViT-L/14's text tower
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,  # the legacy value: pooling takes the highest token id (end-of-text)
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# .../text_encoder_2/config.json: OpenCLIP ViT-bigG/14's text tower, with its projection
TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    **TEXT_ENCODER_CONFIG,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

# madebyollin/sdxl-vae-fp16-fix/config.json: SDXL's VAE architecture, rescaled so fp16 does not overflow
# (the base repo's VAE config differs only in force_upcast=True and sample_size=1024)
VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# .../scheduler/scheduler_config.json, with the trailing spacing SDXL-Lightning needs
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",  # the base repo says "leading"; the loader sets trailing anyway
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# 1024x576 (the API's image size) as latents
_LATENT_CHANNELS = 4
_VAE_SCALE = 8  # 2 ** (len(VAE block_out_channels) - 1)
_TOKENS = 77
_TIME_IDS = 6  # original size, crop top-left, target size


def synthetic_configs() -> dict[str, dict[str, Any]]:
    """Copies of every component's configuration, by pipeline component name."""
    return {
        "unet": dict(UNET_CONFIG),
        "text_encoder": dict(TEXT_ENCODER_CONFIG),
        "text_encoder_2": dict(TEXT_ENCODER_2_CONFIG),
        "vae": dict(VAE_CONFIG),
        "scheduler": dict(SCHEDULER_CONFIG),
    }


def build_synthetic_pipeline(device: str, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """The full-size SDXL pipeline with seeded random weights, every tensor created on `device`.

    Each component is built in float32 on the device (its classes' own default init: uniform or
    normal values of at most a few tenths, norms at 1) and then cast to `dtype`, so the peak is one
    component in both precisions: the UNet's 10.3 GB in float32 plus 5.1 GB in float16; the finished
    float16 pipeline holds 6.9 GB. `device="meta"` builds the structure without any memory.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, tokenizer_2 = _make_tokenizers(Path(tmp))  # a small local CLIP BPE: ids < 49408
    return StableDiffusionXLPipeline(
        vae=_build(1, device, dtype, lambda: AutoencoderKL.from_config(VAE_CONFIG)),
        text_encoder=_build(2, device, dtype, lambda: CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))),
        text_encoder_2=_build(
            3, device, dtype, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2_CONFIG))
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_build(4, device, dtype, lambda: UNet2DConditionModel.from_config(UNET_CONFIG)),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,  # SDXL base's model_index.json
        add_watermarker=False,
    )


def _build(offset: int, device: str, dtype: torch.dtype, factory: Callable[[], torch.nn.Module]) -> Any:
    """Construct one component on `device` under its own seed, then cast it to `dtype`.

    The seed is set for the CPU and every CUDA device (`manual_seed` does both) inside `fork_rng`,
    so the caller's generator state is left as it was.
    """
    target = torch.device(device)
    if target.type == "cuda":
        cuda_devices = [target.index if target.index is not None else torch.cuda.current_device()]
    else:
        cuda_devices = []
    with torch.random.fork_rng(devices=cuda_devices), target:
        torch.manual_seed(_SEED + offset)
        module = factory()
    # torch's own cast: diffusers' `to()` warns about float32-only modules even when it has none
    return torch.nn.Module.to(module, dtype=dtype).eval()


def count_parameters_on_meta() -> dict[str, int]:
    """Parameter count of each model component, built on the meta device (no memory, ~1 s)."""
    pipe = build_synthetic_pipeline("meta", torch.float32)
    return {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("unet", "text_encoder", "text_encoder_2", "vae")
    }


def unet_step_flops(height: int = 576, width: int = 1024, batch: int = 1) -> int:
    """FLOPs of one UNet forward (one denoising step at guidance 0) counted on the meta device.

    `torch.utils.flop_counter` counts 2 FLOPs per multiply-add of matmuls and convolutions; on meta
    tensors attention runs as its math decomposition (bmm), which counts the same as the fused
    kernels' formula (4 x batch x heads x queries x keys x head_dim).
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNET_CONFIG)
        latents = torch.empty(batch, _LATENT_CHANNELS, height // _VAE_SCALE, width // _VAE_SCALE)
        timestep = torch.full((batch,), 999)
        text = torch.empty(batch, _TOKENS, UNET_CONFIG["cross_attention_dim"])
        conditioning = {
            "text_embeds": torch.empty(batch, TEXT_ENCODER_2_CONFIG["projection_dim"]),
            "time_ids": torch.empty(batch, _TIME_IDS),
        }
    return _count_flops(lambda: unet(latents, timestep, text, added_cond_kwargs=conditioning))


def vae_decode_flops(height: int = 576, width: int = 1024, batch: int = 1) -> int:
    """FLOPs of decoding one batch of latents to images (the VAE decoder), counted on meta."""
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(VAE_CONFIG)
        latents = torch.empty(batch, _LATENT_CHANNELS, height // _VAE_SCALE, width // _VAE_SCALE)
    return _count_flops(lambda: vae.decode(latents))


def image_flops(steps: int = 8, height: int = 576, width: int = 1024) -> int:
    """One image: `steps` UNet forwards and one VAE decode, as DESIGN.md section 6 counts it.

    The text encoders are left out: 0.11 TFLOP a prompt (13.3 G + 97.9 G), 0.3% of an image.
    """
    return steps * unet_step_flops(height, width) + vae_decode_flops(height, width)


def _count_flops(run: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()
