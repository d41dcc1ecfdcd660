"""One command for the GPU window: the throughput table of ``benchmarks.gpu_throughput`` on a GPU
box that has torch (with CUDA) but not our other packages, and no internet.

Here, beforehand (needs pip's index)::

    .venv/bin/python scripts/gpu_window.py fetch           # the wheels into .whl/ (ignored by git)

There, in the repository's root, with ``.whl`` carried along::

    python3 scripts/gpu_window.py run OUT [-- ARGS]         # install, check, build, measure: OUT/

Here, the rehearsal of that command (the same install steps into a throwaway target, the smoke
sizes on the CPU)::

    .venv/bin/python scripts/gpu_window.py rehearse [OUT]

``fetch`` downloads, for CPython 3.12 on manylinux x86-64, every package of ``setup.cfg``'s
``install_requires`` that the GPU box lacks (``BOX_PACKAGES``: the device machine's image as
``/work/.library/device/KINDS.md`` lists it), at the pinned versions, and every dependency of
those that the box lacks too (versions: this venv's, which the tests ran with), plus torchao for
the opt-in fp8 path: ``.whl/missing/``. A second group, ``.whl/fallback/``, holds our pinned
versions of packages the box has in a version of its own (transformers, aiohttp, Pillow and what
they need): ``run`` puts them first, so the box runs what the tests ran, and falls back to the
box's own versions only if the import check fails with ours.
``.whl/manifest.json`` names every file with its version and sha256.

``run`` installs each group into a folder of its own under a target folder with ``pip
--no-index --no-deps --target`` (never into the box's site-packages), puts them first on
``PYTHONPATH``, checks that the server, the worker and the benchmark import, writes
``OUT/versions.txt``, then runs ``python -m benchmarks.gpu_throughput`` (which builds the
sdxl-synthetic model on the GPU in each process that needs it) with a time budget so that the
whole command ends in under 8 minutes; the benchmark writes ``OUT/gpu_throughput.json``,
``OUT/gpu_throughput.md`` and ``OUT/server.log``, and this script ``OUT/window.log``.
Only the standard library is imported before the install.
"""

from __future__ import annotations

import argparse
import configparser
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / ".whl"
MISSING, FALLBACK = "missing", "fallback"
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
# The fp8 path (gpu_workers/speed.py): the torchao release made for torch 2.11, the GPU box's.
TORCHAO = ("torchao", "0.17.0")
# Ours, in versions the box may not match: installed there only if its own fail the import check.
FALLBACK_PACKAGES = ("transformers", "regex", "aiohttp", "yarl", "multidict", "propcache", "frozenlist", "aiosignal", "aiohappyeyeballs", "pillow")
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
# What must import on the box before anything is measured.
PREFLIGHT = """
import importlib, json, sys
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
import diffusers
versions["diffusers_from"] = diffusers.__file__
try:
    import torchao.quantization  # only the opt-in fp8 arm needs it
    versions["torchao_import"] = "ok"
except Exception as exc:
    versions["torchao_import"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(versions, indent=1))
"""
WINDOW_SECONDS = 470.0  # the whole run, install included: under 8 minutes
BENCHMARK_BUDGET_S = 400.0


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


def wheel_requirements(wheel: Path) -> list[str]:
    """The dependencies a wheel declares that apply on the box (no extras)."""
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
            needed.append(requirement.name)
    return needed


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
            if group == MISSING:  # what a carried package needs and the box lacks comes along
                queue += [dep for dep in wheel_requirements(wheel) if normalize(dep) not in BOX_PACKAGES]
    (dest / "manifest.json").write_text(json.dumps(groups, indent=1) + "\n")
    total = sum(int(item["bytes"]) for items in groups.values() for item in items)
    print(f"{sum(map(len, groups.values()))} wheels, {total / 2**20:.1f} MiB in {dest} (the device call carries at most 64 MiB with the tree)")
    return groups


# --------------------------------------------------------------------------------------------------
# run (there) and rehearse (here)


class Log:
    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", encoding="utf-8")
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f} s] {text}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def install(python: str, group: str, target: Path, log: Log) -> None:
    wheels = sorted((WHEELS / group).glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {WHEELS / group}: run `python scripts/gpu_window.py fetch` here first, and carry .whl")
    started = time.monotonic()
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                    "--disable-pip-version-check", "--target", str(target), *map(str, wheels)], check=True)  # fmt: skip
    log(f"installed {len(wheels)} {group} wheels into {target} in {time.monotonic() - started:.1f} s")


def preflight(python: str, env: dict[str, str], log: Log) -> tuple[bool, str]:
    result = subprocess.run([python, "-c", PREFLIGHT], env=env, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-12:])
        log(f"import check failed:\n{tail}")
        return False, tail
    return True, result.stdout


def gpu_listing() -> str:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi: not found"
    result = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv"], capture_output=True, text=True)
    return result.stdout.strip() or result.stderr.strip()


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.window_s
    log = Log(out / "window.log")
    python = args.python or sys.executable
    target = Path(args.target).resolve()
    log(f"GPU window: {python} in {REPO}, target {target}, results in {out}" + (" (smoke)" if args.smoke else ""))
    install(python, MISSING, target / MISSING, log)
    layers = [[target / MISSING]]  # the box's own versions of what it has
    if not args.no_fallback:
        install(python, FALLBACK, target / FALLBACK, log)
        layers.insert(0, [target / FALLBACK, target / MISSING])  # preferred: our pinned versions of those too
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    for layer in layers:
        env["PYTHONPATH"] = os.pathsep.join([*map(str, layer), str(REPO)])
        log(f"import check with PYTHONPATH={env['PYTHONPATH']}")
        ok, report = preflight(python, env, log)
        if ok:
            break
    else:
        (out / "versions.txt").write_text(f"import check failed:\n{report}\n")
        return 3
    (out / "versions.txt").write_text(report + "\n" + gpu_listing() + "\n")
    log(f"import check passed: {' '.join(line.strip() for line in report.splitlines() if line.strip() not in '{}')}")
    budget = min(args.budget_s, deadline - time.monotonic() - 45.0)
    command = [python, "-m", "benchmarks.gpu_throughput", "--out", str(out), "--model-cache", str(Path(args.model_cache).resolve()),
               "--budget-s", f"{budget:.0f}", *(["--smoke"] if args.smoke else []), *args.extra]  # fmt: skip
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
    table = out / "gpu_throughput.md"
    if table.exists():
        print("\n" + table.read_text())
    return code


CODE_FOLDERS = ("service", "gpu_workers", "contract", "schemas", "client", "benchmarks/gpu_throughput.py")


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
    """``run --smoke`` here, into a throwaway target: the same install and import steps as there,
    but for the fallback wheels, CPython 3.12 builds that cannot install on this Python (3.11):
    their files, hashes and tags are checked instead."""
    manifest = json.loads((WHEELS / "manifest.json").read_text())
    for group, items in manifest.items():
        for item in items:
            path = WHEELS / group / item["file"]
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != item["sha256"]:
                raise SystemExit(f"{path} is missing or not the file fetched: fetch again")
            tags = item["file"].removesuffix(".whl").split("-")[-3:]
            if tags[0] not in ("py3", "py2.py3", "cp312", "cp310", "cp311") or not (tags[2] == "any" or "x86_64" in tags[2]):
                raise SystemExit(f"{item['file']}: not a wheel for CPython 3.12 on x86-64")
    print(f"manifest: {sum(map(len, manifest.values()))} wheels present and intact")
    carried = {normalize(item["name"]) for items in manifest.values() for item in items}
    uncovered = {module: dist for module, dist in imported_distributions().items() if dist not in BOX_PACKAGES | carried}
    if uncovered:
        raise SystemExit(f"imported by our code, on neither the box nor in .whl: {uncovered}; add them to setup.cfg and fetch again")
    print("every third-party module our code imports is on the box or carried")
    with tempfile.TemporaryDirectory(prefix="gpu-window-target-") as target:
        args.target, args.smoke, args.no_fallback = target, True, True
        args.out = args.out or tempfile.mkdtemp(prefix="gpu-window-out-")
        code = run(args)
        versions = (Path(args.out) / "versions.txt").read_text() if (Path(args.out) / "versions.txt").exists() else ""
        if target not in versions:
            print(f"rehearsal: diffusers was not imported from the target {target}", file=sys.stderr)
            code = code or 1
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_window.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="here: download the wheels the GPU box lacks into .whl/")
    for name in ("run", "rehearse"):
        sub = commands.add_parser(name, help="there: install, check and measure" if name == "run" else "here: run --smoke into a throwaway target")
        sub.add_argument("out", nargs="?" if name == "rehearse" else None, help="folder for the results")
        sub.add_argument("--target", default=str(Path(tempfile.gettempdir()) / "sdxl-window-site"), help="where the wheels are installed")
        sub.add_argument("--python", default=None, help="the Python with torch (default: this one)")
        sub.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "sdxl-window-cache"), help="model and compile cache")
        sub.add_argument("--smoke", action="store_true", help="the CPU smoke sizes (as rehearse does)")
        sub.add_argument("--no-fallback", action="store_true", help="leave .whl/fallback out: the box's own transformers, aiohttp, Pillow")
        sub.add_argument("--budget-s", type=float, default=BENCHMARK_BUDGET_S, help="the benchmark's budget")
        sub.add_argument("--window-s", type=float, default=WINDOW_SECONDS, help="the whole command's limit")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # after --: for benchmarks.gpu_throughput
    args = parser.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    if args.command == "fetch":
        fetch()
        return 0
    args.extra = extra
    return run(args) if args.command == "run" else rehearse(args)


if __name__ == "__main__":
    sys.exit(main())
