"""One command for the GPU window: the throughput table of ``benchmarks.gpu_throughput`` on a GPU
box that has torch (with CUDA) but not our other packages, and no internet.

Here, beforehand (needs pip's index)::

    .venv/bin/python scripts/gpu_window.py fetch      # the wheels into .whl/ (ignored by git)
    .venv/bin/python scripts/gpu_window.py plan       # the window's steps, their budgets, the carry
    .venv/bin/python scripts/gpu_window.py rehearse   # the whole window on the CPU, scaled down

There, in the root of the checkout that travels, with ``.whl`` (and ``.gpu-cache``, if an earlier
window left one) carried: the device tool's ``run`` with the command ``python3
scripts/gpu_window.py run``, ``carry [".whl", ".gpu-cache"]`` and ``timeout_s 600``, then
``give_back`` at once (README.md, "GPU speed", has the exact call). ``run`` writes into ``$OUT``,
read from the environment: a relative folder (which would not come back) is refused.

``fetch`` downloads, for CPython 3.12 on manylinux x86-64, every package of ``setup.cfg``'s
``install_requires`` that the GPU box lacks (``BOX_PACKAGES``: the device machine's image as
``/work/.library/device/KINDS.md`` lists it), at the pinned versions, and every dependency of
those that the box lacks too (versions: this venv's, which the tests ran with), plus torchao for
the opt-in fp8 path: ``.whl/missing/``. A second group, ``.whl/fallback/``, holds our versions of
packages the box has in a version of its own (transformers, huggingface-hub, tokenizers, aiohttp,
Pillow) and every dependency of those that the box may not satisfy (``box_lacks``): ``run`` puts
them first, so the box runs what the tests ran, and falls back to the box's own versions only if
the import check fails with ours. ``.whl/manifest.json`` names every file with its version and
sha256. The carry (``.whl`` and ``.gpu-cache``) must stay under ``CARRY_MAX_BYTES``.

``run`` follows ``plan``: it installs each group into a folder of its own under a target folder
with ``pip --no-index --no-deps --target`` (never into the box's site-packages), puts them first on
``PYTHONPATH``; the preflight checks that the server, the worker and the benchmark import, that
``torch.compile`` works on the device (a 2-layer network; if not, every compiled arm is skipped
with the error) and measures the matrix-product peak after a warm-up, all in the first minute;
``versions.txt`` gets what it found. The compile cache artifacts of an earlier window
(``.gpu-cache/artifacts-*.bin``, and its ``gpu_throughput.json`` for the measured compile time)
go into the model cache, so that the compiled arm starts warm. Then ``python -m
benchmarks.gpu_throughput`` runs its steps in priority order within what is left of the window
(``WINDOW_SECONDS``): the headline pair (plain diffusers at its best batch, our server over HTTP
eager) in ``$OUT`` within ``HEADLINE_BY_S``, then our worker loop eager, then the compiled arms
(bounded), then fp8. ``$OUT`` gets ``gpu_throughput.json``, ``gpu_throughput.md``, the server
logs, the compile artifacts, ``versions.txt`` and ``window.log``: at most 8 files, as the device
tool brings back. Only the standard library is imported before the install.
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks.gpu_throughput: the steps (standard library only at import)
from benchmarks.gpu_throughput import HEARTBEAT_S, STEPS

WHEELS = REPO / ".whl"
CACHE_IN = REPO / ".gpu-cache"  # an earlier window's compile artifacts and gpu_throughput.json, carried
CARRY = (WHEELS, CACHE_IN)
CARRY_MAX_BYTES = 48 * 2**20  # of the device call's 64 MiB, which the working tree shares
OUT_MAX_FILES = 8  # what the device tool brings back from $OUT
MISSING, FALLBACK = "missing", "fallback"
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
# The fp8 path (gpu_workers/speed.py): the torchao release made for torch 2.11, the GPU box's.
TORCHAO = ("torchao", "0.17.0")
# Ours, in versions the box may not match: installed there only if its own fail the import check.
# Their dependencies that the box may not satisfy come along (``box_lacks``).
FALLBACK_PACKAGES = ("transformers", "huggingface-hub", "tokenizers", "regex", "aiohttp", "yarl", "multidict", "propcache", "frozenlist",
                     "aiosignal", "aiohappyeyeballs", "pillow")  # fmt: skip
# Left on the box whatever a requirement says: hf-xet only speeds up downloads (the box has no
# internet), huggingface-hub imports it when it downloads, and it is 4.3 MiB of the carry.
NOT_CARRIED = frozenset({"hf-xet"})
# Versions on the box that sessions read there (KINDS.md's pip list, 2026-11): a requirement these
# satisfy needs no carried copy. Other box packages of unknown version are carried where a
# requirement bounds their version.
BOX_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0", "tokenizers": "0.23.2",
                "transformers": "5.17.0", "torch": "2.11.0", "triton": "3.6.0", "sentencepiece": "0.2.2", "tiktoken": "0.14.0"}  # fmt: skip
# The device machine's Python packages (/work/.library/device/KINDS.md, read 2026-11-17).
BOX_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
    cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
    formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
    imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
    lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
    matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
    networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
    nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
    peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
    pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
    pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
    tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
    transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
    wrapt xarray xxhash yarl zipp""".split()
)
# The environment a marker of a dependency is judged in: the box's CPython 3.12 on Linux x86-64.
BOX_MARKERS = {
    "python_version": PYTHON_VERSION, "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix", "extra": "",
}  # fmt: skip
# The preflight, in the box's Python with the carried packages first: what must import before
# anything is measured, then (with --device-checks) torch.compile on the device and its matrix
# peak. Each result is one line, so that what came before a hang or a crash is kept.
PREFLIGHT = """
import importlib, json, sys, time
from importlib import metadata
for module in ("diffusers", "transformers", "aiohttp", "aiohttp_apigami", "marshmallow", "PIL", "torch",
               "service.app", "service.__main__", "gpu_workers.worker", "gpu_workers.speed", "benchmarks.gpu_throughput"):
    importlib.import_module(module)
import torch
versions = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
for name in ("diffusers", "transformers", "huggingface_hub", "accelerate", "safetensors", "tokenizers", "aiohttp",
             "aiohttp-apigami", "marshmallow", "pillow", "numpy", "triton", "torchao"):
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = None
import diffusers, service
versions["diffusers_from"] = diffusers.__file__
versions["service_from"] = service.__file__
try:
    import torchao.quantization  # only the opt-in fp8 arm needs it
    versions["torchao_import"] = "ok"
except Exception as exc:
    versions["torchao_import"] = f"{type(exc).__name__}: {exc}"
print("IMPORTS " + json.dumps(versions), flush=True)
if "--device-checks" in sys.argv:
    from benchmarks.gpu_throughput import compile_check, measured_peak_tflops
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    error = compile_check(device)
    print("COMPILE " + json.dumps({"device": device, "error": error, "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    started = time.perf_counter()
    peak = measured_peak_tflops(device)
    print("PEAK " + json.dumps({"device": device, "tflops": peak, "seconds": round(time.perf_counter() - started, 1)}), flush=True)
"""
# The window: the device tool's 600 s limit for one command, less a minute for the machine's own
# start of the command and the copies; the install and the preflight end by PREFLIGHT_BY_S; the
# headline pair is in $OUT by HEADLINE_BY_S.
WINDOW_SECONDS = 540.0
DEVICE_TIMEOUT_S = 600
PREFLIGHT_BY_S = 60.0
HEADLINE_BY_S = 300.0
PREFLIGHT_LIMIT_S = 90.0  # a preflight that hangs is cut here (its results so far are kept)
# The window's own steps around the benchmark's (benchmarks.gpu_throughput.STEPS).
INSTALL_S, PREFLIGHT_S, BENCHMARK_START_S, WRITE_OUT_S = 20.0, 40.0, 10.0, 15.0
REHEARSAL_SCALE = 0.5  # the CPU rehearsal's window: every budget halved
REHEARSAL_HEARTBEAT_S = 2.0


@dataclass(frozen=True)
class PlanLine:
    name: str
    budget_s: float
    optional: bool = False
    headline: bool = False  # the last step of the headline pair


def window_plan(scale: float = 1.0) -> list[PlanLine]:
    """The window's steps in the order they run, each with the seconds it is given."""
    lines = [
        PlanLine("install the carried wheels (missing, fallback)", INSTALL_S * scale),
        PlanLine("preflight: imports, torch.compile of a 2-layer network on the device, matmul peak after a warm-up", PREFLIGHT_S * scale),
        PlanLine("benchmark start: torch, the environment, the estimates", BENCHMARK_START_S * scale),
    ]
    for step in STEPS:
        lines.append(PlanLine(step.name, step.budget_s * scale, step.optional, headline=step.arms == ("d",)))
    lines.append(PlanLine("write-out: compile artifacts into $OUT, the tables", WRITE_OUT_S * scale))
    return lines


def plan_table(scale: float = 1.0) -> tuple[str, float, float]:
    """The plan as text, its total and the time by which the headline pair is in $OUT."""
    rows, total, headline_at = [], 0.0, 0.0
    for number, line in enumerate(window_plan(scale), 1):
        if line.optional:
            rows.append(f"{number:>2}  {line.name:<96} {'(' + format(line.budget_s, '.0f') + ')':>8} {'-':>8}  only on time left over")
            continue
        total += line.budget_s
        note = ""
        if line.headline:
            headline_at = total
            note = f"  <- headline pair in $OUT by {total:.0f} s (goal: {HEADLINE_BY_S * scale:.0f} s)"
        elif line.name.startswith("preflight"):
            note = f"  <- preflight done by {total:.0f} s (goal: {PREFLIGHT_BY_S * scale:.0f} s)"
        rows.append(f"{number:>2}  {line.name:<96} {line.budget_s:>8.0f} {total:>8.0f}{note}")
    head = f"{'':>2}  {'step':<96} {'budget s':>8} {'total s':>8}"
    return "\n".join([head, *rows]), total, headline_at


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------------------------------
# fetch (here)


def setup_pins(setup_cfg: Path = REPO / "setup.cfg") -> dict[str, str]:
    """``name == version`` of ``install_requires`` (normalized names); ranges (torch) are left out."""
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    pins = {}
    for line in parser["options"]["install_requires"].splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*==\s*([^\s;]+)", line)
        if match:
            pins[normalize(match[1])] = match[2]
    return pins


def installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def download(spec: str, dest: Path) -> Path:
    """One wheel for CPython 3.12 on manylinux x86-64, no dependencies; returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
               "--implementation", "cp", *[arg for platform in PLATFORMS for arg in ("--platform", platform)], "-d", str(dest), spec]  # fmt: skip
    subprocess.run(command, check=True)
    new = sorted(set(dest.glob("*.whl")) - before)
    if not new:  # already there (pip keeps an existing file)
        name = normalize(re.split(r"[=<>!~ ]", spec, maxsplit=1)[0]).replace("-", "_")
        new = [path for path in dest.glob("*.whl") if normalize(path.name.split("-")[0]).replace("-", "_") == name]
    return new[0]


def wheel_requirement_specs(wheel: Path) -> list:
    """The requirements a wheel declares that apply on the box (no extras): ``packaging`` Requirements."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        metadata_name = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        text = archive.read(metadata_name).decode()
    needed = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        if requirement.marker is None or requirement.marker.evaluate(BOX_MARKERS):
            needed.append(requirement)
    return needed


def wheel_requirements(wheel: Path) -> list[str]:
    """The names of the dependencies a wheel declares that apply on the box."""
    return [requirement.name for requirement in wheel_requirement_specs(wheel)]


def box_lacks(requirement) -> bool:
    """Whether the box's own copy may not do for ``requirement``: the box has none, or its version
    (where KINDS.md gives it) is outside the range, or is unknown and the range bounds it."""
    name = normalize(requirement.name)
    if name in NOT_CARRIED:
        return False
    if name not in BOX_PACKAGES:
        return True
    if not str(requirement.specifier):
        return False
    known = BOX_VERSIONS.get(name)
    return known is None or not requirement.specifier.contains(known, prereleases=True)


def wanted_version(name: str, pins: dict[str, str]) -> str | None:
    if name == TORCHAO[0]:
        return TORCHAO[1]
    return pins.get(name) or installed_version(name)


def fetch(dest: Path = WHEELS) -> dict[str, list[dict[str, str]]]:
    pins = setup_pins()
    if dest.exists():
        shutil.rmtree(dest)  # one version of each package, or the install stops
    groups: dict[str, list[dict[str, str]]] = {MISSING: [], FALLBACK: []}
    # setup.cfg's pins, and whatever our code imports (a dependency not pinned yet takes this venv's version)
    needed = [*pins, *imported_distributions().values(), TORCHAO[0]]
    plan = {MISSING: [name for name in dict.fromkeys(needed) if name not in BOX_PACKAGES], FALLBACK: list(FALLBACK_PACKAGES)}
    for group, names in plan.items():
        queue, seen = list(names), set()
        while queue:
            name = normalize(queue.pop(0))
            if name in seen:
                continue
            seen.add(name)
            version = wanted_version(name, pins)
            spec = f"{name}=={version}" if version else name
            wheel = download(spec, dest / group)
            groups[group].append({"name": name, "version": version or wheel.name.split("-")[1], "file": wheel.name,
                                  "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(), "bytes": str(wheel.stat().st_size)})  # fmt: skip
            print(f"  {group}: {wheel.name}", flush=True)
            # what a carried package needs comes along: in the missing group what the box lacks; in the
            # fallback group also what the box's version may not satisfy (so that ours import as the tests ran them)
            specs = wheel_requirement_specs(wheel)
            queue += [spec.name for spec in specs if (normalize(spec.name) not in BOX_PACKAGES if group == MISSING else box_lacks(spec))]
    (dest / "manifest.json").write_text(json.dumps(groups, indent=1) + "\n")
    total = sum(int(item["bytes"]) for items in groups.values() for item in items)
    print(f"{sum(map(len, groups.values()))} wheels, {total / 2**20:.1f} MiB in {dest}")
    print(carry_report()[0])
    return groups


def carry_report() -> tuple[str, bool]:
    """The carried folders' sizes against CARRY_MAX_BYTES: (text, within)."""
    sizes = {folder.name: sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) for folder in CARRY if folder.exists()}
    total = sum(sizes.values())
    parts = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sizes.items()) or "nothing yet (run fetch)"
    within = total <= CARRY_MAX_BYTES
    return f"carry: {parts}; {total / 2**20:.1f} MiB of at most {CARRY_MAX_BYTES / 2**20:.0f} MiB{'' if within else ': TOO LARGE'}", within


# --------------------------------------------------------------------------------------------------
# run (there) and rehearse (here)


class Log:
    def __init__(self, path: Path, started: float) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        self.started = started

    def __call__(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f} s] {text}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


@dataclass
class WindowStep:
    """One of the window's own steps as it went: for the closing table."""

    name: str
    budget_s: float
    started_s: float
    seconds: float
    outcome: str


def install(python: str, group: str, target: Path, log: Log, only_this_python: bool = False) -> None:
    """``pip install --target`` of a group's wheels; ``only_this_python`` (the rehearsal, on a
    Python that is not the box's 3.12) leaves out the wheels built for another one: their files,
    hashes and tags are checked instead."""
    wheels = sorted((WHEELS / group).glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {WHEELS / group}: run `python scripts/gpu_window.py fetch` here first, and carry .whl")
    if only_this_python:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename

        here = set(sys_tags())
        other = [wheel for wheel in wheels if not parse_wheel_filename(wheel.name)[3] & here]
        wheels = [wheel for wheel in wheels if wheel not in other]
        if other:
            log(f"not installed here (built for CPython {PYTHON_VERSION}, not this Python): {', '.join(wheel.name.split('-')[0] for wheel in other)}")
    started = time.monotonic()
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                    "--disable-pip-version-check", "--target", str(target), *map(str, wheels)], check=True)  # fmt: skip
    log(f"installed {len(wheels)} {group} wheels into {target} in {time.monotonic() - started:.1f} s")


@dataclass
class Preflight:
    ok: bool
    imports: dict
    compile: dict
    peak: dict
    error: str = ""


def preflight(python: str, env: dict[str, str], log: Log, device_checks: bool, limit_s: float) -> Preflight:
    """The imports, then (``device_checks``) torch.compile and the peak, in one process whose
    lines are read as they come; one that hangs is stopped at ``limit_s`` with what it printed."""
    command = [python, "-c", PREFLIGHT, *(["--device-checks"] if device_checks else [])]
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=limit_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        timed_out = True
    found = {}
    for line in stdout.splitlines():
        tag, _, rest = line.partition(" ")
        if tag in ("IMPORTS", "COMPILE", "PEAK"):
            found[tag] = json.loads(rest)
    result = Preflight("IMPORTS" in found, found.get("IMPORTS", {}), found.get("COMPILE", {}), found.get("PEAK", {}))
    if not result.ok:
        result.error = "\n".join((stderr or stdout or "").strip().splitlines()[-12:]) or f"exit status {process.returncode}"
        log(f"import check failed:\n{result.error}")
    elif device_checks and "COMPILE" not in found:
        why = f"ran past {limit_s:.0f} s" if timed_out else (stderr.strip().splitlines() or ["no answer"])[-1]
        result.compile = {"error": f"the torch.compile check did not finish: {why}"}
    return result


def gpu_listing() -> str:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi: not found"
    result = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv"], capture_output=True, text=True)
    return result.stdout.strip() or result.stderr.strip()


def out_folder(given: str | None) -> Path:
    """Where the results go: ``$OUT`` on the device machine (the only folder that comes back), or
    an absolute folder given here. A relative folder is refused: on the device machine it would be
    written inside the checkout and never come back."""
    env_out = os.environ.get("OUT")
    if given is None:
        if not env_out:
            raise SystemExit("no folder for the results: $OUT is not set (on the device machine the tool sets it; here give an absolute folder)")
        return Path(env_out).resolve()
    path = Path(given)
    if not path.is_absolute() and not (env_out and path.resolve() == Path(env_out).resolve()):
        raise SystemExit(f"{given!r} is a relative folder, which the device tool does not bring back: give no folder (the script reads $OUT) or an absolute one")
    return path.resolve()


def bring_compile_cache(cache_in: Path, model_cache: Path, log: Log) -> Path | None:
    """An earlier window's artifacts files into the model cache's compile cache (where the worker
    loads them), and its gpu_throughput.json (the measured compile time) for the estimate."""
    from gpu_workers.speed import compile_cache_dir

    artifacts = sorted([*cache_in.glob("artifacts-*.bin"), *cache_in.glob("artifacts-*.bin.gz")]) if cache_in.is_dir() else []
    if artifacts:
        target = compile_cache_dir(model_cache)
        target.mkdir(parents=True, exist_ok=True)
        for path in artifacts:
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            (target / path.name.removesuffix(".gz")).write_bytes(data)
        log(f"compile cache: {', '.join(f'{path.name} ({path.stat().st_size / 2**20:.1f} MiB)' for path in artifacts)} from {cache_in} into {target}")
    else:
        log(f"compile cache: none carried ({cache_in} has no artifacts-*.bin.gz): the compiled arms start cold")
    previous = cache_in / "gpu_throughput.json"
    return previous if previous.is_file() else None


def run(args: argparse.Namespace) -> int:
    started_at, started = time.time(), time.monotonic()
    scale = args.scale
    out = out_folder(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = started + args.window_s * scale
    log = Log(out / "window.log", started)
    python = args.python or sys.executable
    target = Path(args.target).resolve()
    steps: list[WindowStep] = []
    log(f"GPU window: {python} in {REPO} (the checkout that travelled), target {target}, results in {out}, {args.window_s * scale:.0f} s"
        + (f" (smoke, budgets x{scale:g})" if args.smoke else ""))  # fmt: skip
    for line in plan_table(scale)[0].splitlines():
        log(line)
    step_started = time.monotonic()
    layers: list[list[Path]] = [[]]
    if args.no_install:
        log("install: skipped (no .whl here: the packages of this Python are used; run fetch to rehearse the install too)")
        outcome = "skipped: no .whl"
    else:
        install(python, MISSING, target / MISSING, log, only_this_python=args.only_this_python)
        layers = [[target / MISSING]]  # the box's own versions of what it has
        if not args.no_fallback:
            install(python, FALLBACK, target / FALLBACK, log)
            layers.insert(0, [target / FALLBACK, target / MISSING])  # preferred: our versions of those too
        outcome = "done"
    steps.append(WindowStep("install", INSTALL_S * scale, step_started - started, time.monotonic() - step_started, outcome))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    step_started = time.monotonic()
    for layer in layers:
        env["PYTHONPATH"] = os.pathsep.join([*map(str, layer), str(REPO)])
        log(f"preflight with PYTHONPATH={env['PYTHONPATH']}")
        checked = preflight(python, env, log, device_checks=True, limit_s=PREFLIGHT_LIMIT_S)
        if checked.ok:
            break
    else:
        (out / "versions.txt").write_text(f"import check failed:\n{checked.error}\n")
        return 3
    compile_error = checked.compile.get("error")
    (out / "versions.txt").write_text(json.dumps({**checked.imports, "compile_check": checked.compile, "peak": checked.peak}, indent=1)
                                      + "\n" + gpu_listing() + "\n")  # fmt: skip
    log(f"imports passed: {json.dumps(checked.imports)}")
    log(f"torch.compile on {checked.compile.get('device', '?')}: " + (f"FAILED, the compiled arms are skipped: {compile_error}" if compile_error
        else f"ok in {checked.compile.get('seconds')} s") + f"; peak {checked.peak.get('tflops', 0):.4g} TFLOP/s ({checked.peak.get('seconds')} s with the warm-up)")  # fmt: skip
    steps.append(WindowStep("preflight", PREFLIGHT_S * scale, step_started - started, time.monotonic() - step_started,
                            "done" if not compile_error else "done; torch.compile failed"))  # fmt: skip
    log(f"preflight done at {time.monotonic() - started:.1f} s (goal: {PREFLIGHT_BY_S * scale:.0f} s)")
    model_cache = Path(args.model_cache).resolve()
    previous = bring_compile_cache(Path(args.cache_in).resolve(), model_cache, log)
    budget = deadline - time.monotonic() - WRITE_OUT_S * scale
    command = [python, "-m", "benchmarks.gpu_throughput", "--out", str(out), "--model-cache", str(model_cache), "--budget-s", f"{budget:.0f}",
               "--step-scale", f"{scale:g}", "--heartbeat-s", f"{args.heartbeat_s:g}", "--window-started", f"{started_at:.3f}",
               *(["--peak-tflops", f"{checked.peak['tflops']:.6g}"] if checked.peak.get("tflops") else []),
               *(["--compile-broken", compile_error] if compile_error else []), *(["--previous", str(previous)] if previous else []),
               *(["--smoke"] if args.smoke else []), *args.extra]  # fmt: skip
    log(f"$ {' '.join(command[1:])}")
    process = subprocess.Popen(command, env=env, cwd=REPO)
    try:
        code = process.wait(timeout=max(30.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        log("the benchmark ran past the window: interrupting it (it keeps what it measured)")
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
    log(f"benchmark exited with {code}")
    closing_table(out, steps, started, log)
    files = [path for path in out.rglob("*") if path.is_file()]
    if len(files) > OUT_MAX_FILES:
        log(f"WARNING: {len(files)} files in {out}; the device tool brings back {OUT_MAX_FILES}: {', '.join(sorted(p.name for p in files))}")
    log(f"window done in {time.monotonic() - started:.1f} s of {args.window_s * scale:.0f} s; in {out}: {', '.join(sorted(p.name for p in files))}")
    table = out / "gpu_throughput.md"
    if table.exists():
        print("\n" + table.read_text())
    return code


def closing_table(out: Path, steps: list[WindowStep], started: float, log: Log) -> None:
    """The window's steps as they went: its own and the benchmark's."""
    try:
        results = json.loads((out / "gpu_throughput.json").read_text())
    except (OSError, ValueError):
        results = {}
    rows = [(step.name, step.budget_s, step.started_s, step.seconds, step.outcome) for step in steps]
    rows += [(step["name"], step["budget_s"], step["started_s"], step["seconds"], step["outcome"]) for step in results.get("run_steps", [])]
    log("| step | budget s | started at s | took s | outcome |")
    log("| --- | ---: | ---: | ---: | --- |")
    for name, budget_s, started_s, seconds, outcome in rows:
        log(f"| {name} | {budget_s:.0f} | {started_s:.0f} | {seconds:.1f} | {outcome} |")


CODE_FOLDERS = ("service", "gpu_workers", "contract", "schemas", "client", "benchmarks/gpu_throughput.py", "benchmarks/harness")


def imported_distributions() -> dict[str, str]:
    """Every top-level module our server, workers and this benchmark import that is not in the
    standard library or the repository, with the distribution that provides it here."""
    from importlib import metadata

    modules: set[str] = set()
    for folder in CODE_FOLDERS:
        path = REPO / folder
        for source in [path] if path.is_file() else path.rglob("*.py"):
            for match in re.finditer(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", source.read_text(), re.MULTILINE):
                modules.add(match[1])
    local = {path.name.removesuffix(".py") for path in REPO.iterdir()}
    providers = metadata.packages_distributions()
    found = {}
    for module in sorted(modules - set(sys.stdlib_module_names) - local - {"__future__"}):
        dists = providers.get(module)
        found[module] = normalize(dists[0]) if dists else module
    return found


def rehearse(args: argparse.Namespace) -> int:
    """``run --smoke`` here with every budget scaled by ``REHEARSAL_SCALE``, then the checks that
    the window went as planned. With ``.whl`` (after fetch) the install steps run too, into a
    throwaway target, but for the fallback wheels, CPython 3.12 builds that cannot install on this
    Python (3.11): their files, hashes and tags are checked instead; from a clean clone (no
    ``.whl``) the install is skipped and this Python's packages are used."""
    problems = []
    if (WHEELS / "manifest.json").is_file():
        problems += check_manifest()
        carry, within = carry_report()
        print(carry)
        if not within:
            problems.append(carry)
    else:
        print(f"no {WHEELS}: the install is not rehearsed (run fetch for that)")
    uncovered = {module: dist for module, dist in imported_distributions().items() if dist not in BOX_PACKAGES | carried_names()}
    if uncovered and (WHEELS / "manifest.json").is_file():
        problems.append(f"imported by our code, on neither the box nor in .whl: {uncovered}; add them to setup.cfg and fetch again")
    with tempfile.TemporaryDirectory(prefix="gpu-window-target-") as target:
        args.target, args.smoke, args.no_fallback, args.only_this_python = target, True, True, True
        args.no_install = not (WHEELS / "manifest.json").is_file()
        args.out = args.out or tempfile.mkdtemp(prefix="gpu-window-out-")
        args.scale, args.heartbeat_s = REHEARSAL_SCALE, REHEARSAL_HEARTBEAT_S
        code = run(args)
        out = Path(args.out)
        versions = (out / "versions.txt").read_text() if (out / "versions.txt").exists() else ""
        if not args.no_install and target not in versions:
            problems.append(f"diffusers was not imported from the target {target}")
        if str(REPO) not in versions:
            problems.append(f"our packages were not imported from this checkout {REPO}")
    problems += check_window(out, REHEARSAL_SCALE)
    for problem in problems:
        print(f"rehearsal: {problem}", file=sys.stderr)
    print(f"rehearsal: {'FAILED' if problems or code else 'passed'}")
    return code or (1 if problems else 0)


def check_manifest() -> list[str]:
    manifest = json.loads((WHEELS / "manifest.json").read_text())
    problems = []
    for group, items in manifest.items():
        for item in items:
            path = WHEELS / group / item["file"]
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != item["sha256"]:
                problems.append(f"{path} is missing or not the file fetched: fetch again")
            tags = item["file"].removesuffix(".whl").split("-")[-3:]
            if tags[0] not in ("py3", "py2.py3", "cp312", "cp310", "cp311", "cp39", "cp38") or not (tags[2] == "any" or "x86_64" in tags[2]):
                problems.append(f"{item['file']}: not a wheel for CPython 3.12 on x86-64")
    print(f"manifest: {sum(map(len, manifest.values()))} wheels checked")
    return problems


def carried_names() -> set[str]:
    if not (WHEELS / "manifest.json").is_file():
        return set()
    manifest = json.loads((WHEELS / "manifest.json").read_text())
    return {normalize(item["name"]) for items in manifest.values() for item in items}


def check_window(out: Path, scale: float) -> list[str]:
    """What the window promises, read off its results: the headline pair in $OUT by its time and
    before any compiled row, every step in the plan's order, the compile artifacts in $OUT, and
    no more files than come back."""
    try:
        results = json.loads((out / "gpu_throughput.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"no results in {out}: {exc}"]
    problems = []
    rows = results["rows"]
    landed = {arm: min(row["at_s"] for row in rows if row["arm"] == arm) for arm in {row["arm"] for row in rows}}
    for arm in ("b", "d"):
        if arm not in landed:
            problems.append(f"({arm}) of the headline pair is not in {out}")
        elif landed[arm] > HEADLINE_BY_S * scale:
            problems.append(f"({arm}) landed at {landed[arm]:.0f} s, after the headline's {HEADLINE_BY_S * scale:.0f} s")
    compiled = [landed[arm] for arm in ("c", "s", "e") if arm in landed]
    if compiled and any(landed.get(arm, 0) > min(compiled) for arm in ("b", "d")):
        problems.append("a compiled row landed before the headline pair")
    order = [step["name"] for step in results.get("run_steps", [])]
    planned = [step.name for step in STEPS]
    if order != [name for name in planned if name in order]:
        problems.append(f"the steps ran out of the plan's order: {order}")
    if "c" in landed and not list(out.glob("artifacts-*.bin.gz")):
        problems.append("(c) compiled, but no compile artifacts in $OUT")
    files = [path for path in out.rglob("*") if path.is_file()]
    if len(files) > OUT_MAX_FILES:
        problems.append(f"{len(files)} files in $OUT; the device tool brings back {OUT_MAX_FILES}")
    return problems


def plan(args: argparse.Namespace) -> int:
    table, total, headline_at = plan_table()
    print(f"The GPU window: one command of the device tool, timeout_s {DEVICE_TIMEOUT_S}, of which this plan takes {WINDOW_SECONDS:.0f} s.\n")
    print(table)
    print(f"\ntotal {total:.0f} s of {WINDOW_SECONDS:.0f} s; the headline pair (plain diffusers at its best batch, our server over HTTP eager)"
          f" is in $OUT by {headline_at:.0f} s, before any compile; the compiled step starts only if its estimated compile fits what is"
          f" left, prints a heartbeat every {HEARTBEAT_S:.0f} s, and is abandoned at the window's end with the eager rows kept.")  # fmt: skip
    print(carry_report()[0])
    print("\nThe call (device tool, from this checkout: it travels as it is, committed or not):\n"
          '  run(command="python3 scripts/gpu_window.py run", carry=[".whl", ".gpu-cache"], timeout_s=600); then give_back()')  # fmt: skip
    if total > WINDOW_SECONDS or headline_at > HEADLINE_BY_S:
        print("the plan does not fit its window", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_window.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="here: download the wheels the GPU box lacks into .whl/")
    commands.add_parser("plan", help="the window's steps in order, their budgets and running total")
    for name in ("run", "rehearse"):
        sub = commands.add_parser(name, help="there: install, check and measure into $OUT" if name == "run" else "here: the whole window on the CPU, scaled down")
        sub.add_argument("out", nargs="?", default=None, help="folder for the results: none on the device machine ($OUT is read); else an absolute folder")
        sub.add_argument("--target", default=str(Path(tempfile.gettempdir()) / "sdxl-window-site"), help="where the wheels are installed")
        sub.add_argument("--python", default=None, help="the Python with torch (default: this one)")
        sub.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "sdxl-window-cache"), help="model and compile cache")
        sub.add_argument("--cache-in", default=str(CACHE_IN), help="an earlier window's artifacts-*.bin and gpu_throughput.json (carried)")
        sub.add_argument("--smoke", action="store_true", help="the CPU smoke sizes (as rehearse does)")
        sub.add_argument("--no-fallback", action="store_true", help="leave .whl/fallback out: the box's own transformers, aiohttp, Pillow")
        sub.add_argument("--no-install", action="store_true", help="use this Python's packages, install nothing")
        sub.add_argument("--window-s", type=float, default=WINDOW_SECONDS, help="the whole command's limit")
        sub.add_argument("--scale", type=float, default=1.0, help="factor on every budget (rehearse: 0.5)")
        sub.add_argument("--heartbeat-s", type=float, default=HEARTBEAT_S, help="seconds between a compile's heartbeat lines")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # after --: for benchmarks.gpu_throughput
    args = parser.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    if args.command == "fetch":
        fetch()
        return 0
    if args.command == "plan":
        return plan(args)
    args.extra, args.only_this_python = extra, False
    return run(args) if args.command == "run" else rehearse(args)


if __name__ == "__main__":
    sys.exit(main())
