"""Model lines: each Label Studio project trains and serves its own versions.

    MODEL_DIR/projects/<id>/versions/, CURRENT   the project's line (a ModelStore)
    MODEL_DIR/projects/<id>/job.json             its last training job
    MODEL_DIR/projects/<id>/click_masks/         clicked tasks' spread masks, made once
    BASE_MODEL (default MODEL_DIR itself)        a line trained offline (`camlabel train`)

A project is served from its own CURRENT; until it has one, from the base model's, which is
also what its first version fine-tunes from (when the classes fit). An existing single-line
MODEL_DIR therefore keeps working: it is the base model of every project.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsl_models.versions import ModelStore

PROJECTS = "projects"
BASE = "base"


def project_id(value: Any) -> int | None:
    """The project id of a request: 12, "12", or Label Studio's "<id>.<created timestamp>"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value < 2**63 else None
    if isinstance(value, str):
        head = value.split(".", 1)[0].strip()
        if head.isascii() and head.isdigit() and 0 < int(head) < 2**63:
            return int(head)
    return None


class ModelLines:
    def __init__(self, model_dir: str | Path, base_model: str | Path = "") -> None:
        self.root = Path(model_dir)
        self.base = ModelStore(base_model or model_dir)

    def project_dir(self, pid: int) -> Path:
        return self.root / PROJECTS / str(int(pid))

    def project(self, pid: int) -> ModelStore:
        return ModelStore(self.project_dir(pid))

    def project_ids(self) -> list[int]:
        folder = self.root / PROJECTS
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def store(self, key: str) -> ModelStore:
        return self.base if key == BASE else self.project(int(key))

    def keys(self) -> list[str]:
        """Every line: the base model's, then each project's."""
        return [BASE, *(str(p) for p in self.project_ids())]

    def serving(self, pid: int | None) -> tuple[str, str | None]:
        """(line key, version id) that serves project ``pid`` now: its own line once it has a
        current version, else the base model (None: the base model). One read per pointer."""
        if pid is not None:
            vid = self.project(pid).current_id()
            if vid:
                return str(int(pid)), vid
        return BASE, self.base.current_id()

    def versions(self, pid: int | None = None) -> list[str]:
        """The base model's versions, then the project's (every project's when ``pid`` is None)."""
        pids = self.project_ids() if pid is None else [pid]
        return self.base.version_ids() + [v for p in pids for v in self.project(p).version_ids()]

    def find(self, vid: str) -> ModelStore | None:
        """The store holding version ``vid`` (ids are unique: a timestamp and random bits)."""
        for store in [self.base, *(self.project(p) for p in self.project_ids())]:
            if vid in store.version_ids():
                return store
        return None
