"""A tiny SDXL pipeline with random weights, built locally on first use.

The `tiny` model preset exists so that tests, CI and the offline demo run the *real* pipeline code
(same diffusers classes, same loading path, same tokenizers, same scheduler) on a CPU in well under a
second per 1024x576 image, without any download. Its images are noise; everything else is real.

The weights are drawn from a fixed seed per component, so every machine with the same torch version
builds byte-identical weights, and the folder name carries a version so that a configuration change
here rebuilds it instead of reusing an old folder.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# Bump whenever anything below changes the weights, configs or files, so old folders are not reused.
TINY_MODEL_VERSION = "v1"
TINY_MODEL_NAME = f"tiny-sdxl-{TINY_MODEL_VERSION}"

_SEED = 20261124
_SEED_LOCK = threading.Lock()
_TEXT_HIDDEN = 32  # both text encoders; the UNet's cross_attention_dim is their sum
_TEXT_PROJECTION = 32  # text encoder 2's pooled projection, fed to the UNet's "text_time" embedding
_TIME_EMBED = 8  # addition_time_embed_dim (SDXL: 256)
_MAX_TOKENS = 77  # CLIP's context; without it tokenizer truncation raises OverflowError

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
# pipeline component -> pad token: SDXL's second tokenizer pads with "!", the first with end-of-text
_TOKENIZER_PADS = {"tokenizer": _EOS, "tokenizer_2": "!"}

# Whole-word BPE merges for these words keep token counts close to the real CLIP tokenizer for
# ordinary prompts (any other word falls back to single characters, which is still valid).
_WORDS = """
a an the of in on at to with and or by for from under over near into above below behind beside
is are was be very highly ultra more most no not without
cat cats dog dogs bird birds horse fish lion tiger fox wolf bear owl dragon robot man woman
person people child girl boy king queen knight wizard astronaut portrait face eyes hair
tree trees forest flower flowers garden grass field mountain mountains river lake sea ocean beach
sky cloud clouds sun moon star stars space planet galaxy night day sunset sunrise rain snow fog storm
city street house castle tower bridge road car train ship boat room window door kitchen table chair
red orange yellow green blue purple pink black white gray grey gold golden silver dark light bright
big small tiny huge old new young beautiful cute happy sad epic calm misty cozy futuristic ancient
photo photograph painting drawing sketch illustration render art style cinematic realistic
detailed lighting colorful vibrant soft sharp focus bokeh background closeup wide angle shot view
oil watercolor digital anime cartoon fantasy surreal minimal abstract lens camera film quality
resolution high low best masterpiece trending artstation unreal engine octane hdr
sitting standing running flying walking swimming playing reading wearing holding looking
""".split()


def build_tiny_model(folder: Path, variant: str | None = None) -> Path:
    """Return the tiny pipeline folder under `folder`, building it first if it is not there yet.

    `variant="fp16"` saves it with the hub's variant file names (`model.fp16.safetensors`,
    `diffusion_pytorch_model.fp16.safetensors`) so that loading code which asks for `variant="fp16"`
    (as for the real SDXL base repo) finds its files; the weights stay float32 on disk either way.

    Safe when several processes call it at once: each builds into its own temporary folder next to
    the target and renames it into place; a process (or thread) that loses the race discards its copy.
    """
    target = Path(folder) / (TINY_MODEL_NAME if variant is None else f"{TINY_MODEL_NAME}-{variant}")
    if not _is_built(target):
        _build(target, variant)
    return target


def _is_built(target: Path) -> bool:
    """A folder only ever appears complete (it is renamed into place), so its index file is enough."""
    return (target / "model_index.json").is_file()


def _build(target: Path, variant: str | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        make_tiny_pipeline().save_pretrained(staging, safe_serialization=True, variant=variant)
        _write_tokenizer_folders(staging, replace=True)
        staging.chmod(0o755)  # mkdtemp makes it private; a shared model cache must stay readable
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, target: Path) -> None:
    """Atomically move a finished build into place, unless another process already did."""
    try:
        os.rename(staging, target)
    except OSError:
        if not _is_built(target):
            raise  # not a lost race: a real error (permissions, a stray non-empty folder)


def make_tiny_pipeline() -> StableDiffusionXLPipeline:
    """Build the tiny pipeline in memory, float32 on the CPU, with seeded random weights."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, tokenizer_2 = _make_tokenizers(Path(tmp))
    vocab_size = len(tokenizer)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return StableDiffusionXLPipeline(
        vae=_seeded(1, _make_vae),
        text_encoder=_seeded(2, lambda: CLIPTextModel(_text_config(vocab_size, "quick_gelu", special))),
        text_encoder_2=_seeded(
            3, lambda: CLIPTextModelWithProjection(_text_config(vocab_size, "gelu", special))
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_seeded(4, _make_unet),
        scheduler=_make_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _seeded(offset: int, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Run a component constructor under its own seed, so weights do not depend on build order.

    diffusers and transformers initialise weights from torch's process-wide generator, so the seeded
    section is serialised between threads, and the caller's generator state is restored afterwards.
    """
    with _SEED_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED + offset)
        return factory().eval()


def _make_unet() -> UNet2DConditionModel:
    """SDXL's UNet layout shrunk: three levels, cross-attention only at the lowest (cheap) one.

    Full-resolution attention dominates the cost at 1024x576 (9,216 latent tokens), so the two upper
    levels are plain ResNet blocks, as in SDXL's own first level.
    """
    return UNet2DConditionModel(
        sample_size=128,  # 1024 px / 8: the pipeline's default size, like SDXL
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=1,
        use_linear_projection=True,
        cross_attention_dim=2 * _TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED,
        # six micro-conditioning numbers (original size, crop, target size), each embedded, plus text
        # encoder 2's pooled projection: diffusers checks this sum when the pipeline runs
        projection_class_embeddings_input_dim=6 * _TIME_EMBED + _TEXT_PROJECTION,
    )


def _make_vae() -> AutoencoderKL:
    """SDXL's VAE layout (four blocks, scale factor 8) at width 4: decoding at full size stays cheap.

    The mid-block self-attention is left out: over 9,216 latent tokens it cost 0.15 s of a 0.37 s
    decode on one CPU thread.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=1024,
        scaling_factor=0.13025,  # SDXL's
        force_upcast=False,  # like the fp16-fix VAE: no float32 detour on CUDA
        mid_block_add_attention=False,
    )


def _text_config(vocab_size: int, hidden_act: str, special: dict[str, int]) -> CLIPTextConfig:
    """A two-layer CLIP text encoder: SDXL reads the penultimate hidden state, so two is the minimum."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=2 * _TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_TOKENS,
        hidden_act=hidden_act,
        projection_dim=_TEXT_PROJECTION,
        **special,
    )


def _make_scheduler() -> EulerDiscreteScheduler:
    """SDXL base's scheduler settings, already with the trailing spacing that SDXL-Lightning needs."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="trailing",
    )


def _make_tokenizers(tmp: Path) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """Both SDXL tokenizers, loaded through `from_pretrained` from files written here.

    transformers 5 silently ignores `CLIPTokenizer(vocab_file=..., merges_file=...)` keywords, and
    `from_pretrained` on vocab.json + merges.txt is the path the real repo's tokenizers take.
    """
    _write_tokenizer_folders(tmp)
    first, second = (CLIPTokenizer.from_pretrained(tmp / name) for name in _TOKENIZER_PADS)
    return first, second


def _write_tokenizer_folders(pipeline_folder: Path, replace: bool = False) -> None:
    """Write the tokenizer folders as the SDXL base repo has them: vocab.json, merges.txt and a
    tokenizer_config.json, no tokenizer.json. With `replace`, what save_pretrained wrote goes first,
    so loading the built folder converts the vocabulary exactly as loading the real repo does."""
    for name, pad_token in _TOKENIZER_PADS.items():
        if replace:
            shutil.rmtree(pipeline_folder / name)
        _write_clip_tokenizer_files(pipeline_folder / name, pad_token)


def _write_clip_tokenizer_files(folder: Path, pad_token: str) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json in CLIP's format and token order."""
    folder.mkdir(parents=True)
    byte_chars = list(_bytes_to_unicode().values())
    merges, merged = _word_merges(_WORDS)
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + merged + [_BOS, _EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": _MAX_TOKENS,
        "bos_token": _BOS,
        "eos_token": _EOS,
        "unk_token": _EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _word_merges(words: list[str]) -> tuple[list[str], list[str]]:
    """Learn BPE merges on `words` until each is one token (classic BPE training, deterministic).

    Training, rather than chaining each word's letters independently, keeps the merge ranks
    consistent, so the tokenizer really encodes every listed word as a single token.
    """
    segmented = [(*word[:-1], word[-1] + "</w>") for word in dict.fromkeys(words)]
    merges: list[str] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in segmented:
            for pair in itertools.pairwise(symbols):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges, [left + right for left, right in (m.split(" ") for m in merges)]
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # most frequent, ties by text
        merges.append(" ".join(best))
        segmented = [_merge_pair(symbols, best) for symbols in segmented]


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every adjacent occurrence of `pair` in `symbols` with the joined symbol."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte-to-printable-character map (the base alphabet of the vocab)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))
