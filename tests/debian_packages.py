"""Debian packages that tests drive (chromium, redis-server), installed on demand the way
``.ci/run`` does, so a bare root checkout runs the whole suite."""

from __future__ import annotations

import os
import shutil
import subprocess

APT_TIMEOUT_SECONDS = 900


def apt_install(package: str) -> str | None:
    """Install a Debian package; None on success, otherwise why it could not be installed."""
    if shutil.which("apt-get") is None:
        return "there is no apt-get (not Debian or Ubuntu)"
    if os.geteuid() != 0:
        return "the tests are not running as root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait_for_lock = ["-o", "DPkg::Lock::Timeout=300"]
    for command in (["apt-get", *wait_for_lock, "update", "-q"], ["apt-get", *wait_for_lock, "install", "-y", "-q", package]):
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_SECONDS, check=False)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(command)}` took more than {APT_TIMEOUT_SECONDS} s"
        if result.returncode != 0:
            return f"`{' '.join(command)}` failed: {result.stderr.strip()[-500:]}"
    return None
