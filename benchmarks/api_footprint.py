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
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from benchmarks.soak import REPO, OwnServer

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
    return psutil.Process(pid).memory_info().rss / 2**20


def measure(label: str, repo: Path, model_cache: str) -> Footprint:
    server = OwnServer(workers=1, max_batch=2, model_cache=model_cache, repo=repo)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", metavar="REV", help="also measure this commit (a temporary git worktree)")
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
    print(f"{'server':<22} {'API idle MiB':>12} {'API after 4 images':>19} {'worker MiB':>11} {'libtorch in API':>16}")
    for row in rows:
        print(f"{row.label:<22} {row.api_idle_mib:>12.1f} {row.api_after_request_mib:>19.1f} {row.worker_mib:>11.1f} {str(row.libtorch_in_api):>16}")
    if len(rows) == 2:
        print(f"API idle RSS, after / before: {rows[1].api_idle_mib / rows[0].api_idle_mib:.2f}x")
    verdict = "meets" if rows[-1].api_idle_mib < GOAL_MIB else "MISSES"
    print(f"goal: the API alone under {GOAL_MIB:.0f} MiB at idle: {verdict} ({rows[-1].api_idle_mib:.1f} MiB)")


if __name__ == "__main__":
    main()
