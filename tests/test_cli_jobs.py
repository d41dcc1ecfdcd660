"""``sdxl-client`` against the real tiny-model server (one CPU worker, shards of 2: a job's images
are stored two at a time): connections cut mid-answer, a storyboard CSV, Ctrl-C and ``--job``."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import requests
from PIL import Image

from client.cli import main
from tests.server_process import ServerProcess

SDXL_CLIENT = Path(sys.executable).with_name("sdxl-client")
LOCAL_HEADER = b"PK\x03\x04"
METHODS = (b"GET ", b"POST", b"DELE", b"HEAD", b"PUT ")


class DroppingProxy:
    """Forwards loopback connections to the server, and cuts each connection once, as a tunnel
    does: ``rules`` maps a piece of a request line to ``cut_at(response_so_far)``, the byte offset
    of its response after which the connection is closed (None: not yet). Each rule fires once.
    With ``hold``, a connection that reaches its cut stalls there (a tunnel gone quiet) until the
    event is set, and is closed then."""

    def __init__(
        self, target_port: int, rules: dict[bytes, Callable[[bytes], int | None]], hold: threading.Event | None = None
    ) -> None:
        self.target_port = target_port
        self.rules = dict(rules)
        self.hold = hold
        self.request_lines: list[str] = []
        self.cuts: list[str] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            connection = {"rule": None, "line": "", "response": bytearray()}
            threading.Thread(target=self._up, args=(client, upstream, connection), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, connection), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, connection: dict) -> None:
        try:
            while data := client.recv(65536):
                if data.startswith(METHODS):  # a new request on this connection: its response follows
                    line = data.split(b"\r\n", 1)[0]
                    with self._lock:
                        self.request_lines.append(line.decode())
                        match = next((piece for piece in self.rules if piece in line), None)
                        connection.update(rule=self.rules.pop(match) if match else None, line=line.decode(), response=bytearray())
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(client, upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, connection: dict) -> None:
        try:
            while data := upstream.recv(65536):
                cut_at = connection["rule"]
                if cut_at is not None:
                    before = len(connection["response"])
                    connection["response"] += data
                    at = cut_at(bytes(connection["response"]))
                    if at is not None:
                        client.sendall(data[: max(0, at - before)])
                        self.cuts.append(connection["line"])
                        if self.hold is not None:
                            self.hold.wait()
                        return
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client, upstream)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def _in_the_second_image(response: bytes) -> int | None:
    """Past the manifest and the first image, 100 bytes into the second one."""
    starts = [match.start() for match in re.finditer(re.escape(LOCAL_HEADER), response)]
    return starts[2] + 100 if len(starts) >= 3 else None


def _receipt(path: Path) -> dict:
    with Image.open(path) as image:
        text = image.info.get("sdxl-receipt") or image.getexif().get(0x010E)
    return json.loads(text)


def _archive(server: ServerProcess, job_id: str) -> dict[str, bytes]:
    answer = requests.get(f"{server.url}/jobs/{job_id}/archive", timeout=30)
    assert answer.status_code == 200, answer.text
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        return {item["file"]: archive.read(item["file"]) for item in manifest["images"]}


def test_a_batch_cut_mid_submit_and_mid_archive_ends_with_every_file_once(server: ServerProcess, tmp_path: Path, capsys) -> None:
    """The submit's answer is lost (the job was made: the retry's Idempotency-Key finds it), then
    the first archive is cut half way through its second image: the first is kept, the rest
    fetched from index 1 on. Every file once, byte for byte the server's, one job."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a lighthouse in a storm, take {i}\n" for i in range(6)))
    out = tmp_path / "out"
    started = time.time()
    proxy = DroppingProxy(server.port, {b"POST /jobs": lambda response: 0, b"/archive": _in_the_second_image})
    try:
        code = main([str(prompts), "-o", str(out), "--url", proxy.url, "--seed", "500", "--format", "webp", "--quality", "60"])
    finally:
        proxy.close()
    err = capsys.readouterr().err
    assert code == 0, err
    names = [f"{i:03d}_{500 + i}.webp" for i in range(6)]
    assert sorted(path.name for path in out.iterdir()) == names, "every file once, nothing partial left"

    assert len(proxy.cuts) == 2 and proxy.cuts[0] == "POST /jobs HTTP/1.1"
    assert re.fullmatch(r"GET /jobs/\w+/archive\?since=0 HTTP/1.1", proxy.cuts[1])
    jobs = requests.get(f"{server.url}/jobs?limit=20", timeout=10).json()["jobs"]
    created = [job["job_id"] for job in jobs if job["created_at"] >= started]
    assert len(created) == 1, "the retried submit found its job instead of making a second one"
    job_id = created[0]
    assert f"job {job_id}: 6 image(s), progress at {proxy.url}/jobs/{job_id} (the server had it already: the same Idempotency-Key)" in err
    assert [line for line in proxy.request_lines if line.startswith("POST")] == ["POST /jobs HTTP/1.1"] * 2
    archives = [line for line in proxy.request_lines if "/archive" in line]
    after_cut = archives[archives.index(proxy.cuts[1]) + 1]
    assert f"/jobs/{job_id}/archive?since=1 " in after_cut, "the image saved before the cut is not fetched again"
    assert "reattaching to job" in err and f"job {job_id}: fetching its images from index 1 on (1 already saved)" in err

    stored = _archive(server, job_id)
    for index, name in enumerate(names):
        data = (out / name).read_bytes()
        assert data == stored[f"{index:04d}_{500 + index}.webp"], "the server's bytes, receipt inside, nothing added"
        receipt = _receipt(out / name)
        assert (receipt["prompt"], receipt["seed"], receipt["image_format"], receipt["quality"]) == (
            f"a lighthouse in a storm, take {index}", 500 + index, "webp", 60)


def test_a_storyboard_csv_with_a_bom_gives_files_named_after_its_shots(server: ServerProcess, tmp_path: Path) -> None:
    board = tmp_path / "act one.csv"
    board.write_text(
        "name,prompt,seed\n"
        "Castle at Dawn,\"a castle at dawn, mist in the valley\",4242\n"
        "The Knight,a knight in armour on a hill,\n"
        "Café Crème!,a cup of coffee on a marble table,\n",
        encoding="utf-8-sig",  # what Notepad and Excel's "CSV UTF-8" write
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [str(SDXL_CLIENT), str(board), "-o", str(out), "--url", server.url, "--seed", "10", "--format", "jpeg", "-q"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    expected = {
        "000_castle-at-dawn_4242.jpg": ("a castle at dawn, mist in the valley", 4242),
        "001_the-knight_11.jpg": ("a knight in armour on a hill", 11),
        "002_cafe-creme_12.jpg": ("a cup of coffee on a marble table", 12),
    }
    assert sorted(path.name for path in out.iterdir()) == sorted(expected)
    for name, (prompt, seed) in expected.items():
        receipt = _receipt(out / name)
        assert (receipt["prompt"], receipt["seed"], receipt["image_format"]) == (prompt, seed, "jpeg")


def test_ctrl_c_leaves_the_job_running_and_its_command_fetches_it_and_the_rest(server: ServerProcess, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a ship in a storm, take {i}\n" for i in range(8)))
    out = tmp_path / "out"
    # The first archive stalls after its first image, so Ctrl-C lands while the first job is being
    # fetched however fast its shards run (on a busy machine the client once fetched all four and
    # sent the second batch between the first file appearing and the signal).
    release = threading.Event()
    proxy = DroppingProxy(server.port, {b"/archive": _in_the_second_image}, hold=release)
    arguments = [str(prompts), "-o", str(out), "--url", proxy.url, "--max-images-per-request", "4", "-q"]
    run = subprocess.Popen([str(SDXL_CLIENT), *arguments], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not proxy.cuts and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.05)
        assert proxy.cuts and re.fullmatch(r"GET /jobs/\w+/archive\?since=0 HTTP/1.1", proxy.cuts[0]), proxy.request_lines
        while not any(out.glob("*.png")) and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)  # the first job has saved an image and its archive is still coming
        err = run.communicate(timeout=30)[1]
    finally:
        release.set()
    try:
        _ctrl_c_then_resume(server, proxy.url, prompts, out, run.returncode, err, tmp_path)
    finally:
        proxy.close()


def _ctrl_c_then_resume(server: ServerProcess, url: str, prompts: Path, out: Path, returncode: int, err: str, tmp_path: Path) -> None:
    assert returncode == 130, err
    assert "Traceback" not in err
    lines = err.splitlines()
    job_id = re.search(r"Job (\w+) goes on on the server", lines[0])[1]
    assert "To fetch its images and go on with the 4 image(s) of the file after it, run:" in lines[0]
    command = shlex.split(lines[1])
    assert command[:3] == ["sdxl-client", str(prompts), "--job"] and command[3] == job_id and "--seed" in command
    assert lines[2] == f"sdxl-client: to stop the job instead: curl -X DELETE {url}/jobs/{job_id}"
    assert requests.get(f"{server.url}/jobs/{job_id}", timeout=10).json()["state"] in ("queued", "running", "done")

    saved_before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    again = subprocess.run([str(SDXL_CLIENT), *command[1:]], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    seed = int(command[command.index("--seed") + 1])
    assert sorted(path.name for path in out.iterdir()) == [f"{i:03d}_{(seed + i) % 2**32}.png" for i in range(8)]
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in saved_before.items()), "files saved before are kept, not fetched again"
    for index in range(8):
        assert _receipt(out / f"{index:03d}_{(seed + index) % 2**32}.png")["prompt"] == f"a ship in a storm, take {index}"

    alone = subprocess.run([str(SDXL_CLIENT), "--job", job_id, "-o", str(tmp_path / "alone"), "--url", server.url, "-q"],
                           capture_output=True, text=True, timeout=60)
    assert alone.returncode == 0, alone.stderr
    job_seeds = requests.get(f"{server.url}/jobs/{job_id}", timeout=10).json()["seeds"]
    assert sorted(path.name for path in (tmp_path / "alone").iterdir()) == [f"{i:03d}_{s}.png" for i, s in enumerate(job_seeds)]
    digest = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in (tmp_path / "alone").iterdir()}
    assert len(set(digest.values())) == 4
