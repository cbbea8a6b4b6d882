#!/usr/bin/env bash
# The one way camlabel is installed: `make setup` and the Dockerfile both run this script, so the
# image installs exactly what CI installs and tests (tests/test_deploy.py checks both call it).
#
#   scripts/install.sh [--editable] [--torch-only] PREFIX [EXTRAS]
#
#   PREFIX        the virtual environment to create, or to reuse when it exists (.venv, /opt/venv)
#   EXTRAS        comma-separated extras of the package, e.g. "dev"
#   --editable    install the package in editable mode (development, `make setup`)
#   --torch-only  stop after torch and torchvision (a Docker layer cached before the source is
#                 copied); a later full run finds them installed and goes on
#
# PYTHON names the interpreter that creates the venv (default python3). INSTALLER=uv (`make
# setup`, the Dockerfile) installs with uv (UV_PIN, put in the venv by pip) from where pip
# would (scripts/uv_install.py): the same sources, unpacked in parallel and linked from uv's
# cache on later installs (torch: about 100 s with pip, 12 s). INSTALLER=pip (default) uses pip.
# Torch comes from PyPI:
# on Linux x86_64 that wheel is a CUDA build that brings its CUDA libraries, so one install
# serves CPU and GPU machines (DEVICE=auto picks the GPU when there is one).
set -euo pipefail

# The same pins as pyproject.toml's dependencies (tests/test_deploy.py checks they agree).
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
UV_PIN=uv==0.13.9

usage() {
    sed -n '5,11p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

editable=0
torch_only=0
while [[ $# -gt 0 && $1 == --* ]]; do
    case $1 in
        --editable) editable=1 ;;
        --torch-only) torch_only=1 ;;
        --help) usage ;;
        *) echo "install.sh: unknown option $1" >&2; usage ;;
    esac
    shift
done
[[ $# -ge 1 && $# -le 2 ]] || usage
prefix=$1
extras=${2:-}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
installer=${INSTALLER:-pip}
[[ $installer == pip || $installer == uv ]] || {
    echo "install.sh: INSTALLER must be pip or uv, not $installer" >&2
    exit 2
}

if [[ ! -x $prefix/bin/python ]]; then
    "$python" -m venv "$prefix"
fi
pip=("$prefix/bin/python" -m pip install -q)
if [[ $installer == uv ]]; then
    "${pip[@]}" "$UV_PIN"
    pip=("$prefix/bin/python" "$root/scripts/uv_install.py" "$prefix/bin/python")
else
    "${pip[@]}" --upgrade pip
fi
"${pip[@]}" "${TORCH_PINS[@]}"
if [[ $torch_only == 1 ]]; then
    exit 0
fi

target=$root
if [[ -n $extras ]]; then
    target="$root[$extras]"
fi
if [[ $editable == 1 ]]; then
    "${pip[@]}" -e "$target"
else
    "${pip[@]}" "$target"
fi
