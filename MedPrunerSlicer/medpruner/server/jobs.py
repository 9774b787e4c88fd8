"""The job queue: one worker thread runs jobs one at a time on the model's device, through the same
`run_ask` as the CLI; the HTTP side only reads job states. Finished jobs are kept for `keep_seconds`
and at most `keep_jobs` of them, then deleted with their files.

A queued job holds its upload as the file the client sent, on disk in its private folder, never
as decoded voxels in memory; the worker reads it (in a limited child process, `bounded_read`)
only when the job runs, and deletes the upload folder right after, whether the read worked or not.
A job keeps its answer as it is generated (`answer_so_far` in its status); each change wakes the
job's event streams through its `events.JobFeed`. A queue slot is reserved before an upload's body
is read, so a full queue is a 429 that costs nothing.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PruningConfig
from ..errors import Cancelled, MedPrunerError
from ..pipeline import AskRequest, run_ask
from .bounded_read import read_upload
from .errors import scrub
from .events import JobFeed, job_events
from .job_status import job_status

log = logging.getLogger("medpruner.server")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


@dataclass
class Upload:
    """An uploaded volume waiting for its job: the private folder that holds it, the file, its format."""

    folder: Path
    path: Path
    kind: str


@dataclass
class Job:
    id: str
    request: AskRequest
    upload: Upload | None           # the volume as sent, or None for a volume_id follow-up
    volume_id: str | None
    out_dir: Path
    state: str = QUEUED
    stage: str = "queued"
    progress: float = 0.0
    error: dict[str, str] | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    answer: str = ""                # the answer so far; the whole answer once done
    feed: JobFeed = field(default_factory=JobFeed)

    def status(self, position: int | None) -> dict[str, Any]:
        return job_status(self, position)


class QueueFull(Exception):
    pass


class Slot:
    """A place in the queue held for an upload while its body is read; used once, or released."""

    def __init__(self) -> None:
        self.open = True


class JobManager:
    """Queue, worker and retention of jobs; every method is safe to call from HTTP handlers."""

    def __init__(self, engine, root: Path, max_queue: int, keep_jobs: int, keep_seconds: float,
                 prepared_cache=None, read_limits=None) -> None:
        self.engine = engine
        self.root = root
        self.max_queue = max_queue
        self.keep_jobs = keep_jobs
        self.keep_seconds = keep_seconds
        self.prepared_cache = prepared_cache
        self.read_limits = read_limits
        self.reserved = 0
        self.jobs: dict[str, Job] = {}
        self.queue: deque[Job] = deque()
        self.lock = threading.Condition()
        self.stopping = False
        self.worker = threading.Thread(target=self._work, name="medpruner-worker", daemon=True)

    def start(self) -> None:
        self.worker.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Cancel every job (queued ones never run, the running one stops at its next stage or token), delete
        queued uploads, and wait up to `timeout` s for the worker; True when it has ended."""
        with self.lock:
            self.stopping = True
            for job in self.jobs.values():
                job.cancel_event.set()
            for job in self.queue:
                _remove_upload(job)
                self._finish(job, CANCELLED)
            self.queue.clear()
            self.lock.notify_all()
        if self.worker.is_alive():
            self.worker.join(timeout=timeout)
        return not self.worker.is_alive()

    # -- HTTP side ------------------------------------------------------------------------------
    def reserve(self) -> Slot:
        """Hold a queue place for an upload about to be read; QueueFull when there is none."""
        with self.lock:
            if self.stopping or len(self.queue) + self.reserved >= self.max_queue:
                raise QueueFull()
            self.reserved += 1
            return Slot()

    def release(self, slot: Slot) -> None:
        with self.lock:
            if slot.open:
                slot.open = False
                self.reserved -= 1

    def submit(self, slot: Slot, request: AskRequest, upload: Upload | None, volume_id: str | None) -> Job:
        """Queue a job in the place `slot` held."""
        with self.lock:
            if not slot.open or self.stopping:
                raise QueueFull()
            slot.open = False
            self.reserved -= 1
            job_id = uuid.uuid4().hex
            job = Job(id=job_id, request=request, upload=upload, volume_id=volume_id, out_dir=self.root / job_id)
            self.jobs[job_id] = job
            self.queue.append(job)
            self.lock.notify_all()
        log.info("job %s queued (position %d)", job_id, len(self.queue))
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        with self.lock:
            for index, queued in enumerate(self.queue):
                if queued is job:
                    return index + 1
            return 0 if job.state == RUNNING else None

    def cancel(self, job: Job) -> None:
        with self.lock:
            if job.state == QUEUED:
                self.queue.remove(job)
                self._finish(job, CANCELLED)
                _remove_upload(job)
            elif job.state == RUNNING:
                job.cancel_event.set()   # the worker stops at the next stage or token
        log.info("job %s cancel requested", job.id)

    def end_streams(self) -> None:
        """The HTTP server is stopping: end every job's event stream now (jobs are stopped later, by `stop`)."""
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.feed.close()

    def queue_length(self) -> int:
        with self.lock:
            return len(self.queue)

    def health(self) -> dict[str, Any]:
        """The model and queue facts of GET /v1/health."""
        return {**engine_facts(self.engine), "queue_length": self.queue_length()}

    def prepared_verdict(self, volume_id: str, request: AskRequest) -> str | None:
        """None when a follow-up about `volume_id` can be queued, else why not (see `prepared_verdict`)."""
        return prepared_verdict(self.engine, self.prepared_cache, volume_id, request)

    def events(self, job: Job):
        """The job's Server-Sent Events; its final event is sent once it has finished (position None)."""
        return job_events(job, lambda: job.status(None))

    # -- worker side ----------------------------------------------------------------------------
    def _finish(self, job: Job, state: str, error: dict[str, str] | None = None) -> None:
        job.error, job.finished, job.stage = error, time.time(), state
        job.state = state   # last: a stream that sees the final state has everything else
        job.feed.changed()

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.queue and not self.stopping:
                    self.lock.wait(timeout=30)
                    self._expire()
                if self.stopping:
                    return
                job = self.queue.popleft()
                job.state, job.started, job.stage = RUNNING, time.time(), "load"
            job.feed.changed()
            self._run(job)
            with self.lock:
                self._expire()

    def _run(self, job: Job) -> None:
        def progress(stage: str, fraction: float) -> None:
            job.stage, job.progress = stage, fraction
            job.feed.changed()

        def on_text(delta: str, text: str) -> None:
            job.answer = text
            job.feed.changed()

        started = time.perf_counter()
        relieve_memory_pressure(self.engine, self.prepared_cache)
        try:
            upload, job.upload = job.upload, None   # the job owns it no longer: execute_job deletes it
            state, error = execute_job(self.engine, job.request, upload, job.volume_id, job.out_dir,
                                       self.prepared_cache, self.read_limits, job.cancel_event.is_set,
                                       progress, on_text, job.id)
            if state == DONE:
                job.progress = 1.0
        finally:
            _remove_upload(job)
        with self.lock:
            self._finish(job, state, error)
        log.info("job %s %s in %.2f s", job.id, state, time.perf_counter() - started)

    def _expire(self) -> None:
        """Delete finished jobs past the time limit, then the oldest beyond the count limit (lock held)."""
        now = time.time()
        finished = sorted((j for j in self.jobs.values() if j.state in FINISHED), key=lambda j: j.finished)
        excess = max(0, len(finished) - self.keep_jobs)
        for index, job in enumerate(finished):
            if index < excess or now - job.finished > self.keep_seconds:
                del self.jobs[job.id]
                shutil.rmtree(job.out_dir, ignore_errors=True)



def execute_job(engine, request: AskRequest, upload: Upload | None, volume_id: str | None, out_dir: Path,
                prepared_cache, read_limits, cancel, progress, on_text, job_id: str) -> tuple[str, dict | None]:
    """Run one job to its end: (state, error) with the error fit for a client; `out_dir` holds the outputs
    only when the state is DONE. The upload's folder is deleted as soon as it was read, or failed to be.

    The one place a job runs, for the single server's worker and for each replica of a replica set,
    so both answer, fail and clean up alike."""
    try:
        image = None
        if upload is not None:
            progress("load", 0.0)
            try:
                image = read_upload(upload.path, upload.kind, read_limits, cancel)
            finally:
                shutil.rmtree(upload.folder, ignore_errors=True)   # the file the client sent is gone, read or not
        run_ask(engine, image, request, out_dir, progress=progress, cancel=cancel, prepared_cache=prepared_cache,
                volume_id=volume_id, make_parents=False, on_text=on_text)
        del image
        state, error = DONE, None
    except Cancelled:
        state, error = CANCELLED, None
    except MedPrunerError as exc:
        state, error = FAILED, {"code": exc.code, "message": exc.message, "hint": exc.hint}
    except Exception as exc:   # a failing job never takes the worker down
        if _is_out_of_memory(exc) and prepared_cache is not None:
            prepared_cache.clear()
            _empty_accelerator_cache()
            hint = "The accelerator ran out of memory; the cache of prepared volumes was cleared. Try again " \
                   "with fewer slices (max_slices) or a smaller model."
        else:
            hint = "See the server's log."
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        state, error = FAILED, {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"[:500],
                                "hint": hint}
    finally:
        if upload is not None:
            shutil.rmtree(upload.folder, ignore_errors=True)
    if error is not None:
        error = {key: scrub(value) if key != "code" else value for key, value in error.items()}
    if state != DONE:
        shutil.rmtree(out_dir, ignore_errors=True)
    return state, error


def relieve_memory_pressure(engine, prepared_cache) -> None:
    """Before a job: drop cached prepared volumes, oldest first, while the device's memory is nearly full."""
    if prepared_cache is None:
        return
    from ..prepared_cache import MIN_FREE_FRACTION, free_memory_fraction

    device = engine.device

    def under_pressure() -> bool:
        fraction = free_memory_fraction(device)
        return fraction is not None and fraction < MIN_FREE_FRACTION

    dropped = prepared_cache.evict_while(under_pressure)
    if dropped:
        log.warning("memory nearly full: dropped %d cached prepared volume(s)", dropped)


def engine_facts(engine) -> dict[str, Any]:
    """The model facts /v1/health reports, as plain values (a replica sends them to the front)."""
    return {
        "model_id": engine.model_id,
        "model_family": engine.adapter.family,
        "demo_model": bool(getattr(engine, "is_demo_model", False)),
        "device": str(engine.device),
        "dtype": str(engine.dtype).replace("torch.", ""),
    }


def prepared_verdict(engine, prepared_cache, volume_id: str, request: AskRequest) -> str | None:
    """Why a follow-up about `volume_id` cannot be answered here: "unknown", the settings that differ, or None."""
    from ..pipeline import preparation_settings, settings_differences

    entry = prepared_cache.get(volume_id) if prepared_cache is not None else None
    if entry is None:
        return "unknown"
    requested = preparation_settings(engine, request)
    if entry.settings != requested:
        return settings_differences(entry.settings, requested)
    return None

def _remove_upload(job: Job) -> None:
    if job.upload is not None:
        shutil.rmtree(job.upload.folder, ignore_errors=True)
        job.upload = None


def _is_out_of_memory(exc: Exception) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _empty_accelerator_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def request_from_params(params) -> AskRequest:
    """AskRequest from validated JobParams (config errors become the engine's own ValueErrors)."""
    return AskRequest(
        question=params.question,
        pruning=PruningConfig(**params.pruning.model_dump()),
        axis=params.axis,
        window=params.window,
        max_slices=params.max_slices,
        max_new_tokens=params.max_new_tokens,
        compare=params.compare,
    )
