"""``sdxl-client PROMPTS_FILE -o OUT_DIR``: a file of prompts in, one image file per image out.

The file is text (one prompt per line) or a storyboard CSV (``name,prompt[,seed]``, see
``client.storyboard``). Each image is saved as ``<index>_<seed>.<ext>``, or
``<index>_<shot>_<seed>.<ext>`` for a named shot (index in prompt-major order over the whole file,
zero-padded; extension by format: png, webp, jpg). Our server writes a receipt (prompt, seed,
model, ...) into every image, and the bytes are saved as they came; a PNG without one (the
reference server's) gets the prompt, seed and negative prompt as PNG text chunks, so any image can
be found again and made again. Files longer than one request allows are sent as several requests
whose seeds continue where the previous one stopped: image *i* of the file gets ``seed + i``
(a storyboard row's own seed starts a request of its own). Without ``--seed`` the client draws
one and prints it, so a run can be repeated.

Each request runs as a job on the server, sent with an Idempotency-Key (so a retry never runs it
twice): the bar shows the images done as the server reports them, the images are saved as they
finish (read as a zip, ``/jobs/{id}/archive``), and a dropped connection (a tunnel cut, a server
restart) is followed by reattaching to the same job and fetching only the images not yet saved.
Ctrl-C leaves the job running on the server and prints the command that fetches it (``--job``).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import sys
import threading
import time
from base64 import b64decode
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from client.api import ClientError, GenerateClient, JobGone, JobImage
from client.images import EXTENSIONS, has_receipt, image_format
from client.png_text import add_text
from client.storyboard import SEED_SPACE, Shot, image_stem, read_shots

DEFAULT_URL = "http://localhost:8000"
API_KEY_VARIABLE = "SDXL_API_KEY"  # where the key comes from when --api-key is not given
DEFAULT_MAX_IMAGES = 150
HEALTH_POLL_SECONDS = 1.0
FORMATS = tuple(EXTENSIONS)  # png, webp, jpeg
FORMAT_ALIASES = {"jpg": "jpeg"}
MIN_QUALITY, MAX_QUALITY = 1, 100
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


@dataclass(frozen=True)
class Chunk:
    """The shots of one request, and where its images sit in the whole run."""

    number: int
    first_index: int
    shots: tuple[Shot, ...]
    seed: int

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(shot.prompt for shot in self.shots)


@dataclass(frozen=True)
class Plan:
    """The whole run: every shot of the file, and what each request asks for."""

    shots: tuple[Shot, ...]
    num_images_per_prompt: int
    seed: int
    negative_prompt: str | None
    guidance_scale: float | None
    max_images_per_request: int
    image_format: str | None = None
    quality: int | None = None
    size: str | None = None

    @property
    def total_images(self) -> int:
        return len(self.shots) * self.num_images_per_prompt

    def images_in(self, chunk: Chunk) -> int:
        return len(chunk.shots) * self.num_images_per_prompt

    def first_seed(self, position: int) -> int:
        """The seed of shot ``position``'s first image: its own, or the run's seed plus its index."""
        shot = self.shots[position]
        return shot.seed if shot.seed is not None else (self.seed + position * self.num_images_per_prompt) % SEED_SPACE

    def chunks(self) -> list[Chunk]:
        """Whole shots per request, as many as fit and as long as their seeds run on (the server
        gives image *i* of a request ``seed + i``): a storyboard row with a seed of its own that
        breaks the run starts the next request."""
        n = self.num_images_per_prompt
        per_request = self.max_images_per_request // n
        if per_request < 1:
            raise ClientError(
                f"--num-images-per-prompt {n} is more than one request may hold (--max-images-per-request {self.max_images_per_request})",
                exit_code=2,
            )
        chunks: list[Chunk] = []
        for position, shot in enumerate(self.shots):
            seed = self.first_seed(position)
            last = chunks[-1] if chunks else None
            if last is not None and len(last.shots) < per_request and (last.seed + len(last.shots) * n) % SEED_SPACE == seed:
                chunks[-1] = Chunk(last.number, last.first_index, (*last.shots, shot), last.seed)
            else:
                chunks.append(Chunk(len(chunks), position * n, (shot,), seed))
        return chunks

    def body(self, chunk: Chunk, return_format: str = "base64") -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompts": list(chunk.prompts),
            "num_images_per_prompt": self.num_images_per_prompt,
            "seed": chunk.seed,
            "return_format": return_format,
        }
        if self.negative_prompt:
            body["negative_prompt"] = self.negative_prompt
        if self.guidance_scale is not None:
            body["guidance_scale"] = self.guidance_scale
        if self.image_format is not None:
            body["format"] = self.image_format
        if self.quality is not None:
            body["quality"] = self.quality
        if self.size is not None:
            body["size"] = self.size
        return body

    def shot_of(self, index: int) -> Shot:
        return self.shots[index // self.num_images_per_prompt]

    def stem(self, index: int, seed: int) -> str:
        return image_stem(index, seed, self.total_images, self.shot_of(index).name)

    def chunk_of_job(self, seeds: Sequence[int]) -> Chunk | None:
        """The request whose images have these seeds (a job started by an earlier run of the file)."""
        for chunk in self.chunks():
            if [(chunk.seed + i) % SEED_SPACE for i in range(self.images_in(chunk))] == list(seeds):
                return chunk
        return None


@dataclass
class Progress:
    """How far the run got, for the messages of an error or a Ctrl-C: the files saved, and the
    job being followed (``sending``: a submit whose answer has not come)."""

    saved: list[Path] = field(default_factory=list)
    job_id: str | None = None
    job_images: int = 0
    # The job's images found on disk before, and where its own saves start in ``saved``: the count
    # is derived from the list, whose append is the one step of a save, so a Ctrl-C at any moment
    # counts every file that is there (a counter bumped after the save could miss the last one).
    job_had: int = 0
    job_saves_from: int = 0
    sending: bool = False
    images_after: int = 0  # images of the file after the current job's (not sent yet)

    def start_job(self, job_id: str, images: int, had: int) -> None:
        self.job_id, self.job_images, self.job_had, self.job_saves_from = job_id, images, had, len(self.saved)

    @property
    def job_saved(self) -> int:
        return self.job_had + len(self.saved) - self.job_saves_from


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value


def _image_format(text: str) -> str:
    name = FORMAT_ALIASES.get(text.strip().lower(), text.strip().lower())
    if name not in FORMATS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(FORMATS)}, not {text!r}")
    return name


def _size(text: str) -> str:
    width, _, height = text.strip().lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"must be WIDTHxHEIGHT, such as 1024x576 or 576x1024, not {text!r}")
    return f"{int(width)}x{int(height)}"


def _quality(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not MIN_QUALITY <= value <= MAX_QUALITY:
        raise argparse.ArgumentTypeError(f"must be a whole number from {MIN_QUALITY} to {MAX_QUALITY}, not {text!r}")
    return value


def _job_id(text: str) -> str:
    if not _JOB_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a job id (the 32 letters and digits POST /jobs answered)")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdxl-client",
        description="Generate one image per prompt (or several: -n) with an SDXL-Lightning API server.",
        epilog=(
            "Exit status: 0 all images saved, 1 the server or the network failed, 2 the request or the command line is wrong, "
            "130 interrupted (Ctrl-C; the job goes on on the server, and the line printed says how to fetch it)."
        ),
    )
    add = parser.add_argument
    add("prompts_file", nargs="?",
        help="UTF-8 text, one prompt per line (blank lines and lines starting with # are skipped), or a storyboard .csv "
             "with a header row name,prompt[,seed] (files are then named after the shots); - reads text from stdin")
    add("-o", "--output-dir", default="images", help="folder for the image files, created if missing (default: %(default)s)")
    add("--url", default=os.environ.get("SDXL_URL", DEFAULT_URL), help="server base URL (default: $SDXL_URL or %(default)s)")
    # No default shown here: --help must never print a key taken from the environment.
    add("--api-key", help=f"API key, if the server needs one (default: ${API_KEY_VARIABLE})")
    add("-n", "--num-images-per-prompt", type=_positive_int, default=1, help="variations per prompt (default: %(default)s)")
    add("--seed", type=int, help="seed of the first image; image i gets seed + i (default: a random one, printed)")
    add("--negative-prompt", help="what to avoid (the server uses it only with --guidance-scale above 1)")
    add("--guidance-scale", type=float, help="classifier-free guidance (default: the server's, 0)")
    add("--format", type=_image_format, dest="image_format", metavar="{png,webp,jpeg}",
        help="image format: png (lossless, about 1 MB at 1024x576), webp or jpeg (a tenth of that) (default: the server's, png)")
    add("--size", type=_size, metavar="WxH",
        help="image size: 1024x576 (16:9), 576x1024 (9:16, Shorts/Reels) or 1024x1024; what the server allows is in its GET / (default: the server's, 1024x576)")
    add("--quality", type=_quality, metavar="1-100",
        help="quality of webp and jpeg images, 1 to 100 (default: the server's, 85 for webp and jpeg)")
    add("--job", type=_job_id, metavar="ID",
        help="fetch the images of job ID (a run you interrupted, or any job of yours) instead of sending its batch again; "
             "with a prompts file and the --seed of the run that started it, the files get the file's names and the run "
             "goes on with the prompts after that job")
    add("--max-images-per-request", type=_positive_int, default=DEFAULT_MAX_IMAGES,
        help="most images in one request, the server's --max-images (default: %(default)s)")
    add("--timeout", type=float, default=900.0,
        help="seconds the server may stay silent before the client gives up (default: %(default)s)")
    add("--retries", type=_non_negative_int, default=30,
        help="times a busy server (503) or a refused connection is tried again (default: %(default)s)")
    add("--reattach-for", type=float, default=600.0,
        help="seconds to keep reattaching to a running job after the connection drops (default: %(default)s)")
    add("-q", "--quiet", action="store_true", help="no progress bar and no list of saved files")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompts_file is None and args.job is None:
        parser.error("give a prompts file, or --job ID to fetch the images of a job")
    if args.quality is not None and args.image_format in (None, "png"):
        parser.error("--quality applies to --format webp or jpeg; PNG is lossless and takes none")
    return args


def read_prompts(source: str) -> tuple[Shot, ...]:
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read the prompts file {source}: {exc}", exit_code=2) from None
    return read_shots("stdin" if source == "-" else source, data)


@dataclass
class Saver:
    """Writes images into the output folder: each file whole or not at all (written beside,
    then renamed), so that a file there is always a finished image."""

    out_dir: Path
    bar: tqdm
    quiet: bool
    progress: Progress
    negative_prompt: str | None = None

    def save(self, stem: str, prompt: str, seed: int, data: bytes) -> Path:
        kind = image_format(data)
        if kind is None:
            raise ClientError(f"image {stem} from the server is not a PNG, WebP or JPEG image")
        if kind == "png" and not has_receipt(data):  # the reference server's: no receipt inside
            texts = {"prompt": prompt, "seed": str(seed)}
            if self.negative_prompt:
                texts["negative_prompt"] = self.negative_prompt
            data = add_text(data, texts)
        path = self.out_dir / f"{stem}.{EXTENSIONS[kind]}"
        partial = path.with_name(f".{path.name}.part")
        try:
            partial.write_bytes(data)
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        self.progress.saved.append(path)
        if not self.quiet:
            self.bar.write(str(path))
        return path

    def present(self, stem: str) -> bool:
        """An image of this name is in the folder already (in any format)."""
        return any((self.out_dir / f"{stem}.{extension}").exists() for extension in EXTENSIONS.values())


def _advance(bar: tqdm, position: int) -> None:
    if position > bar.n:
        bar.update(position - bar.n)


@contextmanager
def server_progress(client: GenerateClient, bar: tqdm, first_index: int, images: int) -> Iterator[None]:
    """While a /generate waits, move the bar by the images the server's workers finish (from
    /health, once a second). An estimate when other clients share the server: it never goes past
    this request's images, and the saved files take over when the answer comes."""
    baseline = client.images_done()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(HEALTH_POLL_SECONDS):
            done = client.images_done()
            if baseline is not None and done is not None:
                _advance(bar, first_index + min(images, done - baseline))
            bar.refresh()  # keeps the elapsed time ticking while nothing arrives

    watcher = threading.Thread(target=watch, name="sdxl-client-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def follow(
    client: GenerateClient, job_id: str, stem: Callable[[int, int], str], prompt: Callable[[int], str | None],
    images: int, seeds: Sequence[int], first_index: int, saver: Saver, from_disk: bool,
) -> dict[str, Any]:
    """Follow job ``job_id`` to its end, saving each image as it comes. ``stem(index, seed)`` and
    ``prompt(index)`` (None: whatever the server says) of an image by its index in the job.
    ``from_disk``: images whose files are in the folder already are not fetched again (--job)."""
    progress, bar = saver.progress, saver.bar
    have = {i for i, seed in enumerate(seeds) if saver.present(stem(i, seed))} if from_disk else set()
    progress.start_job(job_id, images, len(have))
    if have and not saver.quiet:
        bar.write(f"sdxl-client: job {job_id}: {len(have)} of its image(s) are in {saver.out_dir} already", file=sys.stderr)

    def on_image(image: JobImage) -> None:
        expected = prompt(image.index)
        if expected is not None and image.prompt is not None and image.prompt != expected:
            raise ClientError(
                f"job {job_id} made image {image.index} from the prompt {image.prompt!r}, not {expected!r}: "
                "give --job the prompts file and the --seed, -n and --max-images-per-request of the run that started it",
                exit_code=2,
            )
        saver.save(stem(image.index, image.seed), expected or image.prompt or "", image.seed, image.data)
        _advance(bar, first_index + len(have) + 1)

    def on_progress(done: int, total: int) -> None:
        _advance(bar, first_index + min(done, images))
        bar.refresh()

    status = client.follow_job(job_id, have, on_image, on_progress)
    progress.job_id = None
    for warning in status.get("warnings") or []:
        bar.write(f"sdxl-client: server warning: {warning}", file=sys.stderr)
    return status


def run(plan: Plan, client: GenerateClient, out_dir: Path, quiet: bool, progress: Progress, job_id: str | None = None) -> None:
    """Request, follow, save, chunk after chunk; with ``job_id``, the run starts at that job's
    chunk, fetched instead of sent. ``progress`` says how far it got if it stops."""
    chunks = plan.chunks()
    start = 0
    if job_id is not None:
        status = _job_status(client, job_id)
        chunk = plan.chunk_of_job(status.get("seeds") or [])
        prompts = status.get("prompts")  # the prompts of the job (not given by older servers)
        if chunk is not None and isinstance(prompts, list) and tuple(prompts) != chunk.prompts:
            chunk = None
        if chunk is None:
            raise ClientError(
                f"job {job_id} is not one of the requests of this prompts file (its seeds or prompts differ): give the --seed, -n and "
                "--max-images-per-request of the run that started it, or --job alone to fetch it under its own names",
                exit_code=2,
            )
        start = chunk.number
    out_dir.mkdir(parents=True, exist_ok=True)
    batch_key = secrets.token_hex(12)  # one per run; the chunk's number makes each request's key
    with tqdm(total=plan.total_images, initial=chunks[start].first_index, unit="img", desc="generating", disable=quiet, file=sys.stderr) as bar:
        client.on_retry = lambda message: bar.write(f"sdxl-client: {message}", file=sys.stderr)
        saver = Saver(out_dir, bar, quiet, progress, plan.negative_prompt)
        for chunk in chunks[start:]:
            progress.images_after = plan.total_images - chunk.first_index - plan.images_in(chunk)
            _run_chunk(plan, chunk, client, saver, f"sdxl-client-{batch_key}-{chunk.number}", job_id if chunk.number == start else None)


def _run_chunk(plan: Plan, chunk: Chunk, client: GenerateClient, saver: Saver, key: str, job_id: str | None) -> None:
    """As a job where the server has jobs (exact progress, images saved as they finish, survives
    dropped connections), else as one /generate with the progress estimated from /health."""
    images, bar, first = plan.images_in(chunk), saver.bar, chunk.first_index
    seeds: Sequence[int] = [(chunk.seed + i) % SEED_SPACE for i in range(images)]
    fetched_again = job_id is not None  # --job: its files saved before are not fetched again
    if job_id is None:
        saver.progress.sending = True
        accepted = client.start_job(plan.body(chunk, "url"), key)
        saver.progress.sending = False
        if accepted is None:
            _generate_chunk(plan, chunk, client, saver, key)
            return
        job_id, seeds = accepted.job_id, accepted.seeds or seeds
        if not saver.quiet:
            again = " (the server had it already: the same Idempotency-Key)" if accepted.replayed else ""
            bar.write(f"sdxl-client: job {job_id}: {images} image(s), progress at {client.base_url}/jobs/{job_id}{again}", file=sys.stderr)
    follow(
        client, job_id,
        stem=lambda index, seed: plan.stem(first + index, seed),
        prompt=lambda index: plan.shot_of(first + index).prompt,
        images=images, seeds=seeds, first_index=first, saver=saver, from_disk=fetched_again,
    )


def _generate_chunk(plan: Plan, chunk: Chunk, client: GenerateClient, saver: Saver, key: str) -> None:
    """One ``POST /generate`` (a server without jobs), its images saved when the answer comes."""
    images, bar = plan.images_in(chunk), saver.bar
    with nullcontext() if saver.quiet else server_progress(client, bar, chunk.first_index, images):
        response = client.generate(plan.body(chunk), key)
    for warning in response.get("warnings") or []:
        bar.write(f"sdxl-client: server warning: {warning}", file=sys.stderr)
    encoded = response["images"]
    # A server without the `seeds` field (the reference one) used the seeds asked for.
    seeds = response.get("seeds") or [(chunk.seed + i) % SEED_SPACE for i in range(images)]
    if len(encoded) != images or len(seeds) != images:
        raise ClientError(f"the server sent {len(encoded)} image(s) and {len(seeds)} seed(s) for a request of {images}")
    for offset, (value, seed) in enumerate(zip(encoded, seeds, strict=True)):
        index = chunk.first_index + offset
        try:
            data = b64decode(value, validate=True)
        except ValueError as exc:
            raise ClientError(f"image {index} from the server is unreadable: {exc}") from None
        saver.save(plan.stem(index, seed), plan.shot_of(index).prompt, seed, data)
        _advance(bar, index + 1)


def fetch_job(job_id: str, client: GenerateClient, out_dir: Path, quiet: bool, progress: Progress) -> None:
    """``--job ID`` without a prompts file: the job's images under their own names
    (``<index>_<seed>.<ext>``, the index in the job), waiting for the rest if it still runs."""
    status = _job_status(client, job_id)
    total, seeds = int(status.get("images_total") or 0), status.get("seeds") or []
    out_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=total, unit="img", desc="fetching", disable=quiet, file=sys.stderr) as bar:
        client.on_retry = lambda message: bar.write(f"sdxl-client: {message}", file=sys.stderr)
        saver = Saver(out_dir, bar, quiet, progress)
        follow(
            client, job_id, stem=lambda index, seed: image_stem(index, seed, total), prompt=lambda index: None,
            images=total, seeds=seeds, first_index=0, saver=saver, from_disk=True,
        )


def _job_status(client: GenerateClient, job_id: str) -> dict[str, Any]:
    try:
        return client.job_status(job_id)
    except JobGone as exc:
        raise ClientError(str(exc), exit_code=2) from None


def check_size(client: GenerateClient, size: str) -> None:
    """``--size`` against the sizes the server says it makes, before anything is sent or shown."""
    sizes = client.server_sizes()
    if sizes is not None and size not in sizes:
        raise ClientError(f"--size {size} is not made by {client.base_url}: it makes {', '.join(sizes)}", exit_code=2)


def resume_command(args: argparse.Namespace, plan: Plan | None, job_id: str) -> str:
    """The exact command that fetches ``job_id`` into the same folder under the same names (and,
    with the prompts file, goes on with the rest of it)."""
    parts = ["sdxl-client"]
    with_file = plan is not None and args.prompts_file not in (None, "-")
    if with_file:
        parts.append(args.prompts_file)
    parts += ["--job", job_id, "-o", args.output_dir, "--url", args.url]
    if with_file and plan is not None:
        parts += ["--seed", str(plan.seed)]
        if plan.num_images_per_prompt != 1:
            parts += ["-n", str(plan.num_images_per_prompt)]
        if plan.max_images_per_request != DEFAULT_MAX_IMAGES:
            parts += ["--max-images-per-request", str(plan.max_images_per_request)]
        for flag, value in (("--negative-prompt", plan.negative_prompt), ("--guidance-scale", plan.guidance_scale),
                            ("--format", plan.image_format), ("--quality", plan.quality), ("--size", plan.size)):
            if value is not None:
                parts += [flag, str(value)]
    if args.quiet:
        parts.append("-q")
    return shlex.join(parts)


def stop_command(url: str, job_id: str, keyed: bool) -> str:
    """The ``curl`` that cancels a job. On a keyed server its header names ``$SDXL_API_KEY`` for the
    shell to fill in: the key itself never reaches the terminal, its scrollback or a pasted log."""
    header = f' -H "Authorization: Bearer ${API_KEY_VARIABLE}"' if keyed else ""
    target = shlex.quote(url.rstrip("/") + f"/jobs/{job_id}")
    return f"curl -X DELETE{header} {target}"


def interrupted(args: argparse.Namespace, plan: Plan | None, progress: Progress) -> str:
    """What a Ctrl-C leaves behind, and the command that picks it up."""
    saved = f" {len(progress.saved)} image(s) were saved to {args.output_dir}." if progress.saved else ""
    url = args.url.rstrip("/")
    if progress.job_id is not None:
        job = progress.job_id
        later = progress.images_after if plan is not None and args.prompts_file not in (None, "-") else 0
        rest = f" and go on with the {later} image(s) of the file after it" if later else ""
        key = " (with your --api-key)" if args.api_key else ""
        keyed = bool(args.api_key or os.environ.get(API_KEY_VARIABLE))
        set_it = f" (with {API_KEY_VARIABLE} set to your key)" if args.api_key else ""
        return (
            f"sdxl-client: interrupted.{saved} Job {job} goes on on the server ({progress.job_saved} of its "
            f"{progress.job_images} image(s) saved). To fetch its images{rest}, run{key}:\n"
            f"  {resume_command(args, plan, job)}\n"
            f"sdxl-client: to stop the job instead{set_it}: {stop_command(url, job, keyed)}"
        )
    if progress.sending:
        return f"sdxl-client: interrupted while sending a batch.{saved} If the server took it, it goes on: GET {url}/jobs lists your jobs."
    return f"sdxl-client: interrupted.{saved}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    progress = Progress()
    plan: Plan | None = None
    try:
        api_key = args.api_key or os.environ.get(API_KEY_VARIABLE)
        client = GenerateClient(
            args.url, api_key=api_key, read_timeout=args.timeout, retries=args.retries, reattach_seconds=args.reattach_for
        )
        if args.size is not None:
            check_size(client, args.size)
        if args.prompts_file is None:
            fetch_job(args.job, client, Path(args.output_dir), args.quiet, progress)
        else:
            plan = Plan(
                shots=read_prompts(args.prompts_file),
                num_images_per_prompt=args.num_images_per_prompt,
                seed=secrets.randbelow(SEED_SPACE) if args.seed is None else args.seed % SEED_SPACE,
                negative_prompt=args.negative_prompt,
                guidance_scale=args.guidance_scale,
                max_images_per_request=args.max_images_per_request,
                image_format=args.image_format,
                quality=args.quality,
                size=args.size,
            )
            if args.seed is None and args.job is None and not args.quiet:
                print(f"sdxl-client: seed {plan.seed} (pass --seed {plan.seed} to make the same images again)", file=sys.stderr)
            run(plan, client, Path(args.output_dir), args.quiet, progress, args.job)
    except ClientError as exc:
        so_far = f" ({len(progress.saved)} image(s) were saved to {args.output_dir} before it)" if progress.saved else ""
        print(f"sdxl-client: error: {exc}{so_far}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the output folder: not writable, disk full
        print(f"sdxl-client: error: cannot write the images: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted(args, plan, progress), file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"sdxl-client: saved {len(progress.saved)} image(s) to {args.output_dir} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
