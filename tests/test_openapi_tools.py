"""``/openapi.json`` as third-party tools take it, as is (no config, no hand edits):

- openapi-spec-validator accepts the live document (with keys and without);
- a client that openapi-python-client generates from it runs a job: submit, poll, result, archive bytes;
- openapi-typescript's types of it type-check a user's first lines under ``tsc --strict`` (the machine's
  Node; the npm packages pinned in tests/openapi_ts/package-lock.json, installed with ``npm ci``);
- every line of a real NDJSON stream, of each kind, is what the ``ProgressLine`` schema says.

One real server for the module: the tiny model, one worker, one image per shard, and a short
heartbeat interval so that a stream of a few images carries progress lines.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import OpenAPIV30SpecValidator

from service.app import create_app
from service.http.octet_stream import prefers_octet_stream
from service.settings import Settings
from tests.fake_transport import FakeTransport, fake_engine
from tests.server_process import ServerProcess
from tests.test_jobs import done, wait_for_job

VENV_BIN = Path(sys.executable).parent
TS_FOLDER = Path(__file__).parent / "openapi_ts"
HEARTBEAT_INTERVAL = 0.25
OPERATION_IDS = {
    ("get", "/"): "root",
    ("get", "/health"): "health",
    ("post", "/generate"): "generate",
    ("get", "/images/{image_name}"): "get_image",
    ("post", "/jobs"): "create_job",
    ("get", "/jobs"): "list_jobs",
    ("get", "/jobs/{job_id}"): "get_job",
    ("delete", "/jobs/{job_id}"): "cancel_job",
    ("get", "/jobs/{job_id}/archive"): "get_job_archive",
    ("post", "/jobs/{job_id}/variants"): "create_variant",
    ("get", "/ui"): "ui",
    ("get", "/metrics"): "metrics",
}
# Routes that need no key on a keyed server (service.edge.auth.OPEN_PATHS and OPEN_PREFIXES).
OPEN_OPERATIONS = {"health", "get_image", "ui"}
BINARY_MEDIA = {"get_image": {"image/png", "image/webp", "image/jpeg"}, "get_job_archive": {"application/zip"}}


@pytest.fixture(scope="module")
def api_server(start_server) -> ServerProcess:
    return start_server("--model", "tiny", "--workers", "1", "--max-batch", "1", "--heartbeat-interval", str(HEARTBEAT_INTERVAL))


@pytest.fixture(scope="module")
def document(api_server: ServerProcess) -> dict[str, Any]:
    response = requests.get(api_server.url + "/openapi.json", timeout=10)
    assert response.status_code == 200
    return response.json()


@pytest.fixture(scope="module")
def image_seconds(api_server: ServerProcess) -> float:
    """The baseline for this machine: one image through /generate, end to end (the worker warmed)."""
    requests.post(api_server.url + "/generate", json={"prompts": ["warm up"]}, timeout=300).raise_for_status()
    started = time.monotonic()
    requests.post(api_server.url + "/generate", json={"prompts": ["baseline"]}, timeout=300).raise_for_status()
    return time.monotonic() - started


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield method, path, operation


def by_id(document: dict[str, Any], operation_id: str) -> dict[str, Any]:
    return next(operation for _, _, operation in operations(document) if operation["operationId"] == operation_id)


def conforms(document: dict[str, Any], schema: dict[str, Any], instance: Any) -> list[str]:
    """Why ``instance`` does not match ``schema`` of ``document`` ($refs into its components)."""
    validator = OAS30Validator({**schema, "components": document["components"]})
    return [f"{'/'.join(map(str, error.path))}: {error.message}" for error in validator.iter_errors(instance)]


def missing_headers(document: dict[str, Any], operation_id: str, status: int, headers: Any) -> list[str]:
    declared = by_id(document, operation_id)["responses"][str(status)].get("headers", {})
    return [name for name, header in declared.items() if header.get("required") and name not in headers]


# ----- the document itself ----------------------------------------------------------------------


def test_the_live_document_passes_openapi_spec_validator(document: dict[str, Any]) -> None:
    errors = [f"{'/'.join(map(str, e.path))}: {e.message[:300]}" for e in OpenAPIV30SpecValidator(document).iter_errors()]
    assert errors == []
    assert document["openapi"] == "3.0.3"


async def test_a_keyed_servers_document_passes_too(aiohttp_client, tmp_path: Path) -> None:
    """Keys add the security schemes and the Authorize button: still a valid document (in-process:
    the document is the same code with or without a real worker)."""
    settings = Settings(image_dir=str(tmp_path / "images"), job_db=str(tmp_path / "jobs.sqlite3"), api_key="openapi-tools-key-0123456789")
    client = await aiohttp_client(create_app(settings, fake_engine(FakeTransport())))
    keyed = await (await client.get("/openapi.json")).json()
    assert list(OpenAPIV30SpecValidator(keyed).iter_errors()) == []
    assert set(keyed["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    open_ones = {operation["operationId"] for _, _, operation in operations(keyed) if operation.get("security") == []}
    assert open_ones == OPEN_OPERATIONS


def test_every_operation_has_its_stable_snake_case_operation_id(document: dict[str, Any]) -> None:
    found = {(method, path): operation.get("operationId") for method, path, operation in operations(document)}
    assert found == OPERATION_IDS
    assert all(re.fullmatch(r"[a-z][a-z_]*", name) for name in found.values())


def test_every_error_is_declared_with_the_error_schema(document: dict[str, Any]) -> None:
    error_ref = {"$ref": "#/components/schemas/Error"}
    for method, path, operation in operations(document):
        name = operation["operationId"]
        statuses = set(operation["responses"])
        if name not in OPEN_OPERATIONS:
            assert "401" in statuses, f"{name}: a keyed server answers 401 without a key"
            assert operation["responses"]["401"]["headers"]["WWW-Authenticate"]["required"] is True
        for status, response in operation["responses"].items():
            if int(status) >= 400 and name != "health":  # /health's 503 is its own body, with the workers
                assert response["content"]["application/json"]["schema"] == error_ref, f"{method} {path} {status}"
    for name in ("generate", "create_job"):
        responses = by_id(document, name)["responses"]
        assert {"400", "401", "408", "413", "422", "429", "503", "507"} <= set(responses), name
        assert responses["503"]["headers"]["Retry-After"]["required"] and responses["429"]["headers"]["Retry-After"]["required"]
    assert {"409", "410", "500"} <= set(by_id(document, "generate")["responses"])
    assert {"404", "409"} <= set(by_id(document, "cancel_job")["responses"])
    assert {"400", "404"} <= set(by_id(document, "get_job_archive")["responses"])
    assert {"404", "410"} <= set(by_id(document, "get_job")["responses"])


def test_request_bodies_are_required_and_only_prompts_must_be_sent(document: dict[str, Any]) -> None:
    for name in ("generate", "create_job"):
        body = by_id(document, name)["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/GenerateRequest"}
    request = document["components"]["schemas"]["GenerateRequest"]
    assert request["required"] == ["prompts"]
    # openapi-typescript would make a property with a default required: defaults are told in words
    assert [name for name, field in request["properties"].items() if "default" in field] == []
    assert "Default (when absent): 1." in request["properties"]["num_images_per_prompt"]["description"]
    assert all("produces" not in operation and "consumes" not in operation for _, _, operation in operations(document))


def test_binary_responses_are_binary_strings_also_as_octet_stream(document: dict[str, Any]) -> None:
    for name, media_types in BINARY_MEDIA.items():
        content = by_id(document, name)["responses"]["200"]["content"]
        assert set(content) == media_types | {"application/octet-stream"}
        assert all(media["schema"] == {"type": "string", "format": "binary"} for media in content.values())
    archive_headers = by_id(document, "get_job_archive")["responses"]["200"]["headers"]
    assert {"X-Job-Id", "X-Job-State", "X-Images-Done", "Content-Disposition"} <= set(archive_headers)
    assert {"Location", "X-Job-Id", "Idempotent-Replayed"} <= set(by_id(document, "create_job")["responses"]["202"]["headers"])


# ----- what the server sends, against the document ----------------------------------------------


def ndjson_lines(server: ServerProcess, body: dict[str, Any], after_job_line=None) -> tuple[requests.Response, list[dict[str, Any]]]:
    response = requests.post(server.url + "/generate", json=body, headers={"Accept": "application/x-ndjson"}, stream=True, timeout=300)
    lines = []
    for raw in response.iter_lines():
        lines.append(json.loads(raw))
        if len(lines) == 1 and after_job_line is not None:
            after_job_line(lines[0])
    return response, lines


def test_every_ndjson_line_is_a_progress_line(api_server: ServerProcess, document: dict[str, Any], image_seconds: float) -> None:
    """A whole stream (job, image, progress, summary) and a cancelled one (its failure summary)."""
    line_schema = by_id(document, "generate")["responses"]["200"]["content"]["application/x-ndjson"]["schema"]
    images = min(150, max(3, math.ceil(3 * HEARTBEAT_INTERVAL / image_seconds) + 1))  # long enough for progress lines
    response, whole = ndjson_lines(api_server, {"prompts": [f"line {i}" for i in range(images)], "seed": 11})
    assert response.status_code == 200 and not missing_headers(document, "generate", 200, response.headers)

    def cancel(job_line: dict[str, Any]) -> None:
        assert requests.delete(f"{api_server.url}/jobs/{job_line['job_id']}", timeout=30).status_code == 200

    _, cancelled = ndjson_lines(api_server, {"prompts": ["never"] * 8, "return_format": "url"}, after_job_line=cancel)
    kinds = [line["type"] for line in whole]
    assert kinds[0] == "job" and kinds[-1] == "summary" and kinds.count("image") == images
    assert "progress" in kinds, f"{images} images of about {image_seconds:.2f} s each sent no progress line at {HEARTBEAT_INTERVAL} s"
    assert whole[-1]["success"] is True and cancelled[-1]["success"] is False and cancelled[-1]["state"] == "cancelled"
    for line in whole + cancelled:
        assert conforms(document, line_schema, line) == [], line


def test_an_archive_and_an_image_come_as_octet_stream_when_asked(api_server: ServerProcess, image_seconds: float) -> None:
    created = requests.post(api_server.url + "/jobs", json={"prompts": ["octets"], "return_format": "url"}, timeout=30).json()
    status = wait_for_job(api_server, created["job_id"], done, timeout=60 + 20 * image_seconds)
    archive_url = f"{api_server.url}/jobs/{created['job_id']}/archive"
    for url, own in ((archive_url, "application/zip"), (status["images"][0], "image/png")):
        plain = requests.get(url, timeout=30)
        octets = requests.get(url, headers={"Accept": "application/octet-stream"}, timeout=30)
        assert plain.headers["Content-Type"] == own and octets.headers["Content-Type"] == "application/octet-stream"
        if own.startswith("image/"):
            assert octets.content == plain.content


def test_who_gets_octet_stream() -> None:
    assert prefers_octet_stream("application/octet-stream", "application/zip")
    assert prefers_octet_stream("application/octet-stream, */*;q=0.8", "image/png")
    assert prefers_octet_stream("image/png;q=0.5, application/octet-stream", "image/png")
    for accept in ("", "*/*", "application/zip", "image/*, application/octet-stream;q=0.9", "application/octet-stream;q=0", "application/octet-stream;q=x"):
        assert not prefers_octet_stream(accept, "image/png" if "image" in accept else "application/zip"), accept


# ----- generated clients ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def document_file(document: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("openapi") / "openapi.json"
    path.write_text(json.dumps(document))
    return path


def test_a_client_generated_by_openapi_python_client_runs_a_job(
    api_server: ServerProcess, document: dict[str, Any], document_file: Path, tmp_path: Path, image_seconds: float
) -> None:
    generated = subprocess.run(
        [str(VENV_BIN / "openapi-python-client"), "generate", "--path", str(document_file), "--meta", "none",
         "--output-path", str(tmp_path / "sdxl_api_client"), "--fail-on-warning"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"},
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        package = importlib.import_module("sdxl_api_client")
        create_job, get_job, get_job_archive = (importlib.import_module(f"sdxl_api_client.api.jobs.{name}") for name in ("create_job", "get_job", "get_job_archive"))
        models = importlib.import_module("sdxl_api_client.models")
        client = package.Client(base_url=api_server.url, raise_on_unexpected_status=True, timeout=60)

        created = create_job.sync_detailed(client=client, body=models.GenerateRequest(prompts=["a lighthouse", "a harbour"], seed=21))
        assert created.status_code == 202 and isinstance(created.parsed, models.JobCreated)
        assert not missing_headers(document, "create_job", 202, created.headers)
        job_id = created.parsed.job_id
        deadline = time.monotonic() + 60 + 40 * image_seconds
        while (status := get_job.sync(job_id, client=client)).state != models.JobStatusState.DONE:
            assert isinstance(status, models.JobStatus) and time.monotonic() < deadline, status
            time.sleep(0.2)
        assert status.seeds == [21, 22] and len(status.images) == 2

        archive = get_job_archive.sync_detailed(job_id, client=client)
        assert archive.status_code == 200 and not missing_headers(document, "get_job_archive", 200, archive.headers)
        with zipfile.ZipFile(io.BytesIO(archive.parsed.payload.read())) as bundle:
            names = bundle.namelist()
            stored = [bundle.read(name) for name in names[1:]]
        assert names[0] == "manifest.json" and len(stored) == 2
        assert sorted(map(sha256, stored)) == sorted(sha256(base64.b64decode(image)) for image in status.images)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [name for name in sys.modules if name.split(".")[0] == "sdxl_api_client"]:
            del sys.modules[name]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npm_ci(folder: Path) -> None:
    """``npm ci`` once per package-lock.json: node_modules (git-ignored) keeps a stamp of the lock it
    was installed from, so reruns skip the install."""
    stamp = folder / "node_modules" / ".installed-from-lock"
    lock = sha256((folder / "package-lock.json").read_bytes())
    if stamp.is_file() and stamp.read_text() == lock:
        return
    installed = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline"], cwd=folder, capture_output=True, text=True, timeout=300
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    stamp.write_text(lock)


def test_openapi_typescript_types_check_under_tsc_strict(document_file: Path, tmp_path: Path) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed (the machine's Node 20 runs openapi-typescript and tsc)")
    npm_ci(TS_FOLDER)
    binaries = TS_FOLDER / "node_modules" / ".bin"
    types = tmp_path / "api.ts"
    made = subprocess.run([str(binaries / "openapi-typescript"), str(document_file), "-o", str(types)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    text = types.read_text()
    assert "operations = Record<string, never>" not in text and all(f"    {name}: {{" in text for name in OPERATION_IDS.values())
    shutil.copy(TS_FOLDER / "usage.ts", tmp_path / "usage.ts")
    checked = subprocess.run(
        [str(binaries / "tsc"), "--strict", "--noEmit", "--target", "es2022", "--module", "esnext", "--moduleResolution", "bundler", str(tmp_path / "usage.ts")],
        capture_output=True, text=True, timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
