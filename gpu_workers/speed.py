"""The worker's speed toolkit: what a worker does to its pipeline between loading it and taking
shards, each piece a setting whose default is right on CUDA and harmless on the CPU.

- ``dtype``: bfloat16 on a CUDA device that has it (compute capability 8.0 and newer: A100, H100,
  H200, L4), float16 on older ones (a T4 has no bfloat16: float16 with the fp16-fix VAE stays the
  rule there), float32 on the CPU, which has no fast half-precision kernels.
- ``channels_last``: the UNet's and the VAE's convolutions read NHWC, the layout the tensor cores'
  convolution kernels want (no transposes around every convolution).
- ``fuse_qkv``: one matrix product for an attention's query, key and value (key and value in
  cross-attention) instead of three (diffusers' ``fuse_qkv_projections``); the separate weights
  diffusers keeps beside the fused ones are dropped (1.3 GB of SDXL's UNet in bfloat16).
- ``compile``: ``torch.compile`` of the UNet and of the VAE decoder. Only the batch dimension may
  vary between calls (every other dimension is marked static), so each image size costs two graphs
  (batch 1, which torch always specialises, and every larger batch) and a shard of any size then
  runs without a recompile. The compile cache lives under the model cache (``torch-compile/``):
  inductor's FX graph, AOTAutograd and autotuning caches, plus one file of
  ``torch.compiler.save_cache_artifacts`` written after the warm-up and loaded before the next
  compile, so a restarted worker skips the compilation (it still traces, some seconds a graph).
- ``fp8``: the UNet's large linear layers in float8 (torchao's dynamic float8 activations and
  weights, per-row scales), off unless asked for; it needs a CUDA GPU of compute capability 8.9 or
  newer (Ada, Hopper) and torchao, and says which is missing when it cannot run.
- ``warmup``: before a worker reports ready it runs one 1-step shard of every (size, shard size)
  pair it may be sent (every allowed size, every shard size from 1 to ``--max-batch``, and a
  guided one, whose UNet batch is doubled), so no request pays a compile or a first-shape cost. On
  the CPU the default stays one 1-step image: tests start many CPU workers.

Nothing here imports torch at module level: the API process reads the settings without it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gpu_workers.flag_settings import flag, setting

log = logging.getLogger(__name__)

AUTO, ON, OFF = "auto", "on", "off"
SWITCH = (AUTO, ON, OFF)
DTYPES = (AUTO, "bfloat16", "float16", "float32")
WARMUPS = (AUTO, "minimal", "full")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# ``--compile on`` (and auto on CUDA): these modules of the pipeline, by attribute path.
COMPILE_TARGETS = ("unet", "vae.decoder")
_TARGET_ALIASES = {"vae": "vae.decoder"}
# fp8 tensor-core matrix products exist from compute capability 8.9 (Ada) on.
FP8_CAPABILITY = (8, 9)
BF16_CAPABILITY = (8, 0)
TORCHAO_HINT = "pip install torchao==0.17.0 (torch 2.11 or newer)"
# Linear layers smaller than this (in x out) stay in bfloat16: quantising their inputs costs more
# than the float8 product saves (time embeddings, small projections).
FP8_MIN_WEIGHT = 640 * 640
COMPILE_CACHE_FOLDER = "torch-compile"
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
REPORT_PREFIX = "speed report "
# A guided warm-up shard: guidance above 1 runs the UNet on twice the batch.
WARMUP_GUIDANCE = 2.0

HELP = {
    "dtype": "auto, bfloat16, float16 or float32: auto = bfloat16 on CUDA (float16 where the GPU has no bfloat16, e.g. a T4), float32 on the CPU",
    "channels_last": "auto, on or off: channels-last (NHWC) memory layout for the UNet and VAE; auto = on for CUDA",
    "fuse_qkv": "auto, on or off: one fused projection for attention's query/key/value; auto = on for CUDA",
    "compile": (
        "auto, on, off, or a comma-separated list of pipeline modules (unet, vae): torch.compile, cache under the model cache; "
        "auto = on (unet and vae decoder) for CUDA. Costs minutes on the first start, seconds per graph after it"
    ),
    "compile_mode": f"torch.compile mode: {', '.join(COMPILE_MODES)}",
    "fp8": f"off or on: float8 linear layers in the UNet (torchao; CUDA compute capability 8.9+ such as an H100/H200; {TORCHAO_HINT})",
    "warmup": "auto, minimal or full: full = one 1-step shard of every (size, shard size) pair before the worker is ready; auto = full on CUDA, minimal (one image) elsewhere",
}


@dataclass(frozen=True)
class SpeedSettings:
    """The speed settings, as flags and ``SDXL_*`` variables give them (strings, ``auto`` by device)."""

    dtype: str = AUTO
    channels_last: str = AUTO
    fuse_qkv: str = AUTO
    compile: str = AUTO
    compile_mode: str = "default"
    fp8: str = OFF
    warmup: str = AUTO

    @classmethod
    def of(cls, source: Any) -> SpeedSettings:
        """The same-named attributes of any settings object (service Settings, LaunchSettings,
        WorkerConfig)."""
        return cls(**{spec.name: getattr(source, spec.name) for spec in fields(cls)})

    def as_fields(self) -> dict[str, str]:
        """Keyword arguments for ``WorkerConfig``."""
        return asdict(self)

    def problems(self) -> list[str]:
        """What is wrong with the values, one sentence each, naming the flag."""
        problems = []
        for name, allowed in (("dtype", DTYPES), ("channels_last", SWITCH), ("fuse_qkv", SWITCH), ("fp8", (ON, OFF)),
                              ("warmup", WARMUPS), ("compile_mode", COMPILE_MODES)):  # fmt: skip
            if getattr(self, name) not in allowed:
                problems.append(f"{flag(name)} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        try:
            compile_targets(self.compile, "cuda")
        except ValueError as exc:
            problems.append(str(exc))
        return problems


_DEFAULTS = SpeedSettings()


def speed_setting(name: str) -> Any:
    """The dataclass field of setting ``name`` for a settings class (service or ``python -m gpu_workers``)."""
    return setting(getattr(_DEFAULTS, name), HELP[name])


@dataclass(frozen=True)
class SpeedFlags:
    """The speed settings as fields of a settings class, with their flags, ``SDXL_*`` variables and
    help: ``python -m service`` and ``python -m gpu_workers`` inherit them, one declaration for both."""

    dtype: str = speed_setting("dtype")
    channels_last: str = speed_setting("channels_last")
    fuse_qkv: str = speed_setting("fuse_qkv")
    compile: str = speed_setting("compile")
    compile_mode: str = speed_setting("compile_mode")
    fp8: str = speed_setting("fp8")
    warmup: str = speed_setting("warmup")


def compile_targets(value: str, device_type: str) -> tuple[str, ...]:
    """The modules ``--compile`` names: ``auto`` is every target on CUDA and none elsewhere."""
    value = value.strip()
    if value == AUTO:
        return COMPILE_TARGETS if device_type == "cuda" else ()
    if value == ON:
        return COMPILE_TARGETS
    if value in (OFF, ""):
        return ()
    targets = []
    for part in (part.strip() for part in value.split(",")):
        if not part or not all(piece.isidentifier() for piece in part.split(".")):
            raise ValueError(f"--compile takes auto, on, off or module names such as unet,vae, not {value!r}")
        targets.append(_TARGET_ALIASES.get(part, part))
    return tuple(dict.fromkeys(targets))


# --------------------------------------------------------------------------------------------------
# What the settings mean on one device


@dataclass(frozen=True)
class SpeedPlan:
    """The settings resolved for one device: what the worker will actually do."""

    device: str
    dtype: Any  # torch.dtype
    channels_last: bool
    fuse_qkv: bool
    compile_targets: tuple[str, ...]
    compile_mode: str
    fp8: bool
    warmup: str  # "minimal" or "full"

    def describe(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "channels_last": self.channels_last,
            "fuse_qkv": self.fuse_qkv,
            "compile": list(self.compile_targets),
            "compile_mode": self.compile_mode,
            "fp8": self.fp8,
            "warmup": self.warmup,
        }


def cuda_capability(device: str) -> tuple[int, int] | None:
    import torch

    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def resolve_dtype(choice: str, device: str, capability: tuple[int, int] | None = None) -> Any:
    """``--dtype`` on ``device``; ``capability`` is the CUDA compute capability (read when None)."""
    import torch

    if choice != AUTO:
        return getattr(torch, choice)
    if torch.device(device).type != "cuda":
        return torch.float32
    capability = capability or cuda_capability(device) or (0, 0)
    return torch.bfloat16 if capability >= BF16_CAPABILITY else torch.float16


def plan(settings: SpeedSettings, device: str, capability: tuple[int, int] | None = None) -> SpeedPlan:
    import torch

    problems = settings.problems()
    if problems:
        raise ValueError("; ".join(problems))
    device_type = torch.device(device).type
    cuda = device_type == "cuda"

    def switch(value: str) -> bool:
        return cuda if value == AUTO else value == ON

    return SpeedPlan(
        device=device,
        dtype=resolve_dtype(settings.dtype, device, capability),
        channels_last=switch(settings.channels_last),
        fuse_qkv=switch(settings.fuse_qkv),
        compile_targets=compile_targets(settings.compile, device_type),
        compile_mode=settings.compile_mode,
        fp8=settings.fp8 == ON,
        warmup=("full" if cuda else "minimal") if settings.warmup == AUTO else settings.warmup,
    )


# --------------------------------------------------------------------------------------------------
# fp8


def fp8_unavailable(device: str, capability: tuple[int, int] | None = None) -> str | None:
    """Why the fp8 path cannot run on ``device`` (None: it can)."""
    import torch

    if torch.device(device).type != "cuda":
        return f"fp8 needs a CUDA GPU of compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer (Ada, Hopper); this worker runs on {device}"
    capability = capability or cuda_capability(device)
    if capability is None or capability < FP8_CAPABILITY:
        found = "no CUDA device" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
        return f"fp8 needs a CUDA GPU of compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer (Ada, Hopper); {device} has {found}"
    try:
        import torchao.quantization as quantization
    except ImportError as exc:
        return f"fp8 needs torchao, which cannot be imported here ({exc}): {TORCHAO_HINT}"
    missing = [name for name in ("quantize_", "Float8DynamicActivationFloat8WeightConfig", "PerRow") if not hasattr(quantization, name)]
    if missing:
        return f"fp8 needs a torchao with {', '.join(missing)} (found {getattr(sys.modules.get('torchao'), '__version__', '?')}): {TORCHAO_HINT}"
    return None


def _fp8_worthy(module: Any, fqn: str) -> bool:
    import torch

    if not isinstance(module, torch.nn.Linear):
        return False
    rows, cols = module.weight.shape
    # float8 matrix products need both dimensions in multiples of 16
    return rows % 16 == 0 and cols % 16 == 0 and rows * cols >= FP8_MIN_WEIGHT


def quantize_fp8(unet: Any) -> int:
    """The UNet's large linear layers to dynamic float8 (activations and weights, per-row scales);
    returns how many layers were converted."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    import torch

    count = sum(_fp8_worthy(module, name) for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear))
    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=_fp8_worthy)
    return count


# --------------------------------------------------------------------------------------------------
# torch.compile and its cache


def compile_cache_dir(model_cache: Path) -> Path:
    return Path(model_cache) / COMPILE_CACHE_FOLDER


@dataclass
class CompileCache:
    """Where inductor keeps its caches for this worker, and the artifacts file of this setup."""

    directory: Path
    artifacts: Path | None
    loaded: bool = False
    saved_bytes: int = 0

    def save(self) -> None:
        """``torch.compiler.save_cache_artifacts`` of everything compiled so far (absent in old torch)."""
        import torch

        save = getattr(getattr(torch, "compiler", None), "save_cache_artifacts", None)
        if self.artifacts is None or save is None:
            return
        try:
            result = save()
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written costs time, never images
            log.warning("could not save the compile cache artifacts: %s: %s", type(exc).__name__, exc)
            return
        if not result or not result[0]:
            return
        data = result[0]
        partial = self.artifacts.with_suffix(f".{os.getpid()}.tmp")
        try:
            partial.write_bytes(data)
            os.replace(partial, self.artifacts)  # several workers may write it: last one wins, whole
            self.saved_bytes = len(data)
        except OSError as exc:
            log.warning("could not write %s: %s", self.artifacts, exc)
            partial.unlink(missing_ok=True)


def prepare_compile_cache(model_cache: Path, key: Mapping[str, Any], recompile_limit: int = 8) -> CompileCache:
    """Point inductor's caches at ``<model_cache>/torch-compile`` (unless TORCHINDUCTOR_CACHE_DIR is
    set already), turn on every local cache, allow ``recompile_limit`` graphs a function, and load
    the artifacts a previous worker with the same ``key`` saved."""
    import torch

    path = inductor_cache_dir(model_cache)
    os.environ[INDUCTOR_CACHE_ENV] = str(path)
    path.mkdir(parents=True, exist_ok=True)
    _set_config("torch._inductor.config", "fx_graph_cache", True)
    _set_config("torch._inductor.config", "autotune_local_cache", True)
    _set_config("torch._functorch.config", "enable_autograd_cache", True)
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, and the one before it
        current = _get_config("torch._dynamo.config", name)
        if isinstance(current, int) and current < recompile_limit:
            _set_config("torch._dynamo.config", name, recompile_limit)
    cache = CompileCache(path, artifacts_path(path, key))
    load = getattr(getattr(torch, "compiler", None), "load_cache_artifacts", None)
    if load is not None and cache.artifacts is not None and cache.artifacts.is_file():
        try:
            load(cache.artifacts.read_bytes())
            cache.loaded = True
        except Exception as exc:  # noqa: BLE001 - a stale or foreign file: compile as if it were absent
            log.warning("ignoring the compile cache artifacts %s: %s: %s", cache.artifacts, type(exc).__name__, exc)
    return cache


def inductor_cache_dir(model_cache: Path) -> Path:
    """``TORCHINDUCTOR_CACHE_DIR`` where it was set, else ``<model_cache>/torch-compile``."""
    directory = os.environ.get(INDUCTOR_CACHE_ENV)
    if not directory or directory == _inductor_default_cache_dir():  # (inductor sets its default on import)
        return compile_cache_dir(model_cache)
    return Path(directory)


def artifacts_path(directory: Path, key: Mapping[str, Any]) -> Path:
    """The artifacts file of one setup (``compile_key``) and this torch: a benchmark that carries
    compile caches between boxes finds the file a worker will load or write."""
    import torch

    digest = hashlib.sha256(json.dumps({**key, "torch": torch.__version__}, sort_keys=True).encode()).hexdigest()[:16]
    return Path(directory) / f"artifacts-{digest}.bin"


def compile_key(config: Any, device_name: str, the_plan: SpeedPlan) -> dict[str, Any]:
    """What a compiled graph depends on: the model, the device, the settings and the warm-up's shapes."""
    return {"model": config.model, "device": device_name, **the_plan.describe(), "sizes": tuple(config.warmup_sizes), "max_batch": config.max_batch}


def _inductor_default_cache_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return os.path.abspath(default_cache_dir())


def _config_module(dotted: str) -> Any:
    import importlib

    try:
        return importlib.import_module(dotted)
    except ImportError:
        return None


def _get_config(module: str, name: str) -> Any:
    return getattr(_config_module(module), name, None)


def _set_config(module: str, name: str, value: Any) -> None:
    config = _config_module(module)
    if config is not None and hasattr(config, name):
        setattr(config, name, value)


def _vary_only_the_batch(values: Iterable[Any]) -> None:
    """Mark dimension 0 of every input tensor as one that may vary and every other one as static:
    a new batch size then reuses the graph, a new image size gets static graphs of its own."""
    import torch

    for value in values:
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                continue
            torch._dynamo.maybe_mark_dynamic(value, 0)
            for dim in range(1, value.dim()):
                torch._dynamo.mark_static(value, dim)
        elif isinstance(value, Mapping):
            _vary_only_the_batch(value.values())
        elif isinstance(value, (list, tuple)):
            _vary_only_the_batch(value)


def compile_module(module: Any, mode: str = "default") -> None:
    """``torch.compile`` ``module.forward`` in place, only its batch dimension dynamic.

    The module stays the same object (its config, dtype and device read as before); graph breaks
    are allowed and counted in the report, so a model with one still runs.
    """
    import torch

    compiled = torch.compile(module.forward, mode=None if mode == "default" else mode)

    @functools.wraps(module.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        _vary_only_the_batch(args)
        _vary_only_the_batch(kwargs.values())
        return compiled(*args, **kwargs)

    module.forward = forward


def module_at(pipe: Any, path: str) -> Any:
    target = pipe
    for part in path.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ValueError(f"--compile {path}: the pipeline has no module {path}")
    return target


# --------------------------------------------------------------------------------------------------
# The worker's sequence: plan, cache, load, apply, warm up


@dataclass
class SpeedReport:
    """What the toolkit did in this process, for the worker's log and the benchmark."""

    plan: dict[str, Any]
    apply_s: float = 0.0
    warmup_s: float = 0.0
    compile_s: float = 0.0
    warmup_shards: int = 0
    graphs: int = 0
    graph_breaks: int = 0
    fp8_layers: int = 0
    cache_dir: str | None = None
    cache_loaded: bool = False
    cache_saved_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One log line a benchmark can read back (``REPORT_PREFIX`` + JSON)."""
        return REPORT_PREFIX + json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_log(cls, text: str) -> SpeedReport | None:
        """The last report line in a log."""
        for line in reversed(text.splitlines()):
            at = line.find(REPORT_PREFIX)
            if at >= 0:
                try:
                    return cls(**json.loads(line[at + len(REPORT_PREFIX):]))
                except (ValueError, TypeError):
                    return None
        return None


_LAST_REPORT: SpeedReport | None = None


def last_report() -> SpeedReport | None:
    """The report of the last ``prepare`` in this process (the in-process benchmark reads it)."""
    return _LAST_REPORT


def is_sdxl_pipeline(pipe: Any) -> bool:
    """A diffusers pipeline with a UNet and a VAE: what the toolkit knows how to speed up."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        return False
    return isinstance(pipe, DiffusionPipeline) and hasattr(pipe, "unet") and hasattr(pipe, "vae")


def apply(pipe: Any, plan: SpeedPlan, report: SpeedReport) -> None:
    """The layout, fusion, fp8 and compile settings, in that order (fp8 must precede compile)."""
    import torch

    started = time.perf_counter()
    if not is_sdxl_pipeline(pipe):
        report.notes.append(f"speed settings skipped: {type(pipe).__name__} is not a diffusers pipeline")
        return
    if plan.fuse_qkv:
        try:
            pipe.fuse_qkv_projections()
        except (ValueError, AttributeError) as exc:
            report.notes.append(f"fuse_qkv skipped: {exc}")
        else:
            drop_unfused_projections(pipe.unet)
            drop_unfused_projections(pipe.vae)
    if plan.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if plan.fp8:
        reason = fp8_unavailable(plan.device)
        if reason is not None:
            raise RuntimeError(f"--fp8 on: {reason}; or start with --fp8 off")
        report.fp8_layers = quantize_fp8(pipe.unet)
    for target in plan.compile_targets:
        compile_module(module_at(pipe, target), plan.compile_mode)
    report.apply_s = time.perf_counter() - started


def drop_unfused_projections(model: Any) -> int:
    """Remove the separate projections that fused attention no longer reads (diffusers keeps them:
    0.65 B parameters in SDXL's UNet, 1.3 GB in bfloat16). A self-attention reads ``to_qkv``, a
    cross-attention ``to_q`` and ``to_kv``. Returns the parameters freed; the model can no longer
    be unfused."""
    freed = 0
    for module in list(model.modules()):
        if not getattr(module, "fused_projections", False):
            continue
        unused = ("to_q", "to_k", "to_v") if getattr(module, "to_qkv", None) is not None else ("to_k", "to_v")
        if getattr(module, "to_qkv", None) is None and getattr(module, "to_kv", None) is None:
            continue
        for name in unused:
            layer = getattr(module, name, None)
            if layer is not None:
                freed += sum(p.numel() for p in layer.parameters())
                delattr(module, name)
    return freed


def warmup_tasks(warmup: str, sizes: Iterable[str], max_batch: int) -> list[Any]:
    """The shards a worker runs before it is ready: one 1-step image for ``minimal``; for ``full``,
    per size, shard sizes 1, ``max_batch``, then the rest (so the batch-dynamic graph is made by the
    second shard), and one guided image (a UNet batch of 2)."""
    from contract.formats import parse_size
    from gpu_workers.messages import ShardTask

    def task(index: int, batch: int, width: int | None = None, height: int | None = None, guidance: float = 0.0) -> ShardTask:
        size = {} if width is None else {"width": width, "height": height}
        return ShardTask("warm-up", index, 0, ("warm-up",) * batch, tuple(range(batch)), None, guidance, steps=1, **size)

    if warmup == "minimal":
        return [task(0, 1)]
    tasks = []
    batches = [1, *([max_batch] if max_batch > 1 else []), *range(2, max_batch)]
    for size in dict.fromkeys(sizes):
        width, height = parse_size(size)
        tasks += [task(len(tasks), batch, width, height) for batch in batches]
        tasks.append(task(len(tasks), 1, width, height, WARMUP_GUIDANCE))
    return tasks


def warm_up(
    pipe: Any, tasks: list[Any], generate: Callable[[Any, Any], Any], report: SpeedReport, after_compile: Callable[[], None] | None = None
) -> None:
    """Run every warm-up shard; one that does not fit in device memory is logged, not fatal (the
    worker splits such shards when they come). ``after_compile`` runs after each shard that made a
    new graph, so that a compile cut short still leaves the graphs finished so far."""
    import torch

    before = _compile_counters()
    started = time.perf_counter()
    graphs = before[1]
    for task in tasks:
        try:
            generate(pipe, task)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            report.notes.append(f"warm-up: {task.size} image(s) of {task.width}x{task.height} do not fit in device memory")
        if after_compile is not None and _compile_counters()[1] > graphs:
            graphs = _compile_counters()[1]
            after_compile()
    report.warmup_s = time.perf_counter() - started
    report.warmup_shards = len(tasks)
    after = _compile_counters()
    report.compile_s = round(after[0] - before[0], 3)
    report.graphs = after[1] - before[1]
    report.graph_breaks = after[2] - before[2]


def _compile_counters() -> tuple[float, int, int]:
    """Seconds dynamo spent compiling, graphs made and graph breaks, so far in this process."""
    try:
        from torch._dynamo.utils import compilation_time_metrics, counters
    except ImportError:
        return 0.0, 0, 0
    seconds = float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))
    return seconds, int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def prepare(
    config: Any,
    device_name: str,
    load: Callable[[Any], Any],
    generate: Callable[[Any, Any], Any],
) -> tuple[Any, SpeedReport]:
    """The worker's start: resolve the settings of ``config`` (a ``WorkerConfig``) on its device,
    prepare the compile cache, ``load(dtype)`` the pipeline, apply the settings, warm up, save the
    compile cache. Returns the pipeline and the report (also logged as one line)."""
    global _LAST_REPORT

    the_plan = plan(SpeedSettings.of(config), config.device)
    report = SpeedReport(the_plan.describe())
    cache = None
    if the_plan.compile_targets:
        key = compile_key(config, device_name, the_plan)
        cache = prepare_compile_cache(Path(config.model_cache), key, recompile_limit=max(8, 2 * len(key["sizes"]) + 4))
        report.cache_dir, report.cache_loaded = str(cache.directory), cache.loaded
    pipe = load(the_plan.dtype)
    apply(pipe, the_plan, report)
    warm_up(pipe, warmup_tasks(the_plan.warmup, config.warmup_sizes, config.max_batch), generate, report, cache.save if cache else None)
    if cache is not None:
        cache.save()
        report.cache_saved_bytes = cache.saved_bytes
    for note in report.notes:
        log.warning("%s", note)
    log.info("%s", report.line())
    _LAST_REPORT = report
    return pipe, report


def announced_shapes(raw: bytes | str) -> tuple[tuple[str, ...] | None, int | None]:
    """``(sizes, max_batch)`` from an API server's broker config (``redis_protocol.config_json``);
    None for what an older server does not announce."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    sizes = data.get("sizes")
    max_batch = data.get("max_batch")
    good_sizes = tuple(sizes) if isinstance(sizes, list) and all(isinstance(s, str) for s in sizes) and sizes else None
    good_batch = max_batch if isinstance(max_batch, int) and not isinstance(max_batch, bool) and max_batch > 0 else None
    return good_sizes, good_batch
