"""The `sdxl-synthetic` preset stays the real SDXL architecture: counted on the meta device, CPU only.

Parameter counts are those of the published checkpoints (SDXL base 1.0's UNet, text encoders and
VAE); FLOPs are DESIGN.md section 6's figures, counted with `torch.utils.flop_counter`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from gpu_workers import loading
from gpu_workers.loading import KNOWN_PRESETS, load_pipeline
from gpu_workers.synthetic_model import (
    build_synthetic_pipeline,
    count_parameters_on_meta,
    synthetic_configs,
    unet_step_flops,
    vae_decode_flops,
)

TFLOP = 1e12


@pytest.fixture(scope="module")
def unet_flops() -> int:
    return unet_step_flops(height=576, width=1024, batch=1)


@pytest.fixture(scope="module")
def vae_flops() -> int:
    return vae_decode_flops(height=576, width=1024, batch=1)


def test_parameter_counts_are_sdxl_base() -> None:
    assert count_parameters_on_meta() == {
        "unet": 2_567_463_684,
        "text_encoder": 123_060_480,  # CLIP ViT-L/14 text tower
        "text_encoder_2": 694_659_840,  # OpenCLIP bigG text tower with its projection
        "vae": 83_653_863,
    }


def test_unet_step_costs_3_64_tflop_at_1024x576(unet_flops: int) -> None:
    assert unet_flops == pytest.approx(3.64 * TFLOP, rel=0.01)
    assert unet_flops == 3_641_208_995_840  # exact, so that any drift shows


def test_vae_decode_costs_5_75_tflop_at_1024x576(vae_flops: int) -> None:
    assert vae_flops == pytest.approx(5.75 * TFLOP, rel=0.01)
    assert vae_flops == 5_754_304_364_544


def test_an_8_step_image_costs_34_9_tflop(unet_flops: int, vae_flops: int) -> None:
    assert 8 * unet_flops + vae_flops == pytest.approx(34.9 * TFLOP, rel=0.01)


def test_unet_flops_scale_with_batch() -> None:
    """Batched shards cost the same per image: nothing in the UNet is shared across a batch."""
    small = unet_step_flops(height=256, width=256, batch=1)
    assert unet_step_flops(height=256, width=256, batch=2) == 2 * small


def test_configs_wire_together() -> None:
    """What diffusers checks when the pipeline runs: cross-attention width is both encoders' hidden
    sizes; the added embedding takes 6 time ids of 256 plus encoder 2's pooled projection."""
    configs = synthetic_configs()
    unet, te1, te2 = configs["unet"], configs["text_encoder"], configs["text_encoder_2"]
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"] == 2048
    added = 6 * unet["addition_time_embed_dim"] + te2["projection_dim"]
    assert unet["projection_class_embeddings_input_dim"] == added == 2816
    assert configs["vae"]["scaling_factor"] == 0.13025 and configs["vae"]["force_upcast"] is False
    assert configs["scheduler"]["timestep_spacing"] == "trailing"
    configs["unet"]["sample_size"] = 1  # copies: the module's configs stay as they are
    assert synthetic_configs()["unet"]["sample_size"] == 128


def test_built_pipeline_has_usable_tokenizers_and_no_memory() -> None:
    pipe = build_synthetic_pipeline("meta", torch.float16)
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in pipe.unet.parameters())
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        assert tokenizer.model_max_length == 77
        ids = tokenizer("a photo of a cat", padding="max_length", truncation=True).input_ids
        assert len(ids) == 77 and max(ids) < encoder.config.vocab_size
        # the legacy eos_token_id=2 pools at the highest id, which must be end-of-text
        assert max(ids) == tokenizer.eos_token_id


def test_loader_builds_the_preset_with_trailing_euler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The real loading path, on the meta device (no weights allocated)."""
    calls: list[tuple[str, torch.dtype]] = []

    def spy(device: str, dtype: torch.dtype) -> StableDiffusionXLPipeline:
        calls.append((device, dtype))
        return build_synthetic_pipeline(device, dtype)

    monkeypatch.setattr(loading, "build_synthetic_pipeline", spy)
    assert "sdxl-synthetic" in KNOWN_PRESETS
    pipe = load_pipeline("sdxl-synthetic", "meta", tmp_path)
    assert calls == [("meta", torch.float32)]  # pipeline_dtype: float16 on CUDA only
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.unet.device.type == "meta"
    assert not list(tmp_path.iterdir())  # nothing written to the model cache
