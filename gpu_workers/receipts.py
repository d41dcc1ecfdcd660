"""What an image was made with, written into the image itself (``gpu_workers.encoding``) and kept by
the job, so that an image found in a folder months later can be made again.

The worker knows the half the request does not: the model's weights, the libraries and the device.
It reads them once, after loading (``WorkerFacts``); every shard adds its own prompt, seed and size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpu_workers.messages import ShardTask

log = logging.getLogger(__name__)

RECEIPT_KEY = "sdxl-receipt"  # the PNG text chunk's keyword; the JSON's own "format" names it too
RECEIPT_VERSION = 1
UNKNOWN = "unknown"
_HASH_CHUNK = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class WorkerFacts:
    """The worker's half of every receipt, read once when its model is loaded."""

    model: str
    model_fingerprint: str
    device_name: str
    torch_version: str
    diffusers_version: str
    # What the speed settings did that changes the bytes (``gpu_workers.speed``): the precision, and
    # the layout, fusion, compile and fp8 choices, e.g. "channels_last,fuse_qkv,compile=unet+vae".
    dtype: str = UNKNOWN
    speed: str = ""

    @classmethod
    def unknown(cls, model: str, device_name: str = "cpu") -> WorkerFacts:
        """For a loop started without a loaded model's facts (tests with a fake pipeline)."""
        return cls(model, UNKNOWN, device_name, UNKNOWN, UNKNOWN)


def library_versions() -> tuple[str, str]:
    import diffusers
    import torch

    return torch.__version__, diffusers.__version__


def receipt(task: ShardTask, offset: int, facts: WorkerFacts, quality: int | None) -> dict[str, Any]:
    """The receipt of image ``offset`` of ``task``: everything that decides its pixels, and how it
    was encoded. No time, no host name: the same request gives the same bytes."""
    return {
        "format": f"{RECEIPT_KEY}/{RECEIPT_VERSION}",
        "prompt": task.prompts[offset],
        "negative_prompt": task.negative_prompt,
        "seed": task.seeds[offset],
        "steps": task.steps,
        "guidance_scale": task.guidance_scale,
        "width": task.width,
        "height": task.height,
        "image_format": task.image_format,
        "quality": quality,
        **asdict(facts),
    }


def receipt_text(fields: dict[str, Any]) -> str:
    """Compact JSON, ASCII only (``\\u`` escapes): it fits EXIF's ASCII tags and every reader."""
    return json.dumps(fields, ensure_ascii=True, separators=(",", ":"))


# The receipt's texts that a request sets and that may be long (``--max-prompt-chars`` each).
CUTTABLE_FIELDS = ("prompt", "negative_prompt")


def cut_prompts(fields: dict[str, Any], keep: int) -> dict[str, Any]:
    """The receipt with each prompt longer than ``keep`` characters cut to ``keep``, for a container
    too small for them (JPEG's EXIF segment: 64 KiB; 3,000 emoji take 36 KB as JSON). The cut receipt
    says so (``prompt_truncated``) and names the whole text by its sha256 (of its UTF-8), which the
    job's stored receipt, the archive's manifest and the PNG keep whole."""
    cut = dict(fields)
    for name in CUTTABLE_FIELDS:
        text = fields.get(name) or ""
        if len(text) > keep:
            cut[name] = text[:keep]
            cut[f"{name}_truncated"] = True
            cut[f"{name}_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return cut


# ----- the model's fingerprint ------------------------------------------------------------------


def hub_fingerprint(repo_ids: tuple[str, ...]) -> str:
    """``repo@revision`` of each hub repo, from the cache's refs (what ``from_pretrained`` used)."""
    from huggingface_hub import constants

    parts = []
    for repo_id in repo_ids:
        refs = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
        try:
            revision = refs.read_text().strip()[:12]
        except OSError:
            revision = UNKNOWN
        parts.append(f"{repo_id}@{revision}")
    return "+".join(parts)


def folder_fingerprint(folder: Path, cache: Path) -> str:
    """``sha256:<first 16 hex>`` over the folder's weight files (names and bytes). Hashing 7 GB
    costs some 10 s, so the result is kept in ``cache`` keyed by each file's size and mtime."""
    weights = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    stamp = [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in weights]
    key = hashlib.sha256(json.dumps([str(folder.resolve()), stamp]).encode()).hexdigest()[:24]
    memo = cache / "fingerprints" / f"{key}.txt"
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    digest = hashlib.sha256()
    for path in weights:
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    fingerprint = f"sha256:{digest.hexdigest()[:16]}"
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.part")
        tmp.write_text(fingerprint)
        os.replace(tmp, memo)
    except OSError as exc:  # a read-only cache costs a re-hash at the next start, nothing more
        log.warning("could not keep the model fingerprint in %s: %s", memo.parent, exc)
    return fingerprint


def model_fingerprint(model: str, model_cache: Path) -> str:
    """What identifies the weights behind ``model``: hub revisions for the Lightning preset, a hash
    of the files for a folder (the tiny model's too), the seed for the synthetic preset's random
    weights; ``unknown`` for a factory, whose weights only it knows."""
    from gpu_workers import loading

    if model == loading.LIGHTNING_8STEP:
        return hub_fingerprint((loading.LIGHTNING_REPO, loading.BASE_REPO, loading.VAE_REPO))
    if model == loading.SYNTHETIC:
        from gpu_workers.synthetic_model import _SEED

        return f"random-weights-seed-{_SEED}"
    if model == loading.TINY:
        from gpu_workers.tiny_model import build_tiny_model

        return folder_fingerprint(build_tiny_model(model_cache), model_cache)
    if Path(model).is_dir():
        return folder_fingerprint(Path(model), model_cache)
    return UNKNOWN


def speed_summary(plan: dict[str, Any]) -> str:
    """The byte-changing choices of a speed plan (``SpeedPlan.describe()``), as one short text."""
    parts = [name for name in ("channels_last", "fuse_qkv", "fp8") if plan.get(name)]
    if plan.get("compile"):
        parts.append("compile=" + "+".join(plan["compile"]))
    return ",".join(parts)


def worker_facts(model: str, model_cache: Path, device_name: str, plan: dict[str, Any] | None = None) -> WorkerFacts:
    """The facts of a worker whose pipeline ``plan`` (``SpeedPlan.describe()``) set up; without a
    plan, the plain float32 path of the CPU (the tests' reference generation)."""
    torch_version, diffusers_version = library_versions()
    plan = plan or {"dtype": "float32"}
    return WorkerFacts(
        model, model_fingerprint(model, model_cache), device_name, torch_version, diffusers_version, plan.get("dtype", UNKNOWN), speed_summary(plan)
    )
