"""Deployment, checked piece by piece: the image must not rot unseen.

tests/test_container.py builds and runs the image itself; these tests take the Dockerfile apart
and run its pieces from the venv: the install step must be the script `make setup` runs (CI
installs through it), the CMD is started from the venv with the Dockerfile's environment, its
HEALTHCHECK command must pass against it, and a SIGTERM (what `docker stop` sends) must leave no process behind. docker-compose.yml is
checked for its wiring, hadolint for the Dockerfile's lint.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from .ls_harness import free_port
from .progress import wait_http, wait_while_progressing

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the venv running the tests stands for /opt/venv
INSTALL_SCRIPT = "scripts/install.sh"
UV_SCRIPT = "scripts/uv_install.py"
AUTH = ("deploy", "deploy-pass")


# ------------------------------------------------------------------------------- parsing
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuations joined, comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, args = (pending + line).partition(" ")
        out.append((instruction.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation"
    return out


def instructions(name: str) -> list[str]:
    return [args for instruction, args in dockerfile() if instruction == name]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions("ENV"):
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            assert sep, f"ENV {token!r}: use the KEY=value form"
            env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    command = json.loads(args)
    assert isinstance(command, list) and all(isinstance(a, str) for a in command), args
    return command


def healthcheck_command() -> list[str]:
    (args,) = instructions("HEALTHCHECK")
    options, sep, command = args.partition("CMD ")
    assert sep, "HEALTHCHECK must have a CMD"
    assert all(o.startswith("--") for o in options.split()), options
    return exec_form(command)


def workdir() -> str:
    return instructions("WORKDIR")[-1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def backend_env_names() -> set[str]:
    """Every environment variable the backend reads (settings, cli, jobs)."""
    names: set[str] = set()
    for name in ("settings.py", "cli.py", "jobs.py"):
        text = (ROOT / "backend" / name).read_text()
        names |= set(re.findall(r"""(?:_env|environ\.get|\be)\(\s*["']([A-Z_]+)["']""", text))
    return names


# ------------------------------------------------------------------------- the install step
def test_the_image_installs_with_the_script_make_setup_runs(tmp_path):
    runs = instructions("RUN")
    installs = [r for r in runs if INSTALL_SCRIPT in r]
    assert installs, f"no RUN calls {INSTALL_SCRIPT}"
    full = [r for r in installs if "--torch-only" not in r]
    assert len(full) == 1 and "/opt/venv" in full[0].split(), full
    assert "--editable" not in full[0], "the image installs the package, not a link to /app"
    # Nothing is installed past the script, so the image cannot drift from what CI tests.
    for run in runs:
        assert not re.search(r"\bpip3? install\b|-m pip\b|\buv pip\b", run), run
    copies = [c.split() for c in instructions("COPY")]
    assert set(copies[0][:-1]) == {INSTALL_SCRIPT, UV_SCRIPT}, "the scripts before the torch layer"
    assert copies[0][-1] == "scripts/"
    assert dockerfile_env()["PATH"].split(":")[0] == "/opt/venv/bin"

    # `make setup` runs the same script (dry run: -n prints the recipe, -B ignores timestamps).
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    dry = subprocess.run(
        [make, "-n", "-B", "setup", f"VENV={venv}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    calls = [shlex.split(line) for line in dry.stdout.splitlines() if INSTALL_SCRIPT in line]
    assert len(calls) == 1, dry.stdout
    assert calls[0][-2:] == [str(venv), "dev"] and "--editable" in calls[0], calls[0]
    assert "INSTALLER=uv" in calls[0], calls[0]
    assert any(word == INSTALL_SCRIPT for word in calls[0]), calls[0]


def test_install_script_is_valid_and_pins_the_same_torch():
    script = ROOT / INSTALL_SCRIPT
    assert os.access(script, os.X_OK), "the Dockerfile and the Makefile run it directly"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    # Argument errors stop before anything is created or installed.
    for argv in ([], ["--no-such-option", "/nonexistent/venv"], ["a", "b", "c"]):
        r = subprocess.run(["bash", str(script), *argv], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "PREFIX" in r.stderr, (argv, r.stderr)
    assert not Path("/nonexistent/venv").exists()
    pins = re.search(r"^TORCH_PINS=\(([^)]*)\)", script.read_text(), re.M)
    assert pins, "TORCH_PINS=(...) not found in the script"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert sorted(pins.group(1).split()) == sorted(
        re.findall(r'"(torch(?:vision)?==[^"]+)"', pyproject)
    )


def test_uv_installs_from_where_pip_would(tmp_path):
    """`make setup` and the image install with uv, which reads no pip configuration: it must get
    pip's indexes, links, constraints and CA bundle, or torch's CUDA build comes from PyPI."""
    spec = importlib.util.spec_from_file_location("uv_install", ROOT / UV_SCRIPT)
    uv_install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(uv_install)
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nextra-index-url = file:///a/simple file:///b/simple\n"
        "find-links = /wheels\nconstraint = /c.txt\ncert = /ca.pem\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = str(conf)
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    settings = uv_install.pip_settings(listing)
    out = uv_install.uv_flags(settings)
    pairs = list(zip(out, out[1:], strict=False))
    assert pairs.index(("--extra-index-url", "file:///a/simple")) < pairs.index(
        ("--extra-index-url", "file:///b/simple")
    )
    for pair in [("--find-links", "/wheels"), ("--constraint", "/c.txt")]:
        assert pair in pairs, out
    assert ("--index-strategy", "unsafe-best-match") in pairs and "--compile-bytecode" in out
    assert "--no-index" not in out
    assert uv_install.uv_env(settings, {})["SSL_CERT_FILE"] == "/ca.pem"
    assert uv_install.uv_env(settings, {"SSL_CERT_FILE": "/own.pem"})["SSL_CERT_FILE"] == "/own.pem"
    # The script refuses an installer it does not know before it creates anything.
    r = subprocess.run(
        ["bash", str(ROOT / INSTALL_SCRIPT), str(tmp_path / "venv")],
        env={**os.environ, "INSTALLER": "conda"}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2 and "INSTALLER" in r.stderr and not (tmp_path / "venv").exists()


# --------------------------------------------------------------------- the image's contract
def test_dockerfile_starts_the_console_command_as_a_non_root_user():
    (cmd,) = instructions("CMD")
    assert exec_form(cmd) == ["camlabel", "serve"]
    assert 'camlabel = "backend.cli:main"' in (ROOT / "pyproject.toml").read_text()
    assert not instructions("ENTRYPOINT")
    (base_arg,) = [a for a in instructions("ARG") if a.startswith("BASE_IMAGE=")]
    assert base_arg.startswith("BASE_IMAGE=python:3.")
    assert instructions("FROM") == ["${BASE_IMAGE}"]
    env = dockerfile_env()
    assert env["PORT"] == "9090" and instructions("EXPOSE") == [env["PORT"]]
    assert env["MODEL_DIR"] == "/data/models" and instructions("VOLUME") == [env["MODEL_DIR"]]
    assert env["DEVICE"] in ("auto", "cpu", "cuda")
    secrets = {"LABEL_STUDIO_API_KEY", "BASIC_AUTH_PASS", "WEBHOOK_SECRET"}
    assert not secrets & set(env), "secrets are given at run time, never baked into the image"
    user = instructions("USER")[-1]
    assert user.split(":")[0] not in ("root", "0") and user.split(":")[0].isdigit()
    unknown = set(env) - backend_env_names() - {
        "PATH", "VIRTUAL_ENV", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
        "NVIDIA_DRIVER_CAPABILITIES",
    }  # fmt: skip
    assert not unknown, f"ENV the backend never reads: {unknown}"
    script = healthcheck_command()[-1]
    assert script.startswith(workdir() + "/")
    assert (ROOT / script.removeprefix(workdir() + "/")).is_file()


def test_dockerignore_keeps_local_state_out_and_the_sources_in():
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]

    def ignored(path: str) -> bool:
        """Docker's rule, simplified: a pattern matches a path or a parent folder from the
        context root; a "**/" prefix lets it match at any depth."""
        parts = path.split("/")
        for p in patterns:
            for i in range(1, len(parts) + 1):
                if p.startswith("**/"):
                    if fnmatch.fnmatch(parts[i - 1], p[3:]):
                        return True
                elif fnmatch.fnmatch("/".join(parts[:i]), p):
                    return True
        return False

    for path in (".venv", ".lsvenv", ".git", "runs", "models", "bench/results/speed.json",
                 "tests/test_deploy.py", ".env", "backend/__pycache__/app.cpython-312.pyc",
                 "camlabel.egg-info"):  # fmt: skip
        assert ignored(path), f"{path} would be sent to the Docker build"
    for path in ("pyproject.toml", "README.md", "backend/app.py", "wsl_models/cli.py",
                 INSTALL_SCRIPT, "scripts/healthcheck.py", "label_config/finding_normal.xml"):  # fmt: skip
        assert not ignored(path), f"{path} is needed by the image but ignored"


def dev_tool(name: str) -> str:
    tool = VENV_BIN / name
    assert tool.exists(), f"{name} is missing: `make setup` installs it (the dev extra)"
    return str(tool)


def test_hadolint_passes():
    hadolint = dev_tool("hadolint")
    r = subprocess.run(
        [hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    config = yaml.safe_load((ROOT / ".hadolint.yaml").read_text())
    text = (ROOT / ".hadolint.yaml").read_text()
    for rule in config.get("ignored", []):  # an ignored rule comes with its reason
        assert re.search(rf"^\s*#\s*{rule}\b.{{40,}}", text, re.M), f"{rule}: no reason given"


# ------------------------------------------------------------------------------- compose
def test_compose_file_is_valid_against_the_compose_spec():
    r = subprocess.run(
        [dev_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
         "docker-compose.yml"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_wires_label_studio_and_the_backend():
    doc = compose()
    services, volumes = doc["services"], doc["volumes"]
    env_df = dockerfile_env()

    ls = services["label-studio"]
    assert ls["image"] == "heartexlabs/label-studio:1.23.2"
    assert ls["environment"]["ML_BLOCK_LOCAL_IP"] == "false"
    assert ls["environment"]["SSRF_PROTECTION_ENABLED"] == "false"
    assert {"LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD"} <= set(ls["environment"])
    assert "/health" in " ".join(ls["healthcheck"]["test"])
    ls_volume, ls_target = ls["volumes"][0].split(":")[:2]
    assert ls_volume in volumes and ls_target == "/label-studio/data"
    ls_port = ls["ports"][0].rsplit(":", 1)[1]

    known = backend_env_names()
    for name in ("camlabel", "camlabel-gpu"):
        svc = services[name]
        env = svc["environment"]
        assert svc["build"]["context"] == "." and "BASE_IMAGE" in svc["build"]["args"]
        assert env["LABEL_STUDIO_URL"] == f"http://label-studio:{ls_port}"
        assert env["LABEL_STUDIO_API_KEY"].startswith("${LABEL_STUDIO_API_KEY")
        for var in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "WEBHOOK_SECRET", "ALLOWED_IMAGE_HOSTS"):
            assert env[var].startswith("${" + var), var
        assert not set(env) - known, f"{name}: variables the backend never reads"
        assert env["MODEL_DIR"] == env_df["MODEL_DIR"]
        volume, target = svc["volumes"][0].split(":")[:2]
        assert volume in volumes and target == env["MODEL_DIR"]
        assert svc["ports"][0].rsplit(":", 1)[1] == env_df["PORT"] == env["PORT"]
        assert svc["depends_on"]["label-studio"]["condition"] == "service_healthy"
        assert svc["healthcheck"]["test"] == ["CMD", *healthcheck_command()]
        assert svc["init"] is True
    assert "profiles" not in services["camlabel"]
    gpu = services["camlabel-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["environment"]["DEVICE"] == "cuda"
    assert "nvidia/cuda" in gpu["build"]["args"]["BASE_IMAGE"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    # Two backends never share one MODEL_DIR (one training queue per directory).
    assert services["camlabel"]["volumes"][0].split(":")[0] != gpu["volumes"][0].split(":")[0]


# ------------------------------------------------------- the start command, outside Docker
def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time, state) from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = (int(fields[1]), fields[19], fields[0])
    return out


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _descendants(root: int) -> dict[int, tuple[str, str]]:
    """pid -> (start time, command line) of every process below ``root``."""
    procs = _processes()
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start, _) in procs.items():
            if ppid == parent and pid not in found:
                found[pid] = (start, _cmdline(pid))
                frontier.append(pid)
    return found


def _alive(snapshot: dict[int, tuple[str, str]]) -> dict[int, str]:
    procs = _processes()
    return {
        pid: cmd
        for pid, (start, cmd) in snapshot.items()
        if pid in procs and procs[pid][1] == start and procs[pid][2] != "Z"
    }


def _wait_gone(snapshot: dict[int, tuple[str, str]], until=None) -> None:
    """Wait while the processes of ``snapshot`` exit one after another, until ``until()`` or
    until all are gone; fail, naming those left, when none has exited for STALL_S seconds (a
    shutdown that stopped moving: a leftover's CPU use is not progress)."""

    def check():
        left = _alive(snapshot)
        done = until() if until is not None else not left
        return (True if done else None), sorted(left)

    wait_while_progressing(check, lambda: [], "the processes to exit", poll=0.2, must_live=False)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_start_command_serves_health_and_stops_without_leftovers(tmp_path):
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_", "WEBHOOK_", "TRAIN_"))
    }
    env.update({k: v for k, v in dockerfile_env().items() if k not in ("PATH", "VIRTUAL_ENV")})
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MODEL_DIR": str(tmp_path / "models"),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "BASIC_AUTH_USER": AUTH[0],
        "BASIC_AUTH_PASS": AUTH[1],
    })  # fmt: skip
    (cmd,) = instructions("CMD")
    argv = exec_form(cmd)
    program = shutil.which(argv[0], path=env["PATH"])
    assert program and Path(program).parent == VENV_BIN, f"{argv[0]} is not in {VENV_BIN}"
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [program, *argv[1:]], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: cleaned up below even on failure
        )  # fmt: skip
    snapshot: dict[int, tuple[str, str]] = {}
    try:
        wait_http(f"{url}/health", proc)
        assert requests.get(f"{url}/health", timeout=10).status_code == 401  # auth is on
        health = requests.get(f"{url}/health", auth=AUTH, timeout=10)
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "UP" and health.json()["trained"] is False

        # The HEALTHCHECK command as the image runs it, WORKDIR being this checkout.
        check = healthcheck_command()
        check = [c.replace(workdir() + "/", f"{ROOT}/", 1) for c in check]
        check[0] = shutil.which(check[0], path=env["PATH"]) or check[0]
        ok = subprocess.run(check, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0 and "healthy" in ok.stdout, ok.stdout + ok.stderr
        bad = subprocess.run(
            check, env={**env, "BASIC_AUTH_PASS": "wrong"}, cwd=ROOT,
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert bad.returncode == 1 and "401" in bad.stderr, bad.stdout + bad.stderr

        # gunicorn workers and the training worker are all below the master (`camlabel serve`
        # execs gunicorn in place, so the master keeps the pid).
        def worker_started():
            found = _descendants(proc.pid)
            started = any("backend.cli worker" in c for _, c in found.values())
            return (found if started else None), sorted(found)

        snapshot = wait_while_progressing(worker_started, proc.pid, "a training worker")
        assert "gunicorn" in _cmdline(proc.pid), _cmdline(proc.pid)

        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends to PID 1
        _wait_gone(snapshot, until=lambda: proc.poll() is not None)  # the master first
        assert proc.returncode == 0
        _wait_gone(snapshot)
    except BaseException:
        print(log_path.read_text()[-5000:])
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for pid in _alive(snapshot):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_the_leftover_check_sees_an_orphan():
    """The check above is not vacuous: a child that outlives its killed parent is reported."""
    parent = subprocess.Popen(["bash", "-c", "sleep 60 & wait"], start_new_session=True)
    try:
        snapshot = wait_while_progressing(
            lambda: (_descendants(parent.pid) or None, None), parent.pid, "bash to start sleep"
        )
        assert any("sleep 60" in cmd for _, cmd in snapshot.values()), snapshot
        parent.kill()
        parent.wait(timeout=10)
        assert list(_alive(snapshot).values()) == [next(iter(snapshot.values()))[1]]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)  # the orphan is still in the group
    _wait_gone(snapshot)


USER_DOCS = ["README.md", "label_config/README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]  # fmt: skip


def _links(text: str) -> list[str]:
    """Relative link targets of a markdown text (images included), without their anchor."""
    found = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.split("#")[0] for t in found if not t.startswith(("http:", "https:", "mailto:", "#"))]


def test_user_docs_links_resolve():
    """Every relative link of the README and the docs pages names a file of the repository."""
    broken = []
    for doc in USER_DOCS:
        path = ROOT / doc
        for target in _links(path.read_text()):
            if target and not (path.parent / target).exists():
                broken.append(f"{doc}: {target}")
    assert not broken, broken


def test_readme_is_short_and_user_docs_name_no_issues():
    """The README is an entry point (at most 250 lines; the rest lives in docs/ pages), and
    user-facing pages speak of features, not of the issue tracker."""
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 250, f"README.md has {len(readme)} lines; move detail to docs/"
    for doc in USER_DOCS:
        hits = re.findall(r"\bissues? \d+", (ROOT / doc).read_text(), flags=re.IGNORECASE)
        assert not hits, f"{doc} names {hits}"
