"""The API process's memory beside its local workers (issue 28): before and after it stopped
importing torch to count GPUs, side by side in one run.

    .venv/bin/python -m benchmarks.api_footprint --before 45bab70

Starts ``python -m service --model tiny --workers 1`` (local workers: the case that used to import
torch) from this checkout and, with ``--before REV``, from a temporary git worktree of REV; for each
it reads the RSS of the API process and of its worker once healthy and idle, again after a 4-image
request, and whether libtorch is mapped into the API process. Goal: the API alone under 100 MB idle.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from benchmarks.harness.launch import REPO, bench_server
from benchmarks.harness.report import Column, JsonOut, Ratio, report
from benchmarks.harness.sampling import rss

GOAL_MIB = 100.0
SETTLE_SECONDS = 2.0


@dataclass(frozen=True)
class Footprint:
    label: str
    api_idle_mib: float
    api_after_request_mib: float
    worker_mib: float
    libtorch_in_api: bool


def rss_mib(pid: int) -> float:
    return rss(pid) / 2**20


def measure(label: str, repo: Path, model_cache: str) -> Footprint:
    server = bench_server(1, 2, model_cache, repo=repo, prefix="sdxl-footprint-")
    server.start()
    try:
        assert server.pid is not None
        time.sleep(SETTLE_SECONDS)
        idle = rss_mib(server.pid)
        answer = requests.post(server.url + "/generate", json={"prompts": ["a harbour at dusk"] * 4, "seed": 1, "return_format": "url"}, timeout=300)
        answer.raise_for_status()
        time.sleep(SETTLE_SECONDS)
        after = rss_mib(server.pid)
        worker_pid = requests.get(server.url + "/health", timeout=10).json()["workers"][0]["pid"]
        libtorch = "libtorch" in Path(f"/proc/{server.pid}/maps").read_text()
        return Footprint(label, idle, after, rss_mib(worker_pid), libtorch)
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", metavar="REV", help="also measure this commit (a temporary git worktree)")
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args()
    model_cache = tempfile.mkdtemp(prefix="sdxl-footprint-cache-")
    rows = []
    if args.before:
        worktree = Path(tempfile.mkdtemp(prefix="sdxl-footprint-before-")) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(worktree), args.before], check=True)
        try:
            rows.append(measure(f"before ({args.before})", worktree, model_cache))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False)
    rows.append(measure("this checkout", REPO, model_cache))
    json_out = JsonOut(args.json, "benchmarks.api_footprint")
    ratios = [Ratio("API idle RSS, after / before", rows[1].api_idle_mib / rows[0].api_idle_mib)] if len(rows) == 2 else []
    report([asdict(row) for row in rows], [
        Column("label", "server", align="<"), Column("api_idle_mib", "API idle MiB", ".1f"), Column("api_after_request_mib", "API after 4 images", ".1f"),
        Column("worker_mib", "worker MiB", ".1f"), Column("libtorch_in_api", "libtorch in API", str),
    ], ratios=ratios, json_out=json_out, name="footprint")  # fmt: skip
    verdict = "meets" if rows[-1].api_idle_mib < GOAL_MIB else "MISSES"
    print(f"goal: the API alone under {GOAL_MIB:.0f} MiB at idle: {verdict} ({rows[-1].api_idle_mib:.1f} MiB)")
    json_out.add("goal", {"mib": GOAL_MIB, "met": rows[-1].api_idle_mib < GOAL_MIB})
    json_out.announce()


if __name__ == "__main__":
    main()
