"""The benchmark harness's own parts, in this process: a table and its JSON hold the same rows, the
checks' verdict, and the sampler's figures of a child it watches. The launchers are exercised by
every test that starts a server (``tests/server_process.py`` is ``ApiServer``)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.harness.report import Check, Column, JsonOut, Ratio, report, report_checks
from benchmarks.harness.sampling import TreeSampler, descendants


def test_a_table_prints_formatted_cells_and_keeps_the_raw_rows_as_json(tmp_path: Path, capsys) -> None:
    out = JsonOut(tmp_path / "run" / "result.json", "benchmarks.example", note="side by side")
    rows = [{"setup": "one box", "images_per_s": 1.5}, {"setup": "two boxes", "images_per_s": 2.91, "lost": None}]
    text = report(
        rows, [Column("setup", align="<"), Column("images_per_s", "images/s", ".2f"), Column("lost")],
        title="scale-out", ratios=[Ratio("two/one", 2.91 / 1.5, ideal=2.0)], json_out=out,
    )  # fmt: skip
    assert capsys.readouterr().out.strip() == text
    lines = text.splitlines()
    assert lines[0] == "scale-out"
    assert lines[1].split() == ["setup", "images/s", "lost"]
    assert lines[2].split() == ["one", "box", "1.50", "-"] and lines[3].split() == ["two", "boxes", "2.91", "-"]
    assert lines[4] == "two/one: 1.94x (ideal 2.00x)"

    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["benchmark"] == "benchmarks.example" and saved["note"] == "side by side"
    table = saved["scale-out"]
    assert table["rows"] == [{"setup": "one box", "images_per_s": 1.5}, {"setup": "two boxes", "images_per_s": 2.91, "lost": None}]
    assert table["columns"] == {"setup": "setup", "images_per_s": "images/s", "lost": "lost"}
    assert table["ratios"] == {"two/one": 2.91 / 1.5}


def test_checks_pass_only_when_no_judged_goal_fails(tmp_path: Path, capsys) -> None:
    out = JsonOut(tmp_path / "checks.json", "benchmarks.example")
    assert report_checks([Check(True, "images lost", "0", "0"), Check(None, "peak RSS", "48 MiB")], json_out=out)
    assert not report_checks([Check(True, "images lost", "0"), Check(False, "newcomer waited", "1.05 s", "< 1 s")], json_out=out)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[0] == "PASS" and printed[1].split()[0] == "info"
    assert printed[-1].split()[:3] == ["FAIL", "newcomer", "waited"] and printed[-1].endswith("goal < 1 s")
    assert [row["ok"] for row in json.loads((tmp_path / "checks.json").read_text())["checks"]["rows"]] == [True, False]


def test_the_sampler_sees_a_child_grow_and_its_cpu() -> None:
    """A child that spins for a second, then holds 64 MiB more: the tree's RSS grows by it, not the
    root's, and the spinning child is seen using CPU while its parent, which waits, is not."""
    code = "import time\nend = time.monotonic() + 1.0\nwhile time.monotonic() < end: pass\nblock = bytearray(64 << 20)\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {code!r}])"])
    try:
        child = None
        while child is None and parent.poll() is None:
            child = next(iter(psutil.Process(parent.pid).children()), None)
            time.sleep(0.01)
        assert child is not None
        sampler = TreeSampler(parent.pid, 0.05, handles=True, cpu=True, cpu_pids=[child.pid])
        with sampler:
            started = time.monotonic()
            grown = 0
            while time.monotonic() - started < 20 and grown < (64 << 20):
                time.sleep(0.05)
                seen = sampler.summary()
                grown = seen.peak_tree_rss - seen.first_rss
            ended = time.monotonic()
        summary = sampler.summary()
        assert summary.samples >= 2
        assert summary.peak_tree_rss - summary.peak_rss >= 60 << 20, "the child's block counts in the tree, not in the root"
        assert summary.first_fds is not None and summary.first_fds[0] >= 3
        busy = sampler.samples.cpu_between(child.pid, started, ended)
        idle = sampler.samples.cpu_between(parent.pid, started, ended)
        assert busy >= 0.2 and idle < busy / 4, f"the spinning child used {busy:.2f} CPU s, its waiting parent {idle:.2f}"
    finally:
        for pid in descendants(parent.pid):
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        parent.kill()
        parent.wait(10)
