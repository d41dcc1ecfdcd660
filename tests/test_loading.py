"""Model loading: the tiny model, the real Lightning recipe against an offline hub cache, local
folders, factories, and the errors an operator sees when something is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from safetensors.torch import load_file

from contract.batch import DEFAULT_STEPS
from gpu_workers.loading import (
    BASE_REPO,
    KNOWN_PRESETS,
    LIGHTNING_REPO,
    LIGHTNING_UNET_FILE,
    VAE_REPO,
    ModelLoadError,
    load_pipeline,
)
from gpu_workers.tiny_model import TINY_MODEL_NAME, _publish, build_tiny_model
from tests.hf_cache import WEIGHTS, lay_out_hub_cache, repo_folder, snapshot_folder

REPO_ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter: huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when imported,
# so only a new process sees them the way a worker started with those variables does.
_LOAD_LIGHTNING = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from safetensors.torch import save_file
    from gpu_workers.loading import ModelLoadError, load_pipeline

    out = Path(sys.argv[1])
    try:
        pipe = load_pipeline("sdxl-lightning-8step", "cpu", out / "models")
    except ModelLoadError as exc:
        result = {"error": str(exc)}
    else:
        save_file(pipe.unet.state_dict(), out / "unet.safetensors")
        save_file(pipe.vae.state_dict(), out / "vae.safetensors")
        image = pipe("a cat", height=64, width=64, num_inference_steps=2, guidance_scale=0.0).images[0]
        result = {
            "scheduler": type(pipe.scheduler).__name__,
            "timestep_spacing": pipe.scheduler.config.timestep_spacing,
            "dtype": str(pipe.unet.dtype),
            "image_size": list(image.size),
        }
    (out / "result.json").write_text(json.dumps(result))
    """
)


@pytest.fixture(autouse=True)
def _one_cpu_thread() -> Iterator[None]:
    """One torch thread, as CPU workers run by default: faster than two on this 2-core box, and it
    does not collapse when other processes share the cores. The caller's setting comes back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_folder(model_cache: Path) -> Path:
    """The tiny model, built once into the session's model cache (conftest.py), which servers share."""
    return build_tiny_model(model_cache)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_folder: Path, model_cache: Path) -> StableDiffusionXLPipeline:
    return load_pipeline("tiny", "cpu", model_cache)


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, tiny_folder: Path) -> Path:
    cache = tmp_path_factory.mktemp("hf-hub")
    lay_out_hub_cache(cache, tiny_folder)
    return cache


def _generate(pipe: StableDiffusionXLPipeline, seed: int) -> np.ndarray:
    """One 1024x576 image the way workers make them: 8 steps, guidance 0, its own CPU generator."""
    image = pipe(
        prompt=["a lighthouse at dusk"],
        height=576,
        width=1024,
        num_inference_steps=DEFAULT_STEPS,
        guidance_scale=0.0,
        generator=[torch.Generator("cpu").manual_seed(seed)],
    ).images[0]
    assert image.size == (1024, 576)
    return np.asarray(image)


def _load_lightning_offline(hub_cache: Path, out: Path) -> dict:
    """Load the real preset in a child process that sees only `hub_cache`, offline."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(
        HF_HOME=str(out / "hf-home"),
        HF_HUB_CACHE=str(hub_cache),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_LIGHTNING, str(out)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def _assert_same_tensors(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor.to(loaded[name].dtype)), name


# --- the tiny model --------------------------------------------------------------------------


def test_tiny_model_is_built_once_under_a_versioned_name(model_cache: Path, tiny_folder: Path) -> None:
    assert tiny_folder == model_cache / TINY_MODEL_NAME
    assert build_tiny_model(model_cache) == tiny_folder
    assert not [path for path in model_cache.iterdir() if path.name.startswith(".")]  # no staging left


def test_tiny_model_can_carry_fp16_variant_file_names(tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (folder / "text_encoder_2" / "model.fp16.safetensors").is_file()
    assert not (folder / "unet" / WEIGHTS).exists()
    # a local folder with only variant files loads too (diffusers needs to be told the variant)
    assert isinstance(load_pipeline(str(folder), "cpu", tmp_path), StableDiffusionXLPipeline)


def test_tiny_model_weights_are_the_same_on_every_build(tmp_path: Path, tiny_folder: Path) -> None:
    torch.manual_seed(12345)  # the caller's generator state must not matter
    again = build_tiny_model(tmp_path)
    for component in ("unet", "vae"):
        weights = Path(component) / WEIGHTS
        _assert_same_tensors(load_file(again / weights), load_file(tiny_folder / weights))


def test_losing_the_build_race_keeps_the_winners_folder(tmp_path: Path, tiny_folder: Path) -> None:
    target = tmp_path / TINY_MODEL_NAME
    shutil.copytree(tiny_folder, target)
    loser = tmp_path / ".staging"
    loser.mkdir()
    (loser / "model_index.json").write_text("{}")
    _publish(loser, target)  # another process got there first: no error, its folder stays
    assert json.loads((target / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


def test_tiny_pipeline_is_sdxl_with_trailing_euler(tiny_pipe: StableDiffusionXLPipeline) -> None:
    assert isinstance(tiny_pipe, StableDiffusionXLPipeline)
    assert isinstance(tiny_pipe.scheduler, EulerDiscreteScheduler)
    assert tiny_pipe.scheduler.config.timestep_spacing == "trailing"
    assert tiny_pipe.unet.config.addition_embed_type == "text_time"
    assert tiny_pipe.unet.dtype == torch.float32
    assert tiny_pipe.tokenizer.model_max_length == tiny_pipe.tokenizer_2.model_max_length == 77


def test_tiny_pipeline_truncates_long_prompts(tiny_pipe: StableDiffusionXLPipeline) -> None:
    ids = tiny_pipe.tokenizer("cat " * 200, truncation=True, max_length=77).input_ids
    assert len(ids) == 77
    assert len(tiny_pipe.tokenizer("a cat in space").input_ids) == 6  # whole words, like CLIP's


def test_tiny_images_depend_only_on_the_seed(tiny_pipe: StableDiffusionXLPipeline) -> None:
    first = _generate(tiny_pipe, seed=7)
    assert first.shape == (576, 1024, 3)
    assert np.array_equal(first, _generate(tiny_pipe, seed=7))
    assert not np.array_equal(first, _generate(tiny_pipe, seed=8))


# --- the real preset against an offline hub cache --------------------------------------------


def test_lightning_preset_loads_lightning_unet_and_fp16_fix_vae(hub_cache: Path, tmp_path: Path) -> None:
    result = _load_lightning_offline(hub_cache, tmp_path)

    assert "error" not in result, result.get("error")
    assert result["scheduler"] == "EulerDiscreteScheduler"
    assert result["timestep_spacing"] == "trailing"
    assert result["dtype"] == "torch.float32"  # fp16 files, upcast on the CPU
    assert result["image_size"] == [64, 64]
    unet = load_file(tmp_path / "unet.safetensors")
    lightning = load_file(snapshot_folder(hub_cache, LIGHTNING_REPO) / LIGHTNING_UNET_FILE)
    _assert_same_tensors(unet, lightning)
    base_unet = snapshot_folder(hub_cache, BASE_REPO) / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    assert not torch.equal(unet["conv_in.weight"], load_file(base_unet)["conv_in.weight"])
    fp16_fix_vae = load_file(snapshot_folder(hub_cache, VAE_REPO) / WEIGHTS)
    _assert_same_tensors(load_file(tmp_path / "vae.safetensors"), fp16_fix_vae)


def test_lightning_preset_with_an_empty_offline_cache_says_how_to_fix_it(tmp_path: Path) -> None:
    (tmp_path / "empty-hub").mkdir()
    error = _load_lightning_offline(tmp_path / "empty-hub", tmp_path)["error"]
    assert BASE_REPO in error
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in error
    assert "internet" in error and "HF_HOME" in error and "HF_TOKEN" in error


def test_lightning_preset_names_the_repo_that_is_missing(tmp_path: Path, tiny_folder: Path) -> None:
    lay_out_hub_cache(tmp_path / "hub", tiny_folder)
    shutil.rmtree(repo_folder(tmp_path / "hub", LIGHTNING_REPO))
    error = _load_lightning_offline(tmp_path / "hub", tmp_path)["error"]
    assert LIGHTNING_REPO in error and BASE_REPO not in error


# --- other model values ----------------------------------------------------------------------


def test_presets_are_listed() -> None:
    assert {"tiny", "sdxl-lightning-8step", "sdxl-synthetic"} <= set(KNOWN_PRESETS)
    assert DEFAULT_STEPS == 8


def test_missing_path_says_what_to_pass(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError) as caught:
        load_pipeline(str(missing), "cpu", tmp_path)
    assert str(caught.value) == (
        f"Model path {missing} does not exist or has no model_index.json:"
        " pass --model tiny, sdxl-lightning-8step, or a diffusers folder"
    )


def test_unknown_name_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"Unknown model 'sdxl-turbo'.*pass --model tiny"):
        load_pipeline("sdxl-turbo", "cpu", tmp_path)


def test_local_folder_loads_with_trailing_euler(tiny_folder: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(str(tiny_folder), "cpu", tmp_path)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.scheduler.config.timestep_spacing == "trailing"


def test_broken_local_folder_is_a_model_load_error(tiny_folder: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_folder, tmp_path / "broken")
    (broken / "unet" / WEIGHTS).unlink()
    with pytest.raises(ModelLoadError, match=f"Could not load the diffusers folder {broken}"):
        load_pipeline(str(broken), "cpu", tmp_path)


def test_factory_is_called_with_device_and_model_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "custom_pipelines.py").write_text(
        "calls = []\n"
        "def make(device, model_cache):\n"
        "    calls.append((device, model_cache))\n"
        "    return 'a pipeline'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_pipeline("custom_pipelines:make", "cpu", tmp_path / "models") == "a pipeline"
    assert sys.modules["custom_pipelines"].calls == [("cpu", tmp_path / "models")]
    with pytest.raises(ModelLoadError, match="has no callable nothing"):
        load_pipeline("custom_pipelines:nothing", "cpu", tmp_path)
    with pytest.raises(ModelLoadError, match="Cannot import no_such_module_here"):
        load_pipeline("no_such_module_here:make", "cpu", tmp_path)
