"""Real nginx and Caddy in front of a real server, as users put them there (items 1 and 2 of issue 24).

nginx 1.22 runs three configurations at once, each a ``server`` block on its own free port: a bare
``proxy_pass`` (HTTP/1.0 to the upstream, buffering on), the README's block, and a bare ``proxy_pass``
with ``proxy_read_timeout 5s`` in front of a server that beats every 2 s. Caddy 2.6 runs the README's
Caddyfile. Both are started by the tests with their own temporary prefix and config, in the
foreground, never the system's. The README's blocks are read from the README itself, so the tested
config and the documented one cannot drift apart.

Through each: a 40-image base64 ``/generate`` arrives whole (one job: the requests share an
Idempotency-Key, so the 40 images are made once and every proxy carries its own heartbeats and body),
NDJSON image lines arrive while the job still runs, and ``curl --http1.0`` straight at the server
gets both kinds of stream close-delimited. Links behind a proxy on a non-default port carry that
port; forwarded headers from an untrusted peer (a client bound to 127.0.0.2) change nothing.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.debian_packages import PROBLEMS
from tests.server_process import REPO, ServerProcess, free_port

HEARTBEAT_SECONDS = 2
PROXY_READ_TIMEOUT_SECONDS = 5
# 40 images of 768x432 take 8 s on one core of the 2-core test machine (0.2 s an image): longer than
# the short-timeout proxy's 5 s, so only the heartbeats keep that connection open.
FORTY_IMAGES = {"prompts": ["a lighthouse in a storm"], "num_images_per_prompt": 40, "size": "768x432", "seed": 7}
# Three shards of 2 (url lines are small: nginx's buffering would hold them all to the end).
NDJSON_REQUEST = {"prompts": ["a fox in the snow"], "num_images_per_prompt": 6, "size": "512x288", "return_format": "url", "seed": 3}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NGINX_CONFIGS = ("bare", "readme", "short_timeout")
UNTRUSTED_PEER = "127.0.0.2"  # not in the default --forwarded-allow-ips 127.0.0.1
CLIENT_BEHIND_NGINX = "127.0.0.3"


def readme_block(language: str) -> str:
    """The fenced ``language`` block of the README's "Behind a proxy" section."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Behind a proxy", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, f"README's 'Behind a proxy' section should hold one {language} block"
    return blocks[0]


@dataclass
class Proxy:
    """A proxy process in the foreground; ``urls`` by configuration name."""

    name: str
    command: list[str]
    workdir: Path
    urls: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Proxy:
        with open(self.workdir / "proxy.log", "wb") as log:
            self.process = subprocess.Popen(self.command, cwd=self.workdir, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        pending = [int(url.rsplit(":", 1)[1]) for url in self.urls.values()]
        while pending:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", pending[0]), timeout=1).close()
                pending.pop(0)
            except OSError:
                time.sleep(0.05)
        return self

    def log(self) -> str:
        return (self.workdir / "proxy.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def need(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(PROBLEMS.get(program, f"{program} is not installed (apt-get install -y {program})"))


@pytest.fixture(scope="module")
def server(start_server) -> ServerProcess:
    return start_server(
        "--model", "tiny", "--workers", "1", "--max-batch", "2", "--heartbeat-interval", str(HEARTBEAT_SECONDS),
        "--sizes", "1024x576,768x432,512x288",
    )


@pytest.fixture(scope="module")
def nginx(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    need("nginx")
    prefix = tmp_path_factory.mktemp("nginx")
    ports = {name: free_port() for name in NGINX_CONFIGS}
    upstream = f"127.0.0.1:{server.port}"
    readme = readme_block("nginx").replace("listen 8080;", f"listen 127.0.0.1:{ports['readme']};").replace("127.0.0.1:8000", upstream)
    temp_paths = "\n".join(f"    {kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (prefix / "nginx.conf").write_text(
        f"""{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
{temp_paths}
    # (a) proxy_pass and nothing else: HTTP/1.0 to the server, buffering on
    server {{
        listen 127.0.0.1:{ports['bare']};
        location / {{ proxy_pass http://{upstream}; }}
    }}
    # (b) the README's block
{readme}
    # (c) a read timeout longer than the heartbeat interval, shorter than the job
    server {{
        listen 127.0.0.1:{ports['short_timeout']};
        location / {{ proxy_pass http://{upstream}; proxy_read_timeout {PROXY_READ_TIMEOUT_SECONDS}s; }}
    }}
}}
"""
    )
    command = ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log"), "-g", "daemon off;"]
    proxy = Proxy("nginx", command, prefix, {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def caddy(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    need("caddy")
    home = tmp_path_factory.mktemp("caddy")
    port = free_port()
    site = readme_block("caddy").replace(":8080", f":{port}").replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    # No admin endpoint (it would take the fixed port 2019) and loopback only.
    (home / "Caddyfile").write_text("{\n\tadmin off\n\tdefault_bind 127.0.0.1\n}\n\n" + site)
    env = {"HOME": str(home), "XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config")}
    command = ["caddy", "run", "--config", str(home / "Caddyfile"), "--adapter", "caddyfile"]
    proxy = Proxy("caddy", command, home, {"readme": f"http://127.0.0.1:{port}"}, env).start()
    yield proxy
    proxy.stop()


@dataclass
class Answer:
    status_line: str
    headers: dict[str, str]
    body: bytes
    seconds: float


def read_head(path: Path) -> tuple[str, dict[str, str]]:
    """curl's ``-D`` file: the last head in it (an interim ``100 Continue`` comes first)."""
    head = path.read_text(errors="replace").strip().split("\r\n\r\n")[-1].splitlines()
    return head[0], {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in head[1:] if ":" in line)}


def curl_command(url: str, body: dict, head: Path, *options: str) -> list[str]:
    return ["curl", "-sS", "-D", str(head), "-H", "Content-Type: application/json", "--data-binary", json.dumps(body), *options, url + "/generate"]


@pytest.fixture(scope="module")
def forty_images(server: ServerProcess, nginx: Proxy, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Answer]:
    """One 40-image base64 job, followed at once through each nginx configuration and by
    ``curl --http1.0`` straight at the server (``direct``); answers by route."""
    folder = tmp_path_factory.mktemp("forty")
    key = ["-H", f"Idempotency-Key: proxies-{uuid.uuid4()}"]
    routes = {"direct": (server.url, ["--http1.0"]), **{name: (nginx.urls[name], []) for name in NGINX_CONFIGS}}
    running = {}
    for route, (url, options) in routes.items():
        command = curl_command(url, FORTY_IMAGES, folder / f"{route}.head", *key, *options, "-o", str(folder / f"{route}.body"))
        running[route] = (time.monotonic(), subprocess.Popen(command, stderr=subprocess.PIPE))
    answers = {}
    for route, (started, process) in running.items():
        _, error = process.communicate(timeout=600)
        assert process.returncode == 0, f"curl through {route}: {error.decode()}\n{nginx.log()}"
        status_line, headers = read_head(folder / f"{route}.head")
        answers[route] = Answer(status_line, headers, (folder / f"{route}.body").read_bytes(), time.monotonic() - started)
    return answers


def images_of(answer: Answer) -> list[str]:
    """The answer's images, after checking it is the whole 40-image success, heartbeats first."""
    assert answer.status_line.split()[1] == "200", answer.status_line
    assert answer.body[:1] == b" ", "the answer should start with heartbeat spaces"
    data = json.loads(answer.body)
    assert data["success"] is True and data["count"] == 40, data.get("detail")
    assert data["seeds"] == list(range(7, 47))
    for image in data["images"]:
        assert base64.b64decode(image)[:8] == PNG_SIGNATURE
    return data["images"]


@pytest.mark.parametrize("config", NGINX_CONFIGS)
def test_forty_base64_images_arrive_whole_through_nginx(forty_images: dict[str, Answer], config: str) -> None:
    answer = forty_images[config]
    assert images_of(answer) == images_of(forty_images["direct"])
    assert answer.headers["cache-control"] == "no-cache, no-transform"
    if config == "short_timeout":  # else the test proves nothing about the read timeout
        assert answer.seconds > PROXY_READ_TIMEOUT_SECONDS, (
            f"the job took {answer.seconds:.1f} s, not longer than proxy_read_timeout: make FORTY_IMAGES bigger"
        )


def test_curl_http10_gets_heartbeats_close_delimited(forty_images: dict[str, Answer]) -> None:
    answer = forty_images["direct"]
    assert answer.status_line.startswith("HTTP/1.0 200"), answer.status_line
    assert "transfer-encoding" not in answer.headers and "content-length" not in answer.headers
    assert answer.headers["connection"] == "close"
    assert answer.headers["x-accel-buffering"] == "no" and answer.headers["cache-control"] == "no-cache, no-transform"
    assert len(images_of(answer)) == 40


@dataclass
class Stream:
    status_line: str
    headers: dict[str, str]
    lines: list[dict]
    # GET /jobs/{id}, asked straight at the server the moment the first image line arrived
    job_when_first_image_arrived: dict


def stream_ndjson(server: ServerProcess, url: str, folder: Path, *options: str) -> Stream:
    head = folder / f"ndjson-{uuid.uuid4()}.head"
    command = curl_command(url, NDJSON_REQUEST, head, "-N", "-H", "Accept: application/x-ndjson", *options)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    lines: list[dict] = []
    job_then: dict = {}
    for raw in process.stdout:
        line = json.loads(raw)
        assert "type" in line, (read_head(head), line)
        lines.append(line)
        if line["type"] == "image" and not job_then:
            job_then = requests.get(f"{server.url}/jobs/{lines[0]['job_id']}", timeout=30).json()
    _, error = process.communicate(timeout=120)
    assert process.returncode == 0, error.decode()
    return Stream(*read_head(head), lines, job_then)


STREAM_ROUTES = ("nginx-bare", "nginx-readme", "nginx-short_timeout", "caddy-readme", "direct-http1.0")


@pytest.mark.parametrize("route", STREAM_ROUTES)
def test_ndjson_lines_arrive_while_the_job_runs(
    route: str, server: ServerProcess, nginx: Proxy, caddy: Proxy, tmp_path: Path
) -> None:
    proxy, _, config = route.partition("-")
    if proxy == "direct":
        url, options = server.url, ("--http1.0",)
    else:
        url, options = {"nginx": nginx, "caddy": caddy}[proxy].urls[config], ()
    stream = stream_ndjson(server, url, tmp_path, *options)
    assert stream.status_line.split()[1] == "200", stream.status_line
    assert stream.headers["content-type"].startswith("application/x-ndjson")
    assert stream.headers["cache-control"] == "no-cache, no-transform"
    kinds = [line["type"] for line in stream.lines]
    assert kinds[0] == "job" and kinds[-1] == "summary" and kinds.count("image") == 6, kinds
    assert stream.lines[-1]["success"] is True
    # The first image line came while later shards were still to be made: not held back to the end.
    job = stream.job_when_first_image_arrived
    assert job["state"] != "done" and job["images_done"] < job["images_total"], job

    links = [line["url"] for line in stream.lines if line["type"] == "image"]
    if config == "readme" or proxy == "direct":  # the README's configs carry the proxy's own port
        assert all(link.startswith(url + "/images/") for link in links), (url, links)
    image = requests.get(links[0], timeout=30)
    assert image.status_code == 200 and image.content[:8] == PNG_SIGNATURE
    if proxy == "direct":
        assert stream.status_line.startswith("HTTP/1.0 200")
        assert "transfer-encoding" not in stream.headers and stream.headers["connection"] == "close"
        assert stream.headers["x-accel-buffering"] == "no"


@pytest.fixture(scope="module")
def url_job(server: ServerProcess) -> str:
    """A finished one-image url job; GET /jobs/{id} builds its links for each request anew."""
    answer = requests.post(server.url + "/generate", json={"prompts": ["a kite"], "size": "512x288", "return_format": "url"}, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()["job_id"]


def get_from(source: str, port: int, path: str, headers: dict[str, str]) -> dict:
    """GET from a chosen loopback source address, as another machine's peer would be."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        assert response.status == 200, response.read()
        return json.loads(response.read())
    finally:
        connection.close()


def access_line(server: ServerProcess, client: str) -> dict:
    """The access-log line of the request whose client was ``client`` (each test's own address)."""
    deadline = time.monotonic() + 30  # the line is written as the handler returns, just after the body
    while True:
        for text in server.log().splitlines():
            if "service.access" in text and f'"client": "{client}"' in text:
                return json.loads(text[text.index("{"):])
        assert time.monotonic() < deadline, f"no access-log line with client {client}"
        time.sleep(0.05)


SPOOFED = {
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Port": "444",
    "X-Forwarded-For": "6.6.6.6",
    "Forwarded": "for=6.6.6.7;host=evil.example;proto=https",
}


def test_forwarded_headers_from_an_untrusted_peer_are_ignored(server: ServerProcess, url_job: str) -> None:
    job = get_from(UNTRUSTED_PEER, server.port, f"/jobs/{url_job}", SPOOFED)
    assert job["images"][0].startswith(server.url + "/images/"), job["images"]
    line = access_line(server, UNTRUSTED_PEER)
    assert line["peer"] == UNTRUSTED_PEER
    # the same headers from a trusted peer (127.0.0.1, the default) do count
    trusted = requests.get(f"{server.url}/jobs/{url_job}", headers=SPOOFED, timeout=30).json()
    assert trusted["images"][0].startswith("https://evil.example:444/images/"), trusted["images"]


def test_links_and_client_address_behind_nginx_on_its_own_port(server: ServerProcess, nginx: Proxy, url_job: str) -> None:
    """Through the README's block, from a client at 127.0.0.3 that also sends a spoofed X-Forwarded-For
    and X-Forwarded-Host: nginx replaces the host and appends the address it saw."""
    port = int(nginx.urls["readme"].rsplit(":", 1)[1])
    job = get_from(CLIENT_BEHIND_NGINX, port, f"/jobs/{url_job}", {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil.example"})
    assert job["images"][0].startswith(f"http://127.0.0.1:{port}/images/"), job["images"]
    line = access_line(server, CLIENT_BEHIND_NGINX)
    assert line["peer"] == "127.0.0.1" and line["route"] == "/jobs/{job_id}"
    image = requests.get(job["images"][0], timeout=30)
    assert image.status_code == 200 and image.content[:8] == PNG_SIGNATURE
