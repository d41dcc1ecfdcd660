"""The worker's speed toolkit (gpu_workers/speed.py) on the CPU with the tiny model.

Each setting that the CPU can run is applied to the real tiny pipeline and its images compared with
the plain path's for the same seeds: within ``SAME_PRECISION_PSNR`` dB for the float32 settings
(channels-last, fused QKV, torch.compile; measured 80 dB and up, often identical bytes) and within
``HALF_PRECISION_PSNR`` dB for bfloat16 and float16 (measured 51 and 62 dB). torch.compile of the
whole UNet and VAE decoder costs minutes on this CPU (a C++ build per kernel: 68 s + 17 s cold), so
the suite compiles the smallest piece of the pipeline that exercises the same code and cache path
(the UNet's time embedding: one graph, some seconds) and restarts it from the saved cache
artifacts alone; the full compile's check runs with ``SDXL_FULL_COMPILE_TEST=1``.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gpu_workers import speed, wire
from gpu_workers.generation import generate_images
from gpu_workers.loading import load_pipeline, pipeline_dtype
from gpu_workers.messages import ShardTask, WorkerConfig
from gpu_workers.redis_protocol import config_json
from gpu_workers.scheduler import EngineConfig
from gpu_workers.speed import SpeedSettings

SAME_PRECISION_PSNR = 60.0
HALF_PRECISION_PSNR = 40.0
SIZE = dict(width=256, height=256)
SEEDS = (11, 12)


@pytest.fixture(autouse=True)
def _one_cpu_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def task(seeds: tuple[int, ...] = SEEDS) -> ShardTask:
    prompts = tuple(f"a lighthouse at dusk, study {seed}" for seed in seeds)
    return ShardTask("speed", 0, 0, prompts, seeds, None, 0.0, **SIZE)


def psnr(a: Any, b: Any) -> float:
    mse = float(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def worst_psnr(reference: list[Any], images: list[Any]) -> float:
    assert len(reference) == len(images)
    return min(psnr(a, b) for a, b in zip(reference, images))


def cpu_plan(**changes: Any) -> speed.SpeedPlan:
    return replace(speed.plan(SpeedSettings(), "cpu"), **changes)


@pytest.fixture(scope="module")
def reference(model_cache: Path) -> list[Any]:
    """The plain path's images: the tiny pipeline as loaded, float32 on the CPU."""
    return generate_images(load_pipeline("tiny", "cpu", model_cache), task())


# --------------------------------------------------------------------------------------------------
# What the settings mean where


def test_defaults_are_the_fast_path_on_cuda_and_the_plain_path_on_the_cpu() -> None:
    hopper = speed.plan(SpeedSettings(), "cuda:0", capability=(9, 0))
    assert (hopper.dtype, hopper.channels_last, hopper.fuse_qkv, hopper.warmup, hopper.fp8) == (torch.bfloat16, True, True, "full", False)
    assert hopper.compile_targets == ("unet", "vae.decoder")
    assert speed.plan(SpeedSettings(), "cuda:0", capability=(7, 5)).dtype == torch.float16  # a T4 has no bfloat16
    cpu = speed.plan(SpeedSettings(), "cpu")
    assert (cpu.dtype, cpu.channels_last, cpu.fuse_qkv, cpu.compile_targets, cpu.warmup, cpu.fp8) == (torch.float32, False, False, (), "minimal", False)
    assert pipeline_dtype("cpu") == torch.float32 and pipeline_dtype("cuda:0", (8, 0)) == torch.bfloat16
    chosen = speed.plan(SpeedSettings(dtype="float16", channels_last="on", compile="unet", warmup="full"), "cpu")
    assert (chosen.dtype, chosen.channels_last, chosen.compile_targets, chosen.warmup) == (torch.float16, True, ("unet",), "full")
    assert speed.compile_targets("vae, unet.time_embedding", "cpu") == ("vae.decoder", "unet.time_embedding")


def test_bad_values_are_refused_with_the_flag_named() -> None:
    problems = SpeedSettings(dtype="fp64", fp8="maybe", compile="unet;rm", warmup="lots").problems()
    assert [p.split()[0] for p in problems] == ["--dtype", "--fp8", "--warmup", "--compile"]
    from gpu_workers.__main__ import load_settings as launcher_settings
    from service.settings import load_settings

    with pytest.raises(SystemExit):
        load_settings(["--channels-last", "yes"], environ={})
    with pytest.raises(SystemExit):
        launcher_settings(["--broker", "redis://localhost:6379/0"], environ={"SDXL_COMPILE_MODE": "fastest"})
    settings = load_settings([], environ={"SDXL_DTYPE": "float16", "SDXL_COMPILE": "off"})
    assert SpeedSettings.of(settings) == SpeedSettings(dtype="float16", compile="off")


def test_settings_reach_every_worker_the_same_way() -> None:
    """Local workers get them from EngineConfig, remote ones from their flags and the API server's
    announcement; both become the same WorkerConfig fields, which survive the wire."""
    engine = EngineConfig(devices=("cpu",), model="tiny", model_cache="/m", max_batch=3, speed=SpeedSettings(fp8="on"), sizes=("1024x576", "576x1024"))
    config = WorkerConfig(0, "cpu", "tiny", "/m", 1, **engine.worker_fields())
    assert SpeedSettings.of(config) == SpeedSettings(fp8="on")
    assert (config.warmup_sizes, config.max_batch) == (("1024x576", "576x1024"), 3)
    assert {f.name for f in fields(SpeedSettings)} <= {f.name for f in fields(WorkerConfig)}
    assert wire.decode(wire.encode(config)) == config
    assert speed.announced_shapes(config_json("tiny", ("1024x576", "576x1024"), 3)) == (("1024x576", "576x1024"), 3)
    assert speed.announced_shapes(config_json("tiny")) == (None, None)  # a server from before


def test_full_warmup_covers_every_size_and_shard_size() -> None:
    [minimal] = speed.warmup_tasks("minimal", ("576x1024",), 4)
    assert (minimal.size, minimal.width, minimal.height, minimal.steps) == (1, 1024, 576, 1)  # as before: one image
    tasks = speed.warmup_tasks("full", ("1024x576", "576x1024"), 4)
    pairs = [(t.width, t.height, t.size, t.guidance_scale > 1) for t in tasks]
    # batch 1, then the largest (so the second shard makes the batch-dynamic graph), then the rest; one guided
    expected = [(w, h, b, False) for w, h in ((1024, 576), (576, 1024)) for b in (1, 4, 2, 3)]
    assert [p for p in pairs if not p[3]] == expected
    assert [p for p in pairs if p[3]] == [(1024, 576, 1, True), (576, 1024, 1, True)]
    assert all(t.steps == 1 for t in tasks)


def test_fp8_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch, model_cache: Path) -> None:
    assert "CUDA GPU of compute capability 8.9" in speed.fp8_unavailable("cpu")
    assert "compute capability 8.0" in speed.fp8_unavailable("cuda:0", capability=(8, 0))
    monkeypatch.setitem(__import__("sys").modules, "torchao.quantization", None)  # as if torchao were not installed
    assert "pip install torchao" in speed.fp8_unavailable("cuda:0", capability=(9, 0))
    from gpu_workers.worker import load_for_worker

    with pytest.raises(RuntimeError, match="--fp8 on: fp8 needs a CUDA GPU"):
        load_for_worker(WorkerConfig(0, "cpu", "tiny", str(model_cache), 1, fp8="on"))


def test_worker_start_applies_the_settings_and_warms_up_every_pair(model_cache: Path, reference: list[Any]) -> None:
    from gpu_workers.worker import load_for_worker

    config = WorkerConfig(0, "cpu", "tiny", str(model_cache), 1, channels_last="on", fuse_qkv="on", warmup="full",
                          warmup_sizes=("256x256",), max_batch=2)  # fmt: skip
    pipe, facts = load_for_worker(config)
    report = speed.last_report()
    assert report is not None and report.plan["channels_last"] and report.plan["fuse_qkv"]
    assert report.warmup_shards == 3 and report.graphs == 0  # batch 1, batch 2, one guided
    assert worst_psnr(reference, generate_images(pipe, task())) >= SAME_PRECISION_PSNR
    assert speed.SpeedReport.from_log("x " + report.line()) == report


# --------------------------------------------------------------------------------------------------
# Each setting's images against the plain path's


@pytest.mark.parametrize("setting", ["channels_last", "fuse_qkv"])
def test_layout_and_fusion_keep_the_images(setting: str, model_cache: Path, reference: list[Any]) -> None:
    pipe = load_pipeline("tiny", "cpu", model_cache)
    parameters = sum(p.numel() for p in pipe.unet.parameters())
    speed.apply(pipe, cpu_plan(**{setting: True}), speed.SpeedReport({}))
    if setting == "channels_last":
        assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    else:
        assert pipe.fusing_unet
        # the separate projections are gone: fusing costs no memory
        assert sum(p.numel() for p in pipe.unet.parameters()) == parameters
    assert worst_psnr(reference, generate_images(pipe, task())) >= SAME_PRECISION_PSNR


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stays_close(dtype: str, model_cache: Path, reference: list[Any]) -> None:
    pipe = load_pipeline("tiny", "cpu", model_cache, getattr(torch, dtype))
    assert pipe.unet.dtype == getattr(torch, dtype)
    assert worst_psnr(reference, generate_images(pipe, task())) >= HALF_PRECISION_PSNR


def _fresh_inductor_counters() -> Any:
    from torch._dynamo.utils import counters

    counters.clear()
    return counters


def test_a_compiled_piece_keeps_the_images_and_restarts_from_the_saved_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_cache: Path
) -> None:
    """The compile path of a worker: the cache under the model cache, a compiled module of the
    pipeline, the artifacts saved; then a restart with nothing on disk but the artifacts file
    compiles from the cache (no FX graph miss)."""
    monkeypatch.setenv(speed.INDUCTOR_CACHE_ENV, "")  # unset for prepare_compile_cache; restored after
    one = task(SEEDS[:1])
    plain = generate_images(load_pipeline("tiny", "cpu", model_cache), one)
    key = {"test": "compile"}
    the_plan = cpu_plan(compile_targets=("unet.time_embedding",))

    cache = speed.prepare_compile_cache(tmp_path, key)
    assert cache.directory == speed.compile_cache_dir(tmp_path) and os.environ[speed.INDUCTOR_CACHE_ENV] == str(cache.directory)
    pipe = load_pipeline("tiny", "cpu", model_cache)
    speed.apply(pipe, the_plan, speed.SpeedReport({}))
    counters = _fresh_inductor_counters()
    assert worst_psnr(plain, generate_images(pipe, one)) >= SAME_PRECISION_PSNR
    assert counters["inductor"]["fxgraph_cache_miss"] >= 1
    cache.save()
    assert cache.saved_bytes > 0 and cache.artifacts is not None and cache.artifacts.is_file()

    torch._dynamo.reset()  # a new process, as far as dynamo knows ...
    for path in cache.directory.iterdir():  # ... on a box that has nothing but the artifacts file
        if path != cache.artifacts:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    restarted = speed.prepare_compile_cache(tmp_path, key)
    assert restarted.loaded
    pipe = load_pipeline("tiny", "cpu", model_cache)
    speed.apply(pipe, the_plan, speed.SpeedReport({}))
    counters = _fresh_inductor_counters()
    assert worst_psnr(plain, generate_images(pipe, one)) >= SAME_PRECISION_PSNR
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1 and counters["inductor"]["fxgraph_cache_miss"] == 0
    torch._dynamo.reset()


@pytest.mark.skipif(os.environ.get("SDXL_FULL_COMPILE_TEST") != "1", reason="minutes on a CPU: set SDXL_FULL_COMPILE_TEST=1")
def test_full_compile_keeps_the_images(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_cache: Path, reference: list[Any]) -> None:
    """UNet and VAE decoder compiled, as on CUDA, with every other setting on too."""
    monkeypatch.setenv(speed.INDUCTOR_CACHE_ENV, "")
    speed.prepare_compile_cache(tmp_path, {"test": "full"})
    pipe = load_pipeline("tiny", "cpu", model_cache)
    report = speed.SpeedReport({})
    speed.apply(pipe, cpu_plan(channels_last=True, fuse_qkv=True, compile_targets=speed.COMPILE_TARGETS), report)
    speed.warm_up(pipe, [task()], generate_images, report)
    assert report.graphs >= 2 and report.graph_breaks == 0, report
    assert worst_psnr(reference, generate_images(pipe, task())) >= SAME_PRECISION_PSNR
    torch._dynamo.reset()
