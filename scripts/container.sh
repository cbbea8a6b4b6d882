#!/usr/bin/env bash
# Build the Dockerfile with podman, as `make test` does before tests/test_container.py runs it.
#
#   scripts/container.sh image    tools (podman, runc, debootstrap) when missing, the base image
#                                 (cached), then the Dockerfile built as $IMAGE
#   scripts/container.sh clean    remove $IMAGE and every dangling layer (the base stays)
#   scripts/container.sh flags    print podman's global flags for this machine (tests use them)
#
# No registry is reachable here, so the base is Debian bookworm made by debootstrap (python3 with
# venv) and imported as $BASE, made once per machine. The build gets this machine's pip
# configuration (its index folders, constraints and CA bundle, mounted read-only for the build
# steps only, nothing of it stays in the image), so it installs what `make setup` installs.
# The Dockerfile is the one a user builds; only BASE_IMAGE changes. Needs root (apt, podman).
set -euo pipefail

IMAGE=${IMAGE:-localhost/camlabel:test}
BASE=${BASE:-localhost/camlabel-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# This sandbox: no systemd cgroups, low default limits; runc, not crun.
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs)
LIMITS=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)

log() { echo "container.sh: $*" >&2; }

tools() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || [[ -x /usr/sbin/runc ]] || missing+=(runc)
    command -v debootstrap >/dev/null || [[ -x /usr/sbin/debootstrap ]] || missing+=(debootstrap)
    if [[ ${#missing[@]} -gt 0 ]]; then
        log "installing ${missing[*]} from the system's packages"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
}

base() {
    if "${PODMAN[@]}" image exists "$BASE"; then
        return
    fi
    local dir
    dir=$(mktemp -d)
    log "making $BASE with debootstrap (about a minute)"
    PATH=$PATH:/usr/sbin debootstrap --variant=minbase \
        --include=python3,python3-venv,ca-certificates bookworm "$dir" "$MIRROR" >&2
    tar -C "$dir" -c . | "${PODMAN[@]}" import - "$BASE" >&2
    rm -rf "$dir"
}

# pip's effective configuration as one pip.conf, and a -v for each local folder or file it names.
pip_config() {
    local conf=$1
    python3 - "$conf" "$root/scripts" <<'EOF'
import os, subprocess, sys
sys.path.insert(0, sys.argv[2])
from uv_install import pip_settings  # `pip config list` parsed as for uv
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                     capture_output=True, text=True).stdout
values = pip_settings(out)
with open(sys.argv[1], "w") as f:
    f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
mounts = set()
for value in values.values():
    for token in value.split():
        path = token.removeprefix("file://")
        if not path.startswith("/") or not os.path.exists(path):
            continue
        # an index's pages link to ../../files: mount the folder above "simple"
        mounts.add(os.path.dirname(path) if os.path.basename(path) == "simple" else path)
print(" ".join(f"-v {m}:{m}:ro" for m in sorted(mounts)))
EOF
}

image() {
    tools
    base
    local conf mounts
    conf=$(mktemp)
    mounts=$(pip_config "$conf")
    log "building $IMAGE from Dockerfile on $BASE"
    # --format docker keeps HEALTHCHECK (the OCI format has no field for it).
    # shellcheck disable=SC2086
    "${PODMAN[@]}" build --format docker --network host "${LIMITS[@]}" \
        --build-arg BASE_IMAGE="$BASE" -v "$conf:/etc/pip.conf:ro" $mounts \
        -t "$IMAGE" "$root" >&2
    rm -f "$conf"
    # Older builds of the test image leave untagged layers: drop them, keep the cache in use.
    "${PODMAN[@]}" image prune -f >/dev/null
    "${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Size}}' |
        awk '{printf "container.sh: %s is %.2f GB\n", "'"$IMAGE"'", $1 / 1e9}' >&2
}

clean() {
    "${PODMAN[@]}" rmi -f "$IMAGE" 2>/dev/null || true
    "${PODMAN[@]}" image prune -f >/dev/null
}

case ${1:-} in
    image) image ;;
    clean) clean ;;
    flags) echo "${PODMAN[*]:1}" ;;
    *) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
