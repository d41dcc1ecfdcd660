"""``sdxl-client``: the installed console script against the real tiny-model server, and its waits
and errors against a scripted server that answers exactly what a test needs (503s, late failures)."""

from __future__ import annotations

import base64
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import pytest
import requests
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from client.cli import Plan, main
from client.png_text import add_text
from client.storyboard import Shot, image_name
from tests.server_process import ServerProcess, free_port
from tests.tcp_proxy import CuttableProxy

SDXL_CLIENT = Path(sys.executable).with_name("sdxl-client")
PROMPTS = ["baroque oil painting, a lighthouse", "a ship in a storm, chiaroscuro", "Stillleben mit Äpfeln und Zitronen ✓"]


def _png(size: tuple[int, int] = (8, 4)) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_text(source: Path | BytesIO) -> tuple[tuple[int, int], dict[str, str]]:
    """Size and text chunks of a PNG file (anything else fails the test)."""
    with Image.open(source) as image:
        assert isinstance(image, PngImageFile), f"not a PNG: {image.format}"
        return image.size, dict(image.text)


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 8
    while at < len(png):
        length = struct.unpack(">I", png[at : at + 4])[0]
        chunks.append((png[at + 4 : at + 8], png[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


# ----- pieces -----------------------------------------------------------------------------------


def test_text_chunks_are_added_and_the_image_bytes_kept() -> None:
    original = _png()
    tagged = add_text(original, {"prompt": "Äpfel ✓", "seed": "7"})
    assert [kind for kind, _ in _chunks(tagged) if kind != b"iTXt"] == [kind for kind, _ in _chunks(original)]
    assert [c for c in _chunks(tagged) if c[0] != b"iTXt"] == _chunks(original), "pixels and compression untouched"
    assert _png_text(BytesIO(tagged)) == ((8, 4), {"prompt": "Äpfel ✓", "seed": "7"})
    with pytest.raises(ValueError, match="not a PNG"):
        add_text(b"<html>", {"seed": "1"})


def test_long_files_are_split_into_requests_whose_seeds_continue() -> None:
    job = Plan(tuple(Shot(f"p{i}") for i in range(5)), 2, 2**32 - 3, None, None, max_images_per_request=4)
    chunks = job.chunks()
    assert [(c.first_index, c.prompts, c.seed) for c in chunks] == [
        (0, ("p0", "p1"), 2**32 - 3),
        (4, ("p2", "p3"), 1),
        (8, ("p4",), 5),
    ]
    assert job.body(chunks[1]) == {"prompts": ["p2", "p3"], "num_images_per_prompt": 2, "seed": 1, "return_format": "base64"}
    assert image_name(7, 42, 150) == "007_42.png" and image_name(7, 42, 1500) == "0007_42.png"


# ----- the real server --------------------------------------------------------------------------


def test_three_prompts_give_three_named_pngs_with_prompt_and_seed(server: ServerProcess, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# three prompts\n" + "\n\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = subprocess.run(
        [str(SDXL_CLIENT), str(prompts), "-o", str(out), "--url", server.url, "--seed", "100"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    names = ["000_100.png", "001_101.png", "002_102.png"]
    assert sorted(path.name for path in out.iterdir()) == names
    for name, prompt, seed in zip(names, PROMPTS, (100, 101, 102), strict=True):
        size, texts = _png_text(out / name)
        receipt = json.loads(texts["sdxl-receipt"])
        assert (size, receipt["prompt"], receipt["seed"]) == ((1024, 576), prompt, seed)
        assert "prompt" not in texts, "the server's receipt is in the image: the client adds no text chunks of its own"
    assert result.stdout.split() == [str(out / name) for name in names]
    assert "3/3" in result.stderr, "the progress bar reaches the end"
    assert "saved 3 image(s)" in result.stderr


def test_a_dropped_connection_reattaches_to_the_same_job(server: ServerProcess, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"reattach {i}" for i in range(10)) + "\n")
    proxy = CuttableProxy(server.port)
    jobs_before = server.log().count("(POST /jobs)")
    outcome: dict = {}
    run = threading.Thread(
        target=lambda: outcome.update(code=main([str(prompts), "-o", str(tmp_path / "out"), "--url", proxy.url, "--seed", "60"]))
    )
    run.start()
    server.wait_for(lambda h: h["workers"][0]["shards_in_flight"] > 0, what="the job running")
    proxy.cut()  # the tunnel drops mid-batch...
    time.sleep(2.5)
    proxy.restore()  # ...and comes back on the same address
    run.join(180)
    assert outcome["code"] == 0
    err = capsys.readouterr().err
    assert "reattaching to job" in err and "reattached to job" in err
    assert server.log().count("(POST /jobs)") == jobs_before + 1, "the batch is never sent again"
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [f"{i:03d}_{60 + i}.png" for i in range(10)]
    assert "10/10" in err


def test_a_request_the_server_refuses_is_one_clear_line(server: ServerProcess, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("x" * 2500 + "\n")
    assert main([str(prompts), "-o", str(tmp_path / "out"), "--url", server.url, "-q"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sdxl-client: error: the server refused the request (HTTP 400): prompts[0] is 2500 characters")
    assert "Traceback" not in error and error.count("\n") == 1


# ----- a scripted server ------------------------------------------------------------------------


@dataclass
class Scripted:
    """Answers each POST /generate with the next scripted (status, headers, body); records when they
    came. It has no jobs API (POST /jobs is 404), as the reference server."""

    answers: list[tuple[int, dict[str, str], bytes]]
    arrivals: list[float] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    script = Scripted([])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path == "/jobs":  # a server without jobs, like the reference: the client falls back to /generate
                self.send_error(404)
                return
            script.arrivals.append(time.monotonic())
            script.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            script.authorizations.append(self.headers.get("Authorization"))
            status, headers, body = script.answers.pop(0)
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # /health: no workers, so no progress estimate
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    script.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield script
    httpd.shutdown()
    httpd.server_close()


def _json(body: dict, heartbeats: int = 0) -> bytes:
    return b" " * heartbeats + json.dumps(body).encode()


def test_503_is_retried_after_retry_after_then_the_images_saved(scripted: Scripted, tmp_path: Path, capsys) -> None:
    busy = {"detail": "The server is busy: 600 image(s) are queued."}
    done = {"success": True, "images": [base64.b64encode(_png()).decode()], "count": 1, "seeds": [5]}
    scripted.answers = [(503, {"Retry-After": "1"}, _json(busy)), (200, {}, _json(done, heartbeats=3))]
    (tmp_path / "p.txt").write_text("one prompt\n")
    arguments = [str(tmp_path / "p.txt"), "-o", str(tmp_path / "out"), "--url", scripted.url, "--seed", "5", "--api-key", "k1", "-q"]
    assert main(arguments) == 0
    assert scripted.authorizations == ["Bearer k1", "Bearer k1"]
    assert scripted.arrivals[1] - scripted.arrivals[0] >= 1.0, "Retry-After: 1 means wait a second"
    assert scripted.bodies[0] == scripted.bodies[1], "the retry sends the same request, seed included"
    assert "server busy: The server is busy: 600 image(s) are queued. Retrying in 1 s (1/30)" in capsys.readouterr().err
    assert _png_text(tmp_path / "out" / "000_5.png") == ((8, 4), {"prompt": "one prompt", "seed": "5"})


@pytest.mark.parametrize(
    ("answer", "code", "message"),
    [
        ((200, {}, _json({"success": False, "detail": "Image generation failed: CUDA out of memory", "images": [], "count": 0}, 2)),
         1, "generation failed: Image generation failed: CUDA out of memory"),
        ((500, {}, _json({"detail": "A shard killed two workers."})), 1, "generation failed (HTTP 500): A shard killed two workers."),
        ((401, {}, _json({"detail": "The API key is not valid."})), 2,
         "the server refused the request (HTTP 401): The API key is not valid. Give the key with --api-key"),
        ((503, {"Retry-After": "1"}, _json({"detail": "No worker is ready."})), 1,
         "the server is still unavailable after 0 retries: No worker is ready."),
        ((502, {"Content-Type": "text/html"}, b"<html>Bad Gateway</html>"), 1, "generation failed (HTTP 502): <html>Bad Gateway</html>"),
    ],
)
def test_failures_are_one_clear_line_with_an_exit_code(scripted: Scripted, tmp_path: Path, capsys, answer, code, message) -> None:
    scripted.answers = [answer]
    (tmp_path / "p.txt").write_text("one prompt\n")
    assert main([str(tmp_path / "p.txt"), "-o", str(tmp_path / "out"), "--url", scripted.url, "--retries", "0", "-q"]) == code
    error = capsys.readouterr().err
    assert error.startswith(f"sdxl-client: error: {message}"), error
    assert error.count("\n") == 1 and "Traceback" not in error
    assert not list((tmp_path / "out").glob("*.png"))


def test_an_unreachable_server_says_so(tmp_path: Path, capsys) -> None:
    (tmp_path / "p.txt").write_text("one prompt\n")
    url = f"http://127.0.0.1:{free_port()}"
    assert main([str(tmp_path / "p.txt"), "-o", str(tmp_path / "out"), "--url", url, "--retries", "0", "-q"]) == 1
    expected = f"sdxl-client: error: cannot reach {url} (Connection refused): is the server running, and the URL right (--url)?\n"
    assert capsys.readouterr().err == expected


def test_a_silent_server_times_out_with_a_hint(tmp_path: Path, capsys) -> None:
    (tmp_path / "p.txt").write_text("one prompt\n")
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody ever answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        assert main([str(tmp_path / "p.txt"), "-o", str(tmp_path / "out"), "--url", url, "--timeout", "0.5", "-q"]) == 1
    assert capsys.readouterr().err == (
        f"sdxl-client: error: {url} sent nothing for 0.5 s (our server sends a heartbeat every 10 s by default): "
        "raise --timeout for a server without heartbeats\n"
    )


def test_an_empty_prompts_file_is_a_usage_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "p.txt").write_text("# nothing but comments\n\n")
    assert main([str(tmp_path / "p.txt"), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert "holds no prompt" in capsys.readouterr().err


def test_a_size_the_server_does_not_make_is_refused_before_anything_starts(server: ServerProcess, tmp_path: Path, capsys) -> None:
    """GET / names the sizes: a wrong --size is one line and exit 2, with no batch sent and no
    progress bar drawn."""
    jobs_before = requests.get(server.url + "/jobs", timeout=10).json()["jobs"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a boat\n")
    code = main([str(prompts), "--url", server.url, "--size", "1080x1920", "-o", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2
    assert f"sdxl-client: error: --size 1080x1920 is not made by {server.url}: it makes 1024x576, 576x1024, 1024x1024" in error
    assert "generating" not in error and "img/s" not in error, "no progress bar before the refusal"
    assert requests.get(server.url + "/jobs", timeout=10).json()["jobs"] == jobs_before, "no batch was sent"
    assert not (tmp_path / "out").exists()
