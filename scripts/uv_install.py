#!/usr/bin/env python3
"""`uv pip install` into another environment, from where pip here would install.

    python scripts/uv_install.py TARGET_PYTHON REQUIREMENT...

Run with an interpreter that has pip and the `uv` package (scripts/install.sh puts both in the
venv it makes). uv reads no pip configuration, so a machine whose pip takes its wheels from
local folders or indexes, or trusts its own CA bundle (``pip config list``: config files and
PIP_* variables), would send uv to PyPI for torch's 5.5 GB CUDA build, or fail to connect.
These flags and SSL_CERT_FILE carry pip's settings over; bytecode is compiled as pip does.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

# pip option -> uv flag; each value may hold several space-separated entries.
FLAGS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def pip_settings(listing: str) -> dict[str, str]:
    """`pip config list` lines (``global.key='v'``, ``:env:.key='v'``) as {key: value}."""
    values: dict[str, str] = {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.rsplit(".", 1)[-1]] = shlex.split(value)[0] if value else ""
    return values


def uv_flags(settings: dict[str, str]) -> list[str]:
    """pip's sources as uv flags. pip takes the best version across all its indexes, uv by
    default the first index's; and pip compiles bytecode, which this machine's
    PYTHONDONTWRITEBYTECODE=1 would otherwise leave to every start of every process."""
    flags = ["--index-strategy", "unsafe-best-match", "--compile-bytecode"]
    for key, flag in FLAGS.items():
        for entry in settings.get(key, "").split():
            flags += [flag, entry]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        flags.append("--no-index")
    return flags


def uv_env(settings: dict[str, str], env: dict[str, str]) -> dict[str, str]:
    """pip's CA bundle (``cert``) for uv, unless SSL_CERT_FILE already names one."""
    cert = settings.get("cert")
    return {**env, "SSL_CERT_FILE": cert} if cert and "SSL_CERT_FILE" not in env else env


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    from uv import find_uv_bin

    target, *requirements = argv
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    settings = pip_settings(listing)
    command = [find_uv_bin(), "pip", "install", "-q", "--python", target, *uv_flags(settings)]
    return subprocess.run(
        [*command, *requirements], env=uv_env(settings, dict(os.environ))
    ).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
