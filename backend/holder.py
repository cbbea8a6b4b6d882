"""The versions this worker process serves: one loaded ensemble per model line.

A version is loaded (hash-checked, moved to the device) in a background thread and swapped in
whole when ready; until then the line's previous version keeps serving, so no request and no
/health probe ever waits on a load. Only the start of a worker loads synchronously
(``preload``), before it accepts requests; then a watcher checks every line's CURRENT each
second, so new versions are usually in before anyone asks for them.
"""

from __future__ import annotations

import logging
import threading
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
        self._lock = threading.Lock()
        self._loaded: dict[str, tuple[Ensemble, str]] = {}  # line key -> (ensemble, version)
        self._served: dict[int | None, str] = {}  # project -> line key it was last served from
        self._loading: dict[str, Future] = {}
        self._errors: dict[str, tuple[str, str]] = {}  # line key -> (version, why it failed)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="camlabel-load")
        self._stop = threading.Event()

    @property
    def last_error(self) -> str | None:
        return "; ".join(why for _, why in self._errors.values()) or None

    def preload(self) -> None:
        """Load every line's current version now (a worker's start, before any request)."""
        for key in self.lines.keys():
            vid = self.lines.store(key).current_id()
            if vid:
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
            if wanted:
                with self._lock:
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
        meanwhile the version that served this project before answers."""
        key, wanted = self.lines.serving(pid)
        with self._lock:
            if wanted:
                self._schedule(key, wanted)
            have = self._loaded.get(key)
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

    def _load(self, key: str, vid: str) -> None:
        try:
            ensemble = self._prepared(self.lines.store(key).load(vid, self.device), vid)
            with self._lock:
                self._loaded[key] = (ensemble, vid)
                self._errors.pop(key, None)
            log.info("line %s: serving model version %s", key, vid)
        except VersionError as exc:  # keep serving the version we have
            self._errors[key] = (vid, str(exc))
            log.error("line %s: cannot load version %s: %s", key, vid, exc)
        finally:
            with self._lock:
                self._loading.pop(key, None)

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
