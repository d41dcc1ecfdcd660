"""``sdxl-client PROMPTS_FILE -o OUT_DIR``: a file of prompts in, one PNG per image out.

Each image is saved as ``<index>_<seed>.png`` (index in prompt-major order over the whole file,
zero-padded) with its prompt, seed and negative prompt in PNG text chunks, so any image can be found
again and made again. Files longer than one request allows are sent as several requests whose seeds
continue where the previous one stopped: image *i* of the file always gets ``seed + i``. Without
``--seed`` the client draws one and prints it, so a run can be repeated.

Each request runs as a job on the server: the bar shows the images done of the total as the server
reports them, and a dropped connection (a tunnel cut, a server restart) is followed by reattaching
to the same job, never by sending the batch again.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import threading
import time
from base64 import b64decode
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from client.api import ClientError, GenerateClient
from client.png_text import add_text

SEED_SPACE = 2**32
DEFAULT_URL = "http://localhost:8000"
HEALTH_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Chunk:
    """The prompts of one request, and where its images sit in the whole run."""

    first_index: int
    prompts: tuple[str, ...]
    seed: int


@dataclass(frozen=True)
class Job:
    """The whole run: every prompt of the file, and what each request asks for."""

    prompts: tuple[str, ...]
    num_images_per_prompt: int
    seed: int
    negative_prompt: str | None
    guidance_scale: float | None
    max_images_per_request: int

    @property
    def total_images(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    def chunks(self) -> list[Chunk]:
        """Whole prompts per request, as many as fit; seeds continue across requests."""
        per_request = self.max_images_per_request // self.num_images_per_prompt
        if per_request < 1:
            raise ClientError(
                f"--num-images-per-prompt {self.num_images_per_prompt} is more than one request may hold "
                f"(--max-images-per-request {self.max_images_per_request})",
                exit_code=2,
            )
        chunks = []
        for start in range(0, len(self.prompts), per_request):
            first = start * self.num_images_per_prompt
            chunks.append(Chunk(first, self.prompts[start : start + per_request], (self.seed + first) % SEED_SPACE))
        return chunks

    def body(self, chunk: Chunk) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompts": list(chunk.prompts),
            "num_images_per_prompt": self.num_images_per_prompt,
            "seed": chunk.seed,
            "return_format": "base64",
        }
        if self.negative_prompt:
            body["negative_prompt"] = self.negative_prompt
        if self.guidance_scale is not None:
            body["guidance_scale"] = self.guidance_scale
        return body


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdxl-client",
        description="Generate one PNG per prompt (or several: -n) with an SDXL-Lightning API server.",
        epilog="Exit status: 0 all images saved, 1 the server or the network failed, 2 the request or the command line is wrong.",
    )
    add = parser.add_argument
    add("prompts_file", help="UTF-8 text, one prompt per line; blank lines and lines starting with # are skipped; - reads stdin")
    add("-o", "--output-dir", default="images", help="folder for the PNG files, created if missing (default: %(default)s)")
    add("--url", default=os.environ.get("SDXL_URL", DEFAULT_URL), help="server base URL (default: $SDXL_URL or %(default)s)")
    # No default shown here: --help must never print a key taken from the environment.
    add("--api-key", help="API key, if the server needs one (default: $SDXL_API_KEY)")
    add("-n", "--num-images-per-prompt", type=_positive_int, default=1, help="variations per prompt (default: %(default)s)")
    add("--seed", type=int, help="seed of the first image; image i gets seed + i (default: a random one, printed)")
    add("--negative-prompt", help="what to avoid (the server uses it only with --guidance-scale above 1)")
    add("--guidance-scale", type=float, help="classifier-free guidance (default: the server's, 0)")
    add("--max-images-per-request", type=_positive_int, default=150,
        help="most images in one request, the server's --max-images (default: %(default)s)")
    add("--timeout", type=float, default=900.0,
        help="seconds the server may stay silent before the client gives up (default: %(default)s)")
    add("--retries", type=_non_negative_int, default=30,
        help="times a busy server (503) or a refused connection is tried again (default: %(default)s)")
    add("--reattach-for", type=float, default=600.0,
        help="seconds to keep reattaching to a running job after the connection drops (default: %(default)s)")
    add("-q", "--quiet", action="store_true", help="no progress bar and no list of saved files")
    return parser


def read_prompts(source: str) -> tuple[str, ...]:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ClientError(f"cannot read the prompts file {source}: {exc}", exit_code=2) from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise ClientError(f"{source} holds no prompt (one per line; # starts a comment)", exit_code=2)
    return prompts


def image_name(index: int, seed: int, total: int) -> str:
    """``007_1234.png``: sorts in request order; the seed makes the image again."""
    return f"{index:0{max(3, len(str(total - 1)))}d}_{seed}.png"


def save_images(job: Job, chunk: Chunk, response: dict[str, Any], out_dir: Path, bar: tqdm) -> list[Path]:
    """Write the chunk's images with their metadata; the bar, which counts the images of the whole
    run in order, ends at this chunk's last one (it never moves back from an estimate)."""
    images = response["images"]
    expected = len(chunk.prompts) * job.num_images_per_prompt
    # A server without the `seeds` field (the reference one) used the seeds asked for, or none at all.
    seeds = response.get("seeds") or [(chunk.seed + i) % SEED_SPACE for i in range(expected)]
    if len(images) != expected or len(seeds) != expected:
        raise ClientError(f"the server sent {len(images)} image(s) and {len(seeds)} seed(s) for a request of {expected}")
    saved = []
    for offset, (image, seed) in enumerate(zip(images, seeds, strict=True)):
        texts = {"prompt": chunk.prompts[offset // job.num_images_per_prompt], "seed": str(seed)}
        if job.negative_prompt:
            texts["negative_prompt"] = job.negative_prompt
        try:
            png = add_text(b64decode(image), texts)
        except ValueError as exc:  # not base64, or not a PNG
            raise ClientError(f"image {chunk.first_index + offset} from the server is unreadable: {exc}") from None
        path = out_dir / image_name(chunk.first_index + offset, seed, job.total_images)
        path.write_bytes(png)
        saved.append(path)
        _advance(bar, chunk.first_index + offset + 1)
    return saved


def _advance(bar: tqdm, position: int) -> None:
    if position > bar.n:
        bar.update(position - bar.n)


@contextmanager
def server_progress(client: GenerateClient, bar: tqdm, chunk: Chunk, images: int) -> Iterator[None]:
    """While a request waits, move the bar by the images the server's workers finish (from /health,
    once a second). An estimate when other clients share the server: it never goes past this
    request's images, and the saved files take over when the answer comes."""
    baseline = client.images_done()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(HEALTH_POLL_SECONDS):
            done = client.images_done()
            if baseline is not None and done is not None:
                _advance(bar, chunk.first_index + min(images, done - baseline))
            bar.refresh()  # keeps the elapsed time ticking while nothing arrives

    watcher = threading.Thread(target=watch, name="sdxl-client-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def run(job: Job, client: GenerateClient, out_dir: Path, quiet: bool, saved: list[Path]) -> None:
    """Request, wait, save, chunk after chunk; ``saved`` grows as files land (so that an error can
    say how far the run got)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=job.total_images, unit="img", desc="generating", disable=quiet, file=sys.stderr) as bar:
        client.on_retry = lambda message: bar.write(f"sdxl-client: {message}", file=sys.stderr)
        for chunk in job.chunks():
            response = _request_chunk(job, chunk, client, bar, quiet)
            for warning in response.get("warnings") or []:
                bar.write(f"sdxl-client: server warning: {warning}", file=sys.stderr)
            for path in save_images(job, chunk, response, out_dir, bar):
                saved.append(path)
                if not quiet:
                    bar.write(str(path))


def _request_chunk(job: Job, chunk: Chunk, client: GenerateClient, bar: tqdm, quiet: bool) -> dict[str, Any]:
    """As a job where the server has jobs (exact progress, survives dropped connections), else
    as one /generate with the progress estimated from /health."""
    images = len(chunk.prompts) * job.num_images_per_prompt
    accepted = client.start_job(job.body(chunk))
    if accepted is None:
        with nullcontext() if quiet else server_progress(client, bar, chunk, images):
            return client.generate(job.body(chunk))
    job_id = accepted["job_id"]
    if not quiet:
        bar.write(f"sdxl-client: job {job_id}: {images} image(s), progress at {client.base_url}/jobs/{job_id}", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        _advance(bar, chunk.first_index + min(done, images))
        bar.refresh()

    return client.wait_for_job(job_id, progress)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    saved: list[Path] = []
    try:
        job = Job(
            prompts=read_prompts(args.prompts_file),
            num_images_per_prompt=args.num_images_per_prompt,
            seed=secrets.randbelow(SEED_SPACE) if args.seed is None else args.seed % SEED_SPACE,
            negative_prompt=args.negative_prompt,
            guidance_scale=args.guidance_scale,
            max_images_per_request=args.max_images_per_request,
        )
        if args.seed is None and not args.quiet:
            print(f"sdxl-client: seed {job.seed} (pass --seed {job.seed} to make the same images again)", file=sys.stderr)
        api_key = args.api_key or os.environ.get("SDXL_API_KEY")
        client = GenerateClient(
            args.url, api_key=api_key, read_timeout=args.timeout, retries=args.retries, reattach_seconds=args.reattach_for
        )
        run(job, client, Path(args.output_dir), args.quiet, saved)
    except ClientError as exc:
        so_far = f" ({len(saved)} image(s) were saved to {args.output_dir} before it)" if saved else ""
        print(f"sdxl-client: error: {exc}{so_far}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the output folder: not writable, disk full
        print(f"sdxl-client: error: cannot write the images: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sdxl-client: interrupted", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"sdxl-client: saved {len(saved)} image(s) to {args.output_dir} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
