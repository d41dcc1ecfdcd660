"""Issue 24 (image metadata where the tools look) and issue 25 (receipts that always fit), read
the way users read them: Debian's exiftool (``-validate``), A1111's own EXIF reader (``piexif`` and
``piexif.helper.UserComment``, as in A1111's ``read_info_from_image``), Pillow.

The encoder runs in the test's process on a real picture; one real server (tiny model, one worker,
``--max-prompt-chars 3000``) shows that the longest prompts it accepts come back as images, never
as a 500.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import piexif
import piexif.helper
import pytest
import requests
from PIL import Image

from gpu_workers.encoding import encode, parameters_line, read_receipt, receipt_exif
from gpu_workers.exif import JPEG_EXIF_LIMIT, USER_COMMENT_UNICODE
from gpu_workers.messages import ShardTask
from gpu_workers.receipts import WorkerFacts, cut_prompts, receipt
from tests.debian_packages import PROBLEMS
from tests.fake_transport import fake_picture
from tests.server_process import ServerProcess

FORMATS = ("png", "webp", "jpeg")
PROMPT = 'a lighthouse at dusk, "fog", 霧の灯台 😺'
LONGEST = 3000  # the server's --max-prompt-chars below
EMOJI_PROMPT = "😺" * LONGEST  # 4 bytes in UTF-8 and in UTF-16, 12 as a JSON \u escape pair
CJK_NEGATIVE = "霧" * (LONGEST - 1) + "😺"


def fields_for(image_format: str, prompt: str = PROMPT, negative: str | None = "blurry, ぼやけた") -> dict[str, Any]:
    """A receipt as a worker makes it (``gpu_workers.receipts.receipt``)."""
    task = ShardTask("request", 0, 0, (prompt,), (1234,), negative, 0.0, image_format=image_format, quality=85 if image_format != "png" else None)
    facts = WorkerFacts("tiny", "sha256:0123456789abcdef", "cpu", "2.13.0", "0.42.1", "float32", "")
    return receipt(task, 0, facts, task.quality)


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    """Noise at the default size: what the tiny model's images are like, and the costliest to encode."""
    return fake_picture(7, 576).resize((1024, 576))


def exiftool(*paths: Path) -> list[dict[str, Any]]:
    """exiftool's validation and the tags the tools read, as JSON, one object per file."""
    program = shutil.which("exiftool")
    if program is None:
        pytest.skip(PROBLEMS.get("exiftool", "exiftool (Debian package libimage-exiftool-perl) is not installed"))
    command = [program, "-j", "-a", "-G1", "-validate", "-warning", "-ImageDescription", "-UserComment", "-Parameters", "-Sdxl-receipt", *map(str, paths)]
    ran = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)


def exif_of(data: bytes) -> bytes:
    """The image's EXIF block as JPEG's APP1 holds it (``Exif\\0\\0``, then the TIFF header)."""
    with Image.open(io.BytesIO(data)) as image:
        exif = image.info["exif"]
    return exif if exif.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + exif


def test_exiftool_validates_every_format_and_reads_the_receipt_and_parameters(picture: Image.Image, tmp_path: Path) -> None:
    """``exiftool -validate -warning -a``: no warning for PNG, WebP or JPEG (JPEG's IFD0 needs
    XResolution, YResolution, ResolutionUnit, YCbCrPositioning; its Exif IFD the version tags);
    and exiftool reads the JSON receipt and A1111's parameters text, emoji and CJK intact."""
    paths, fields = [], {}
    for image_format in FORMATS:
        fields[image_format] = fields_for(image_format)
        path = tmp_path / f"image.{image_format}"
        path.write_bytes(encode(picture, image_format, fields[image_format]["quality"], fields[image_format]))
        paths.append(path)
    for path, found in zip(paths, exiftool(*paths), strict=True):
        image_format = path.suffix[1:]
        assert found["ExifTool:Validate"] == "OK", found
        assert not [key for key in found if "Warning" in key], found
        if image_format == "png":
            assert json.loads(found["PNG:Sdxl-receipt"]) == fields["png"]
            assert found["PNG:Parameters"] == parameters_line(fields["png"])
        else:
            assert json.loads(found["IFD0:ImageDescription"]) == fields[image_format]
            assert found["ExifIFD:UserComment"] == parameters_line(fields[image_format])
            assert PROMPT in found["ExifIFD:UserComment"]


@pytest.mark.parametrize("image_format", ["webp", "jpeg"])
def test_a1111_reads_the_parameters_from_exif_user_comment(picture: Image.Image, image_format: str) -> None:
    """A1111 (and the tools that copy its reader) take ``parameters`` from EXIF UserComment through
    ``piexif.helper.UserComment.load``: the 8-byte ``UNICODE\\0`` code, then UTF-16 big-endian,
    the byte order of the block itself (``MM``). Pillow still reads the JSON receipt beside it."""
    fields = fields_for(image_format)
    data = encode(picture, image_format, 85, fields)
    exif = exif_of(data)
    assert exif.startswith(b"Exif\x00\x00MM"), "big-endian, as piexif and Pillow write it"
    loaded = piexif.load(exif)
    raw = loaded["Exif"][piexif.ExifIFD.UserComment]
    assert isinstance(raw, bytes) and raw.startswith(USER_COMMENT_UNICODE), "UNDEFINED bytes with the character code"
    assert raw[8:].decode("utf-16-be") == parameters_line(fields)
    assert piexif.helper.UserComment.load(raw) == parameters_line(fields)
    assert loaded["0th"][piexif.ImageIFD.XResolution] == (72, 1) and loaded["0th"][piexif.ImageIFD.YCbCrPositioning] == 1
    assert read_receipt(data) == fields


def test_same_receipt_same_bytes(picture: Image.Image) -> None:
    """No clock and no host in the metadata: the same seed and settings give the same bytes."""
    for image_format in FORMATS:
        fields = fields_for(image_format)
        assert encode(picture, image_format, fields["quality"], fields) == encode(picture, image_format, fields["quality"], dict(fields)), image_format


def test_the_longest_prompts_fit_every_format_and_jpeg_says_what_it_cut(picture: Image.Image, tmp_path: Path) -> None:
    """3,000 emoji and 3,000 CJK characters: 72 KB of JSON, over JPEG's 64 KiB EXIF segment. JPEG
    keeps as much of both prompts as fits, says so with the whole texts' sha256, and still
    validates; WebP and PNG keep them whole."""
    whole = {}
    for image_format in FORMATS:
        fields = fields_for(image_format, EMOJI_PROMPT, CJK_NEGATIVE)
        data = encode(picture, image_format, fields["quality"], fields)
        (tmp_path / f"long.{image_format}").write_bytes(data)
        found = read_receipt(data)
        assert found is not None, image_format
        whole[image_format] = (fields, found)
    for image_format in ("png", "webp"):
        fields, found = whole[image_format]
        assert found == fields, f"{image_format} keeps the whole receipt"
    fields, found = whole["jpeg"]
    assert found["prompt_truncated"] is True and found["negative_prompt_truncated"] is True
    assert found["prompt_sha256"] == hashlib.sha256(EMOJI_PROMPT.encode()).hexdigest()
    assert found["negative_prompt_sha256"] == hashlib.sha256(CJK_NEGATIVE.encode()).hexdigest()
    kept = len(found["prompt"])
    assert 0 < kept < LONGEST and EMOJI_PROMPT.startswith(found["prompt"]) and CJK_NEGATIVE.startswith(found["negative_prompt"])
    assert {key: value for key, value in found.items() if "prompt" not in key} == {key: value for key, value in fields.items() if "prompt" not in key}
    exif = exif_of((tmp_path / "long.jpeg").read_bytes())
    assert len(exif) <= JPEG_EXIF_LIMIT
    assert len(receipt_exif(cut_prompts(fields, kept + 1), picture.size)) > JPEG_EXIF_LIMIT, "as much of the prompts as fits"
    user_comment = piexif.helper.UserComment.load(piexif.load(exif)["Exif"][piexif.ExifIFD.UserComment])
    assert user_comment == parameters_line(cut_prompts(fields, kept)), "the parameters text is cut the same way"
    assert [entry["ExifTool:Validate"] for entry in exiftool(*(tmp_path / f"long.{f}" for f in FORMATS))] == ["OK"] * 3


def test_a_prompt_that_fits_is_never_cut(picture: Image.Image) -> None:
    """3,000 ASCII characters take 3 KB in the JSON and 6 KB in UserComment: nothing to cut."""
    fields = fields_for("jpeg", "a" * LONGEST, "b" * LONGEST)
    assert read_receipt(encode(picture, "jpeg", 85, fields)) == fields


# ----- through a real server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_prompt_server(start_server) -> ServerProcess:
    return start_server("--model", "tiny", "--workers", "1", "--max-batch", "1", "--max-prompt-chars", str(LONGEST))


def test_a_real_server_accepts_the_longest_prompts_in_every_format_and_keeps_them_whole(long_prompt_server: ServerProcess) -> None:
    """Issue 25: accepted means encoded, in every format; never accepted and then a 500. The
    image's JPEG receipt is cut; the job's own receipt (the archive's manifest) keeps every
    character. One character more is a 400 that names the field."""
    url = long_prompt_server.url
    for image_format in FORMATS:
        body = {"prompts": [EMOJI_PROMPT], "negative_prompt": CJK_NEGATIVE, "seed": 9, "format": image_format}
        answer = requests.post(f"{url}/generate", json=body, timeout=120)
        assert answer.status_code == 200, answer.text[:500]
        data = base64.b64decode(answer.json()["images"][0])
        found = read_receipt(data)
        assert found is not None and found.get("prompt_truncated", False) is (image_format == "jpeg"), image_format
        archive = requests.get(f"{url}/jobs/{answer.headers['X-Job-Id']}/archive", timeout=60)
        assert archive.status_code == 200
        with zipfile.ZipFile(io.BytesIO(archive.content)) as zipped:
            [entry] = json.loads(zipped.read("manifest.json"))["images"]
            assert zipped.read(entry["file"]) == data
        assert entry["receipt"]["prompt"] == EMOJI_PROMPT and entry["receipt"]["negative_prompt"] == CJK_NEGATIVE
        assert "prompt_truncated" not in entry["receipt"]
    over = requests.post(f"{url}/generate", json={"prompts": [EMOJI_PROMPT + "😺"], "format": "jpeg"}, timeout=60)
    assert over.status_code == 400 and "prompts[0]" in over.json()["detail"]
