"""What a benchmark prints and keeps: aligned tables (or markdown ones) with their ratios, PASS/FAIL
checks, and the same rows as JSON (``--json PATH``), one function each for every benchmark.

``report(rows, columns)`` formats rows (dicts of raw values) through ``Column`` specs, prints the
table and the ratios under it, and hands the raw rows to a ``JsonOut`` under a name: the printed
table and the JSON file always hold the same rows. ``JsonOut(None)`` writes nothing.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

Formatter = str | Callable[[Any], str]


@dataclass(frozen=True)
class Column:
    """One column: the row key it shows, its title, how a value is written (a format spec such as
    ``".2f"``, or a callable), and its alignment (``">"`` right, ``"<"`` left). None shows as "-"."""

    key: str
    title: str | None = None
    fmt: Formatter = ""
    align: str = ">"

    def cell(self, row: Mapping[str, Any]) -> str:
        value = row.get(self.key)
        if value is None:
            return "-"
        if callable(self.fmt):
            return self.fmt(value)
        return format(value, self.fmt)

    @property
    def heading(self) -> str:
        return self.key if self.title is None else self.title


@dataclass(frozen=True)
class Ratio:
    """A comparison printed under a table: ``label: 1.94x (ideal 2.00x)``."""

    label: str
    value: float
    ideal: float | None = None
    fmt: str = ".2f"
    unit: str = "x"

    def line(self) -> str:
        ideal = "" if self.ideal is None else f" (ideal {self.ideal:{self.fmt}}{self.unit})"
        return f"{self.label}: {self.value:{self.fmt}}{self.unit}{ideal}"


@dataclass(frozen=True)
class Check:
    """A goal judged (``ok`` True/False) or a figure reported beside them (``ok`` None)."""

    ok: bool | None
    what: str
    value: str = ""
    goal: str = ""


class JsonOut:
    """The JSON file of one run (``--json PATH``): every table and check list under its name, with
    the command, machine and times; rewritten after each addition, so a run cut short keeps what
    it measured. A ``None`` path keeps nothing."""

    def __init__(self, path: str | Path | None, benchmark: str, **extra: Any) -> None:
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {
            "benchmark": benchmark,
            "command": " ".join(["python", "-m", benchmark, *sys.argv[1:]]),
            "started": f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC",
            "machine": machine_description(),
            "load_start": list(os.getloadavg()),
            **extra,
        }

    def add(self, name: str, payload: Any) -> None:
        self.data[name] = payload
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        self.data["load_now"] = list(os.getloadavg())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(json_safe(self.data), indent=2) + "\n")

    def announce(self) -> None:
        if self.path is not None:
            print(f"JSON written to {self.path}")


def json_safe(value: Any) -> Any:
    """Values JSON can hold: NaN and infinities become None, tuples lists, anything else its str."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    return str(value)


def render(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], *, markdown: bool = False, header: bool = True, indent: str = "") -> list[str]:
    """The table's lines: aligned text (columns two spaces apart) or a markdown table."""
    cells = [[column.cell(row) for column in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(c.heading for c in columns) + " |", "| " + " | ".join("---:" if c.align == ">" else "---" for c in columns) + " |"]
        return lines + ["| " + " | ".join(line) + " |" for line in cells]
    widths = [max([len(c.heading) if header else 0, *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]
    out = []
    if header:
        out.append(indent + "  ".join(f"{c.heading:{c.align}{w}}" for c, w in zip(columns, widths)).rstrip())
    for line in cells:
        out.append(indent + "  ".join(f"{cell:{c.align}{w}}" for cell, c, w in zip(line, columns, widths)).rstrip())
    return out


def report(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    *,
    title: str | None = None,
    ratios: Sequence[Ratio] = (),
    notes: Sequence[str] = (),
    markdown: bool = False,
    header: bool = True,
    indent: str = "",
    json_out: JsonOut | None = None,
    name: str | None = None,
    echo: bool = True,
) -> str:
    """Print (``echo``) and return a table with its ratios and notes, and add the same rows to
    ``json_out`` under ``name`` (the title by default): raw values, not the formatted cells."""
    lines = [] if title is None else [title]
    lines += render(rows, columns, markdown=markdown, header=header, indent=indent)
    lines += [indent + ratio.line() for ratio in ratios]
    lines += [indent + note for note in notes]
    text = "\n".join(lines)
    if echo:
        print(text, flush=True)
    if json_out is not None:
        json_out.add(
            name or title or "table",
            {
                "columns": {c.key: c.heading for c in columns},
                "rows": [dict(row) for row in rows],
                **({"ratios": {r.label: r.value for r in ratios}} if ratios else {}),
            },
        )
    return text


def report_pairs(
    pairs: Sequence[tuple[str, Any]], *, title: str | None = None, indent: str = "", json_out: JsonOut | None = None, name: str | None = None
) -> str:
    """A figure-and-value table without a header (a run's summary)."""
    rows = [{"figure": label, "value": value} for label, value in pairs]
    return report(rows, [Column("figure", align="<"), Column("value", fmt=str, align="<")], title=title, header=False,
                  indent=indent, json_out=json_out, name=name)  # fmt: skip


def report_checks(
    checks: Sequence[Check], *, title: str | None = None, indent: str = "", fail: str = "FAIL", json_out: JsonOut | None = None, name: str = "checks"
) -> bool:
    """``PASS``/``FAIL`` (``fail``)/``info`` and each check's line; True when no judged check failed."""
    rows = [{"mark": "info" if c.ok is None else "PASS" if c.ok else fail, "what": c.what, "value": c.value,
             "goal": f"goal {c.goal}" if c.goal else "", "ok": c.ok} for c in checks]  # fmt: skip
    columns = [Column("mark", align="<"), Column("what", align="<")]
    if any(c.value for c in checks):
        columns.append(Column("value", align="<"))
    if any(c.goal for c in checks):
        columns.append(Column("goal", align="<"))
    report(rows, columns, title=title, header=False, indent=indent, json_out=json_out, name=name)
    return all(c.ok is not False for c in checks)


# --------------------------------------------------------------------------------------------------
# The figures every benchmark prints beside its own


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cores)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description(packages: Sequence[str] = ("torch", "aiohttp")) -> str:
    """CPU, cores, memory, kernel, Python and the versions of ``packages`` (those installed)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory = float("nan")
    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(
        [f"{cpu_model()}, {os.cpu_count()} cores, {memory:.1f} GiB RAM, {platform.system()} {platform.release()}",
         f"Python {platform.python_version()}", *versions]
    )  # fmt: skip


def mib(value: float, digits: int = 1) -> str:
    return f"{value / 2**20:.{digits}f} MiB"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
