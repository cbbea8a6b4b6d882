"""One inference thread per worker process: requests hand it their images and wait.

Why one: forwards from several request threads at once fight over the same cores (each
PyTorch op is already parallel). The thread takes the oldest waiting job and adds every other
waiting job of the same version while the batch holds at most ``max_batch`` images.

A task must get the same score alone or among others, bit for bit (annotators follow the
ranking). MC Dropout draws from its own seeded generator, one mask per sample for the whole
batch, so sampling is batch-independent; convolutions are not (oneDNN and cuDNN pick their
blocking by batch size: differences in the 7th digit). So with ``exact`` (the default) each
image of a batch runs its own forward. On CPU that costs nothing: batch-1 forwards of the
Lite trio were faster per image than batch 8 here (bench/batch_invariance.py). On a GPU,
``exact=False`` (BATCH_INVARIANT=0) forwards the batch at once.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from wsl_models.ensemble import Ensemble, EnsembleOutput

log = logging.getLogger(__name__)

MC_SEED = 0  # every prediction draws the same MC Dropout masks: scores are reproducible


@dataclass(eq=False)  # identity: deque.remove must not compare the image tensors
class _Job:
    ensemble: Ensemble | None
    images: torch.Tensor  # (n, 3, H, W)
    samples: int | None = None  # MC Dropout samples (None: the version's own; 0: none)
    future: Future = field(default_factory=Future)
    task: Callable[[], Any] | None = None  # other model work, run alone (call())


class InferenceEngine:
    def __init__(self, max_batch: int = 8, exact: bool = True) -> None:
        self.max_batch = max(1, int(max_batch))
        self.exact = exact
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="camlabel-infer", daemon=True)
        self._thread.start()
        self.batches = 0  # batches run so far (benchmarks report images per batch)

    def predict(
        self, ensemble: Ensemble, images: torch.Tensor, samples: int | None = None
    ) -> list[EnsembleOutput]:
        """One output per image (batch of 1 each), in order; blocks until they are computed."""
        jobs = [
            _Job(ensemble, images[i : i + self.max_batch], samples)
            for i in range(0, len(images), self.max_batch)
        ]
        with self._cond:
            if self._closed:
                raise RuntimeError("the inference engine is closed")
            self._jobs.extend(jobs)
            self._cond.notify()
        return [out for job in jobs for out in job.future.result()]

    def call(self, task: Callable[[], Any]) -> Any:
        """``task()`` on the inference thread (other forwards of a request, e.g. the smart
        keypoints' features), so they too never fight the predictions over the cores."""
        job = _Job(None, torch.empty(0), task=task)
        with self._cond:
            if self._closed:
                raise RuntimeError("the inference engine is closed")
            self._jobs.append(job)
            self._cond.notify()
        return job.future.result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _next_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if not self._jobs:
                return None
            batch = [self._jobs.popleft()]
            size = len(batch[0].images)
            if batch[0].task is not None:
                return batch
            for job in list(self._jobs):
                # (a task() job has no ensemble, so it never joins a batch)
                same = job.ensemble is batch[0].ensemble and job.samples == batch[0].samples
                if same and size + len(job.images) <= self.max_batch:
                    self._jobs.remove(job)
                    batch.append(job)
                    size += len(job.images)
            return batch

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            ensemble = batch[0].ensemble
            if batch[0].task is not None:
                self._run(batch[0])
                continue
            try:
                x = torch.cat([job.images for job in batch])
                step = 1 if self.exact else len(x)
                per_image: list[EnsembleOutput] = []
                for i in range(0, len(x), step):
                    out = ensemble.predict(x[i : i + step], seed=MC_SEED, samples=batch[0].samples)
                    per_image += [out.select(slice(j, j + 1)) for j in range(len(out.probs))]
                self.batches += 1
            except Exception as exc:  # the requests get the error, the thread lives on
                log.exception("inference of %d images failed", sum(len(j.images) for j in batch))
                for job in batch:
                    job.future.set_exception(exc)
                continue
            start = 0
            for job in batch:
                job.future.set_result(per_image[start : start + len(job.images)])
                start += len(job.images)

    @staticmethod
    def _run(job: _Job) -> None:
        try:
            job.future.set_result(job.task())
        except Exception as exc:  # the request gets the error, the thread lives on
            log.exception("inference task failed")
            job.future.set_exception(exc)
