"""RSS, CPU seconds and open files of a process tree, sampled in a thread: one sampler for every benchmark.

``TreeSampler(pid)`` reads, every ``interval`` seconds, the root's RSS, the RSS of the root and all
its descendants (a server's workers, multiprocessing's helpers: all of it is the server's memory),
the root's open fds (and sockets among them) and threads, and the CPU seconds (and, with
``waits``, the seconds its main thread was runnable but had no CPU) of the root and of any
``cpu_pids``. ``stop()`` returns the ``Samples``; ``summary()`` the first, peak and last figures.

psutil is imported when a sampler starts, not at import: ``benchmarks/gpu_throughput.py`` imports
this module on the GPU box before its packages are installed.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self


def rss(pid: int) -> int:
    """Resident bytes of one process, 0 if it is gone (workers die on purpose in some benchmarks)."""
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` (empty if it is gone)."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process; NaN if it is gone."""
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return float("nan")
    return times.user + times.system


def open_files(pid: int) -> tuple[int, int] | None:
    """(open fds, sockets among them) of a process, from /proc/<pid>/fd; None if it is gone."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    sockets = 0
    for name in names:
        try:
            sockets += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
        except OSError:
            pass  # closed since the listing
    return len(names), sockets


def threads(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def fd_limit(pid: int) -> int | None:
    """The soft limit of open files of a process, from /proc/<pid>/limits."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


def schedstat(pid: int, tid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of one thread, from the scheduler.

    The wait is what other processes on a shared machine cost us; wall time minus it is what the
    run would have taken on an idle machine, which is far less noisy than wall time alone."""
    try:
        on_cpu, waiting, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return float("nan"), float("nan")
    return int(on_cpu) / 1e9, int(waiting) / 1e9


@dataclass
class Samples:
    """What the sampler saw, one entry per sample (a figure that was not asked for stays empty)."""

    times: list[float] = field(default_factory=list)  # monotonic
    rss: list[int] = field(default_factory=list)  # the root process
    tree_rss: list[int] = field(default_factory=list)  # the root and every descendant
    fds: list[int] = field(default_factory=list)  # the root's open fds (-1: unreadable)
    sockets: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    cpu: dict[int, list[float]] = field(default_factory=dict)  # pid -> user+system seconds
    waits: dict[int, list[float]] = field(default_factory=dict)  # pid -> seconds its main thread waited for a CPU

    def rss_between(self, start: float, end: float, tree: bool = False) -> list[int]:
        values = self.tree_rss if tree else self.rss
        return [r for t, r in zip(self.times, values) if start <= t <= end]

    def cpu_between(self, pid: int, start: float, end: float, series: str = "cpu") -> float:
        """CPU seconds the process used (``waits``: its main thread waited for a CPU) between two
        moments, from the last sample at or before ``start`` to the first at or after ``end``."""
        values = getattr(self, series)[pid]
        first = max(0, bisect.bisect_right(self.times, start) - 1)
        last = min(len(values) - 1, bisect.bisect_left(self.times, end))
        if last <= first:
            return float("nan")
        return values[last] - values[first]


@dataclass(frozen=True)
class SampleSummary:
    samples: int
    first_rss: int
    peak_rss: int
    last_rss: int
    peak_tree_rss: int
    first_fds: tuple[int, int] | None  # (fds, threads) at the first readable sample
    last_fds: tuple[int, int] | None
    max_fds: int
    max_sockets: int
    first_sockets: int

    @property
    def rss_growth(self) -> int:
        return self.last_rss - self.first_rss

    @property
    def peak_growth(self) -> int:
        return self.peak_rss - self.first_rss


class TreeSampler:
    """Samples a process tree every ``interval`` s in a daemon thread, between ``start`` and ``stop``
    (or as a context manager).

    ``root``: a pid, or a callable giving it (None while it is not started yet: a server the sampler
    watches from before its launch). ``tree``: also sum the descendants' RSS. ``handles``: the
    root's open fds, sockets and threads. ``cpu_pids``: CPU seconds of these (and of the root when
    ``cpu``), ``waits``: and their main threads' waits for a CPU."""

    def __init__(
        self,
        root: int | Callable[[], int | None],
        interval: float = 0.5,
        *,
        memory: bool = True,
        tree: bool = True,
        handles: bool = False,
        sockets: bool = False,
        cpu: bool = False,
        cpu_pids: Sequence[int] = (),
        waits: bool = False,
    ) -> None:
        self._root = root if callable(root) else (lambda: root)
        self.interval = interval
        self.memory, self.tree, self.handles, self.count_sockets, self.waits = memory, tree, handles, sockets, waits
        fixed = self._root() if cpu else None
        self.cpu_pids = list(dict.fromkeys([*([fixed] if fixed else []), *cpu_pids]))
        self.samples = Samples(cpu={pid: [] for pid in self.cpu_pids}, waits={pid: [] for pid in self.cpu_pids} if waits else {})
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Samples:
        self._halt.set()
        if self._thread is not None:
            self._thread.join()
        return self.samples

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def sample(self) -> None:
        """One sample now (the thread calls this; a caller may too, e.g. one last one at the end)."""
        pid = self._root()
        now = time.monotonic()
        root_rss = rss(pid) if pid and self.memory else 0
        tree_rss = root_rss + sum(rss(child) for child in descendants(pid)) if pid and self.memory and self.tree else root_rss
        found = open_files(pid) if pid and self.handles and self.count_sockets else None
        if pid and self.handles and not self.count_sockets:
            try:
                found = (len(os.listdir(f"/proc/{pid}/fd")), 0)
            except OSError:
                found = None
        count = threads(pid) if pid and self.handles else None
        cpus = {p: cpu_seconds(p) for p in self.cpu_pids}
        waits = {p: schedstat(p, p)[1] for p in self.cpu_pids} if self.waits else {}
        with self._lock:
            s = self.samples
            s.times.append(now)
            s.rss.append(root_rss)
            s.tree_rss.append(tree_rss)
            if self.handles:
                s.fds.append(found[0] if found else -1)
                s.sockets.append(found[1] if found else -1)
                s.threads.append(count if count is not None else -1)
            for p, value in cpus.items():
                s.cpu[p].append(value)
            for p, value in waits.items():
                s.waits[p].append(value)

    def _run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def summary(self) -> SampleSummary:
        with self._lock:
            s = self.samples
            readable = [i for i, rss_now in enumerate(s.rss) if rss_now] if self.memory else []
            handles = [i for i, fds in enumerate(s.fds) if fds >= 0]
            return SampleSummary(
                samples=len(s.times),
                first_rss=s.rss[readable[0]] if readable else 0,
                peak_rss=max(s.rss, default=0),
                last_rss=s.rss[readable[-1]] if readable else 0,
                peak_tree_rss=max(s.tree_rss, default=0),
                first_fds=(s.fds[handles[0]], s.threads[handles[0]]) if handles else None,
                last_fds=(s.fds[handles[-1]], s.threads[handles[-1]]) if handles else None,
                max_fds=max((s.fds[i] for i in handles), default=0),
                max_sockets=max((s.sockets[i] for i in handles), default=0),
                first_sockets=s.sockets[handles[0]] if handles else 0,
            )
