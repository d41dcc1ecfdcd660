"""All settings in one dataclass, filled from CLI flags and ``SDXL_*`` environment variables.

A field ``max_batch`` is the flag ``--max-batch`` and the variable ``SDXL_MAX_BATCH``; the flag
wins over the variable, the variable over the default. ``python -m service --help`` lists them.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from contract.formats import DEFAULT_ALLOWED_SIZES, DEFAULT_SIZE, parse_size
from gpu_workers.flag_settings import build_parser as build_settings_parser
from gpu_workers.flag_settings import flag, parse, setting
from gpu_workers.shard_rules import DEFAULT_SHARD_TIMEOUT
from gpu_workers.speed import SpeedFlags, SpeedSettings
from service.edge.forwarded import TrustedProxies

# Shorter keys are too easy to guess for a server that anyone on its tunnel URL can reach.
MIN_KEY_CHARS = 16


@dataclass(frozen=True)
class Settings(SpeedFlags):
    """Every setting of ``python -m service``; the workers' speed settings (``--dtype``, ``--compile``,
    ...; README "GPU speed") come from ``SpeedFlags``, shared with ``python -m gpu_workers``."""

    host: str = setting("0.0.0.0", "address to listen on")
    port: int = setting(8000, "port to listen on")
    model: str = setting(
        "auto",
        "model preset: sdxl-lightning-8step, tiny, a local diffusers folder, or package.module:factory; "
        "auto = sdxl-lightning-8step where CUDA is available, tiny otherwise",
    )
    devices: str = setting("auto", "comma-separated CUDA devices (cuda:0,cuda:1 or 0,1); auto = every CUDA device")
    workers: int = setting(1, "number of CPU workers where there is no CUDA device; 0 with --broker: an API box with no local workers")
    cpu_threads: int = setting(1, "torch threads per CPU worker (changes the bytes, so it is fixed, not derived)")
    max_batch: int = setting(4, "most images per shard, the batch a worker runs at once")
    shard_timeout: float = setting(
        DEFAULT_SHARD_TIMEOUT, "seconds a shard may run on a device; past it the worker is replaced and the shard retried once elsewhere"
    )
    max_images: int = setting(150, "most images per request (prompts x num_images_per_prompt)")
    max_prompt_chars: int = setting(2000, "longest prompt, in characters")
    sizes: str = setting(",".join(DEFAULT_ALLOWED_SIZES), "comma-separated WIDTHxHEIGHT sizes a request may ask for; must hold 1024x576, the default")
    max_queued_images: int = setting(600, "most images accepted and not finished; beyond it requests get 503")
    max_queued_images_per_key: int = setting(
        0,
        "most images one API key may have accepted and not finished; beyond it that key gets 429 while others are served "
        "(0: automatic: with two or more keys half of --max-queued-images, at least --max-images; with one key or none, no bound)",
    )
    grace_period: float = setting(60.0, "seconds in-flight requests get to finish after SIGTERM")
    heartbeat_interval: float = setting(10.0, "seconds between heartbeat spaces while a request runs")
    image_dir: str = setting("var/images", "folder for the images of every job (served to return_format url requests)")
    image_retention: float = setting(86400.0, "seconds a finished job and its images are kept")
    image_dir_max_bytes: int = setting(5 * 2**30, "disk budget of stored images; the oldest go first beyond it")
    job_db: str = setting("var/jobs.sqlite3", "SQLite database of jobs (survives restarts; unfinished jobs resume)")
    public_url: str = setting("", "base URL for image links (e.g. your ngrok URL); default: from the request")
    forwarded_allow_ips: str = setting(
        "127.0.0.1",
        "comma-separated addresses or networks of the proxies whose X-Forwarded-Proto/Host/Port/For and Forwarded "
        "headers are trusted (links, the logged client address), or *; those of any other peer are ignored",
    )
    api_key: str = setting("", "require this key (Authorization: Bearer or X-API-Key) on every route but the open ones (/health, the docs, /ui, images, /favicon.ico: README, On a public tunnel)", secret=True)
    api_key_file: str = setting("", "file of accepted API keys, one per line, as name:key or a bare key, :operator at the end for an operator key (# comments allowed)")
    cors_origins: str = setting("", "comma-separated origins allowed to call the API from a browser, or * (default: none)")
    max_body_bytes: int = setting(2**20, "largest request body; larger ones get 413")
    max_connections: int = setting(
        512,
        "most open client connections (kept below the open-file limit); at the cap the one idle longest is closed to make "
        "room, and only when every one is busy does one more get 503",
    )
    max_connections_per_peer: int = setting(
        64,
        "most open connections from one address (for peers in --forwarded-allow-ips: from one forwarded client address, "
        "once a request arrives); past it that address's idle one is closed, or the newcomer gets 503",
    )
    keepalive_timeout: float = setting(15.0, "seconds a connection may stay open without sending a whole request head (new or idle)")
    body_timeout: float = setting(30.0, "seconds a request body may take to arrive; slower ones get 408")
    write_timeout: float = setting(60.0, "seconds one write of a response may wait for a client that does not read; then it is cut off")
    model_cache: str = setting(
        str(Path.home() / ".cache" / "sdxl-lightning-server"), "folder where the tiny model is built"
    )
    broker: str = setting(
        "",
        "redis:// or rediss:// URL of a Redis that carries shards to workers on other boxes (python -m gpu_workers); "
        "default: none, local worker processes",
        secret=True,
    )
    broker_prefix: str = setting("sdxl", "prefix of the Redis keys, so that several deployments can share one Redis")
    webhook_secret: str = setting(
        "",
        "whsec_<base64 of 24 to 64 random bytes>: signs webhook deliveries (Standard Webhooks); without it webhook_url is "
        "refused, as unsigned webhooks are not sent",
        secret=True,
    )
    webhook_allow_private: bool = setting(False, "let webhook_url reach loopback, private and link-local addresses (refused by default)")
    webhook_timeout: float = setting(10.0, "seconds one webhook delivery may take, connecting included")
    webhook_max_attempts: int = setting(16, "deliveries of one webhook message before it is given up (1 s apart, doubling to 1 h: about 6 h)")
    max_pending_webhooks_per_key: int = setting(
        2000,
        "webhook messages one key may have waiting in the outbox, counting those its unfinished jobs will add; past it a "
        "webhook_url gets 429 (0: no bound). 2000 holds 13 jobs of 150 images with image.completed while their receiver is down",
    )
    webhook_nameservers: str = setting(
        "",
        "comma-separated nameservers (IP or IP:port) that resolve webhook hosts; default: the system's (/etc/resolv.conf)",
    )
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")

    @property
    def image_path(self) -> Path:
        return Path(self.image_dir)

    @property
    def job_db_path(self) -> Path:
        return Path(self.job_db)

    def api_keys(self) -> tuple[ApiKey, ...]:
        """Every accepted key: ``api_key`` and the lines of ``api_key_file``. Empty: no auth. The key
        of ``--api-key`` is an operator key: the operator sets it on the server's own command line,
        and a server with that one key has always scraped /metrics with it."""
        keys = [replace(ApiKey.parse(self.api_key), operator=True)] if self.api_key else []
        if self.api_key_file:
            for line in Path(self.api_key_file).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(ApiKey.parse(line))
        return tuple(keys)

    def queued_images_per_key(self, keys: int) -> int:
        """The per-key bound in force with ``keys`` API keys (0: none). Unset (0) with two or more
        keys: half of ``--max-queued-images``, so that one key alone can never fill the queue and lock
        the others out, yet never less than one largest request (``--max-images``), so that every key
        can still send its largest batch. Not queue/keys: with ten keys that would refuse a 150-image
        batch for good and leave most of the queue idle while one key works alone; sharing beyond
        this bound is the round-robin scheduler's job."""
        if self.max_queued_images_per_key or keys < 2:
            return self.max_queued_images_per_key
        return max(math.ceil(self.max_queued_images / 2), min(self.max_images, self.max_queued_images))

    def allowed_sizes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(size.strip() for size in self.sizes.split(",") if size.strip()))

    def trusted_proxies(self) -> TrustedProxies:
        return TrustedProxies.parse(self.forwarded_allow_ips)

    def allowed_origins(self) -> tuple[str, ...]:
        return tuple(origin.strip().rstrip("/") for origin in self.cors_origins.split(",") if origin.strip())


KEY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.@-]{0,63}")
OPERATOR_SUFFIX = ":operator"


@dataclass(frozen=True)
class ApiKey:
    """An accepted key and the name the logs, the metrics and the fair queue know it by (never the
    key itself)."""

    name: str
    key: str = field(repr=False)
    # May see across keys: the per-key figures of /metrics (README, Named keys).
    operator: bool = False

    @classmethod
    def parse(cls, line: str) -> ApiKey:
        """``name:key`` (a name starts with a letter: letters, digits, ``_.@-``), or a bare key,
        which is named after a digest of itself (``key-1a2b3c4d``); either ending in ``:operator``
        is an operator key. A suffix, not a prefix: ``operator:key`` already means a key named
        operator in the files written before."""
        if line.endswith(OPERATOR_SUFFIX) and len(line) > len(OPERATOR_SUFFIX):
            return replace(cls.parse(line[: -len(OPERATOR_SUFFIX)]), operator=True)
        name, separator, key = line.partition(":")
        if separator and key and KEY_NAME.fullmatch(name):
            return cls(name, key)
        return cls("key-" + hashlib.sha256(line.encode()).hexdigest()[:8], line)


def build_parser() -> argparse.ArgumentParser:
    return build_settings_parser(
        Settings,
        prog="python -m service",
        description="SDXL-Lightning batch image API. Every flag also reads the SDXL_* variable named in its help.",
    )


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, overridden by ``SDXL_*`` variables, overridden by flags."""
    parser = build_parser()
    settings = parse(Settings, parser, argv, environ)
    problems = validate(settings)
    if problems:
        parser.error("; ".join(problems))
    return settings


def validate(settings: Settings) -> list[str]:
    problems = []
    for name in (
        "cpu_threads", "max_batch", "max_images", "max_prompt_chars", "max_queued_images",
        "max_body_bytes", "image_dir_max_bytes", "max_connections", "max_connections_per_peer",
    ):
        if getattr(settings, name) < 1:
            problems.append(f"{flag(name)} must be at least 1")
    if settings.workers < 0 or (settings.workers == 0 and not settings.broker):
        problems.append("--workers must be at least 1 (0 only with --broker: an API box whose workers are on other boxes)")
    if settings.broker and not settings.broker.startswith(("redis://", "rediss://", "unix://")):
        problems.append("--broker must be a redis://, rediss:// or unix:// URL")
    if settings.broker and settings.workers != 0:
        problems.append("with --broker, run the workers with python -m gpu_workers --broker URL and start the API with --workers 0")
    if settings.grace_period < 0:
        problems.append("--grace-period must not be negative")
    if settings.max_queued_images_per_key < 0:
        problems.append("--max-queued-images-per-key must not be negative (0: automatic)")
    for name in ("shard_timeout", "keepalive_timeout", "body_timeout", "write_timeout"):
        if getattr(settings, name) <= 0:
            problems.append(f"{flag(name)} must be positive")
    for size in settings.allowed_sizes():
        try:
            parse_size(size)
        except ValueError as exc:
            problems.append(f"--sizes: {exc}")
    if DEFAULT_SIZE not in settings.allowed_sizes():
        problems.append(f"--sizes must hold {DEFAULT_SIZE}, the size of a request that names none")
    try:
        settings.trusted_proxies()
    except ValueError as exc:
        problems.append(f"--forwarded-allow-ips: {exc}")
    if settings.heartbeat_interval <= 0:
        problems.append("--heartbeat-interval must be positive")
    try:
        keys = settings.api_keys()
    except OSError as exc:
        problems.append(f"--api-key-file cannot be read: {exc.strerror}")
    else:
        if settings.api_key_file and not keys:
            problems.append(f"--api-key-file {settings.api_key_file} holds no key")
        short = sum(len(entry.key) < MIN_KEY_CHARS for entry in keys)
        names = [entry.name for entry in keys]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            problems.append(f"API key names must differ: {', '.join(twice)} name more than one key")
        if short:
            problems.append(
                f"{short} API key(s) are shorter than {MIN_KEY_CHARS} characters, too easy to guess on a public tunnel; "
                "make one with: python -c 'import secrets; print(secrets.token_urlsafe(24))'"
            )
    if settings.webhook_secret:
        problem = webhook_secret_problem(settings.webhook_secret)
        if problem:
            problems.append(problem)
    if settings.webhook_timeout <= 0:
        problems.append("--webhook-timeout must be positive")
    if settings.max_pending_webhooks_per_key < 0:
        problems.append("--max-pending-webhooks-per-key must not be negative (0: no bound)")
    for server in filter(None, (name.strip() for name in settings.webhook_nameservers.split(","))):
        if not nameserver_ok(server):
            problems.append(f"--webhook-nameservers: {server!r} is not an IP address or IP:port")
    if settings.webhook_max_attempts < 1:
        problems.append("--webhook-max-attempts must be at least 1")
    if not 0 <= settings.port <= 65535:
        problems.append("--port must be between 0 and 65535")
    problems += SpeedSettings.of(settings).problems()
    return problems


def nameserver_ok(server: str) -> bool:
    """An IP address, or one with a port (``[v6]:port`` for IPv6), as c-ares reads them."""
    bracketed_port = server.startswith("[") and not server.endswith("]")
    host, _, port = server.rpartition(":") if server.count(":") == 1 or bracketed_port else (server, "", "")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        return False
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


WEBHOOK_SECRET_PREFIX = "whsec_"
WEBHOOK_SECRET_BYTES = (24, 64)  # as the Standard Webhooks specification asks


def webhook_secret_problem(secret: str) -> str | None:
    """Why ``--webhook-secret`` cannot sign (None: it can): ``whsec_`` and 24 to 64 bytes in base64."""
    make = "make one with: python -c \"import base64, secrets; print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        return f"--webhook-secret must start with {WEBHOOK_SECRET_PREFIX} (whsec_<base64>); {make}"
    try:
        encoded = secret[len(WEBHOOK_SECRET_PREFIX):]
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)  # padding optional, as for the signer
    except binascii.Error:
        return f"--webhook-secret is not whsec_ and base64; {make}"
    low, high = WEBHOOK_SECRET_BYTES
    if not low <= len(key) <= high:
        return f"--webhook-secret holds {len(key)} bytes; it must hold {low} to {high}; {make}"
    return None
