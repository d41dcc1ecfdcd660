"""Does the server keep the GPU busy? Measured on a CPU box against a simulated device.

At GPU speed (~100 ms an image) a worker that encodes its PNGs after each shard, before taking the
next, leaves the device idle for the encoding (40-70 ms a picture): about a third of its time
(DESIGN.md sections 3 and 6). Whether the worker overlaps host work with the device is a property
of the host side alone, so this script measures it without a GPU: the real server
(``python -m service``, started with ``benchmarks.harness.launch``) runs the pipeline of
``benchmarks.simulated_device``, which sleeps for the device time and logs every device interval
to a trace file, with the system-wide monotonic clock the client uses too.

For each configuration the script starts a server (``--model benchmarks.simulated_device:factory
--workers N --max-batch 4 --heartbeat-interval 1``), waits for every worker, sends one warm request
(4 images, not counted), empties the trace, then sends one ``POST /generate`` of ``--images``
images (4 per prompt, ``return_format: url``, a fixed seed) and reads the whole answer. From the
trace, per worker: busy = the union of its device intervals, span = its first interval start to
its last interval end; **device busy %** = busy / span (per worker, and their mean). The request's
wall time (sent to last byte) gives images/s, against the ideal N * 1000 / ms-per-image; "of wall"
is busy / (N * wall), which also charges the request's lead-in (first byte to first device start)
and tail (last device end to last response byte).

    .venv/bin/python -m benchmarks.device_overlap [--configs a,b,c] [--images 48] [--repeats 1] [--json PATH]
        [--format png|webp|jpeg [--quality Q]]

``--format`` asks for the images in that format (the request's ``format`` field; ``quality`` with
``--quality``, else the server's default for the format): the encode stage then writes WebP or JPEG
instead of PNG, and the device should wait no more for it. Without it the request carries no
``format`` field, as before the server had one (so PNG).

Configurations: (a) 1 worker at 100 ms/image (the goal: >= 90% busy), (b) 1 worker at 50 ms/image
(encoding weighs twice as much), (c) 2 workers at 100 ms/image (on a 2-core box the two workers'
encoding and the API process share the cores: the load average is printed with the results).
With ``--repeats`` above 1 each figure is the median over the repeats. About a minute on a 2-core
machine. Exit status 0 when configuration (a) was >= 90% busy (or was not run), 1 otherwise or when
a request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


from benchmarks.harness.launch import ApiServer, bench_server
from benchmarks.harness.report import Check, Column, JsonOut, load_line, machine_description, report, report_checks
from benchmarks.server_overhead import PROMPTS, batch_body, post_generate
from benchmarks.simulated_device import MS_PER_IMAGE_ENV, TRACE_ENV

MODEL = "benchmarks.simulated_device:factory"
MAX_BATCH = 4
PER_PROMPT = 4
WARM_IMAGES = 4
HEARTBEAT_INTERVAL_S = 1.0
SEED = 1234
GOAL_CONFIG = "a"
GOAL_BUSY = 0.90
EXTENSIONS = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}  # the image links' endings, per format


@dataclass(frozen=True)
class Config:
    name: str
    workers: int
    ms_per_image: float

    @property
    def ideal_images_per_s(self) -> float:
        return self.workers * 1000 / self.ms_per_image

    def describe(self) -> str:
        return f"({self.name}) {self.workers} worker(s) at {self.ms_per_image:g} ms/image"


CONFIGS = {c.name: c for c in (Config("a", 1, 100.0), Config("b", 1, 50.0), Config("c", 2, 100.0))}


@dataclass(frozen=True)
class Interval:
    """One pipeline call's device time, as the simulated device traced it."""

    pid: int
    start: float
    end: float
    images: int


@dataclass(frozen=True)
class WorkerFigures:
    pid: int
    calls: int
    images: int
    busy_s: float
    span_s: float

    @property
    def busy(self) -> float:
        """Busy over span; a worker that got no work was not kept busy at all."""
        return self.busy_s / self.span_s if self.span_s > 0 else 0.0


@dataclass(frozen=True)
class Run:
    """One counted request: the client's clock and every worker's device intervals."""

    wall_s: float
    images: int
    device_images: int
    lead_s: float  # request sent -> first device interval starts
    tail_s: float  # last device interval ends -> last byte of the answer
    workers: tuple[WorkerFigures, ...]

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def mean_busy(self) -> float:
        return statistics.fmean(w.busy for w in self.workers)

    @property
    def busy_of_wall(self) -> float:
        return sum(w.busy_s for w in self.workers) / (len(self.workers) * self.wall_s)


@dataclass(frozen=True)
class Result:
    config: Config
    runs: tuple[Run, ...]
    load_average: tuple[float, float, float]

    def median(self, figure: str) -> float:
        return statistics.median(getattr(run, figure) for run in self.runs)

    @property
    def typical(self) -> Run:
        """The run whose mean busy is the median: its per-worker figures go in the table."""
        ordered = sorted(self.runs, key=lambda run: run.mean_busy)
        return ordered[(len(ordered) - 1) // 2]


# --------------------------------------------------------------------------------------------------
# The trace


def read_trace(path: Path) -> list[Interval]:
    if not path.exists():
        return []
    return [Interval(int(pid), float(start), float(end), int(images)) for pid, start, end, images in (line.split() for line in path.read_text().splitlines())]


def union_seconds(intervals: Iterable[Interval]) -> float:
    """Total time covered by the intervals, overlaps counted once."""
    total, reach = 0.0, float("-inf")
    for interval in sorted(intervals, key=lambda i: i.start):
        if interval.end > reach:
            total += interval.end - max(interval.start, reach)
            reach = interval.end
    return total


def worker_figures(intervals: Sequence[Interval], pids: Iterable[int]) -> tuple[WorkerFigures, ...]:
    """Per worker of the server, including those the trace never saw (they count as 0% busy)."""
    by_pid: dict[int, list[Interval]] = defaultdict(list)
    for interval in intervals:
        by_pid[interval.pid].append(interval)
    figures = []
    for pid in sorted(set(pids) | set(by_pid)):
        own = by_pid.get(pid, [])
        span = max((i.end for i in own), default=0.0) - min((i.start for i in own), default=0.0)
        figures.append(WorkerFigures(pid, len(own), sum(i.images for i in own), union_seconds(own), span))
    return tuple(figures)


# --------------------------------------------------------------------------------------------------
# The server and the request


def prompts(images: int) -> list[str]:
    return [f"{PROMPTS[i % len(PROMPTS)]}, study {i + 1}" for i in range(images // PER_PROMPT)]


def request_body(images: int, image_format: str | None = None, quality: int | None = None) -> dict[str, Any]:
    """The measured request: ``format`` and ``quality`` only when asked for."""
    body = batch_body(prompts(images), PER_PROMPT, SEED, "url")
    if image_format is not None:
        body["format"] = image_format
    if quality is not None:
        body["quality"] = quality
    return body


def generate(url: str, images: int, image_format: str | None = None, quality: int | None = None) -> tuple[float, float]:
    """POST /generate and read the whole answer; (sent, ended) on the monotonic clock."""
    reply = post_generate(url, request_body(images, image_format, quality), keep_body=True)
    body = json.loads(reply.body or b"{}")
    if reply.status != 200 or body.get("success") is not True or body.get("count") != images:
        raise RuntimeError(f"POST /generate of {images} images: HTTP {reply.status}, {str(body.get('detail', body))[:300]}")
    extension = EXTENSIONS[image_format or "png"]
    if any(not str(link).endswith(extension) for link in body.get("images", [])):
        raise RuntimeError(f"POST /generate asked for {image_format or 'png'}: some image links do not end in {extension} (a server without the format field?)")
    return reply.sent, reply.ended


def measure_once(server: ApiServer, trace: Path, images: int, pids: Sequence[int], image_format: str | None = None, quality: int | None = None) -> Run:
    trace.write_bytes(b"")  # the workers append with O_APPEND: truncating between requests is safe
    sent, ended = generate(server.url, images, image_format, quality)
    intervals = read_trace(trace)
    if not intervals:
        raise RuntimeError(f"the trace {trace} is empty: is {MODEL} the server's model?")
    return Run(
        wall_s=ended - sent,
        images=images,
        device_images=sum(i.images for i in intervals),
        lead_s=min(i.start for i in intervals) - sent,
        tail_s=ended - max(i.end for i in intervals),
        workers=worker_figures(intervals, pids),
    )


def make_server(config: Config, model_cache: str) -> tuple[ApiServer, Path]:
    """The server on the simulated device (not started yet) and its trace file."""
    server = bench_server(config.workers, MAX_BATCH, model_cache, "--heartbeat-interval", str(HEARTBEAT_INTERVAL_S), model=MODEL,
                          prefix="sdxl-overlap-")  # fmt: skip
    return server, server.workdir / "device.trace"


def start_server(server: ApiServer, config: Config, trace: Path) -> list[int]:
    """Start with the simulated device's variables and wait for every worker; the worker pids."""
    print(f"   $ {MS_PER_IMAGE_ENV}={config.ms_per_image:g} {TRACE_ENV}={trace} python {' '.join(server.args[1:])}", flush=True)
    server.env.update({MS_PER_IMAGE_ENV: str(config.ms_per_image), TRACE_ENV: str(trace)})
    server.start()
    return server.wait_workers(config.workers)


def stop_server(server: ApiServer, keep_log: bool) -> None:
    code = server.stop()
    server.remove_images()
    if code != 0:
        print(f"   server exited with {code}; log kept at {server.log_path}", flush=True)
    elif keep_log:
        print(f"   server log kept at {server.log_path}", flush=True)
    else:
        shutil.rmtree(server.workdir, ignore_errors=True)


def run_config(config: Config, args: argparse.Namespace) -> Result:
    print(f"\n== {config.describe()} ==", flush=True)
    server, trace = make_server(config, args.model_cache)
    try:
        pids = start_server(server, config, trace)
        generate(server.url, WARM_IMAGES, args.format, args.quality)  # first-request paths; not counted
        runs = []
        for repeat in range(args.repeats):
            run = measure_once(server, trace, args.images, pids, args.format, args.quality)
            runs.append(run)
            per_worker = ", ".join(f"{w.busy:.0%} ({w.images} img)" for w in run.workers)
            print(
                f"   run {repeat + 1}: {run.images} images in {run.wall_s:.2f} s = {run.images_per_s:.2f} images/s; "
                f"device busy {run.mean_busy:.1%} [{per_worker}]; lead {1000 * run.lead_s:.0f} ms, tail {1000 * run.tail_s:.0f} ms",
                flush=True,
            )
            if run.device_images != run.images:
                print(f"   warning: the device ran {run.device_images} images for {run.images} requested", flush=True)
    finally:
        stop_server(server, args.keep_logs)
    return Result(config, tuple(runs), os.getloadavg())


# --------------------------------------------------------------------------------------------------
# Report


def table(results: Sequence[Result], json_out: JsonOut | None = None) -> str:
    rows = []
    for result in results:
        config, typical = result.config, result.typical
        rows.append({
            "config": config.name, "workers": config.workers, "ms_per_image": config.ms_per_image, "images": typical.images,
            "wall_s": result.median("wall_s"), "images_per_s": result.median("images_per_s"), "ideal_images_per_s": config.ideal_images_per_s,
            "device_busy": result.median("mean_busy"), "per_worker": [w.busy for w in typical.workers], "of_wall": result.median("busy_of_wall"),
            "lead_ms": 1000 * result.median("lead_s"), "tail_ms": 1000 * result.median("tail_s"), "load_1_min": result.load_average[0],
        })  # fmt: skip
    return report(rows, [
        Column("config", align="<"), Column("workers"), Column("ms_per_image", "ms/image", "g"), Column("images"), Column("wall_s", "wall s", ".2f"),
        Column("images_per_s", "images/s", ".2f"), Column("ideal_images_per_s", "ideal images/s", ".2f"),
        Column("device_busy", "device busy % (mean)", ".1%"), Column("per_worker", "per worker", lambda v: " / ".join(f"{b:.1%}" for b in v), align="<"),
        Column("of_wall", "of wall %", ".1%"), Column("lead_ms", "lead ms", ".0f"), Column("tail_ms", "tail ms", ".0f"), Column("load_1_min", "load 1 min", ".2f"),
    ], markdown=True, json_out=json_out, name="table", echo=False)  # fmt: skip


def as_json(results: Sequence[Result], args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    def run_json(run: Run) -> dict[str, Any]:
        workers = [{**asdict(w), "busy": w.busy} for w in run.workers]
        return {**asdict(run), "workers": workers, "images_per_s": run.images_per_s, "mean_busy": run.mean_busy, "busy_of_wall": run.busy_of_wall}

    return {
        "images": args.images,
        "format": args.format or "png (no format field)",
        "quality": args.quality,
        "max_batch": MAX_BATCH,
        "seconds": seconds,
        "goal": {"config": GOAL_CONFIG, "busy": GOAL_BUSY},
        "configs": [
            {
                **asdict(r.config),
                "ideal_images_per_s": r.config.ideal_images_per_s,
                "median": {f: r.median(f) for f in ("mean_busy", "images_per_s", "wall_s", "busy_of_wall", "lead_s", "tail_s")},
                "load_average": r.load_average,
                "runs": [run_json(run) for run in r.runs],
            }
            for r in results
        ],
    }


def verdict(results: Sequence[Result], json_out: JsonOut) -> bool:
    goal = next((r for r in results if r.config.name == GOAL_CONFIG), None)
    if goal is None:
        print(f"\ngoal not checked: configuration {GOAL_CONFIG} was not run")
        return True
    busy = goal.median("mean_busy")
    check = Check(busy >= GOAL_BUSY, f"{goal.config.describe()}: device busy {busy:.1%}, goal >= {GOAL_BUSY:.0%}")
    return report_checks([check], title="", fail="MISS", json_out=json_out)


# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="How busy the server keeps a (simulated) GPU.")
    parser.add_argument("--configs", default="a,b,c", help="comma-separated: a (1 worker, 100 ms/image), b (1, 50), c (2, 100)")
    parser.add_argument("--images", type=int, default=48, help=f"images of the measured request ({PER_PROMPT} per prompt)")
    parser.add_argument("--repeats", type=int, default=1, help="measured requests per configuration (figures are medians)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--format", choices=("png", "webp", "jpeg"), help="the images' format (the request's format field; default: no field, so PNG)"
    )
    parser.add_argument("--quality", type=int, help="the request's quality (webp and jpeg; default: the server's default for the format)")
    parser.add_argument("--keep-logs", action="store_true", help="keep each server's temp dir (its log and trace)")
    parser.add_argument(
        "--model-cache", default=str(Path.home() / ".cache" / "sdxl-lightning-server"), help="--model-cache of the servers (unused by the simulated device)"
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    if not names or any(name not in CONFIGS for name in names):
        parser.error(f"--configs takes names from {', '.join(CONFIGS)}")
    if args.images <= 0 or args.images % PER_PROMPT:
        parser.error(f"--images must be a positive multiple of {PER_PROMPT}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.quality is not None and args.format not in ("webp", "jpeg"):
        parser.error("--quality needs --format webp or jpeg")
    args.configs = [CONFIGS[name] for name in dict.fromkeys(names)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    print("== device overlap: the server on a simulated device (benchmarks.simulated_device) ==")
    print(f"   machine: {machine_description()}")
    print(f"   at start: {load_line()}", flush=True)
    try:
        results = [run_config(config, args) for config in args.configs]
    except RuntimeError as exc:
        print(f"\nfailed: {exc}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - began
    json_out = JsonOut(args.json, "benchmarks.device_overlap")
    print(f"\n{table(results, json_out)}\n")
    quality = "" if args.quality is None else f" quality {args.quality}"
    print(f"{args.images} images per request ({PER_PROMPT} per prompt), --max-batch {MAX_BATCH}, url answers, "
          f"format {args.format or 'png (no format field)'}{quality}; "
          f"medians of {args.repeats} run(s); {seconds:.0f} s in all; at the end: {load_line()}")
    json_out.add("run", as_json(results, args, seconds))
    passed = verdict(results, json_out)
    json_out.announce()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
