"""The rooms of ``service/`` and which way their imports run, checked on the source; and a traced
request, checked to stay in the HTTP rooms (DESIGN: the HTTP request stops at the edge).

- ``service/jobs`` knows no HTTP: it imports no aiohttp and nothing of the edge, the handlers,
  the integrations or the page. ``service/integrations`` observe jobs and import no handler.
  ``service/edge`` imports no handler. ``contract`` and ``gpu_workers`` import nothing of ``service``.
- Only the edge, the handlers with the two modules that parse a request and put a response on it
  (``service.http.asked``, ``service.http.streaming``), the response-prepare hooks and the
  /metrics and /ui handlers name aiohttp's request type.
- A profiler records every function of ``service`` that holds the request while real requests run
  (submit with and without NDJSON, an Idempotency-Key, a webhook, a job's page, its archive, a
  re-roll, a list): all of them are in those modules.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from aiohttp import web

from service.app import create_app
from service.settings import Settings
from tests.fake_transport import FakeTransport, fake_engine

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"

# The modules that may hold an aiohttp request: the edge, the handlers, the parser and the writer.
REQUEST_ROOM = (
    "service.edge.",
    "service.http.asked",
    "service.http.streaming",
    "service.http.routes",
    "service.http.job_routes",
    "service.http.octet_stream",  # a response-prepare hook: it reads the request's Accept
    "service.ui.page",  # the /ui handler and its files' response-prepare hook
    "service.integrations.metrics",  # the /metrics handler
)
# Which rooms each room must not import.
FORBIDDEN_IMPORTS = {
    "service.jobs": ("aiohttp", "service.edge", "service.http", "service.integrations", "service.ui", "service.app", "service.app_keys"),
    "service.integrations": ("service.edge", "service.http", "service.ui"),
    "service.edge": ("service.http", "service.ui"),
    "contract": ("service", "aiohttp"),
    "gpu_workers": ("service",),
}
REQUEST_NAMES = {"Request", "BaseRequest"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_files(top: str) -> list[Path]:
    return sorted((ROOT / top).rglob("*.py"))


def imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def names_request_type(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in REQUEST_NAMES:
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiohttp"):
            if REQUEST_NAMES & {alias.name for alias in node.names}:
                return True
    return False


def in_room(module: str, room: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix) for prefix in room)


def test_imports_run_one_way() -> None:
    wrong = []
    for room, forbidden in FORBIDDEN_IMPORTS.items():
        for path in python_files(room.replace(".", "/")):
            for imported in imported_modules(ast.parse(path.read_text())):
                if any(imported == bad or imported.startswith(bad + ".") for bad in forbidden):
                    wrong.append(f"{module_name(path)} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_only_the_http_rooms_name_the_request_type() -> None:
    outside = [
        module_name(path)
        for path in python_files("service")
        if names_request_type(ast.parse(path.read_text())) and not in_room(module_name(path), REQUEST_ROOM)
    ]
    assert not outside, f"modules below the handlers name aiohttp's request: {outside}"


def test_each_room_says_what_it_holds() -> None:
    for package in sorted(path.parent for path in SERVICE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 2, f"{package.name}/__init__.py: a two-line docstring"


class RequestTracer:
    """Records the ``service`` modules whose functions are called with a request among their locals."""

    def __init__(self) -> None:
        self.modules: set[str] = set()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("service."):
            return
        if any(isinstance(value, web.BaseRequest) for value in frame.f_locals.values()):
            self.modules.add(module)


async def test_a_traced_request_is_handled_in_the_http_rooms(aiohttp_client, tmp_path: Path) -> None:
    settings = replace(
        Settings(image_dir=str(tmp_path / "images"), job_db=str(tmp_path / "jobs.sqlite3"), heartbeat_interval=0.2),
        api_key="k" * 32,
        webhook_secret="whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        webhook_allow_private=True,
    )
    client = await aiohttp_client(create_app(settings, fake_engine(FakeTransport(), max_batch=settings.max_batch)))
    headers = {"Authorization": "Bearer " + "k" * 32}
    tracer = RequestTracer()
    sys.setprofile(tracer)
    try:
        body = {"prompts": ["a", "b"], "seed": 3, "webhook_url": "http://127.0.0.1:9/hook"}
        first = await client.post("/generate", json=body, headers={**headers, "Idempotency-Key": "trace-1"})
        job_id = (await first.json())["job_id"]
        streamed = await client.post("/generate", json={"prompts": ["c"]}, headers={**headers, "Accept": "application/x-ndjson"})
        await streamed.read()
        created = await client.post("/jobs", json={"prompts": ["d"], "return_format": "url"}, headers=headers)
        answers = [first, streamed, created]
        for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/archive", "/jobs?limit=5", "/health"):
            response = await client.get(path, headers=headers)
            await response.read()
            answers.append(response)
        reroll = await client.post(f"/jobs/{job_id}/variants", json={"index": 1}, headers=headers)
        answers.append(reroll)
    finally:
        sys.setprofile(None)
    assert [a.status for a in answers] == [200, 200, 202, 200, 200, 200, 200, 202], [a.status for a in answers]
    assert tracer.modules, "the tracer saw no request: it is broken"
    assert {"service.http.routes", "service.http.job_routes", "service.http.asked"} <= tracer.modules
    outside = sorted(module for module in tracer.modules if not in_room(module, REQUEST_ROOM))
    assert not outside, f"the request reached {outside}"
