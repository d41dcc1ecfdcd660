"""Run a module as ``python -m`` would, recording every import of the watched top-level packages
made in this process (not in the processes it spawns).

``python tests/import_probe.py RECORD WATCHED MODULE [ARGS...]``: ``WATCHED`` is a comma list such
as ``torch,diffusers``; each first import of one of them appends its name to the file ``RECORD``
at the moment it happens, so a test reads what the API process loaded while it served, however
it stopped. Spawned workers re-import the main module (``service.__main__``), not this file, so they
are not watched.
"""

from __future__ import annotations

import importlib.abc
import runpy
import sys
from pathlib import Path


class ImportRecorder(importlib.abc.MetaPathFinder):
    """A finder that finds nothing: it only notes the names asked for, then lets the real finders work."""

    def __init__(self, record: Path, watched: set[str]) -> None:
        self.record = record
        self.watched = watched

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname in self.watched:
            with self.record.open("a") as out:
                out.write(fullname + "\n")
        return None


def main() -> None:
    record, watched, module, *args = sys.argv[1:]
    Path(record).touch()
    sys.meta_path.insert(0, ImportRecorder(Path(record), set(watched.split(","))))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
