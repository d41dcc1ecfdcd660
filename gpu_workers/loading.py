"""Turn a `--model` value into a ready pipeline on one device.

A model is a preset name, a local diffusers folder, or `package.module:factory`. Hub downloads go
through huggingface_hub's defaults (no explicit `cache_dir`), so the standard environment variables
rule: `HF_HOME` / `HF_HUB_CACHE` for the cache, `HF_TOKEN` for gated repos, `HF_HUB_OFFLINE=1` to
never touch the network. Tests lay the tiny model out under the real repo ids in a temporary cache
and run this very code against it (DESIGN.md section 4).

Every failure the operator can fix surfaces as `ModelLoadError`, whose message says what went wrong
and what to do about it, because it ends up in `/health` and the worker's log rather than in front
of someone reading a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file

from gpu_workers.synthetic_model import build_synthetic_pipeline
from gpu_workers.tiny_model import build_tiny_model

TINY = "tiny"
LIGHTNING_8STEP = "sdxl-lightning-8step"
SYNTHETIC = "sdxl-synthetic"
KNOWN_PRESETS: tuple[str, ...] = (LIGHTNING_8STEP, TINY, SYNTHETIC)

BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
BASE_VARIANT = "fp16"  # half the download; upcast on load where the device runs float32
LIGHTNING_REPO = "ByteDance/SDXL-Lightning"
LIGHTNING_UNET_FILE = "sdxl_lightning_8step_unet.safetensors"
VAE_REPO = "madebyollin/sdxl-vae-fp16-fix"  # the base VAE overflows in float16

_CHOICES = "pass --model tiny, sdxl-lightning-8step, or a diffusers folder"
_FACTORY = re.compile(r"^(?P<module>[A-Za-z_][\w.]*):(?P<factory>[A-Za-z_]\w*)$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message names the cause and the fix."""


def load_pipeline(
    model: str, device: str, model_cache: Path, dtype: torch.dtype | None = None
) -> StableDiffusionXLPipeline:
    """Load `model` onto `device` in `dtype` (None: `pipeline_dtype(device)`), progress bars off.

    `model_cache` is where locally built models (the tiny one) live; hub files go to the HF cache.
    A `package.module:factory` result is returned exactly as the factory made it.
    """
    dtype = dtype or pipeline_dtype(device)
    if model in KNOWN_PRESETS:
        pipe = _load_preset(model, device, Path(model_cache), dtype)
    elif _is_pipeline_folder(Path(model)):
        pipe = _load_folder(Path(model), dtype)
    elif match := _FACTORY.match(model):
        return _call_factory(match["module"], match["factory"], device, Path(model_cache))
    else:
        raise ModelLoadError(_unknown_model_message(model))
    return _to_device(pipe, device)


def pipeline_dtype(device: str, capability: tuple[int, int] | None = None) -> torch.dtype:
    """The default precision on `device` (`--dtype auto`): bfloat16 on a CUDA GPU that has it
    (compute capability 8.0 and newer), float16 on older ones such as a T4 (with the fp16-fix VAE),
    float32 on the CPU, which has no fast half-precision kernels."""
    from gpu_workers.speed import AUTO, resolve_dtype

    return resolve_dtype(AUTO, device, capability)


def _load_preset(preset: str, device: str, model_cache: Path, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    if preset == TINY:
        try:
            folder = build_tiny_model(model_cache)
        except OSError as exc:
            raise ModelLoadError(
                f"Could not build the tiny model in {model_cache}: {exc}."
                " Point the model cache at a writable folder"
            ) from exc
        return _load_folder(folder, dtype)
    if preset == LIGHTNING_8STEP:
        return _load_lightning(dtype)
    if preset == SYNTHETIC:
        return _with_trailing_euler(build_synthetic_pipeline(device, dtype))
    raise ModelLoadError(f"The {preset} preset is not implemented yet: {_CHOICES}")


def _load_lightning(dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """SDXL base with its UNet swapped for the 8-step Lightning one and the fp16-safe VAE.

    This is ByteDance's recipe: a UNet built from the base repo's config gets the Lightning weights,
    and Euler runs with trailing timestep spacing, which the distilled UNet was trained for. Passing
    the UNet and VAE into `from_pretrained` keeps the base repo's own copies from being downloaded.
    """
    with _hub_errors(BASE_REPO):
        unet_config = UNet2DConditionModel.load_config(BASE_REPO, subfolder="unet")
    with _hub_errors(LIGHTNING_REPO):
        unet_file = hf_hub_download(LIGHTNING_REPO, LIGHTNING_UNET_FILE)
    unet = _unet_with_weights(unet_config, Path(unet_file), dtype)
    with _hub_errors(VAE_REPO):
        vae = AutoencoderKL.from_pretrained(VAE_REPO, dtype=dtype)
    with _hub_errors(BASE_REPO):
        pipe = StableDiffusionXLPipeline.from_pretrained(
            BASE_REPO, unet=unet, vae=vae, dtype=dtype, variant=BASE_VARIANT
        )
    return _with_trailing_euler(pipe)


def _unet_with_weights(config: dict[str, Any], weights: Path, dtype: torch.dtype) -> UNet2DConditionModel:
    """Build the UNet without allocating random weights, then adopt the checkpoint's tensors.

    A 2.6 B-parameter UNet initialised for real costs about 10 GB and tens of seconds on the CPU,
    all thrown away; on the meta device it costs nothing, and `assign=True` takes the loaded tensors
    as they are (cast to `dtype` first: the file is float16, a CPU runs float32). `strict` loading
    catches a checkpoint that does not fit the base config.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    try:
        state = {name: tensor.to(dtype) for name, tensor in load_file(weights).items()}
        unet.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, SafetensorError) as exc:  # a truncated download, or the wrong checkpoint
        raise ModelLoadError(
            f"{weights.name} from {LIGHTNING_REPO} is unreadable or does not fit the UNet config of"
            f" {BASE_REPO}: {_first_line(exc)}."
            " Delete that file from the Hugging Face cache so that it downloads again"
        ) from exc
    return unet.eval()


def _load_folder(folder: Path, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """A local SDXL diffusers folder, with the Lightning-style trailing Euler scheduler."""
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype, variant=_folder_variant(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(
            f"Could not load the diffusers folder {folder} as an SDXL pipeline: {exc}."
            f" Point --model at a complete StableDiffusionXLPipeline folder, or {_CHOICES}"
        ) from exc
    return _with_trailing_euler(pipe)


def _folder_variant(folder: Path) -> str | None:
    """Return "fp16" when a component has only fp16-variant weights, as a snapshot of the SDXL base
    repo fetched with `variant="fp16"` has: diffusers does not look for variant files unless asked."""
    for component in (path for path in folder.iterdir() if path.is_dir()):
        weights = [path.name for path in component.iterdir() if path.name.endswith(_WEIGHT_SUFFIXES)]
        if weights and all(f".{BASE_VARIANT}." in name for name in weights):
            return BASE_VARIANT
    return None


def _with_trailing_euler(pipe: StableDiffusionXLPipeline) -> StableDiffusionXLPipeline:
    """Euler with trailing spacing, so that few steps still start from pure noise (t = 999)."""
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return pipe


def _to_device(pipe: StableDiffusionXLPipeline, device: str) -> StableDiffusionXLPipeline:
    try:
        pipe = pipe.to(device)
    except (RuntimeError, AssertionError) as exc:  # unknown or unavailable device, out of memory
        raise ModelLoadError(
            f"Could not move the pipeline to {device}: {exc}. Pick another device with --devices"
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_factory(module_name: str, factory_name: str, device: str, model_cache: Path) -> Any:
    """The extension point: `factory(device, model_cache)` returns a pipeline-like callable."""
    spec = f"{module_name}:{factory_name}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"Cannot import {module_name} for --model {spec}: {exc}. Put its package on PYTHONPATH"
        ) from exc
    factory: Callable[[str, Path], Any] | None = getattr(module, factory_name, None)
    if not callable(factory):
        raise ModelLoadError(
            f"{module_name} has no callable {factory_name} for --model {spec}: check the name"
        )
    try:
        return factory(device, model_cache)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"The model factory {spec} failed: {type(exc).__name__}: {exc}") from exc


def _is_pipeline_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _unknown_model_message(model: str) -> str:
    if _looks_like_path(model):
        return f"Model path {model} does not exist or has no model_index.json: {_CHOICES}"
    return (
        f"Unknown model {model!r}: it is not a preset ({', '.join(KNOWN_PRESETS)}), a diffusers folder"
        f" or a package.module:factory; {_CHOICES}"
    )


def _looks_like_path(model: str) -> bool:
    return "/" in model or "\\" in model or model.startswith((".", "~")) or Path(model).exists()


@contextlib.contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """Translate huggingface_hub / from_pretrained failures into a fix the operator can apply.

    Offline with nothing cached, huggingface_hub raises `LocalEntryNotFoundError` and diffusers an
    `OSError`; a gated repo without a token raises `GatedRepoError` (a 401/403 HTTP error).
    """
    try:
        yield
    except GatedRepoError as exc:
        raise ModelLoadError(
            f"Access to {repo_id} was refused ({_first_line(exc)}): accept its license on huggingface.co"
            " and set HF_TOKEN to a token of that account"
        ) from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        where = f"the Hugging Face cache at {hub_constants.HF_HUB_CACHE}"
        problem = (
            f"{repo_id} is not (completely) in {where}, and HF_HUB_OFFLINE=1 forbids downloading it"
            if hub_constants.HF_HUB_OFFLINE
            else f"{repo_id} is not in {where} and could not be downloaded"
        )
        raise ModelLoadError(
            f"{problem} ({type(exc).__name__}: {_first_line(exc)}). Run once with internet access"
            " (HF_HUB_OFFLINE unset) so that it downloads, or set HF_HOME (or HF_HUB_CACHE) to a cache"
            " that holds it, and HF_TOKEN to a token that can read it"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
