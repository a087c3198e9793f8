"""Dynamic batching: one queue and one worker thread per head. The worker takes the first waiting request, then
gathers more for up to `max_wait` seconds (0, the default: those already queued, which under load are the ones that
arrived while the head ran; on a 2-core CPU a 5 ms wait lost throughput) or until `max_batch` images, runs the head
once per image size on the gathered images, and hands each request its own slice. A request is never split (so
`max_batch=1` means no batching across requests); one larger than `max_batch` runs alone.

Heads score each image on its own, so a request's scores do not depend on what it was batched with (the
shapes-world heads exactly; a learned model up to its kernels' batch-size-dependent rounding). When a gathered
batch fails, each request in it is retried alone, so one bad request never fails its neighbours."""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from spatialscore.heads import RewardHead
from spatialscore.serve.protocol import DecodedItem

log = logging.getLogger(__name__)


@dataclass
class Scored:
    scores: list[float]
    extras: dict[str, list[float]]
    batch_size: int


@dataclass
class _Job:
    items: list[DecodedItem]
    future: Future = field(default_factory=Future)


class HeadBatcher:
    def __init__(self, name: str, head: RewardHead, max_batch: int, max_wait: float):
        self.name, self.head, self.max_batch, self.max_wait = name, head, max_batch, max_wait
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._carry: _Job | None = None
        self._thread = threading.Thread(target=self._run, name=f"head-{name}", daemon=True)
        self._thread.start()

    def submit(self, items: list[DecodedItem]) -> Future:
        job = _Job(items)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _gather(self) -> list[_Job] | None:
        first = self._carry or self._queue.get()
        self._carry = None
        if first is None:
            return None
        jobs, count = [first], len(first.items)
        deadline = time.monotonic() + self.max_wait
        while count < self.max_batch:
            try:
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if job is None:  # closing: put the sentinel back, so the loop ends after this batch
                self._queue.put(None)
                break
            if count + len(job.items) > self.max_batch:
                self._carry = job
                break
            jobs.append(job)
            count += len(job.items)
        return jobs

    def _run(self) -> None:
        """The worker loop. It must outlive anything a request does: a request cancelled while queued (its client
        went away, the server is stopping) is skipped, and no error ends the loop."""
        while True:
            jobs = self._gather()
            if jobs is None:
                return
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            try:
                self._serve(jobs)
            except Exception:  # a bug here must not leave every later request to this head waiting forever
                log.exception("head %s: the batch loop failed", self.name)
                for job in jobs:
                    self._settle(job, error=RuntimeError("the server failed to score this request"))

    def _serve(self, jobs: list[_Job]) -> None:
        try:
            results = self._score(jobs)
        except Exception as err:
            if len(jobs) == 1:
                self._fail(jobs[0], err)
                return
            for job in jobs:  # retry each alone, so one bad request does not fail its neighbours
                try:
                    self._settle(job, result=self._score([job])[0])
                except Exception as alone:
                    self._fail(job, alone)
            return
        for job, result in zip(jobs, results):
            self._settle(job, result=result)

    @staticmethod
    def _settle(job: _Job, result: Scored | None = None, error: Exception | None = None) -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    def _fail(self, job: _Job, err: Exception) -> None:
        log.error("head %s failed on a request: %s: %s", self.name, type(err).__name__, err)
        self._settle(job, error=err)

    @torch.no_grad()
    def _score(self, jobs: list[_Job]) -> list[Scored]:
        items = [item for job in jobs for item in job.items]
        scores = [0.0] * len(items)
        extras: dict[str, list[float]] = {}
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(items):
            by_size.setdefault(tuple(item.image.shape[1:]), []).append(index)
        for indices in by_size.values():
            out = self.head(torch.stack([items[i].image for i in indices]), [items[i].prompt for i in indices],
                            [items[i].meta for i in indices])
            for position, value in zip(indices, out.scores.float().tolist()):
                scores[position] = value
            for key, tensor in out.extras.items():
                column = extras.setdefault(key, [float("nan")] * len(items))
                for position, value in zip(indices, tensor.float().flatten().tolist()):
                    column[position] = value
        results, start = [], 0
        for job in jobs:
            end = start + len(job.items)
            results.append(Scored(scores[start:end], {k: v[start:end] for k, v in extras.items()}, len(items)))
            start = end
        return results
