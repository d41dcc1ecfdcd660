"""Debian packages that tests drive (chromium, redis-server, prometheus's promtool, nginx, caddy, exiftool), installed the way ``.ci/run`` does,
once, before any test is collected (``tests/conftest.py``'s ``pytest_sessionstart``), so a bare
root checkout runs the whole suite and no test module skips because another one installs later."""

from __future__ import annotations

import os
import shutil
import subprocess

APT_TIMEOUT_SECONDS = 900


# The program each test needs, and the Debian package that brings it.
NEEDED = {
    "chromium": "chromium",
    "redis-server": "redis-server",
    "promtool": "prometheus",
    # tests/test_proxies.py: the proxies users put in front of the server
    "nginx": "nginx",
    "caddy": "caddy",
    # image metadata checked the way users read it (exiftool -validate)
    "exiftool": "libimage-exiftool-perl",
}
# Why a needed program is missing after the install (filled by ``install_missing``).
PROBLEMS: dict[str, str] = {}


def install_missing() -> None:
    """Install every needed package whose program is missing, in one apt-get run."""
    missing = [package for program, package in NEEDED.items() if shutil.which(program) is None]
    if not missing:
        return
    problem = apt_install(*missing)
    for program, package in NEEDED.items():
        if shutil.which(program) is None:
            PROBLEMS[program] = (
                f"{program} is not installed and cannot be installed here: {problem or 'no binary after the install'}. "
                f"Install it with `apt-get install -y {package}` (as .ci/run does)"
            )


def apt_install(*packages: str) -> str | None:
    """Install Debian packages; None on success, otherwise why they could not be installed."""
    if shutil.which("apt-get") is None:
        return "there is no apt-get (not Debian or Ubuntu)"
    if os.geteuid() != 0:
        return "the tests are not running as root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait_for_lock = ["-o", "DPkg::Lock::Timeout=300"]
    for command in (["apt-get", *wait_for_lock, "update", "-q"], ["apt-get", *wait_for_lock, "install", "-y", "-q", *packages]):
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_SECONDS, check=False)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(command)}` took more than {APT_TIMEOUT_SECONDS} s"
        if result.returncode != 0:
            return f"`{' '.join(command)}` failed: {result.stderr.strip()[-500:]}"
    return None
