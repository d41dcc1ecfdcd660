"""GPU throughput, side by side on one device: plain diffusers, our worker loop, our whole server.

Arms, each on the same device, model, image size, step count and seeds:

- (a) plain diffusers ``StableDiffusionXLPipeline``, one image per call;
- (b) plain diffusers at its best batch (a sweep of batches; the best one is the table's row);
- (c) our worker loop in this process: ``gpu_workers.worker.load_for_worker`` (the speed toolkit
  of ``gpu_workers.speed`` and its warm-up) and ``gpu_workers.worker_loop.serve`` over the shards
  of one request, PNG encoding included, for each ``--max-batch`` of a sweep;
- (d) our whole server over HTTP: ``python -m service`` on a loopback port, one request of
  ``--http-images`` images (150) with ``return_format: url``, read as NDJSON so the first image's
  arrival is seen;
- (x) optional: (c) at its largest ``--max-batch`` with ``--compile off`` (what torch.compile adds);
- (e) optional: (c) with the fp8 UNet (``--fp8 on``), where torchao and the GPU allow it.

For each row: images/s, ms per image, achieved TFLOP/s and the fraction of the device's peak (the
FLOPs of one image are counted on the meta device from the loaded model's own configuration: 34.9
TFLOP for SDXL at 1024x576 and 8 steps, DESIGN.md section 6; the peak is a bf16 matrix product
measured at the start, and the datasheet figure where the device is known), peak device memory,
time to first image, warm-up and compile seconds, and the PSNR of its images against arm (a)'s for
the same seeds.

    python -m benchmarks.gpu_throughput --out DIR              # on a GPU: sdxl-synthetic, 1024x576
    python -m benchmarks.gpu_throughput --smoke --out DIR      # every arm on the CPU, tiny model

It writes ``DIR/gpu_throughput.json`` and ``DIR/gpu_throughput.md`` after every arm (a run cut
short keeps what it measured) and, for arm (d), the server's log as ``DIR/server.log``.
``--budget-s`` skips an arm that would not fit in what is left of the budget. ``--smoke`` also
checks that the worker loop's images (channels-last and fused QKV on) are within
``SMOKE_MIN_PSNR`` dB of plain diffusers'. Exit status 0 when every arm asked for ran (or was
skipped for the budget) and the smoke check held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import gc
import io
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROMPTS = (
    "a lighthouse on a cliff at sunset, cinematic lighting",
    "a red fox in a snowy forest, photo, sharp focus",
    "an astronaut riding a horse on the moon, digital art",
    "a cozy kitchen with plants by the window, morning light",
    "a futuristic city street at night in the rain, neon",
)
SEED = 20261201
SMOKE_MIN_PSNR = 40.0  # dB: float32 on the CPU, channels-last and fused QKV (measured: 80 dB and more)
# Dense bf16 (fp16 on the T4) tensor-core rates from the vendors' datasheets, TFLOP/s.
DATASHEET_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0, "T4": 65.0}
# Seconds an arm needs at least (a guess: compile time dominates c and e); skipped below it.
ARM_MIN_SECONDS = {"a": 30.0, "b": 30.0, "x": 45.0, "c": 120.0, "d": 60.0, "e": 150.0}
ARMS = ("a", "b", "x", "c", "d", "e")  # the order they run in
ARM_NAMES = {
    "a": "plain diffusers, 1 image/call",
    "b": "plain diffusers, best batch",
    "x": "worker loop, compile off",
    "c": "worker loop (in process)",
    "d": "server over HTTP",
    "e": "worker loop, fp8 UNet",
}
SPEED_FLAGS = ("dtype", "channels_last", "fuse_qkv", "compile", "compile_mode", "warmup")


# --------------------------------------------------------------------------------------------------
# Settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_throughput.json, gpu_throughput.md, server.log")
    parser.add_argument("--smoke", action="store_true", help="every arm on the CPU with the tiny model, small sizes")
    parser.add_argument("--device", default=None, help="cuda:0, cpu, ... (default: cuda:0 where CUDA is available; cpu with --smoke)")
    parser.add_argument("--model", default=None, help="model preset (default sdxl-synthetic; tiny with --smoke)")
    parser.add_argument("--model-cache", default=str(Path.home() / ".cache" / "sdxl-lightning-server"), help="model and compile cache")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default 1024x576; 256x256 with --smoke)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (the server always runs 8)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {','.join(ARMS)} (they run in that order)")
    parser.add_argument("--single-images", type=int, default=None, help="(a): timed images (default 8; 3 with --smoke)")
    parser.add_argument("--plain-batches", default=None, help="(b): batches to sweep (default 2,4,8,16; 2,4 with --smoke)")
    parser.add_argument("--plain-repeats", type=int, default=2, help="(b): timed calls per batch (after one warm call)")
    parser.add_argument("--max-batch", default=None, help="(c): the --max-batch sweep (default 1,4,8; 1,2 with --smoke)")
    parser.add_argument("--loop-images", type=int, default=None, help="(c), (e): images per sweep point (default 48; 8 with --smoke)")
    parser.add_argument("--http-images", type=int, default=None, help="(d): images of the request (default 150; 8 with --smoke)")
    parser.add_argument("--server-max-batch", type=int, default=None, help="(d): --max-batch of the server (default: the sweep's largest)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for the whole run; arms that would not fit are skipped (default 420; none with --smoke)")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads on the CPU (this process and the server's worker)")
    for name in SPEED_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), default=None, help="worker setting for (c), (d), (e), as python -m service --help says (default auto; --smoke: channels-last and fused QKV on, compile off, full warm-up)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.device = args.device or ("cpu" if smoke else _default_device())
    args.model = args.model or ("tiny" if smoke else "sdxl-synthetic")
    args.size = args.size or ("256x256" if smoke else "1024x576")
    args.single_images = args.single_images or (3 if smoke else 8)
    args.plain_batches = _ints(args.plain_batches or ("2,4" if smoke else "2,4,8,16"), parser, "--plain-batches")
    args.max_batch = _ints(args.max_batch or ("1,2" if smoke else "1,4,8"), parser, "--max-batch")
    args.loop_images = args.loop_images or (8 if smoke else 48)
    args.http_images = args.http_images or (8 if smoke else 150)
    args.server_max_batch = args.server_max_batch or max(args.max_batch)
    args.budget_s = (0.0 if smoke else 420.0) if args.budget_s is None else args.budget_s
    # The smoke run turns on the toolkit's CPU-cheap pieces so their code runs; compile stays off
    # (a cold CPU compile of the tiny model costs minutes: tests/test_speed.py covers it).
    smoke_speed = {"channels_last": "on", "fuse_qkv": "on", "compile": "off", "warmup": "full"}
    for name in SPEED_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, smoke_speed.get(name, "auto") if smoke else ("default" if name == "compile_mode" else "auto"))
    if args.compile_mode == "auto":
        args.compile_mode = "default"
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    if not arms or any(arm not in ARMS for arm in arms):
        parser.error(f"--arms takes letters from {','.join(ARMS)}")
    args.arms = list(dict.fromkeys(arms))
    from contract.formats import parse_size

    try:
        args.width, args.height = parse_size(args.size)
    except ValueError as exc:
        parser.error(f"--size: {exc}")
    return args


def _ints(text: str, parser: argparse.ArgumentParser, name: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"{name} takes comma-separated integers")
    if not values or min(values) < 1:
        parser.error(f"{name} takes positive integers")
    return values


def _default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Row:
    arm: str
    what: str
    batch: int
    images: int
    seconds: float
    first_image_s: float | None = None
    warmup_s: float | None = None
    compile_s: float | None = None
    peak_memory_bytes: int | None = None
    psnr_db: float | None = None
    notes: str = ""
    images_per_s: float = 0.0
    ms_per_image: float = 0.0
    tflops: float = 0.0
    peak_fraction: float = 0.0

    def finish(self, flops_per_image: float, peak_tflops: float) -> Row:
        self.images_per_s = self.images / self.seconds if self.seconds > 0 else 0.0
        self.ms_per_image = 1000 * self.seconds / self.images if self.images else 0.0
        self.tflops = self.images_per_s * flops_per_image / 1e12
        self.peak_fraction = self.tflops / peak_tflops if peak_tflops > 0 else 0.0
        return self


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measured_peak_tflops(device: str) -> float:
    """The rate of a large matrix product on ``device`` (bf16 on CUDA, float32 on the CPU): the
    ceiling this run's TFLOP/s are compared with."""
    import torch

    cuda = device.startswith("cuda")
    n, dtype, repeats = (8192, torch.bfloat16, 10) if cuda else (512, torch.float32, 10)
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    for _ in range(3):
        a @ b
    synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times) / 1e12


def datasheet_tflops(device_name: str) -> float | None:
    for name, tflops in DATASHEET_TFLOPS.items():
        if name in device_name:
            return tflops
    return None


def image_flops(pipe: Any, width: int, height: int, steps: int) -> float:
    """FLOPs of one image at guidance 0: ``steps`` UNet forwards and one VAE decode, counted on the
    meta device from the pipeline's own configuration (no memory, no device time). The text
    encoders are left out (0.3% for SDXL), as DESIGN.md section 6 counts."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet_config, vae_config = dict(pipe.unet.config), dict(pipe.vae.config)
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    time_ids = 6  # original size, crop top-left, target size
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        latents = torch.empty(1, unet_config["in_channels"], height // scale, width // scale)
        text = torch.empty(1, 77, unet_config["cross_attention_dim"])
        pooled = unet_config["projection_class_embeddings_input_dim"] - unet_config["addition_time_embed_dim"] * time_ids
        conditioning = {"text_embeds": torch.empty(1, pooled), "time_ids": torch.empty(1, time_ids)}
        timestep = torch.full((1,), 999)

    def count(run: Callable[[], Any]) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run()
        return counter.get_total_flops()

    return float(steps * count(lambda: unet(latents, timestep, text, added_cond_kwargs=conditioning)) + count(lambda: vae.decode(latents)))


class MemoryPeak:
    """Peak memory while a block runs: the CUDA allocator's peak of this process, or the highest
    RSS (CPU) or device-wide use (CUDA, other processes: ``pids``) seen by a sampling thread."""

    def __init__(self, device: str, pids: Callable[[], list[int]] | None = None, interval: float = 0.05) -> None:
        self.device = device
        self.pids = pids
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._baseline = 0

    def __enter__(self) -> MemoryPeak:
        import torch

        if self.device.startswith("cuda") and self.pids is None:
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if self.device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info(self.device)
            self._baseline = total - free
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> int:
        if self.device.startswith("cuda"):
            import torch

            free, total = torch.cuda.mem_get_info(self.device)
            return max(0, total - free - self._baseline)
        import psutil

        total = 0
        for pid in self.pids() if self.pids else [os.getpid()]:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            self._stop.wait(self.interval)

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self._thread is None:
            synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())


def to_array(image: Any) -> Any:
    import numpy as np
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def psnr(reference: Any, image: Any) -> float:
    """Peak signal-to-noise ratio of two 8-bit images, dB (inf when they are equal)."""
    mse = float(((to_array(reference) - to_array(image)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


# --------------------------------------------------------------------------------------------------
# The run


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()

    def left(self) -> float:
        return math.inf if self.seconds <= 0 else self.seconds - (time.monotonic() - self.started)

    def allows(self, needed: float) -> bool:
        return self.left() >= needed


@dataclass
class Results:
    args: argparse.Namespace
    started: float = field(default_factory=time.monotonic)
    environment: dict[str, Any] = field(default_factory=dict)
    flops_per_image: float = 0.0
    peak_tflops: float = 0.0
    datasheet_tflops: float | None = None
    rows: list[Row] = field(default_factory=list)
    plain_sweep: list[Row] = field(default_factory=list)
    reports: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    references: dict[int, Any] = field(default_factory=dict)  # seed -> arm (a)'s image
    checks: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        row.finish(self.flops_per_image, self.peak_tflops)
        self.rows.append(row)
        print(f"   {row_line(row)}", flush=True)
        return row

    def as_json(self) -> dict[str, Any]:
        settings = {name: getattr(self.args, name) for name in SPEED_FLAGS}
        return {
            "command": " ".join(["python", "-m", "benchmarks.gpu_throughput", *sys.argv[1:]]),
            "environment": self.environment,
            "model": self.args.model,
            "device": self.args.device,
            "size": self.args.size,
            "steps": self.args.steps,
            "worker_settings": settings,
            "flops_per_image": self.flops_per_image,
            "peak_tflops_measured": self.peak_tflops,
            "peak_tflops_datasheet": self.datasheet_tflops,
            "rows": [asdict(row) for row in self.rows],
            "plain_sweep": [asdict(row) for row in self.plain_sweep],
            "speed_reports": self.reports,
            "skipped": self.skipped,
            "failed": self.failed,
            "checks": self.checks,
            "seconds": time.monotonic() - self.started,
        }

    def write(self) -> None:
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_throughput.json").write_text(json.dumps(self.as_json(), indent=2, default=str) + "\n")
        (out / "gpu_throughput.md").write_text(markdown(self) + "\n")


def row_line(row: Row) -> str:
    extra = f", first image {row.first_image_s:.2f} s" if row.first_image_s is not None else ""
    return (
        f"({row.arm}) {row.what}, batch {row.batch}: {row.images} images in {row.seconds:.2f} s = {row.images_per_s:.2f} images/s, "
        f"{row.ms_per_image:.0f} ms/image, {row.tflops:.3g} TFLOP/s ({row.peak_fraction:.1%} of peak){extra}"
    )


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "identical"
    return f"{value:{spec}}{unit}"


def _bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def markdown(results: Results) -> str:
    args = results.args
    env = results.environment
    peak = f"{results.peak_tflops:.3g} TFLOP/s measured ({'bf16' if args.device.startswith('cuda') else 'float32'} matrix product)"
    if results.datasheet_tflops:
        peak += f", datasheet {results.datasheet_tflops:g}"
    lines = [
        f"**{env.get('device_name', args.device)}**, {args.model} at {args.size}, {args.steps} steps, "
        f"{results.flops_per_image / 1e12:.3g} TFLOP an image; peak {peak}; torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
        f"Python {env.get('python')}. Worker settings: " + ", ".join(f"{name} {getattr(args, name)}" for name in SPEED_FLAGS) + ".",
        "",
        "| arm | what | batch | images | images/s | ms/image | TFLOP/s | of peak | peak memory | first image s | warm-up s | compile s | PSNR vs (a) dB | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in results.rows:
        lines.append(
            f"| {row.arm} | {row.what} | {row.batch} | {row.images} | {row.images_per_s:.2f} | {row.ms_per_image:.0f} | {row.tflops:.3g} | "
            f"{row.peak_fraction:.1%} | {_bytes(row.peak_memory_bytes)} | {_fmt(row.first_image_s, '.2f')} | {_fmt(row.warmup_s, '.1f')} | "
            f"{_fmt(row.compile_s, '.1f')} | {_fmt(row.psnr_db, '.1f')} | {row.notes} |"
        )
    if results.plain_sweep:
        lines += ["", "Plain diffusers, batch sweep (b): " + ", ".join(f"batch {r.batch}: {r.images_per_s:.2f} images/s ({_bytes(r.peak_memory_bytes)})" for r in results.plain_sweep) + "."]
    for arm, reason in results.skipped.items():
        lines.append(f"\nSkipped ({arm}) {ARM_NAMES[arm]}: {reason}.")
    for arm, error in results.failed.items():
        lines.append(f"\nFailed ({arm}) {ARM_NAMES[arm]}: {error}")
    for check in results.checks:
        lines.append(f"\n{check}")
    lines.append(f"\n{time.monotonic() - results.started:.0f} s in all.")
    return "\n".join(lines)


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(), "host": platform.node()}
    for package in ("diffusers", "transformers", "aiohttp", "pillow", "torchao"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["cuda"] = torch.version.cuda
        env["device_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    else:
        env["device_name"] = _cpu_name()
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU ({line.split(':', 1)[1].strip()}, {os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({platform.processor() or 'unknown'}, {os.cpu_count()} cores)"


def prompt_for(index: int) -> str:
    return PROMPTS[index % len(PROMPTS)]


# --------------------------------------------------------------------------------------------------
# (a) and (b): plain diffusers


def plain_call(pipe: Any, args: argparse.Namespace, first: int, count: int) -> list[Any]:
    """Images ``first`` .. ``first + count - 1`` of the run (prompt and seed by index), one call."""
    import torch

    with torch.inference_mode():
        return pipe(
            prompt=[prompt_for(i) for i in range(first, first + count)],
            num_inference_steps=args.steps,
            guidance_scale=0.0,
            width=args.width,
            height=args.height,
            generator=[torch.Generator("cpu").manual_seed(SEED + i) for i in range(first, first + count)],
            output_type="pil",
        ).images


def arms_plain(results: Results, budget: Budget) -> None:
    import torch

    from gpu_workers.loading import load_pipeline
    from gpu_workers.speed import resolve_dtype

    args = results.args
    started = time.perf_counter()
    pipe = load_pipeline(args.model, args.device, Path(args.model_cache), resolve_dtype(args.dtype, args.device))
    synchronize(args.device)
    load_s = time.perf_counter() - started
    ensure_flops(results, pipe)
    try:
        if "a" in args.arms:
            print(f"\n== (a) {ARM_NAMES['a']} (load {load_s:.1f} s) ==", flush=True)
            with MemoryPeak(args.device) as memory:
                started = time.perf_counter()
                results.references[SEED] = plain_call(pipe, args, 0, 1)[0]
                first_s = time.perf_counter() - started
                started = time.perf_counter()
                for index in range(1, args.single_images + 1):
                    results.references[SEED + index] = plain_call(pipe, args, index, 1)[0]
                seconds = time.perf_counter() - started
            per_image = seconds / args.single_images
            results.add(Row("a", ARM_NAMES["a"], 1, args.single_images, seconds, first_image_s=first_s, warmup_s=max(0.0, first_s - per_image),
                            compile_s=0.0, peak_memory_bytes=memory.peak, notes=f"load {load_s:.1f} s; first call not counted"))  # fmt: skip
            results.write()
        if "b" in args.arms:
            if not budget.allows(ARM_MIN_SECONDS["b"]):
                results.skipped["b"] = f"{budget.left():.0f} s of the budget left"
                return
            print(f"\n== (b) {ARM_NAMES['b']}: batches {args.plain_batches} ==", flush=True)
            for batch in args.plain_batches:
                if results.plain_sweep and not budget.allows(ARM_MIN_SECONDS["b"] / 2):
                    break
                try:
                    with MemoryPeak(args.device) as memory:
                        started = time.perf_counter()
                        plain_call(pipe, args, 0, batch)
                        warm_s = time.perf_counter() - started
                        started = time.perf_counter()
                        for repeat in range(args.plain_repeats):
                            plain_call(pipe, args, repeat * batch, batch)
                        seconds = time.perf_counter() - started
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"   batch {batch}: out of device memory", flush=True)
                    break
                row = Row("b", ARM_NAMES["b"], batch, batch * args.plain_repeats, seconds, first_image_s=seconds / args.plain_repeats,
                          warmup_s=max(0.0, warm_s - seconds / args.plain_repeats), compile_s=0.0, peak_memory_bytes=memory.peak)  # fmt: skip
                row.finish(results.flops_per_image, results.peak_tflops)
                results.plain_sweep.append(row)
                print(f"   batch {batch}: {row.images_per_s:.2f} images/s, {row.ms_per_image:.0f} ms/image", flush=True)
            if results.plain_sweep:
                best = max(results.plain_sweep, key=lambda r: r.images_per_s)
                results.add(Row(**{**asdict(best), "notes": f"best of batches {', '.join(str(r.batch) for r in results.plain_sweep)}; first image = one call"}))
            results.write()
    finally:
        del pipe
        free_device(args.device)


def ensure_flops(results: Results, pipe: Any) -> None:
    if not results.flops_per_image:
        args = results.args
        results.flops_per_image = image_flops(pipe, args.width, args.height, args.steps)
        print(f"   {results.flops_per_image / 1e12:.4g} TFLOP an image ({args.model}, {args.size}, {args.steps} steps)", flush=True)


def free_device(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# (c) and (e): the worker loop in this process


class ListSource:
    """A request's shards, then stop: the worker loop's ``ShardSource``."""

    def __init__(self, tasks: list[Any]) -> None:
        self._tasks = collections.deque(tasks)
        self._lock = threading.Lock()

    def take(self) -> Any:
        from gpu_workers.worker_loop import Taken

        with self._lock:
            return Taken(self._tasks.popleft()) if self._tasks else None

    def stopping(self) -> bool:
        with self._lock:
            return not self._tasks


class CollectingSink:
    """Every reply with the time it was handed over: the worker loop's ``ResultSink``."""

    def __init__(self) -> None:
        self.replies: list[tuple[float, Any]] = []

    def started(self, taken: Any) -> None:
        pass

    def finished(self, taken: Any, reply: Any) -> None:
        self.replies.append((time.perf_counter(), reply))

    def state(self, state: Any, images_done: int) -> None:
        pass


def request_shards(args: argparse.Namespace, images: int, shard_size: int, request_id: str) -> list[Any]:
    from gpu_workers.messages import ShardTask

    return [
        ShardTask(request_id, shard_id, start, tuple(prompt_for(i) for i in range(start, min(images, start + shard_size))),
                  tuple(SEED + i for i in range(start, min(images, start + shard_size))), None, 0.0, steps=args.steps,
                  width=args.width, height=args.height)  # fmt: skip
        for shard_id, start in enumerate(range(0, images, shard_size))
    ]


def arm_worker_loop(results: Results, budget: Budget, arm: str) -> None:
    import torch

    from gpu_workers.messages import ShardDone, WorkerConfig
    from gpu_workers.speed import SpeedSettings, last_report
    from gpu_workers.worker import load_for_worker
    from gpu_workers.worker_loop import serve

    args = results.args
    sweep = args.max_batch if arm == "c" else [max(args.max_batch)]
    speed = {name: getattr(args, name) for name in SPEED_FLAGS}
    if arm == "e":
        speed["fp8"] = "on"
    if arm == "x":
        speed["compile"] = "off"
    settings = SpeedSettings(**{**SpeedSettings().as_fields(), **speed})
    config = WorkerConfig(0, args.device, args.model, args.model_cache, args.cpu_threads, 0.0, **settings.as_fields(),
                          warmup_sizes=(args.size,), max_batch=max(sweep))  # fmt: skip
    print(f"\n== ({arm}) {ARM_NAMES[arm]}: --max-batch {sweep}, {args.loop_images} images each ==", flush=True)
    with MemoryPeak(args.device) as memory:
        started = time.perf_counter()
        pipe, facts = load_for_worker(config)
        synchronize(args.device)
        ready_s = time.perf_counter() - started
    report = last_report()
    results.reports[arm] = asdict(report) if report else None
    warmup_s = report.warmup_s if report else None
    compile_s = report.compile_s if report else None
    print(f"   ready in {ready_s:.1f} s (warm-up {warmup_s:.1f} s, compile {compile_s:.1f} s, {report.graphs if report else '?'} graphs)", flush=True)
    ensure_flops(results, pipe)
    try:
        for max_batch in sweep:
            if not budget.allows(20.0):
                results.skipped.setdefault(arm, f"--max-batch {max_batch} and after: {budget.left():.0f} s of the budget left")
                break
            tasks = request_shards(args, args.loop_images, max_batch, f"{arm}-{max_batch}")
            sink = CollectingSink()
            with MemoryPeak(args.device) as run_memory:
                started = time.perf_counter()
                made = serve(pipe, config, ListSource(tasks), sink, facts=facts)
            failures = [reply for _, reply in sink.replies if not isinstance(reply, ShardDone)]
            if failures or made != args.loop_images:
                raise RuntimeError(f"--max-batch {max_batch}: {made} of {args.loop_images} images, failures: {failures[:2]}")
            # up to the last reply: serve() itself returns only after one more poll for a shard
            seconds = max(at for at, _ in sink.replies) - started
            first_s = min(at for at, _ in sink.replies) - started
            scores = []
            for _, reply in sink.replies:
                for offset, data in enumerate(reply.images):
                    seed = SEED + next(t.first_index for t in tasks if t.shard_id == reply.shard_id) + offset
                    if seed in results.references:
                        scores.append(psnr(results.references[seed], data))
            notes = f"ready in {ready_s:.1f} s" + (f"; {report.graphs} graphs, {report.graph_breaks} graph breaks" if report else "")
            if report and report.fp8_layers:
                notes += f"; {report.fp8_layers} fp8 layers"
            results.add(Row(arm, ARM_NAMES[arm], max_batch, made, seconds, first_image_s=first_s, warmup_s=warmup_s, compile_s=compile_s,
                            peak_memory_bytes=max(memory.peak, run_memory.peak) if args.device.startswith("cuda") else run_memory.peak,
                            psnr_db=min(scores) if scores else None, notes=notes))  # fmt: skip
            results.write()
    finally:
        del pipe
        torch._dynamo.reset()
        free_device(args.device)


# --------------------------------------------------------------------------------------------------
# (d): the whole server over HTTP


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m service`` on a loopback port, its log in the output folder."""

    def __init__(self, args: argparse.Namespace, workdir: Path, overrides: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = args.out / "server.log"
        sizes = ",".join(dict.fromkeys(["1024x576", args.size]))  # the server insists on its default size
        self.argv = [
            sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port), "--model", args.model,
            "--max-batch", str(args.server_max_batch), "--sizes", sizes, "--max-images", str(max(150, args.http_images)),
            "--image-dir", str(workdir / "images"), "--job-db", str(workdir / "jobs.sqlite3"), "--model-cache", args.model_cache,
            "--heartbeat-interval", "5", "--shard-timeout", "900", "--cpu-threads", str(args.cpu_threads),
        ]  # fmt: skip
        if args.device.startswith("cuda"):
            self.argv += ["--devices", args.device]
        else:
            self.argv += ["--workers", "1"]
        for name in SPEED_FLAGS:
            self.argv += ["--" + name.replace("_", "-"), str((overrides or {}).get(name, getattr(args, name)))]
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self._log = open(self.log_path, "wb")
        print(f"   $ {' '.join(self.argv[1:])}", flush=True)
        self.process = subprocess.Popen(self.argv, cwd=self.workdir, env={**os.environ, "PYTHONPATH": path}, stdout=self._log, stderr=subprocess.STDOUT)

    def health(self) -> dict[str, Any] | None:
        import requests

        try:
            return requests.get(self.url + "/health", timeout=2).json()
        except (requests.RequestException, ValueError):
            return None

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see server.log:\n{self.log_tail()}")
            health = self.health()
            workers = (health or {}).get("workers", [])
            if any(w.get("state") in ("ready", "busy") for w in workers):
                return health or {}
            failed = [w.get("error") for w in workers if w.get("state") == "failed"]
            if failed:
                raise RuntimeError(f"the server's worker failed to start: {failed[0]}")
            time.sleep(0.25)
        raise RuntimeError(f"no worker ready after {timeout:.0f} s; see server.log:\n{self.log_tail()}")

    def process_tree(self) -> list[int]:
        """The server's process and its children (the workers)."""
        import psutil

        if self.process is None or self.process.poll() is not None:
            return []
        try:
            return [self.process.pid, *(child.pid for child in psutil.Process(self.process.pid).children(recursive=True))]
        except psutil.Error:
            return [self.process.pid]

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None


def generate_ndjson(url: str, images: int, args: argparse.Namespace) -> tuple[float, float, int, dict[int, str]]:
    """One ``POST /generate`` read as NDJSON: (seconds to the first image, seconds to the summary,
    images, url by seed). Image i has prompt ``prompt_for(i)`` and seed ``SEED + i``, as in (a)."""
    import requests

    body = {"prompts": [prompt_for(i) for i in range(images)], "seed": SEED, "return_format": "url", "size": args.size}
    first = done = None
    count = 0
    urls: dict[int, str] = {}
    started = time.perf_counter()
    with requests.post(url + "/generate", json=body, headers={"Accept": "application/x-ndjson"}, stream=True, timeout=900) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"POST /generate: HTTP {reply.status_code}: {reply.text[:300]}")
        for line in reply.iter_lines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item.get("type") == "image":
                count += 1
                urls[int(item["seed"])] = item["url"]
                if first is None:
                    first = time.perf_counter() - started
            elif item.get("type") == "summary":
                done = time.perf_counter() - started
                if item.get("success") is not True:
                    raise RuntimeError(f"POST /generate failed: {item.get('detail')}")
    if done is None or count != images:
        raise RuntimeError(f"POST /generate: {count} of {images} images, summary {'seen' if done else 'missing'}")
    return first or done, done, count, urls


def psnr_of_urls(urls: dict[int, str], references: dict[int, Any], most: int = 8) -> float | None:
    """The lowest PSNR of the served images against (a)'s for the same seeds (at most ``most``)."""
    import requests

    scores = [psnr(references[seed], requests.get(urls[seed], timeout=60).content) for seed in sorted(set(urls) & set(references))[:most]]
    return min(scores) if scores else None


def server_overrides(results: Results, budget: Budget) -> tuple[dict[str, str], str]:
    """Compile off for the server when (c) failed with it, or when what is left of the budget would
    not cover its start: a restart from the compile cache still traces every graph (guessed at a
    third of (c)'s cold compile) and the request must fit after it."""
    if "c" in results.failed and results.args.compile != "off":
        return {"compile": "off"}, f"; compile off: (c) failed with it ({results.failed['c'][:120]})"
    report = results.reports.get("c")
    if not report or not report["plan"]["compile"] or budget.seconds <= 0:
        return {}, ""
    needed = ARM_MIN_SECONDS["d"] + report["compile_s"] / 3
    if budget.allows(needed):
        return {}, ""
    return {"compile": "off"}, f"; compile off: {budget.left():.0f} s of the budget left, a start from the compile cache needs about {needed:.0f} s"


def arm_server(results: Results, budget: Budget) -> None:
    from gpu_workers.speed import SpeedReport

    args = results.args
    overrides, why = server_overrides(results, budget)
    print(f"\n== (d) {ARM_NAMES['d']}: {args.http_images} images, --max-batch {args.server_max_batch}{why} ==", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-throughput-") as tmp:
        server = Server(args, Path(tmp), overrides)
        # Peak memory from before the start to the end of the request: on CUDA the device's use
        # beyond this process's, on the CPU the RSS of the server's processes (API and worker).
        memory = MemoryPeak(args.device, pids=server.process_tree, interval=0.2)
        try:
            started = time.perf_counter()
            with memory:
                server.start()
                server.wait_ready(timeout=min(1800.0, max(60.0, budget.left() - 30.0)))
                ready_s = time.perf_counter() - started
                print(f"   ready in {ready_s:.1f} s", flush=True)
                first_s, seconds, count, urls = generate_ndjson(server.url, args.http_images, args)
            report = SpeedReport.from_log(server.log_path.read_text(errors="replace"))
            results.reports["d"] = asdict(report) if report else None
            score = psnr_of_urls(urls, results.references)
            notes = f"ready in {ready_s:.1f} s (process start, load, warm-up); url answers, NDJSON; memory: start and request{why}"
            results.add(Row("d", ARM_NAMES["d"], args.server_max_batch, count, seconds, first_image_s=first_s,
                            warmup_s=report.warmup_s if report else None, compile_s=report.compile_s if report else None,
                            peak_memory_bytes=memory.peak, psnr_db=score, notes=notes))  # fmt: skip
        finally:
            server.stop()
    results.write()


# --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Results:
    import torch

    results = Results(args)
    budget = Budget(args.budget_s)
    if args.device == "cpu":
        torch.set_num_threads(args.cpu_threads)
    results.environment = environment(args.device)
    results.peak_tflops = measured_peak_tflops(args.device)
    results.datasheet_tflops = datasheet_tflops(results.environment.get("device_name", ""))
    print(f"== GPU throughput: {results.environment['device_name']}, {args.model} at {args.size}, {args.steps} steps; arms {','.join(args.arms)} ==")
    print(f"   peak: {results.peak_tflops:.3g} TFLOP/s measured" + (f", {results.datasheet_tflops:g} datasheet" if results.datasheet_tflops else ""), flush=True)
    results.write()
    steps: list[tuple[str, Callable[[], None]]] = []
    if "a" in args.arms or "b" in args.arms:
        steps.append(("a" if "a" in args.arms else "b", lambda: arms_plain(results, budget)))
    for arm in ("x", "c", "e"):
        if arm in args.arms:
            steps.append((arm, lambda arm=arm: arm_worker_loop(results, budget, arm)))
    if "d" in args.arms:
        steps.append(("d", lambda: arm_server(results, budget)))
    steps.sort(key=lambda step: ARMS.index(step[0]))
    for arm, step in steps:
        if not budget.allows(ARM_MIN_SECONDS[arm]):
            results.skipped[arm] = f"{budget.left():.0f} s of the budget left, it needs about {ARM_MIN_SECONDS[arm]:.0f} s"
            print(f"\n== ({arm}) skipped: {results.skipped[arm]} ==", flush=True)
            continue
        if arm == "e":
            from gpu_workers.speed import fp8_unavailable

            reason = fp8_unavailable(args.device)
            if reason:
                results.skipped["e"] = reason
                print(f"\n== (e) skipped: {reason} ==", flush=True)
                continue
        try:
            step()
        except KeyboardInterrupt:  # the GPU window's time is up: keep what was measured
            results.failed[arm] = "interrupted: the run's time was up"
            results.write()
            break
        except Exception as exc:  # noqa: BLE001 - one arm's failure must not lose the others
            import traceback

            traceback.print_exc()
            results.failed[arm] = f"{type(exc).__name__}: {exc}"
        results.write()
    if args.smoke:
        smoke_check(results)
    results.write()
    return results


def smoke_check(results: Results) -> None:
    """The worker loop's and the server's images against plain diffusers' for the same seeds."""
    for arm in ("c", "d"):
        if arm not in results.args.arms:
            continue
        scores = [row.psnr_db for row in results.rows if row.arm == arm and row.psnr_db is not None]
        if not scores:
            results.failed.setdefault(arm, f"no PSNR of ({arm})'s images against (a)'s")
            continue
        worst = min(scores)
        verdict = "PASS" if worst >= SMOKE_MIN_PSNR else "MISS"
        results.checks.append(f"{verdict}: ({arm}) {ARM_NAMES[arm]}: images within {worst:.1f} dB PSNR of plain diffusers' (goal >= {SMOKE_MIN_PSNR:g} dB)")
        if verdict != "PASS":
            results.failed[arm] = results.checks[-1]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    results = run(args)
    print("\n" + markdown(results))
    print(f"\nwritten: {args.out / 'gpu_throughput.json'}, {args.out / 'gpu_throughput.md'}")
    asked = set(args.arms)
    ran = {row.arm for row in results.rows} | set(results.skipped)
    return 0 if not results.failed and asked <= ran else 1


if __name__ == "__main__":
    sys.exit(main())
