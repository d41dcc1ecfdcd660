"""A real Hugging Face hub cache on disk, filled from the tiny model, for the loader's repo ids.

With `HF_HUB_CACHE` pointing here and `HF_HUB_OFFLINE=1`, the `sdxl-lightning-8step` loader runs
unchanged and finds every file it asks for, so tests exercise the production loading code without a
network (DESIGN.md section 4).

The layout is huggingface_hub's: `models--{org}--{name}/refs/main` holds a commit hash and
`snapshots/{commit}/` holds the repo's files. Real files in the snapshot are enough: offline lookups
only check that `snapshots/{commit}/{path}` exists, the `blobs/` symlink targets are never read.
Without a cached tree listing (`trees/`), huggingface_hub cannot tell a partial snapshot from a full
one and returns it as it is, which is what an operator's hand-copied cache looks like too.

The Lightning UNet and the fp16-fix VAE are seeded perturbations of the tiny weights, so a test can
tell which repo a loaded component really came from.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gpu_workers.loading import BASE_REPO, BASE_VARIANT, LIGHTNING_REPO, LIGHTNING_UNET_FILE, VAE_REPO

WEIGHTS = "diffusion_pytorch_model.safetensors"


def lay_out_hub_cache(hub_cache: Path, tiny_folder: Path) -> None:
    """Create the base, Lightning and fp16-fix VAE repos under `hub_cache` from `tiny_folder`."""
    _lay_out_base(snapshot_folder(hub_cache, BASE_REPO, create=True), tiny_folder)
    _lay_out_lightning(snapshot_folder(hub_cache, LIGHTNING_REPO, create=True), tiny_folder)
    _lay_out_vae(snapshot_folder(hub_cache, VAE_REPO, create=True), tiny_folder)


def snapshot_folder(hub_cache: Path, repo_id: str, create: bool = False) -> Path:
    """The snapshot folder of `repo_id` in `hub_cache`; with `create`, also its `refs/main`."""
    storage = repo_folder(hub_cache, repo_id)
    commit = fake_commit(repo_id)
    snapshot = storage / "snapshots" / commit
    if create:
        snapshot.mkdir(parents=True)
        (storage / "refs").mkdir()
        # read back verbatim by huggingface_hub: a trailing newline would become part of the hash
        (storage / "refs" / "main").write_text(commit)
    return snapshot


def repo_folder(hub_cache: Path, repo_id: str) -> Path:
    """huggingface_hub's folder name for a model repo: `models--org--name`."""
    return Path(hub_cache) / ("models--" + repo_id.replace("/", "--"))


def fake_commit(repo_id: str) -> str:
    """A stable 40-hex 'commit' per repo (what `refs/main` would hold after a real download)."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


def _lay_out_base(snapshot: Path, tiny_folder: Path) -> None:
    """The SDXL base repo as the loader sees it: the pipeline with fp16-variant weight names only,
    so a loader that forgets `variant="fp16"` fails here as it would pay double on the real hub."""
    shutil.copytree(tiny_folder, snapshot, dirs_exist_ok=True)
    for weights in list(snapshot.rglob("*.safetensors")):
        weights.rename(weights.with_name(f"{weights.stem}.{BASE_VARIANT}{weights.suffix}"))


def _lay_out_lightning(snapshot: Path, tiny_folder: Path) -> None:
    """A single UNet state dict in float16, like ByteDance's file."""
    state = _perturbed(load_file(tiny_folder / "unet" / WEIGHTS), seed=1, dtype=torch.float16)
    save_file(state, snapshot / LIGHTNING_UNET_FILE)


def _lay_out_vae(snapshot: Path, tiny_folder: Path) -> None:
    """A diffusers model repo at its root: config.json and float32 weights."""
    shutil.copy(tiny_folder / "vae" / "config.json", snapshot / "config.json")
    save_file(_perturbed(load_file(tiny_folder / "vae" / WEIGHTS), seed=2), snapshot / WEIGHTS)


def _perturbed(
    state: dict[str, torch.Tensor], seed: int, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Each tensor plus small seeded noise, so its values are told apart from the tiny original."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (tensor + 0.01 * torch.randn(tensor.shape, generator=generator)).to(dtype or tensor.dtype)
        for name, tensor in sorted(state.items())
    }
