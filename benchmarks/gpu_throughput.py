"""GPU throughput, side by side on one device: plain diffusers, our whole server, our worker loop.

Arms, each on the same device, model, image size, step count and seeds, in the order they run
(``STEPS``: the most important first, so that a run cut short keeps what matters most):

- (b) plain diffusers ``StableDiffusionXLPipeline`` at its best batch (a sweep, largest batch first),
  then (a) one image per call (its images are the PSNR references);
- (d) our whole server over HTTP, eager (bf16, channels-last, fused QKV, no compile): ``python -m
  service`` on a loopback port, one request of ``--http-images`` images (150) with ``return_format:
  url``, read as NDJSON, each image fetched as its line arrives; the clock stops when the last byte
  of the last image is in. (b) and (d) are the headline ratio;
- (x) our worker loop in this process, eager: ``gpu_workers.worker.load_for_worker`` (the speed
  toolkit of ``gpu_workers.speed`` and its warm-up) and ``gpu_workers.worker_loop.serve`` over the
  shards of one request, PNG encoding included, for each ``--max-batch`` of a sweep (largest first);
- (c) the same worker loop compiled (``--compile``: UNet and VAE decoder by default, ``--compile
  unet`` for the UNet alone), in a child process with a hard time limit: it starts only if its
  measured (``--previous``) or estimated compile fits what is left, prints a heartbeat line every
  ``--heartbeat-s`` while it runs, and is abandoned cleanly (the child's process group killed, the
  reason in the results) when it overruns; the compile cache artifacts it leaves are copied into the
  output folder, gzipped, when under ``ARTIFACTS_MAX_BYTES``, for the next run to start warm;
- (s) our server over HTTP compiled, from the compile cache (c) left, only with time left over;
- (e) (c) with the fp8 UNet (``--fp8 on``), where torchao and the GPU allow it, with time left over.

For each row: images/s, ms per image, achieved TFLOP/s and the fraction of the device's peak (the
FLOPs of one image are counted on the meta device from the loaded model's own configuration: 34.9
TFLOP for SDXL at 1024x576 and 8 steps, DESIGN.md section 6; the peak is a bf16 matrix product
measured after a warm-up that lets the clocks rise, or ``--peak-tflops`` from the GPU window's
preflight, and the datasheet figure where the device is known), peak device memory, time to first
image, warm-up and compile seconds, the PSNR of its images against arm (a)'s for the same seeds,
and when the row landed in the output folder (seconds since the window's start).

    python -m benchmarks.gpu_throughput --out DIR              # on a GPU: sdxl-synthetic, 1024x576
    python -m benchmarks.gpu_throughput --smoke --out DIR      # every arm on the CPU, tiny model

It writes ``DIR/gpu_throughput.json`` and ``DIR/gpu_throughput.md`` after every arm (a run cut
short keeps what it measured), the servers' logs as ``DIR/server.log`` and
``DIR/server-compiled.log``, and the compile cache artifacts as ``DIR/artifacts-<key>.bin.gz``.
``--budget-s`` is the time the run has; a step that would not fit in what is left is skipped and
said so (``--step-scale`` scales the steps' budgets, for the CPU rehearsal). ``--smoke`` also
checks that the worker loop's and the server's images are within ``SMOKE_MIN_PSNR`` dB of plain
diffusers'. Exit status 0 when every arm asked for ran, was skipped or was abandoned for time and
the smoke check held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import gc
import io
import json
import math
import os
import gzip
import platform
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

from benchmarks.harness.launch import REPO, ApiServer, NotReached, checkout_env, ready_rows, stop_process
from benchmarks.harness.report import Column, report
from benchmarks.harness.sampling import TreeSampler

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
ARMS = ("b", "a", "d", "x", "c", "s", "e")  # the order they run in: the headline pair first
ARM_NAMES = {
    "b": "plain diffusers, best batch",
    "a": "plain diffusers, 1 image/call",
    "d": "server over HTTP, eager",
    "x": "worker loop, eager",
    "c": "worker loop, compiled",
    "s": "server over HTTP, compiled",
    "e": "worker loop, fp8 UNet",
}
COMPILED_ARMS = ("c", "s", "e")
HEADLINE_ARMS = ("b", "d")


@dataclass(frozen=True)
class Step:
    """One step of the run: its arms, the seconds it is given on the GPU box (scaled by
    ``--step-scale``), and whether it runs only on time the steps before it did not use."""

    name: str
    arms: tuple[str, ...]
    budget_s: float
    optional: bool = False


# The GPU window's steps after the install and the preflight (scripts/gpu_window.py plan shows the
# whole window). The budgets are generous for the eager steps (load, warm-up and the timed calls of
# SDXL on an H200 take well under a minute each) so that the headline pair lands first and early;
# the compiled step takes what is left.
STEPS = (
    Step("plain diffusers: (b) batch sweep, largest first, then (a)", ("b", "a"), 70.0),
    Step("server over HTTP, eager: (d)", ("d",), 100.0),
    Step("worker loop, eager: (x) --max-batch sweep, largest first", ("x",), 50.0),
    Step("worker loop, compiled: (c), bounded", ("c",), 230.0),
    Step("server over HTTP, compiled from (c)'s cache: (s)", ("s",), 60.0, optional=True),
    Step("worker loop, fp8 UNet: (e), bounded", ("e",), 180.0, optional=True),
)
# A cold compile's seconds where no earlier run measured them, per --compile target and device type
# (a guess at the low end of the 3-7 minutes expected for SDXL's 4 graphs on an H200; the CPU's from
# the tiny model here). A run replaces it with its measurement (``compile`` in the results).
COLD_COMPILE_GUESS_S = {"cuda": {"unet": 150.0, "vae.decoder": 45.0}, "cpu": {"unet": 70.0, "vae.decoder": 20.0}}
OTHER_TARGET_GUESS_S = 15.0
WARM_COMPILE_FRACTION = 0.25  # a start from the artifacts still traces every graph
LOAD_GUESS_S = 30.0  # load and eager warm-up, where (x) did not measure it
CHILD_START_S = 10.0  # a bounded child's own start: Python, torch, diffusers
MEASURE_MIN_S = 20.0  # the shortest useful timed part of a worker-loop arm
ARTIFACTS_MAX_BYTES = 16 * 2**20  # what one file back from the GPU window may hold
HEARTBEAT_S = 15.0
SMOKE_COMPILE = "unet.time_embedding.linear_1"  # one linear layer: inductor makes no C++ kernel, a cold CPU compile of seconds
SPEED_FLAGS = ("dtype", "channels_last", "fuse_qkv", "compile", "compile_mode", "warmup")


# --------------------------------------------------------------------------------------------------
# Settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_throughput.json, gpu_throughput.md, the server logs, the compile artifacts")
    parser.add_argument("--smoke", action="store_true", help="every arm on the CPU with the tiny model, small sizes")
    parser.add_argument("--device", default=None, help="cuda:0, cpu, ... (default: cuda:0 where CUDA is available; cpu with --smoke)")
    parser.add_argument("--model", default=None, help="model preset (default sdxl-synthetic; tiny with --smoke)")
    parser.add_argument("--model-cache", default=str(Path.home() / ".cache" / "sdxl-lightning-server"), help="model and compile cache")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default 1024x576; 256x256 with --smoke)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (the server always runs 8)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {','.join(ARMS)} (they run in that order)")
    parser.add_argument("--single-images", type=int, default=None, help="(a): timed images (default 8; 3 with --smoke)")
    parser.add_argument("--plain-batches", default=None, help="(b): batches to sweep, largest first (default 16,8,4,2; 4,2 with --smoke)")
    parser.add_argument("--plain-repeats", type=int, default=2, help="(b): timed calls per batch (after one warm call)")
    parser.add_argument("--max-batch", default=None, help="(x), (c): the --max-batch sweep, largest first (default 8,4,1; 2,1 with --smoke)")
    parser.add_argument("--loop-images", type=int, default=None, help="(x), (c), (e): images per sweep point (default 48; 8 with --smoke)")
    parser.add_argument("--http-images", type=int, default=None, help="(d), (s): images of the request (default 150; 8 with --smoke)")
    parser.add_argument("--server-max-batch", type=int, default=None, help="(d), (s): --max-batch of the server (default: the sweep's largest)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for the whole run; steps that would not fit are skipped (default 420; none with --smoke)")
    parser.add_argument("--step-scale", type=float, default=1.0, help="factor on the steps' budgets (the CPU rehearsal's scaled-down window)")
    parser.add_argument("--heartbeat-s", type=float, default=HEARTBEAT_S, help="seconds between the heartbeat lines of a bounded compile")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's matrix-product peak, measured already (the GPU window's preflight)")
    parser.add_argument("--compile-broken", default=None, help="why torch.compile cannot run here (the preflight's check): the compiled arms are skipped with it")
    parser.add_argument("--previous", type=Path, default=None, help="an earlier run's gpu_throughput.json: its measured compile seconds replace the guesses")
    parser.add_argument("--window-started", type=float, default=None, help="time.time() when the GPU window's command started (rows say when they landed)")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads on the CPU (this process and the server's worker)")
    for name in SPEED_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), default=None, help="worker setting, as python -m service --help says; --compile is the compiled arms' (the eager ones run with it off) (default auto; --smoke: channels-last and fused QKV on, compile unet.time_embedding, full warm-up)")
    parser.add_argument("--child-arm", default=None, help=argparse.SUPPRESS)  # the bounded child of (c) or (e)
    parser.add_argument("--child-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a bounded child is started with
    smoke = args.smoke
    args.device = args.device or ("cpu" if smoke else _default_device())
    args.model = args.model or ("tiny" if smoke else "sdxl-synthetic")
    args.size = args.size or ("256x256" if smoke else "1024x576")
    args.single_images = args.single_images or (3 if smoke else 8)
    args.plain_batches = sorted(_ints(args.plain_batches or ("4,2" if smoke else "16,8,4,2"), parser, "--plain-batches"), reverse=True)
    args.max_batch = sorted(_ints(args.max_batch or ("2,1" if smoke else "8,4,1"), parser, "--max-batch"), reverse=True)
    args.loop_images = args.loop_images or (8 if smoke else 48)
    args.http_images = args.http_images or (8 if smoke else 150)
    args.server_max_batch = args.server_max_batch or max(args.max_batch)
    args.budget_s = (0.0 if smoke else 420.0) if args.budget_s is None else args.budget_s
    args.window_started = time.time() if args.window_started is None else args.window_started
    # The smoke run turns on the toolkit's CPU-cheap pieces so their code runs; its compiled arms
    # compile one small module (a cold CPU compile of the whole tiny model costs minutes:
    # tests/test_speed.py covers it).
    smoke_speed = {"channels_last": "on", "fuse_qkv": "on", "compile": SMOKE_COMPILE, "warmup": "full"}
    for name in SPEED_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, smoke_speed.get(name, "auto") if smoke else ("default" if name == "compile_mode" else "auto"))
    if args.compile_mode == "auto":
        args.compile_mode = "default"
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    if not arms or any(arm not in ARMS for arm in arms):
        parser.error(f"--arms takes letters from {','.join(ARMS)}")
    args.arms = [arm for arm in ARMS if arm in arms]
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
    at_s: float | None = None  # when the row landed in the output folder, seconds since the window's start
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


def measured_peak_tflops(device: str, warmup_s: float | None = None) -> float:
    """The rate of a large matrix product on ``device`` (bf16 on CUDA, float32 on the CPU): the
    ceiling this run's TFLOP/s are compared with. Products run for ``warmup_s`` first (3 s on
    CUDA): an idle GPU's clocks are low (an H200 here: 345 MHz idle, 1980 MHz under load), and a
    peak taken before they rise understates it."""
    import torch

    cuda = device.startswith("cuda")
    n, dtype, repeats = (8192, torch.bfloat16, 20) if cuda else (512, torch.float32, 10)
    warmup_s = (3.0 if cuda else 0.2) if warmup_s is None else warmup_s
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    until = time.perf_counter() + warmup_s
    while True:
        a @ b
        synchronize(device)
        if time.perf_counter() >= until:
            break
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times) / 1e12


def compile_check(device: str) -> str | None:
    """``torch.compile`` (inductor) of a 2-layer network on ``device``, against its eager output:
    None when it works, else why not (the compiled arms are then skipped with this reason instead
    of failing minutes into the run). On CUDA a GELU between the layers makes inductor generate
    and build a Triton kernel; on the CPU (the rehearsal) the layers alone, whose products inductor
    hands to the library: a C++ kernel's build costs 15 s on the 2-core machine here, and
    tests/test_speed.py covers that path."""
    import torch

    try:
        generator = torch.Generator("cpu").manual_seed(0)
        between = torch.nn.GELU() if device.startswith("cuda") else torch.nn.Identity()
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), between, torch.nn.Linear(128, 64)).to(device)
        inputs = torch.randn(8, 64, generator=generator).to(device)
        with torch.no_grad():
            expected = model(inputs)
            got = torch.compile(model)(inputs)
        synchronize(device)
        error = float((got - expected).norm() / expected.norm())
        if not error < 1e-2:
            return f"torch.compile's output differs from eager: relative error {error:.3g}"
        return None
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        return f"{type(exc).__name__}: {str(exc).strip()[:400]}"
    finally:
        torch._dynamo.reset()


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
    """Peak memory while a block runs: the CUDA allocator's peak of this process, the device-wide
    use (CUDA, another process: ``root``, a server) seen by a sampling thread, or on the CPU the
    highest RSS of this process or of ``root``'s process tree (the harness's ``TreeSampler``)."""

    def __init__(self, device: str, root: Callable[[], int | None] | None = None, interval: float = 0.05) -> None:
        self.device = device
        self.root = root
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tree: TreeSampler | None = None
        self._baseline = 0

    def __enter__(self) -> MemoryPeak:
        if not self.device.startswith("cuda"):
            self._tree = TreeSampler(self.root or os.getpid(), self.interval, tree=self.root is not None).start()
            return self
        import torch

        if self.root is None:
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        free, total = torch.cuda.mem_get_info(self.device)
        self._baseline = total - free
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _device_use(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return max(0, total - free - self._baseline)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._device_use())
            self._stop.wait(self.interval)

    def __exit__(self, *exc: Any) -> None:
        if self._tree is not None:
            self._tree.sample()
            self._tree.stop()
            self.peak = self._tree.summary().peak_tree_rss
            return
        import torch

        if self._thread is None:
            synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._device_use())


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
    abandoned: dict[str, str] = field(default_factory=dict)  # cut off at their time limit: not failures
    references: dict[int, Any] = field(default_factory=dict)  # seed -> arm (a)'s image
    checks: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)  # each step: budget, start, seconds, outcome
    compile: dict[str, Any] = field(default_factory=dict)  # the compiled arm's compile, for the next run's estimate
    ready_s: dict[str, float] = field(default_factory=dict)  # arm -> seconds from its start to ready

    def window_seconds(self) -> float:
        return time.time() - self.args.window_started

    def add(self, row: Row) -> Row:
        row.finish(self.flops_per_image, self.peak_tflops)
        if row.at_s is None:
            row.at_s = round(self.window_seconds(), 1)
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
            "abandoned": self.abandoned,
            "checks": self.checks,
            "run_steps": self.steps,
            "compile": self.compile,
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


ROW_COLUMNS = [
    Column("arm", align="<"), Column("what", align="<"), Column("batch"), Column("images"), Column("images_per_s", "images/s", ".2f"),
    Column("ms_per_image", "ms/image", ".0f"), Column("tflops", "TFLOP/s", ".3g"), Column("peak_fraction", "of peak", ".1%"),
    Column("peak_memory_bytes", "peak memory", _bytes), Column("first_image_s", "first image s", ".2f"), Column("warmup_s", "warm-up s", ".1f"),
    Column("compile_s", "compile s", ".1f"), Column("psnr_db", "PSNR vs (a) dB", lambda v: _fmt(v, ".1f")), Column("at_s", "in OUT at s", ".0f"),
    Column("notes", align="<"),
]  # fmt: skip
STEP_COLUMNS = [
    Column("name", "step", align="<"), Column("budget_s", "budget s", ".0f"), Column("started_s", "started at s", ".0f"),
    Column("seconds", "took s", ".1f"), Column("outcome", align="<"),
]  # fmt: skip


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
        report([asdict(row) for row in results.rows], ROW_COLUMNS, markdown=True, echo=False),
    ]
    if results.plain_sweep:
        lines += ["", "Plain diffusers, batch sweep (b): " + ", ".join(f"batch {r.batch}: {r.images_per_s:.2f} images/s ({_bytes(r.peak_memory_bytes)})" for r in results.plain_sweep) + "."]
    for arm, reason in results.skipped.items():
        lines.append(f"\nSkipped ({arm}) {ARM_NAMES[arm]}: {reason}.")
    for arm, reason in results.abandoned.items():
        lines.append(f"\nAbandoned ({arm}) {ARM_NAMES[arm]}: {reason}.")
    for arm, error in results.failed.items():
        lines.append(f"\nFailed ({arm}) {ARM_NAMES[arm]}: {error}")
    if results.steps:
        lines += ["", report(results.steps, STEP_COLUMNS, markdown=True, echo=False)]
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


def arms_plain(results: Results, budget: Budget, step_end: float) -> None:
    """(b) the batch sweep, largest batch first (the headline point is the first measured, and one
    that does not fit in memory ends the sweep), then (a) one image per call, whose images are the
    PSNR references of the other arms. A sweep point starts only before ``step_end``
    (``time.monotonic()``), and (a) runs even if the sweep was cut."""
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
        if "b" in args.arms:
            print(f"\n== (b) {ARM_NAMES['b']}: batches {args.plain_batches} (load {load_s:.1f} s) ==", flush=True)
            for batch in args.plain_batches:
                if results.plain_sweep and time.monotonic() >= step_end:
                    print(f"   batch {batch} and after: the step's time is up", flush=True)
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
                    continue
                row = Row("b", ARM_NAMES["b"], batch, batch * args.plain_repeats, seconds, first_image_s=seconds / args.plain_repeats,
                          warmup_s=max(0.0, warm_s - seconds / args.plain_repeats), compile_s=0.0, peak_memory_bytes=memory.peak)  # fmt: skip
                row.finish(results.flops_per_image, results.peak_tflops)
                results.plain_sweep.append(row)
                print(f"   batch {batch}: {row.images_per_s:.2f} images/s, {row.ms_per_image:.0f} ms/image", flush=True)
            if results.plain_sweep:
                best = max(results.plain_sweep, key=lambda r: r.images_per_s)
                notes = f"best of batches {', '.join(str(r.batch) for r in results.plain_sweep)}; first image = one call; load {load_s:.1f} s"
                results.add(Row(**{**asdict(best), "notes": notes, "at_s": None}))
            results.write()
        if "a" in args.arms:
            print(f"\n== (a) {ARM_NAMES['a']} ==", flush=True)
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
                            compile_s=0.0, peak_memory_bytes=memory.peak, notes="first call not counted"))  # fmt: skip
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


def arm_settings(args: argparse.Namespace, arm: str) -> dict[str, str]:
    """The worker settings of an arm: the eager ones with compile off, (e) with the fp8 UNet."""
    speed = {name: str(getattr(args, name)) for name in SPEED_FLAGS}
    if arm in ("d", "x"):
        speed["compile"] = "off"
    if arm == "e":
        speed["fp8"] = "on"
    return speed


def loop_sweep(args: argparse.Namespace, arm: str) -> list[int]:
    """The --max-batch values a worker-loop arm measures, largest first ((e): the largest only)."""
    return list(args.max_batch) if arm in ("x", "c") else [max(args.max_batch)]


def worker_config(args: argparse.Namespace, arm: str) -> Any:
    from gpu_workers.messages import WorkerConfig
    from gpu_workers.speed import SpeedSettings

    settings = SpeedSettings(**{**SpeedSettings().as_fields(), **arm_settings(args, arm)})
    sizes, max_batch = (args.size,), max(loop_sweep(args, arm))
    return WorkerConfig(0, args.device, args.model, args.model_cache, args.cpu_threads, 0.0, **settings.as_fields(), warmup_sizes=sizes, max_batch=max_batch)


class ChildProgress:
    """What a worker-loop arm tells whoever watches it, through files in ``folder`` that stay
    readable if the process is killed at any moment: its phase, each row as it is measured, its
    speed report. Without a folder (an arm in this process) it does nothing."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def phase(self, text: str) -> None:
        if self.folder is not None:
            partial = self.folder / "phase.tmp"
            partial.write_text(text)
            os.replace(partial, self.folder / "phase.txt")

    def row(self, row: Row) -> None:
        if self.folder is not None:
            with open(self.folder / "rows.jsonl", "a", encoding="utf-8") as rows:
                rows.write(json.dumps(asdict(row)) + "\n")

    def report(self, report: dict[str, Any] | None, ready_s: float, flops_per_image: float) -> None:
        if self.folder is not None:
            (self.folder / "report.json").write_text(json.dumps({"report": report, "ready_s": ready_s, "flops_per_image": flops_per_image}))


def arm_worker_loop(results: Results, arm: str, step_end: float, progress: ChildProgress | None = None) -> None:
    """(x), (c), (e): load and warm up as a worker does, then one request's shards through the
    worker loop for each --max-batch of the sweep, largest first; a sweep point starts only before
    ``step_end`` (``time.monotonic()``)."""
    import torch

    from gpu_workers.messages import ShardDone
    from gpu_workers.speed import last_report
    from gpu_workers.worker import load_for_worker
    from gpu_workers.worker_loop import serve

    args = results.args
    progress = progress or ChildProgress(None)
    sweep = loop_sweep(args, arm)
    config = worker_config(args, arm)
    print(f"\n== ({arm}) {ARM_NAMES[arm]}: --max-batch {sweep}, {args.loop_images} images each, compile {config.compile} ==", flush=True)
    progress.phase("loading and compiling (warm-up)" if arm in COMPILED_ARMS else "loading and warming up")
    with MemoryPeak(args.device) as memory:
        started = time.perf_counter()
        pipe, facts = load_for_worker(config)
        synchronize(args.device)
        ready_s = time.perf_counter() - started
    report = last_report()
    results.reports[arm] = asdict(report) if report else None
    results.ready_s[arm] = ready_s
    warmup_s = report.warmup_s if report else None
    compile_s = report.compile_s if report else None
    print(f"   ready in {ready_s:.1f} s (warm-up {warmup_s:.1f} s, compile {compile_s:.1f} s, {report.graphs if report else '?'} graphs)", flush=True)
    ensure_flops(results, pipe)
    progress.report(results.reports[arm], ready_s, results.flops_per_image)
    try:
        for max_batch in sweep:
            if max_batch != sweep[0] and time.monotonic() >= step_end:
                print(f"   --max-batch {max_batch} and after: the step's time is up", flush=True)
                break
            progress.phase(f"measuring --max-batch {max_batch}")
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
            if report and report.cache_loaded:
                notes += "; compile cache artifacts loaded"
            if report and report.fp8_layers:
                notes += f"; {report.fp8_layers} fp8 layers"
            row = results.add(Row(arm, ARM_NAMES[arm], max_batch, made, seconds, first_image_s=first_s, warmup_s=warmup_s, compile_s=compile_s,
                                  peak_memory_bytes=max(memory.peak, run_memory.peak) if args.device.startswith("cuda") else run_memory.peak,
                                  psnr_db=min(scores) if scores else None, notes=notes))  # fmt: skip
            progress.row(row)
            results.write()
    finally:
        del pipe
        torch._dynamo.reset()
        free_device(args.device)


# --------------------------------------------------------------------------------------------------
# (c), (e): the compiled worker loop in a child process with a hard time limit


@dataclass
class Bounded:
    """How a bounded child process ended."""

    returncode: int | None
    seconds: float
    abandoned: bool


def run_bounded(command: list[str], limit_s: float, heartbeat_s: float, status: Callable[[], str], label: str, env: dict[str, str] | None = None) -> Bounded:
    """Run ``command`` in a process group of its own; print ``label: status()`` every
    ``heartbeat_s`` while it runs; at ``limit_s`` kill the whole group (a compile's worker
    processes too), which leaves the device and this process as they were."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True)
    next_beat = started + heartbeat_s
    try:
        while True:
            now = time.monotonic()
            try:
                code = process.wait(timeout=max(0.05, min(1.0, next_beat - now, started + limit_s - now)))
                return Bounded(code, time.monotonic() - started, abandoned=False)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now - started >= limit_s:
                print(f"   {label}: {now - started:.0f} s, its limit: abandoning it ({status()})", flush=True)
                stop_process(process, 5.0, group=True, name=label)
                return Bounded(None, time.monotonic() - started, abandoned=True)
            if now >= next_beat:
                print(f"   {label}: {now - started:.0f} s of at most {limit_s:.0f} s: {status()}", flush=True)
                next_beat += heartbeat_s
    finally:
        if process.poll() is None:  # interrupted (the window's end): the child goes too
            stop_process(process, 5.0, group=True, name=label)


def device_label(device: str) -> str:
    """The device's name as a worker gives it (``gpu_workers.worker``): part of the compile key."""
    import torch

    return "cpu" if device == "cpu" else torch.cuda.get_device_name(device)


def compile_artifacts_path(args: argparse.Namespace, arm: str) -> Path:
    """The compile cache artifacts file the worker of ``arm`` loads and writes."""
    from gpu_workers.speed import SpeedSettings, artifacts_path, compile_key, inductor_cache_dir, plan

    config = worker_config(args, arm)
    directory = inductor_cache_dir(Path(args.model_cache))
    return artifacts_path(directory, compile_key(config, device_label(args.device), plan(SpeedSettings.of(config), args.device)))


def previous_compile(path: Path | None) -> dict[str, Any]:
    """The compile record of an earlier run's gpu_throughput.json ({} when there is none)."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        return dict(json.loads(Path(path).read_text()).get("compile") or {})
    except (ValueError, AttributeError):
        return {}


def compile_estimate(results: Results, arm: str, previous: dict[str, Any]) -> tuple[float, str]:
    """Seconds from a compiled arm's start to ready (load, apply, warm-up with its compile), and
    where the figure comes from: the earlier run's measurement for the same setup, cold or from
    its artifacts, else the guesses."""
    import torch

    from gpu_workers.speed import compile_targets

    args = results.args
    targets = compile_targets(arm_settings(args, arm)["compile"], torch.device(args.device).type)
    warm = compile_artifacts_path(args, arm).is_file()
    same = previous.get("setup") == compile_setup(args, arm)
    kind = "warm" if warm else "cold"
    if same and previous.get(f"{kind}_ready_s"):
        return CHILD_START_S + float(previous[f"{kind}_ready_s"]), f"start {CHILD_START_S:.0f} s + load and compile measured {kind} by an earlier run"
    guesses = COLD_COMPILE_GUESS_S.get(torch.device(args.device).type, {})
    compile_s = sum(guesses.get(target, OTHER_TARGET_GUESS_S) for target in targets)
    if same and previous.get("cold_compile_s"):
        compile_s = float(previous["cold_compile_s"])
    if warm:
        compile_s *= WARM_COMPILE_FRACTION
    load_s = results.ready_s.get("x", LOAD_GUESS_S)
    source = (f"estimated: start {CHILD_START_S:.0f} s + load {load_s:.0f} s ({'measured by (x)' if 'x' in results.ready_s else 'a guess'})"
              f" + {kind} compile of {'+'.join(targets)} {compile_s:.0f} s")  # fmt: skip
    return CHILD_START_S + load_s + compile_s, source


def compile_setup(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    """What makes two runs' compile times comparable."""
    settings = arm_settings(args, arm)
    return {"model": args.model, "device": args.device, "size": args.size, "max_batch": max(loop_sweep(args, arm)), **settings}


def arm_bounded(results: Results, arm: str, limit_s: float, estimate: tuple[float, str]) -> None:
    """(c) or (e) in a child process of this benchmark (``--child-arm``), killed at ``limit_s``:
    the rows it measured before stay; then the compile cache artifacts go to the output folder
    and the compile's figures to the results, for the next run."""
    args = results.args
    artifacts = compile_artifacts_path(args, arm)
    warm = artifacts.is_file()
    print(f"\n== ({arm}) {ARM_NAMES[arm]}: a child process, at most {limit_s:.0f} s; ready in about {estimate[0]:.0f} s "
          f"({estimate[1]}); compile cache {'warm: ' + artifacts.name if warm else 'cold'} ==", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f"gpu-throughput-{arm}-") as tmp:
        folder = Path(tmp)
        (folder / "references").mkdir()
        for seed, image in results.references.items():
            image.save(folder / "references" / f"{seed}.png")
        (folder / "context.json").write_text(json.dumps({"flops_per_image": results.flops_per_image, "peak_tflops": results.peak_tflops}))
        command = [sys.executable, "-m", "benchmarks.gpu_throughput", *args.argv, "--child-arm", arm, "--child-dir", str(folder), "--out", str(folder / "out"),
                   "--window-started", f"{args.window_started:.3f}"]  # fmt: skip

        def status() -> str:
            phase = _read(folder / "phase.txt") or "starting"
            if phase.startswith("loading and compiling"):
                saved = artifacts.stat().st_size if artifacts.is_file() else 0
                return f"compiling: {phase}; compile artifacts so far {saved / 2**20:.1f} MiB"
            return phase

        env = checkout_env()
        outcome = run_bounded(command, limit_s, args.heartbeat_s, status, f"({arm})", env)
        results.rows += [Row(**json.loads(line)) for line in (_read(folder / "rows.jsonl") or "").splitlines()]  # (printed by the child)
        child = json.loads(_read(folder / "report.json") or "{}")
        results.reports[arm] = child.get("report")
        if child.get("ready_s") is not None:
            results.ready_s[arm] = float(child["ready_s"])
        results.flops_per_image = results.flops_per_image or float(child.get("flops_per_image") or 0.0)
        phase = _read(folder / "phase.txt") or "starting"
        if outcome.abandoned:
            results.abandoned[arm] = (f"ran past its limit of {limit_s:.0f} s while {phase} (ready expected in about {estimate[0]:.0f} s: "
                                      f"{estimate[1]}); its processes were killed, the rows before it stay")  # fmt: skip
        elif outcome.returncode != 0:
            results.failed[arm] = _read(folder / "error.txt") or f"the child exited with {outcome.returncode}"
    if arm == "c":
        record_compile(results, arm, artifacts, warm, outcome)
    results.write()


def record_compile(results: Results, arm: str, artifacts: Path, warm: bool, outcome: Bounded) -> None:
    """The compile's figures (kept from the earlier run where this one did not measure them) and
    its artifacts file copied into the output folder when it is small enough to come back."""
    args = results.args
    report = results.reports.get(arm) or {}
    record = dict(results.compile)
    if record.get("setup") != compile_setup(args, arm):
        record = {"setup": compile_setup(args, arm)}
    kind = "warm" if report.get("cache_loaded") else "cold"
    if report and not outcome.abandoned:
        record[f"{kind}_ready_s"] = round(results.ready_s.get(arm, 0.0), 1)
        record[f"{kind}_compile_s"] = round(float(report.get("compile_s") or 0.0), 1)
        record["graphs"] = report.get("graphs")
    record.update({"arm": arm, "device_name": results.environment.get("device_name"), "torch": results.environment.get("torch"),
                   "started_warm": warm, "abandoned": outcome.abandoned, "artifacts": artifacts.name, "artifacts_bytes": None, "in_out": False})  # fmt: skip
    if artifacts.is_file():
        data = gzip.compress(artifacts.read_bytes(), compresslevel=6)
        record["artifacts_bytes"], record["artifacts_gz_bytes"] = artifacts.stat().st_size, len(data)
        sizes = f"{artifacts.stat().st_size / 2**20:.2f} MiB, {len(data) / 2**20:.2f} MiB gzipped"
        if len(data) <= ARTIFACTS_MAX_BYTES:
            (args.out / f"{artifacts.name}.gz").write_bytes(data)
            record["in_out"] = True
            print(f"   compile cache artifacts: {artifacts.name}.gz ({sizes}) in {args.out}", flush=True)
        else:
            print(f"   compile cache artifacts: {sizes}, over the {ARTIFACTS_MAX_BYTES / 2**20:.0f} MiB a file back may hold: not copied", flush=True)
    results.compile = record


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def child_main(args: argparse.Namespace) -> int:
    """The bounded child of ``arm_bounded``: one worker-loop arm, its progress in ``--child-dir``."""
    from PIL import Image

    folder = args.child_dir
    context = json.loads((folder / "context.json").read_text())
    results = Results(args)
    results.flops_per_image, results.peak_tflops = context["flops_per_image"], context["peak_tflops"]
    for path in (folder / "references").glob("*.png"):
        results.references[int(path.stem)] = Image.open(path).convert("RGB")
    if args.device == "cpu":
        import torch

        torch.set_num_threads(args.cpu_threads)
    try:
        arm_worker_loop(results, args.child_arm, math.inf, ChildProgress(folder))
    except Exception as exc:  # noqa: BLE001 - the parent reads the reason
        import traceback

        traceback.print_exc()
        (folder / "error.txt").write_text(f"{type(exc).__name__}: {exc}")
        return 1
    return 0


# --------------------------------------------------------------------------------------------------
# (d), (s): the whole server over HTTP


class ReadyTimeout(RuntimeError):
    """No worker was ready in the time the step had."""


def server_for(args: argparse.Namespace, workdir: Path, settings: dict[str, str], log_name: str = "server.log") -> ApiServer:
    """``python -m service`` (the harness's launcher) on a loopback port, its log in the output
    folder, in a session of its own (a stop takes its workers and compile helpers too)."""
    sizes = ",".join(dict.fromkeys(["1024x576", args.size]))  # the server insists on its default size
    flags = [
        "--model", args.model, "--max-batch", str(args.server_max_batch), "--sizes", sizes, "--max-images", str(max(150, args.http_images)),
        "--model-cache", args.model_cache, "--heartbeat-interval", "5", "--shard-timeout", "900", "--cpu-threads", str(args.cpu_threads),
    ]  # fmt: skip
    flags += ["--devices", args.device] if args.device.startswith("cuda") else ["--workers", "1"]
    for name in SPEED_FLAGS:
        flags += ["--" + name.replace("_", "-"), settings[name]]
    server = ApiServer(workdir, flags, log_path=args.out / log_name, new_session=True)
    server.stop_timeout = 60.0  # the drain of a request in flight
    return server


def wait_ready(server: ApiServer, timeout: float, heartbeat_s: float = math.inf, label: str = "server") -> dict[str, Any]:
    """Until a worker is ready; a line every ``heartbeat_s`` while its start (a compile) runs."""

    def ready(health: dict[str, Any]) -> bool:
        workers = health.get("workers", [])
        failed = [w.get("error") for w in workers if w.get("state") == "failed"]
        if failed:
            raise RuntimeError(f"the server's worker failed to start: {failed[0]}")
        return bool(ready_rows(health))

    def beat(seconds: float, health: dict[str, Any] | None) -> None:
        states = ",".join(str(w.get("state")) for w in (health or {}).get("workers", [])) or "no answer"
        print(f"   {label}: {seconds:.0f} s of at most {timeout:.0f} s: starting (workers: {states})", flush=True)

    try:
        return server.wait_for(ready, timeout, "a ready worker", heartbeat=beat, heartbeat_s=heartbeat_s)
    except NotReached:
        raise ReadyTimeout(f"no worker ready after {timeout:.0f} s, the step's limit; see {server.log_path.name}") from None


@dataclass
class HttpTiming:
    """One request over HTTP, each time since the request was sent."""

    first_line_s: float  # the first image's NDJSON line
    first_image_s: float  # the first image's last byte
    last_byte_s: float  # the last image's last byte: the end of the clock
    summary_s: float  # the NDJSON summary line
    images: dict[int, bytes]  # by seed


def generate_ndjson(url: str, images: int, args: argparse.Namespace, fetchers: int = 4) -> HttpTiming:
    """One ``POST /generate`` read as NDJSON, each image fetched (``fetchers`` threads) as its line
    arrives, as a client would: the request is done when the last byte of the last image is in.
    Image i has prompt ``prompt_for(i)`` and seed ``SEED + i``, as in (a)."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    local = threading.local()

    def fetch(image_url: str) -> tuple[bytes, float]:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        reply = session.get(image_url, timeout=120)
        reply.raise_for_status()
        return reply.content, time.perf_counter()

    body = {"prompts": [prompt_for(i) for i in range(images)], "seed": SEED, "return_format": "url", "size": args.size}
    first_line = summary = None
    fetches: dict[int, Any] = {}
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=fetchers) as pool:
        with requests.post(url + "/generate", json=body, headers={"Accept": "application/x-ndjson"}, stream=True, timeout=900) as reply:
            if reply.status_code != 200:
                raise RuntimeError(f"POST /generate: HTTP {reply.status_code}: {reply.text[:300]}")
            for line in reply.iter_lines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if item.get("type") == "image":
                    fetches[int(item["seed"])] = pool.submit(fetch, item["url"])
                    first_line = first_line if first_line is not None else time.perf_counter() - started
                elif item.get("type") == "summary":
                    summary = time.perf_counter() - started
                    if item.get("success") is not True:
                        raise RuntimeError(f"POST /generate failed: {item.get('detail')}")
        fetched = {seed: future.result() for seed, future in fetches.items()}
    if summary is None or len(fetched) != images:
        raise RuntimeError(f"POST /generate: {len(fetched)} of {images} images, summary {'seen' if summary else 'missing'}")
    arrivals = [at - started for _, at in fetched.values()]
    return HttpTiming(first_line or summary, min(arrivals), max(max(arrivals), summary), summary, {seed: data for seed, (data, _) in fetched.items()})


def arm_server(results: Results, arm: str, ready_limit_s: float) -> None:
    """(d) eager or (s) compiled: the server's start (load, warm-up, compile) within
    ``ready_limit_s``, else abandoned; then one request, timed to the last byte."""
    from gpu_workers.speed import SpeedReport

    args = results.args
    settings = arm_settings(args, arm)
    print(f"\n== ({arm}) {ARM_NAMES[arm]}: {args.http_images} images, --max-batch {args.server_max_batch}, compile {settings['compile']}, "
          f"ready within {ready_limit_s:.0f} s ==", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu-throughput-") as tmp:
        server = server_for(args, Path(tmp), settings, "server.log" if arm == "d" else "server-compiled.log")
        # Peak memory from before the start to the end of the request: on CUDA the device's use
        # beyond this process's, on the CPU the RSS of the server's processes (API and worker).
        memory = MemoryPeak(args.device, root=lambda: server.pid, interval=0.2)
        try:
            started = time.perf_counter()
            with memory:
                print(f"   $ {' '.join(server.args[1:])}", flush=True)
                server.launch()
                try:
                    wait_ready(server, ready_limit_s, args.heartbeat_s, f"({arm})")
                except ReadyTimeout as exc:
                    results.abandoned[arm] = str(exc)
                    print(f"   ({arm}) abandoned: {exc}", flush=True)
                    server.stop(5.0)
                    results.write()
                    return
                ready_s = time.perf_counter() - started
                results.ready_s[arm] = ready_s
                print(f"   ready in {ready_s:.1f} s", flush=True)
                timing = generate_ndjson(server.url, args.http_images, args)
            report = SpeedReport.from_log(server.log_path.read_text(errors="replace"))
            results.reports[arm] = asdict(report) if report else None
            scores = [psnr(results.references[seed], data) for seed, data in timing.images.items() if seed in results.references]
            notes = (f"ready in {ready_s:.1f} s (process start, load, warm-up); url answers fetched as their NDJSON lines arrive, the clock "
                     f"stopped at the last byte (summary line at {timing.summary_s:.2f} s, first line at {timing.first_line_s:.2f} s); "
                     "memory: start and request")  # fmt: skip
            results.add(Row(arm, ARM_NAMES[arm], args.server_max_batch, len(timing.images), timing.last_byte_s, first_image_s=timing.first_image_s,
                            warmup_s=report.warmup_s if report else None, compile_s=report.compile_s if report else None,
                            peak_memory_bytes=memory.peak, psnr_db=min(scores) if scores else None, notes=notes))  # fmt: skip
        finally:
            server.stop()
    results.write()


# --------------------------------------------------------------------------------------------------
# The steps


def step_blocker(results: Results, budget: Budget, step: Step, budget_s: float, previous: dict[str, Any]) -> tuple[str | None, float]:
    """Why ``step`` cannot start now (None: it can), and the seconds it expects to need."""
    args = results.args
    arm = step.arms[0]
    if arm in COMPILED_ARMS:
        import torch

        from gpu_workers.speed import compile_targets, fp8_unavailable

        if args.compile_broken:
            return f"torch.compile failed the preflight: {args.compile_broken}", 0.0
        if not compile_targets(args.compile, torch.device(args.device).type):
            return f"--compile {args.compile} compiles nothing on {args.device}", 0.0
        if arm == "e" and fp8_unavailable(args.device):
            return str(fp8_unavailable(args.device)), 0.0
        if arm == "s" and not any(row.arm == "c" for row in results.rows):
            return "(c) did not finish its compile: no warm compile cache to start from", 0.0
    if arm in ("c", "e"):
        ready_s, source = compile_estimate(results, arm, previous)
        needed, why = ready_s + MEASURE_MIN_S * args.step_scale, f"ready in about {ready_s:.0f} s ({source}) and {MEASURE_MIN_S * args.step_scale:.0f} s to measure"
    elif arm == "s":
        compile_s = float((results.reports.get("c") or {}).get("compile_s") or 0.0) * WARM_COMPILE_FRACTION
        request_s = next((row.seconds for row in results.rows if row.arm == "d"), MEASURE_MIN_S)
        needed = results.ready_s.get("d", LOAD_GUESS_S) + compile_s + request_s
        why = f"(d)'s start and request and a start from (c)'s compile cache: about {needed:.0f} s"
    else:
        needed, why = budget_s, f"its budget of {budget_s:.0f} s"
    if not budget.allows(needed):
        return f"{budget.left():.0f} s of the run's time left, it needs {why}", needed
    return None, needed


def run_step(results: Results, budget: Budget, step: Step, budget_s: float, previous: dict[str, Any]) -> str:
    args = results.args
    arms = [arm for arm in step.arms if arm in args.arms]
    blocker, _ = step_blocker(results, budget, Step(step.name, tuple(arms), step.budget_s, step.optional), budget_s, previous)
    if blocker:
        for arm in arms:
            results.skipped[arm] = blocker
            print(f"\n== ({arm}) skipped: {blocker} ==", flush=True)
        return f"skipped: {blocker}"
    step_end = time.monotonic() + budget_s
    arm = arms[0]
    try:
        if arm in ("b", "a"):
            arms_plain(results, budget, step_end)
        elif arm == "x":
            arm_worker_loop(results, arm, step_end)
        elif arm in ("c", "e"):
            arm_bounded(results, arm, budget.left(), compile_estimate(results, arm, previous))
        elif arm == "d":  # an eager start takes a fraction of the step: one that does not come in it is stuck
            arm_server(results, arm, min(budget.left(), budget_s))
        else:  # s: its start (a compile from the cache) gets what is left but the request's expected time
            request_s = next((row.seconds for row in results.rows if row.arm == "d"), 0.0)
            arm_server(results, arm, min(budget.left(), 1800.0) - 1.5 * request_s)
    except KeyboardInterrupt:  # the GPU window's time is up: keep what was measured
        results.failed[arm] = "interrupted: the run's time was up"
        return "interrupted"
    except Exception as exc:  # noqa: BLE001 - one arm's failure must not lose the others
        import traceback

        traceback.print_exc()
        results.failed[arm] = f"{type(exc).__name__}: {exc}"
        return f"failed: {type(exc).__name__}"
    if arm in results.abandoned:
        return "abandoned at its limit"
    return "done"


def run(args: argparse.Namespace) -> Results:
    import torch

    results = Results(args)
    budget = Budget(args.budget_s)
    if args.device == "cpu":
        torch.set_num_threads(args.cpu_threads)
    results.environment = environment(args.device)
    results.peak_tflops = args.peak_tflops or measured_peak_tflops(args.device)
    results.datasheet_tflops = datasheet_tflops(results.environment.get("device_name", ""))
    previous = previous_compile(args.previous)
    results.compile = previous
    print(f"== GPU throughput: {results.environment['device_name']}, {args.model} at {args.size}, {args.steps} steps; arms {','.join(args.arms)} ==")
    print(f"   peak: {results.peak_tflops:.3g} TFLOP/s " + ("(the preflight's)" if args.peak_tflops else "measured") +
          (f", {results.datasheet_tflops:g} datasheet" if results.datasheet_tflops else ""), flush=True)  # fmt: skip
    results.write()
    for step in STEPS:
        if not any(arm in args.arms for arm in step.arms):
            continue
        budget_s = step.budget_s * args.step_scale
        started, started_s = time.monotonic(), results.window_seconds()
        outcome = run_step(results, budget, step, budget_s, previous)
        results.steps.append({"name": step.name, "arms": [arm for arm in step.arms if arm in args.arms], "budget_s": round(budget_s, 1),
                              "optional": step.optional, "started_s": round(started_s, 1), "seconds": round(time.monotonic() - started, 1),
                              "outcome": outcome})  # fmt: skip
        results.write()
        if outcome == "interrupted":
            break
    if args.smoke:
        smoke_check(results)
    results.write()
    return results


def smoke_check(results: Results) -> None:
    """Our images (worker loop and server, eager and compiled) against plain diffusers' for the same seeds."""
    for arm in ("d", "x", "c", "s"):
        if arm not in results.args.arms or arm in results.skipped or arm in results.abandoned:
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
    if args.child_arm:
        return child_main(args)
    results = run(args)
    print("\n" + markdown(results))
    print(f"\nwritten: {args.out / 'gpu_throughput.json'}, {args.out / 'gpu_throughput.md'}")
    asked = set(args.arms)
    ended = {row.arm for row in results.rows} | set(results.skipped) | set(results.abandoned)
    return 0 if not results.failed and asked <= ended else 1


if __name__ == "__main__":
    sys.exit(main())
