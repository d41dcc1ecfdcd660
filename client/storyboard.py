"""What to make: a prompts file read into shots, and the name each image is saved under.

Two kinds of file:
- text: one prompt per line; blank lines and lines starting with ``#`` are skipped;
- CSV (a name ending in ``.csv``): a storyboard, with a header row naming the columns ``name``,
  ``prompt`` and, optionally, ``seed`` (the seed of that shot's first image); other columns, such
  as notes or durations, are left alone. Excel's "CSV" with semicolons reads too.

Both must be UTF-8. A byte order mark (Windows Notepad and Excel's "CSV UTF-8" write one) is
dropped, so it never ends up in the first prompt; a file in another encoding is refused with a
sentence that says how to save it, rather than guessed at.

Images are saved as ``<index>_<slug of the shot's name>_<seed>.<extension>``
(``012_castle-at-dawn_4242.webp``), or ``<index>_<seed>.<extension>`` for a shot without a name:
the index sorts them in the order of the file, the seed makes the image again.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from dataclasses import dataclass

from client.api import ClientError

BOM = "\ufeff"
SEED_SPACE = 2**32
CSV_SUFFIX = ".csv"
CSV_COLUMNS = "name,prompt[,seed]"
# Long enough to tell shots apart, short enough for a file browser's column.
MAX_SLUG_CHARS = 48
_NOT_SLUG = re.compile(r"[\W_]+")
SAVE_AS_UTF8 = (
    "save it as UTF-8 and run again (Notepad: File > Save As, Encoding: UTF-8; Excel: Save As, "
    "\"CSV UTF-8 (Comma delimited)\"; iconv -f <encoding> -t UTF-8)"
)


@dataclass(frozen=True)
class Shot:
    """One prompt of the file. ``seed``: its first image's seed when the storyboard gives one
    (None: the run's seed plus the image's index); ``line``: where it is, for messages."""

    prompt: str
    name: str = ""
    seed: int | None = None
    line: int = 0


def decode(data: bytes, source: str) -> str:
    """``data`` as text: UTF-8, with a leading byte order mark dropped; anything else is a
    ``ClientError`` (exit 2) that says where the first foreign byte is and how to fix the file."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ClientError(f"{source} is UTF-16 text (Notepad's \"Unicode\"), not UTF-8: {SAVE_AS_UTF8}", exit_code=2)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ClientError(
            f"{source} is not UTF-8 text (line {line} has the byte 0x{data[exc.start]:02x}, which UTF-8 does not allow "
            f"there; Windows-1252 or Latin-1, perhaps): {SAVE_AS_UTF8}",
            exit_code=2,
        ) from None
    return text.removeprefix(BOM)


def is_storyboard(source: str) -> bool:
    return source.lower().endswith(CSV_SUFFIX)


def parse_text(text: str) -> tuple[Shot, ...]:
    """One shot per line that is neither blank nor a ``#`` comment."""
    return tuple(
        Shot(line.strip(), line=number)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    )


def parse_storyboard(text: str, source: str) -> tuple[Shot, ...]:
    """The rows of a ``name,prompt[,seed]`` CSV after its header row. Blank rows and rows whose
    first cell starts with ``#`` are skipped; a row without a prompt or with a bad seed is a
    ``ClientError`` naming its line."""
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = ";" if ";" in first_line and "," not in first_line else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns: dict[str, int] | None = None
    shots = []
    try:
        for row in reader:
            cells = [cell.strip() for cell in row]
            if not any(cells) or cells[0].startswith("#"):
                continue
            if columns is None:
                columns = _columns(cells, source)
                continue
            shots.append(_shot(cells, columns, reader.line_num, source))
    except csv.Error as exc:
        raise ClientError(f"{source} line {reader.line_num} is not valid CSV: {exc}", exit_code=2) from None
    return tuple(shots)


def _columns(header: list[str], source: str) -> dict[str, int]:
    names = [cell.lower() for cell in header]
    if "name" not in names or "prompt" not in names:
        raise ClientError(
            f"{source}: the first row must name the columns {CSV_COLUMNS} (a storyboard CSV has a header row); "
            f"it is: {','.join(header)}",
            exit_code=2,
        )
    doubled = sorted({name for name in names if name in ("name", "prompt", "seed") and names.count(name) > 1})
    if doubled:
        raise ClientError(f"{source}: the header row names the column {doubled[0]!r} twice", exit_code=2)
    return {name: names.index(name) for name in ("name", "prompt", "seed") if name in names}


def _shot(cells: list[str], columns: dict[str, int], line: int, source: str) -> Shot:
    def cell(column: str) -> str:
        at = columns.get(column)
        return cells[at] if at is not None and at < len(cells) else ""

    name, prompt, seed_text = cell("name"), cell("prompt"), cell("seed")
    where = f"{source} line {line}" + (f" (shot {name!r})" if name else "")
    if not prompt:
        raise ClientError(f"{where} has no prompt", exit_code=2)
    seed = None
    if seed_text:
        try:
            seed = int(seed_text)
        except ValueError:
            seed = -1
        if not 0 <= seed < SEED_SPACE:
            raise ClientError(f"{where}: the seed {seed_text!r} is not a whole number from 0 to {SEED_SPACE - 1}", exit_code=2)
    return Shot(prompt, name, seed, line)


def read_shots(source: str, data: bytes) -> tuple[Shot, ...]:
    """The shots of a prompts file's bytes (``source`` is its name; a ``.csv`` is a storyboard)."""
    text = decode(data, source)
    shots = parse_storyboard(text, source) if is_storyboard(source) else parse_text(text)
    if not shots:
        what = f"no shot (a header row {CSV_COLUMNS}, then one shot a row)" if is_storyboard(source) else "no prompt (one per line; # starts a comment)"
        raise ClientError(f"{source} holds {what}", exit_code=2)
    return shots


def slug(name: str) -> str:
    """``"Castle at Dawn!"`` -> ``"castle-at-dawn"``: lower case, accents dropped, letters and
    digits of any script kept, every other run of characters one hyphen; safe in a file name on
    every system (no path separators, no reserved characters)."""
    decomposed = unicodedata.normalize("NFKD", name)
    bare = "".join(char for char in decomposed if not unicodedata.combining(char))
    text = _NOT_SLUG.sub("-", unicodedata.normalize("NFC", bare).casefold()).strip("-")
    if len(text) > MAX_SLUG_CHARS:
        cut = text[:MAX_SLUG_CHARS]
        text = cut.rsplit("-", 1)[0] if "-" in cut else cut
    return text.strip("-")


def image_stem(index: int, seed: int, total: int, shot_name: str = "") -> str:
    """``007_1234``, ``012_castle-at-dawn_4242``: the index, zero-padded so that names sort in the
    order of the file; the slug of the shot's name, if it has one; the seed."""
    label = slug(shot_name)
    middle = f"_{label}" if label else ""
    return f"{index:0{max(3, len(str(total - 1)))}d}{middle}_{seed}"


def image_name(index: int, seed: int, total: int, extension: str = "png", shot_name: str = "") -> str:
    """The file name: the stem and the extension of the image's format."""
    return f"{image_stem(index, seed, total, shot_name)}.{extension}"
