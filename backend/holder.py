"""The versions this worker process serves: one loaded ensemble per model line.

A version is loaded (hash-checked, moved to the device) in a background thread and swapped in
whole when ready; until then the line's previous version keeps serving, so no request and no
/health probe ever waits on a load. Only the start of a worker loads synchronously
(``preload``), before it accepts requests; then a watcher checks every line's CURRENT each
second, so new versions are usually in before anyone asks for them.

Memory is bounded by MAX_LOADED_LINES: past it, the project line least recently asked for is
dropped. Its next request waits while it loads back: serving another version in the meantime
would answer the project with a model that is not its own.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from wsl_models.ensemble import Ensemble
from wsl_models.train_config import resolve_device
from wsl_models.versions import VersionError

from .lines import BASE, ModelLines
from .settings import Settings

log = logging.getLogger(__name__)

Served = tuple[Ensemble | None, str | None]


class ModelHolder:
    def __init__(self, settings: Settings) -> None:
        self.lines = ModelLines(settings.model_dir, settings.base_model)
        self.device = resolve_device(settings.device)
        self.amp = settings.amp
        self.map_source = settings.map_source
        if settings.max_loaded_lines < 0:
            raise ValueError(f"MAX_LOADED_LINES must be 0 or more, not {settings.max_loaded_lines}")
        self.max_lines = settings.max_loaded_lines  # project lines kept loaded; 0: no limit
        self._lock = threading.Lock()
        self._loaded: dict[str, tuple[Ensemble, str]] = {}  # line key -> (ensemble, version)
        self._served: dict[int | None, str] = {}  # project -> line key it was last served from
        self._loading: dict[str, Future] = {}
        self._errors: dict[str, tuple[str, str]] = {}  # line key -> (version, why it failed)
        self._used: dict[str, float] = {}  # line key -> when a request last asked for it
        self._dropped: set[str] = set()  # project lines unloaded to keep within max_lines
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="camlabel-load")
        self._stop = threading.Event()

    @property
    def last_error(self) -> str | None:
        return "; ".join(why for _, why in self._errors.values()) or None

    def loaded(self) -> list[str]:
        """The line keys loaded now."""
        with self._lock:
            return sorted(self._loaded)

    def preload(self) -> None:
        """Load every line's current version now (a worker's start, before any request): the
        base model's, then the projects' newest versions first, as many as max_lines allows."""
        current = [(key, self.lines.store(key).current_id()) for key in self.lines.keys()]
        base = [(k, v) for k, v in current if k == BASE and v]
        projects = sorted(((k, v) for k, v in current if k != BASE and v),
                          key=lambda kv: kv[1], reverse=True)  # fmt: skip
        if self.max_lines:
            self._dropped.update(k for k, _ in projects[self.max_lines :])
            projects = projects[: self.max_lines]
        for key, vid in base + projects:
            self._load(key, vid)

    def watch(self, interval: float = 1.0) -> None:
        """Check every line's CURRENT every ``interval`` seconds and load what changed, so a
        version trained a moment ago is in before its project's next request (a request
        would otherwise get the previous version once, while its load starts)."""

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.refresh()
                except Exception:  # a transient filesystem error must not end the watch
                    log.exception("checking the model lines failed")

        threading.Thread(target=loop, name="camlabel-watch", daemon=True).start()

    def refresh(self) -> None:
        """Start loading every line whose CURRENT differs from what is loaded."""
        for key in self.lines.keys():
            wanted = self.lines.store(key).current_id()
            with self._lock:
                if wanted and key not in self._dropped:  # a dropped line: back when asked for
                    self._schedule(key, wanted)

    def close(self) -> None:
        self._stop.set()

    def _schedule(self, key: str, wanted: str) -> None:
        """Under the lock: load ``wanted`` for line ``key`` in the background if it is new."""
        have = self._loaded.get(key)
        stale = have is None or have[1] != wanted
        failed = self._errors.get(key, ("",))[0] == wanted  # not retried on every request
        if stale and not failed and key not in self._loading:
            self._loading[key] = self._loader.submit(self._load, key, wanted)

    def get(self, pid: int | None = None) -> Served:
        """The version serving project ``pid`` now. A newer one is loaded in the background;
        meanwhile the version that served this project before answers. A line dropped to keep
        within max_lines is loaded back first."""
        key, wanted = self.lines.serving(pid)
        with self._lock:
            self._used[key] = time.monotonic()
            if wanted:
                self._schedule(key, wanted)
            have = self._loaded.get(key)
            reload = self._loading.get(key) if have is None and key in self._dropped else None
        if reload is not None:
            have = reload.result()  # None when it failed (logged): the fallback below answers
        with self._lock:
            if have is None:  # this line is not loaded yet: what served the project so far
                have = self._loaded.get(self._served.get(pid, BASE))
            else:
                self._served[pid] = key
        return have if have is not None else (None, None)

    def load_now(self, pid: int | None) -> Served:
        """The project's current version, loaded here and now (ranking, CLI: not a request)."""
        key, vid = self.lines.serving(pid)
        if vid is None:
            return None, None
        ensemble = self.lines.store(key).load(vid, self.device)
        return self._prepared(ensemble, vid), vid

    def settle(self, timeout: float = 60.0) -> None:
        """Wait for background loads in flight (tests and benchmarks)."""
        with self._lock:
            pending = list(self._loading.values())
        for f in pending:
            f.result(timeout)

    def _load(self, key: str, vid: str) -> Served | None:
        try:
            ensemble = self._prepared(self.lines.store(key).load(vid, self.device), vid)
            with self._lock:
                self._loaded[key] = (ensemble, vid)
                self._errors.pop(key, None)
                self._dropped.discard(key)
                self._used.setdefault(key, time.monotonic())
                self._drop_over_limit(keep=key)
            log.info("line %s: serving model version %s", key, vid)
            return ensemble, vid
        except VersionError as exc:  # keep serving the version we have
            self._errors[key] = (vid, str(exc))
            log.error("line %s: cannot load version %s: %s", key, vid, exc)
            return None
        finally:
            with self._lock:
                self._loading.pop(key, None)

    def _drop_over_limit(self, keep: str) -> None:
        """Under the lock: unload the least recently asked-for project lines past max_lines
        (never the base model's, nor ``keep``). Requests already holding one finish with it."""
        projects = [k for k in self._loaded if k != BASE]
        over = len(projects) - self.max_lines
        if not self.max_lines or over <= 0:
            return
        by_age = sorted((k for k in projects if k != keep), key=lambda k: self._used.get(k, 0.0))
        for key in by_age[:over]:
            del self._loaded[key]
            self._dropped.add(key)
            log.info("line %s: unloaded, the least recently used (MAX_LOADED_LINES=%d)",
                     key, self.max_lines)  # fmt: skip

    def _prepared(self, ensemble: Ensemble, vid: str) -> Ensemble:
        ensemble.amp = self.amp
        if self.map_source:  # MAP_SOURCE overrides the version's own source where it has it
            if self.map_source in ensemble.config.sources:
                ensemble.config.map_source = self.map_source
            else:
                log.warning("version %s has no %r maps (it has %s): serving its own %r",
                            vid, self.map_source, ensemble.config.sources,
                            ensemble.config.map_source)  # fmt: skip
        return ensemble
