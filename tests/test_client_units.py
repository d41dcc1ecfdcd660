"""``sdxl-client`` without a server: prompts files (text, storyboard CSV, byte order marks, other
encodings), file names, how a run is cut into requests, the request body, the command line, the
Ctrl-C message, the streaming zip reader and the receipt check."""

from __future__ import annotations

import argparse
import io
import json
import re
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image
from tqdm import tqdm

from client import archive
from client.api import ClientError
from client.api import JobImage
from client.cli import Plan, Progress, Saver, build_parser, follow, interrupted, main, parse_args, resume_command
from client.images import has_receipt, image_format
from client.storyboard import Shot, decode, image_name, read_shots, slug

# ----- prompts files ----------------------------------------------------------------------------


def test_a_byte_order_mark_reads_as_if_it_were_not_there() -> None:
    plain = "# the storyboard of act one\nfirst prompt\n\nsecond prompt\n"
    with_bom = read_shots("prompts.txt", plain.encode("utf-8-sig"))
    assert with_bom == read_shots("prompts.txt", plain.encode())
    assert [shot.prompt for shot in with_bom] == ["first prompt", "second prompt"], "the comment stays a comment"
    assert read_shots("p.txt", "\ufeffÄpfel\r\nZitronen\r\n".encode())[0].prompt == "Äpfel", "no mark in the first prompt"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("Äpfel\nCafé crème\n".encode("cp1252"), "prompts.txt is not UTF-8 text (line 1 has the byte 0xc4"),
        (b"line one\nline two\nna\xefve\n", "prompts.txt is not UTF-8 text (line 3 has the byte 0xef"),
        ("prompt\n".encode("utf-16"), 'prompts.txt is UTF-16 text (Notepad\'s "Unicode"), not UTF-8'),
    ],
)
def test_a_file_that_is_not_utf8_says_so_and_how_to_save_it(data: bytes, expected: str) -> None:
    with pytest.raises(ClientError) as caught:
        decode(data, "prompts.txt")
    assert str(caught.value).startswith(expected) and caught.value.exit_code == 2
    assert "save it as UTF-8" in str(caught.value) and "Encoding: UTF-8" in str(caught.value)


def test_a_non_utf8_file_is_one_line_and_exit_2_from_the_command(tmp_path: Path, capsys) -> None:
    (tmp_path / "p.txt").write_bytes("Stillleben mit Äpfeln\n".encode("latin-1"))
    assert main([str(tmp_path / "p.txt"), "-o", str(tmp_path / "out"), "-q"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"sdxl-client: error: {tmp_path / 'p.txt'} is not UTF-8 text (line 1 has the byte 0xc4")
    assert error.count("\n") == 1 and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_a_storyboard_csv_gives_named_shots_with_their_seeds() -> None:
    text = (
        "Name, Prompt ,seed,notes\n"
        '"Castle at Dawn","a castle at dawn, mist in the valley",4242,wide\n'
        "\n"
        "# a shot left out,a prompt,1,\n"
        "The Knight,a knight in armour,,close-up\n"
        'Tavern,"she said ""cheers""\nand drank",7\n'
    )
    shots = read_shots("board.csv", text.encode("utf-8-sig"))
    assert shots == (
        Shot("a castle at dawn, mist in the valley", "Castle at Dawn", 4242, 2),
        Shot("a knight in armour", "The Knight", None, 5),
        Shot('she said "cheers"\nand drank', "Tavern", 7, 7),
    )
    semicolons = read_shots("BOARD.CSV", "name;prompt\nOne;a prompt, with a comma\n".encode("utf-8-sig"))
    assert semicolons == (Shot("a prompt, with a comma", "One", None, 2),), "Excel's CSV in a comma-decimal locale"
    no_seed_column = read_shots("b.csv", b"prompt,name\nfirst,A\n")
    assert no_seed_column == (Shot("first", "A", None, 2),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a castle,at dawn\n", "b.csv: the first row must name the columns name,prompt[,seed] (a storyboard CSV has a header row); it is: a castle,at dawn"),
        ("name,prompt,seed\nOne,,5\n", "b.csv line 2 (shot 'One') has no prompt"),
        ("name,prompt,seed\nOne,a prompt,abc\n", "b.csv line 2 (shot 'One'): the seed 'abc' is not a whole number from 0 to 4294967295"),
        ("name,prompt,seed\n,a prompt,-1\n", "b.csv line 2: the seed '-1' is not a whole number from 0 to 4294967295"),
        ("name,prompt,prompt\nOne,a,b\n", "b.csv: the header row names the column 'prompt' twice"),
        ("name,prompt\n", "b.csv holds no shot (a header row name,prompt[,seed], then one shot a row)"),
    ],
)
def test_a_bad_storyboard_names_the_line(text: str, message: str) -> None:
    with pytest.raises(ClientError) as caught:
        read_shots("b.csv", text.encode())
    assert str(caught.value) == message and caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Castle at Dawn", "castle-at-dawn"),
        ("  Café Crème! (take 2) ", "cafe-creme-take-2"),
        ("../../etc/passwd", "etc-passwd"),
        ('a:b*c?d"e<f>g|h\\i', "a-b-c-d-e-f-g-h-i"),
        ("snake_case_name", "snake-case-name"),
        ("Straße", "strasse"),
        ("城の朝", "城の朝"),
        ("ＦＵＬＬ　ｗｉｄｔｈ", "full-width"),
        ("!!!", ""),
        ("word " * 20, "word-word-word-word-word-word-word-word-word"),
    ],
)
def test_slugs_are_safe_file_name_parts(name: str, expected: str) -> None:
    assert slug(name) == expected
    assert len(slug(name)) <= 48


def test_files_are_named_by_index_shot_and_seed() -> None:
    assert image_name(12, 4242, 150, "webp", "Castle at Dawn") == "012_castle-at-dawn_4242.webp"
    assert image_name(7, 42, 150) == "007_42.png" and image_name(7, 42, 1500, "jpg") == "0007_42.jpg"
    assert image_name(3, 9, 10, "png", "???") == "003_9.png", "a name with nothing to keep: no slug part"


# ----- the run, its requests and their bodies ---------------------------------------------------


def _plan(shots: tuple[Shot, ...], n: int = 1, seed: int = 100, per_request: int = 150, **options) -> Plan:
    return Plan(shots, n, seed, None, None, per_request, **options)


def test_storyboard_seeds_decide_where_a_request_ends() -> None:
    shots = (Shot("a", "A", 500), Shot("b", "B", 501), Shot("c", "C"), Shot("d", "D"), Shot("e", "E", 7), Shot("f", "F", 8))
    chunks = _plan(shots, seed=100).chunks()
    # a, b run on (500, 501); c and d take the run's seed + their index (102, 103); e, f start again at 7.
    assert [(c.number, c.first_index, c.prompts, c.seed) for c in chunks] == [
        (0, 0, ("a", "b"), 500), (1, 2, ("c", "d"), 102), (2, 4, ("e", "f"), 7),
    ]
    plan = _plan(shots, n=2, seed=100, per_request=4)
    assert [(c.first_index, c.prompts, c.seed) for c in plan.chunks()] == [
        (0, ("a",), 500), (2, ("b",), 501), (4, ("c", "d"), 104), (8, ("e",), 7), (10, ("f",), 8),
    ]
    assert plan.stem(7, 107) == "007_d_107" and plan.stem(8, 7) == "008_e_7"
    assert plan.chunk_of_job([104, 105, 106, 107]) == plan.chunks()[2]
    assert plan.chunk_of_job([104, 105]) is None


def test_format_and_quality_reach_the_request_body() -> None:
    chunk = _plan((Shot("a"),), image_format="webp", quality=70).chunks()[0]
    body = _plan((Shot("a"),), image_format="webp", quality=70).body(chunk, "url")
    assert body == {"prompts": ["a"], "num_images_per_prompt": 1, "seed": 100, "return_format": "url", "format": "webp", "quality": 70}
    args = parse_args(["p.txt", "--format", "JPG", "--quality", "1"])
    assert (args.image_format, args.quality) == ("jpeg", 1)
    plain = _plan((Shot("a"),)).body(chunk)
    assert "format" not in plain and "quality" not in plain and "size" not in plain, "without the options, the body an old server knows"
    assert _plan((Shot("a"),), size="576x1024").body(chunk)["size"] == "576x1024"
    assert parse_args(["p.txt", "--size", "576X1024"]).size == "576x1024"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["p.txt", "--format", "gif"], "argument --format: must be one of png, webp, jpeg, not 'gif'"),
        (["p.txt", "--format", "webp", "--quality", "0"], "argument --quality: must be a whole number from 1 to 100, not '0'"),
        (["p.txt", "--format", "webp", "--quality", "101"], "argument --quality: must be a whole number from 1 to 100, not '101'"),
        (["p.txt", "--format", "jpeg", "--quality", "high"], "argument --quality: must be a whole number from 1 to 100, not 'high'"),
        (["p.txt", "--quality", "80"], "--quality applies to --format webp or jpeg; PNG is lossless and takes none"),
        (["p.txt", "--format", "png", "--quality", "80"], "--quality applies to --format webp or jpeg; PNG is lossless and takes none"),
        (["p.txt", "--size", "big"], "argument --size: must be WIDTHxHEIGHT, such as 1024x576 or 576x1024, not 'big'"),
        (["--job", "../etc"], "argument --job: '../etc' is not a job id"),
        ([], "give a prompts file, or --job ID to fetch the images of a job"),
    ],
)
def test_bad_options_are_refused_by_argparse_with_a_clear_message(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_args(argv)
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: sdxl-client") and f"sdxl-client: error: {message}" in error


def test_help_names_the_new_options() -> None:
    text = build_parser().format_help()
    assert "--format {png,webp,jpeg}" in text and "--quality 1-100" in text and "--job ID" in text and "storyboard" in text


def test_ctrl_c_says_the_job_goes_on_and_the_exact_command_that_fetches_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDXL_API_KEY", raising=False)
    args = parse_args(["my prompts.csv", "-o", "out dir", "--url", "http://gpu.example:8000", "--format", "webp", "--api-key", "k"])
    plan = _plan((Shot("a", "A"),) * 4, seed=77, per_request=2, image_format="webp")
    progress = Progress(saved=[Path("out dir/000_a_77.webp")], job_id="f" * 32, job_images=2, job_saves_from=1, images_after=0)
    message = interrupted(args, plan, progress)
    assert message.splitlines() == [
        f"sdxl-client: interrupted. 1 image(s) were saved to out dir. Job {'f' * 32} goes on on the server (0 of its 2 image(s) "
        "saved). To fetch its images, run (with your --api-key):",
        f"  sdxl-client 'my prompts.csv' --job {'f' * 32} -o 'out dir' --url http://gpu.example:8000 --seed 77 "
        "--max-images-per-request 2 --format webp",
        "sdxl-client: to stop the job instead (with SDXL_API_KEY set to your key): "
        f'curl -X DELETE -H "Authorization: Bearer $SDXL_API_KEY" http://gpu.example:8000/jobs/{"f" * 32}',
    ]
    progress.images_after = 2
    assert "To fetch its images and go on with the 2 image(s) of the file after it, run" in interrupted(args, plan, progress)
    stdin = parse_args(["-", "-o", "out"])
    assert resume_command(stdin, plan, "abc") == "sdxl-client --job abc -o out --url http://localhost:8000"
    assert interrupted(stdin, plan, Progress(sending=True)).startswith("sdxl-client: interrupted while sending a batch.")
    assert isinstance(parse_args(["--job", "abc"]), argparse.Namespace)


@pytest.mark.parametrize(
    ("argv", "environ", "stop_line"),
    [
        ([], {}, "sdxl-client: to stop the job instead: curl -X DELETE 'http://gpu.example/a b/jobs/j1'"),
        ([], {"SDXL_API_KEY": "env-secret-0123456789"},
         """sdxl-client: to stop the job instead: curl -X DELETE -H "Authorization: Bearer $SDXL_API_KEY" 'http://gpu.example/a b/jobs/j1'"""),
        (["--api-key", "flag-secret-0123456789"], {},
         "sdxl-client: to stop the job instead (with SDXL_API_KEY set to your key): "
         """curl -X DELETE -H "Authorization: Bearer $SDXL_API_KEY" 'http://gpu.example/a b/jobs/j1'"""),
    ],
    ids=["no key", "key from the environment", "key from --api-key"],
)
def test_the_ctrl_c_stop_line_names_the_key_variable_and_never_prints_the_key(
    argv: list[str], environ: dict[str, str], stop_line: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The line is pasted into a shell, often on a keyed server behind a tunnel: without the header
    it would get 401; with the key written out, the key would sit in the scrollback."""
    monkeypatch.delenv("SDXL_API_KEY", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    args = parse_args(["--job", "j1", "-o", "out", "--url", "http://gpu.example/a b/", *argv])
    message = interrupted(args, None, Progress(job_id="j1", job_images=1))
    assert message.splitlines()[-1] == stop_line
    assert "secret" not in message


# ----- the streaming zip reader -----------------------------------------------------------------


def _zipped(entries: dict[str, bytes], method: int = zipfile.ZIP_STORED, streamed: bool = True) -> bytes:
    """A zip as a server streams it (sizes in data descriptors after the data) or as a file."""

    class Unseekable(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # type: ignore[override]
            self.data += b
            return len(b)

    sink = Unseekable() if streamed else io.BytesIO()
    with zipfile.ZipFile(sink, "w", compression=method) as zip_file:
        for name, data in entries.items():
            with zip_file.open(name, "w") as entry:
                entry.write(data)
    return bytes(sink.data) if streamed else sink.getvalue()


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("streamed", [True, False])
def test_zip_entries_are_read_as_they_arrive(method: int, streamed: bool) -> None:
    # An image whose bytes hold a descriptor signature: only the one with the right CRC and size counts.
    tricky = b"\x89PNG" + archive.DATA_DESCRIPTOR + b"\x00" * 20 + bytes(range(256)) * 40
    entries = {"manifest.json": b'{"images": []}', "0000_1.png": tricky, "0001_2.png": b"x" * 70000}
    data = _zipped(entries, method, streamed)
    for piece in (1, 7, 65536):
        assert dict(archive.entries(_pieces(data, piece))) == entries


def test_a_cut_zip_gives_the_whole_entries_then_says_it_was_cut() -> None:
    entries = {"manifest.json": b"{}", "0000_1.png": b"a" * 5000, "0001_2.png": b"b" * 5000}
    data = _zipped(entries)
    second = data.index(b"PK\x03\x04", data.index(b"0000_1.png"))
    got = []
    with pytest.raises(archive.Truncated):
        for name, content in archive.entries(_pieces(data[: second + 2000], 1000)):
            got.append(name)
    assert got == ["manifest.json", "0000_1.png"]
    sizes = {"0000_1.png": 5000, "0001_2.png": 5000}
    assert dict(archive.entries([data], sizes.get)) == entries, "sizes the caller knows (the manifest's) are used"


def test_a_damaged_zip_is_an_archive_error() -> None:
    data = bytearray(_zipped({"manifest.json": b"{}", "a.png": b"a" * 100}, streamed=False))
    data[data.index(b"a" * 100) + 5] ^= 0xFF
    with pytest.raises(archive.ArchiveError, match="does not match its CRC"):
        list(archive.entries([bytes(data)]))
    with pytest.raises(archive.ArchiveError, match="expected a zip entry"):
        list(archive.entries([b"<html>Bad Gateway</html>"]))
    header = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 12, 0, 0, zlib.crc32(b""), 0, 0, 1, 0) + b"x"
    with pytest.raises(archive.ArchiveError, match="method 12"):
        list(archive.entries([header]))


# ----- images ------------------------------------------------------------------------------------


def _image(kind: str, receipt: dict | None) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (8, 4), (10, 20, 30))
    if kind == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        if receipt is not None:
            info.add_itxt("sdxl-receipt", json.dumps(receipt))
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        if receipt is not None:
            exif[0x010E] = json.dumps(receipt)
        image.save(buffer, format=kind, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize(("kind", "name"), [("PNG", "png"), ("WEBP", "webp"), ("JPEG", "jpeg")])
def test_the_receipt_is_found_in_every_format(kind: str, name: str) -> None:
    assert image_format(_image(kind, None)) == name
    assert has_receipt(_image(kind, {"prompt": "a", "seed": 1}))
    assert not has_receipt(_image(kind, None))
    assert not has_receipt(b"not an image") and image_format(b"GIF89a") is None


# ----- a scripted server of ours from before archives ---------------------------------------------


def test_a_server_without_archives_gets_the_done_jobs_links(tmp_path: Path) -> None:
    """POST /jobs carries the Idempotency-Key and the format options; a server with jobs but no
    GET /jobs/{id}/archive (404) still works: the images come from the done job's links, fetched
    from the URL the client knows (not the host in the links), and get the client's text chunks
    since they carry no receipt."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    png = _image("PNG", None)
    seen: dict[str, list] = {"posts": [], "gets": []}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen["posts"].append((self.path, self.headers.get("Idempotency-Key"), body))
            self._send(202, json.dumps({"job_id": "j1", "state": "queued", "images_total": 2, "seeds": [5, 6]}).encode())

        def do_GET(self) -> None:
            seen["gets"].append(self.path)
            if self.path == "/jobs/j1":
                polls = seen["gets"].count("/jobs/j1")
                status = {"job_id": "j1", "state": "running" if polls == 1 else "done", "images_done": polls, "images_total": 2, "seeds": [5, 6]}
                if polls > 1:
                    status["images"] = ["http://elsewhere.invalid/images/a.png", "http://elsewhere.invalid/images/b.png"]
                self._send(200, json.dumps(status).encode())
            elif self.path.startswith("/images/"):
                self._send(200, png, "image/png")
            else:
                self._send(404, b'{"detail": "Not found."}')

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        (tmp_path / "p.txt").write_text("one prompt\n")
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        arguments = [str(tmp_path / "p.txt"), "-o", str(tmp_path / "out"), "--url", url, "--seed", "5", "-n", "2", "--format", "webp", "--quality", "70", "-q"]
        assert main(arguments) == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
    [(path, key, body)] = seen["posts"]
    assert path == "/jobs" and re.fullmatch(r"sdxl-client-[0-9a-f]{24}-0", key)
    assert body == {"prompts": ["one prompt"], "num_images_per_prompt": 2, "seed": 5, "return_format": "url", "format": "webp", "quality": 70}
    assert "/jobs/j1/archive?since=0" in seen["gets"] and seen["gets"][-2:] == ["/images/a.png", "/images/b.png"]
    for name, seed in (("000_5.png", "5"), ("001_6.png", "6")):
        with Image.open(tmp_path / "out" / name) as image:
            assert image.text == {"prompt": "one prompt", "seed": seed}


# ----- the job follower against a scripted server -------------------------------------------------


class _Scripted:
    """A loopback HTTP server answering each path (query included) with its next scripted answer
    (the last one repeats); ``asked`` lists the paths in order."""

    def __init__(self, answers: dict[str, list[tuple[int, bytes]]]) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.asked: list[str] = []
        script = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                script.asked.append(self.path)
                queue = answers.get(self.path) or [(404, b'{"detail": "Not found."}')]
                status, body = queue.pop(0) if len(queue) > 1 else queue[0]
                self.send_response(status)
                self.send_header("Content-Type", "application/zip" if body.startswith(b"PK") else "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _job_archive(images: dict[int, bytes], since: int = 0, damaged: bool = False) -> bytes:
    import hashlib

    files = {f"{index:04d}_{100 + index}.png": (index, data) for index, data in sorted(images.items()) if index >= since}
    manifest = {"job_id": "j", "since": since, "images": [
        {"index": index, "file": name, "prompt": f"p{index}", "seed": 100 + index, "bytes": len(data),
         "sha256": hashlib.sha256(data + (b"!" if damaged else b"")).hexdigest(), "receipt": None}
        for name, (index, data) in files.items()
    ]}
    return _zipped({"manifest.json": json.dumps(manifest).encode(), **{name: data for name, (_, data) in files.items()}})


def _status(state: str, done: int, total: int = 4) -> tuple[int, bytes]:
    return 200, json.dumps({"job_id": "j", "state": state, "images_done": done, "images_total": total, "seeds": [100, 101, 102, 103]}).encode()


def test_images_that_finish_out_of_order_are_each_saved_once() -> None:
    from client.api import GenerateClient

    images = {index: _image("PNG", {"prompt": f"p{index}", "seed": 100 + index}) for index in range(4)}
    server = _Scripted({
        "/jobs/j": [_status("running", 2), _status("done", 4)],
        # A second worker finished images 2 and 3 first; the next archive from 0 holds all four.
        "/jobs/j/archive?since=0": [(200, _job_archive({2: images[2], 3: images[3]})), (200, _job_archive(images))],
    })
    got: list[int] = []
    have: set[int] = set()
    try:
        client = GenerateClient(server.url, on_retry=lambda message: None, sleep=lambda seconds: None)
        status = client.follow_job("j", have, lambda image: got.append(image.index), lambda done, total: None)
    finally:
        server.close()
    assert status["state"] == "done" and have == {0, 1, 2, 3}
    assert got == [2, 3, 0, 1], "each image handed over once, as it arrived"
    assert server.asked == ["/jobs/j", "/jobs/j/archive?since=0", "/jobs/j", "/jobs/j/archive?since=0"]


def test_an_image_that_does_not_match_its_sha256_is_an_error_not_a_file() -> None:
    from client.api import GenerateClient

    server = _Scripted({"/jobs/j": [_status("done", 1, total=1)], "/jobs/j/archive?since=0": [(200, _job_archive({0: b"x" * 10}, damaged=True))]})
    try:
        client = GenerateClient(server.url, on_retry=lambda message: None, sleep=lambda seconds: None)
        with pytest.raises(ClientError, match="the archive of job j is damaged: 0000_100.png does not match the sha256 of its manifest"):
            client.follow_job("j", set(), lambda image: pytest.fail("a damaged image was handed over"), lambda done, total: None)
    finally:
        server.close()


def test_a_ctrl_c_right_after_a_file_is_saved_counts_that_file(tmp_path: Path) -> None:
    """The count of the job's saved images comes from the saved files themselves: an interrupt that
    lands just after a save (before anything else ran) still counts it (it used to say 0 of 8)."""

    class OneImageThenCtrlC:
        def follow_job(self, job_id, have, on_image, on_progress):  # type: ignore[no-untyped-def]
            picture = io.BytesIO()
            Image.new("RGB", (8, 8)).save(picture, format="PNG")
            on_image(JobImage(0, 5, "a", picture.getvalue()))
            raise AssertionError("not reached")

    class InterruptedSaver(Saver):
        def save(self, stem: str, prompt: str, seed: int, data: bytes) -> Path:
            path = super().save(stem, prompt, seed, data)
            raise KeyboardInterrupt  # the very next thing after the file is in place

    progress = Progress()
    with tqdm(disable=True) as bar:
        saver = InterruptedSaver(tmp_path, bar, True, progress)
        with pytest.raises(KeyboardInterrupt):
            follow(OneImageThenCtrlC(), "j" * 32, stem=lambda i, seed: f"{i:03d}_{seed}", prompt=lambda i: None,  # type: ignore[arg-type]
                   images=8, seeds=range(5, 13), first_index=0, saver=saver, from_disk=False)
    assert (tmp_path / "000_5.png").exists()
    message = interrupted(parse_args(["--job", "j" * 32, "-o", str(tmp_path)]), None, progress)
    assert f"1 image(s) were saved to {tmp_path}. Job {'j' * 32} goes on on the server (1 of its 8 image(s) saved)" in message

