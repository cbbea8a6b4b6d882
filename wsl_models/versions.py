"""A model directory of immutable versions and an atomically switched pointer to the current one.

    MODEL_DIR/versions/<id>/manifest.json   config, classes, metrics, file hashes, time
    MODEL_DIR/versions/<id>/<k>-<member>.pt one state dict per member
    MODEL_DIR/CURRENT                       the current version id (replaced with os.replace)

A version folder is written under a temporary name and renamed into place only when complete,
so a crash mid-training never leaves a half version behind and never touches CURRENT.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .ensemble import Ensemble, EnsembleConfig
from .members import build_member

MANIFEST = "manifest.json"


class VersionError(RuntimeError):
    """A version that is missing, incomplete or corrupt; it is never loaded."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class ModelStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"

    def current_id(self) -> str | None:
        pointer = self.root / "CURRENT"
        if not pointer.is_file():
            return None
        vid = pointer.read_text().strip()
        return vid or None

    def version_ids(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.versions_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()
        )

    def manifest(self, vid: str) -> dict[str, Any]:
        path = self.versions_dir / vid / MANIFEST
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise VersionError(f"version {vid}: manifest unreadable ({exc})") from exc

    def save(
        self, ensemble: Ensemble, metrics: dict[str, Any], make_current: bool = True, **extra: Any
    ) -> str:
        vid = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.versions_dir / f".tmp-{vid}"
        tmp.mkdir()
        try:
            files = {}
            for k, member in enumerate(ensemble.members):
                name = f"{k}-{member.name}.pt"
                path = tmp / name
                torch.save({n: t.cpu() for n, t in member.state_dict().items()}, path)
                files[name] = _sha256(path)
            manifest = {
                "version": vid,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "config": ensemble.config.to_dict(),
                "files": files,
                "metrics": metrics,
                **extra,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            for p in tmp.iterdir():
                with p.open("rb") as fh:
                    os.fsync(fh.fileno())
            os.rename(tmp, self.versions_dir / vid)
            _fsync_dir(self.versions_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if make_current:
            self.set_current(vid)
        return vid

    def set_current(self, vid: str) -> None:
        if vid not in self.version_ids():
            raise VersionError(f"no complete version {vid!r} in {self.versions_dir}")
        _write_atomic(self.root / "CURRENT", vid.encode())

    def load(self, vid: str | None = None, device: str | torch.device = "cpu") -> Ensemble:
        """Load a version (default: current), verifying every file against its hash."""
        vid = vid or self.current_id()
        if vid is None:
            raise VersionError(f"{self.root} has no current model version: train one first")
        manifest = self.manifest(vid)
        config = EnsembleConfig.from_dict(manifest["config"])
        members = []
        for k, name in enumerate(config.members):
            fname = f"{k}-{name}.pt"
            path = self.versions_dir / vid / fname
            if not path.is_file() or _sha256(path) != manifest["files"].get(fname):
                raise VersionError(f"version {vid}: {fname} is missing or corrupt")
            member = build_member(
                name,
                len(config.classes),
                "none",
                config.dropout,
                config.output_stride,
                config.localizer,
                config.decoder,
            )
            member.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            members.append(member.eval())
        return Ensemble(members, config).to(device)
