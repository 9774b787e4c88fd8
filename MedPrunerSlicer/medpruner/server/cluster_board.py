"""The job board of a replica set: every job's record, the replicas, and which replica holds which volume.

With `medpruner serve --replicas N` no job lives in the HTTP front's memory: the front asks the
board (a Ray actor, `JobBoardActor`) for a job's status and its event stream, replicas write their
progress and answer into it as they run, and the front records the outcome there when a replica
returns. The board also decides admission for the whole set (a queue place is reserved before an
upload's body is read, as in the single server): at most one running job per live replica plus
`max_queue` waiting ones, cluster-wide.

`JobBoard` is plain Python (its rules are tested without Ray); `JobBoardActor` adds what needs an
event loop and Ray: waiting for a change (the event streams' long poll) and pinging replicas.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from .job_status import job_status

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
MAX_VOLUME_OWNERS = 10000        # volume_id -> replica entries kept (the oldest are forgotten first)
PING_INTERVAL_S = 2.0            # replicas are pinged at most this often (health is unauthenticated)
PING_TIMEOUT_S = 5.0


@dataclass
class JobRecord:
    id: str
    created: float
    follow_up: str | None = None        # the volume_id a follow-up asks about
    state: str = QUEUED
    stage: str = "queued"
    progress: float = 0.0
    error: dict[str, str] | None = None
    started: float | None = None
    finished: float | None = None
    answer: str = ""
    replica: str | None = None          # the replica that took the job (None until one did)
    cancel_requested: bool = False
    version: int = 0

    def status(self, position: int | None) -> dict[str, Any]:
        """The same fields as the single server's job status, plus the replica."""
        return job_status(self, position)


@dataclass
class ReplicaRecord:
    id: str
    facts: dict[str, Any]               # model_id, model_family, demo_model, device, dtype
    prepared_volumes: int = 0
    pid: int | None = None              # for the front's log only (not in /v1/health)
    registered: float = field(default_factory=time.time)
    actor: Any = None                   # the replica's Ray actor handle, for liveness pings


class JobBoard:
    """Job records, admission, replicas and volume owners of one replica set (all methods quick, no I/O)."""

    def __init__(self, max_queue: int, keep_jobs: int, keep_seconds: float, clock=time.time) -> None:
        self.max_queue, self.keep_jobs, self.keep_seconds, self.clock = max_queue, keep_jobs, keep_seconds, clock
        self.jobs: dict[str, JobRecord] = {}          # in submission order
        self.replicas: dict[str, ReplicaRecord] = {}
        self.volume_owners: dict[str, str] = {}       # volume_id -> replica id, oldest first
        self.facts: dict[str, Any] | None = None      # the model's facts, from the first replica
        self.reserved = 0
        self.stopping = False

    # -- admission --------------------------------------------------------------------------
    def capacity(self) -> int:
        """Jobs the set takes at once: one running per live replica, plus max_queue waiting."""
        return len(self.replicas) + self.max_queue

    def outstanding(self) -> int:
        return sum(1 for job in self.jobs.values() if job.state not in FINISHED)

    def reserve(self) -> bool:
        """Hold a place for an upload about to be read; False when the set is full (or stopping)."""
        if self.stopping or self.outstanding() + self.reserved >= self.capacity():
            return False
        self.reserved += 1
        return True

    def release(self) -> None:
        """Give back a place that was not used for a job."""
        self.reserved = max(0, self.reserved - 1)

    def create(self, job_id: str, follow_up: str | None) -> dict[str, Any] | None:
        """Record a queued job in a reserved place; None when the set began stopping meanwhile."""
        self.reserved = max(0, self.reserved - 1)
        if self.stopping:
            return None
        job = self.jobs[job_id] = JobRecord(id=job_id, created=self.clock(), follow_up=follow_up)
        self._changed(job)
        return job.status(self.position(job))

    # -- replica side ---------------------------------------------------------------------------
    def accepted(self, job_id: str, replica_id: str) -> bool:
        """A replica took the job into its queue; False when the job is already over (cancelled)."""
        job = self.jobs.get(job_id)
        if job is None or job.state in FINISHED:
            return False
        job.replica = replica_id
        self._changed(job)
        return True

    def started(self, job_id: str, replica_id: str) -> bool:
        """The replica begins the job; False when it was cancelled while it waited."""
        job = self.jobs.get(job_id)
        if job is None or job.state in FINISHED or job.cancel_requested:
            return False
        job.replica, job.state, job.stage, job.started = replica_id, RUNNING, "load", self.clock()
        self._changed(job)
        return True

    def update(self, job_id: str, stage: str | None = None, progress: float | None = None,
               answer: str | None = None) -> None:
        """Progress or answer so far of a running job (ignored once it has finished: updates may arrive late)."""
        job = self.jobs.get(job_id)
        if job is None or job.state != RUNNING:
            return
        if stage is not None:
            job.stage = stage
        if progress is not None:
            job.progress = progress
        if answer is not None and len(answer) >= len(job.answer):
            job.answer = answer
        self._changed(job)

    # -- front side -----------------------------------------------------------------------------
    def finish(self, job_id: str, state: str, error: dict[str, str] | None = None, answer: str | None = None,
               volume_id: str | None = None) -> list[str]:
        """The job's outcome (the first one wins); returns the ids of jobs now expired, whose files go."""
        job = self.jobs.get(job_id)
        if job is not None and job.state not in FINISHED:
            if answer is not None:
                job.answer = answer
            if state == DONE:
                job.progress = 1.0
                if volume_id is not None and job.replica is not None:
                    self.volume_owners.pop(volume_id, None)
                    self.volume_owners[volume_id] = job.replica
                    while len(self.volume_owners) > MAX_VOLUME_OWNERS:
                        del self.volume_owners[next(iter(self.volume_owners))]
            job.error, job.finished, job.stage = error, self.clock(), state
            job.state = state   # last, as in the single server
            self._changed(job)
        return self.expire()

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a job: one no replica has begun is cancelled now; a running one when its replica stops it."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job.state == QUEUED:
            self.finish(job_id, CANCELLED)
        elif job.state == RUNNING:
            job.cancel_requested = True
            self._changed(job)
        return job.status(self.position(job))

    def status(self, job_id: str) -> dict[str, Any] | None:
        job = self.jobs.get(job_id)
        return None if job is None else job.status(self.position(job))

    def position(self, job: JobRecord) -> int | None:
        """1 + the queued jobs ahead of it in the same line (its replica's, or not yet taken); 0 running."""
        if job.state == RUNNING:
            return 0
        if job.state != QUEUED:
            return None
        ahead = 0
        for other in self.jobs.values():
            if other is job:
                break
            if other.state == QUEUED and other.replica == job.replica:
                ahead += 1
        return ahead + 1

    def expire(self) -> list[str]:
        """Forget finished jobs past the time limit, then the oldest beyond the count limit."""
        now = self.clock()
        finished = sorted((j for j in self.jobs.values() if j.state in FINISHED), key=lambda j: j.finished)
        excess = max(0, len(finished) - self.keep_jobs)
        gone = [job.id for index, job in enumerate(finished)
                if index < excess or now - job.finished > self.keep_seconds]
        for job_id in gone:
            del self.jobs[job_id]
        return gone

    def stop(self) -> list[str]:
        """The front is stopping: no more admissions; returns the unfinished jobs."""
        self.stopping = True
        return [job.id for job in self.jobs.values() if job.state not in FINISHED]

    # -- replicas -------------------------------------------------------------------------------
    def register(self, replica_id: str, facts: dict[str, Any], actor: Any = None, pid: int | None = None) -> None:
        self.replicas[replica_id] = ReplicaRecord(replica_id, dict(facts), actor=actor, pid=pid)
        if self.facts is None:
            self.facts = dict(facts)

    def replica_changed(self, replica_id: str, prepared_volumes: int) -> None:
        if replica_id in self.replicas:
            self.replicas[replica_id].prepared_volumes = prepared_volumes

    def replica_lost(self, replica_id: str) -> None:
        """A replica's process is gone: it takes no more jobs and its prepared volumes are no longer anywhere."""
        self.replicas.pop(replica_id, None)
        for volume_id in [v for v, owner in self.volume_owners.items() if owner == replica_id]:
            del self.volume_owners[volume_id]

    def replica_pids(self) -> dict[str, int | None]:
        return {r.id: r.pid for r in self.replicas.values()}

    def volume_owner(self, volume_id: str) -> str | None:
        return self.volume_owners.get(volume_id)

    def health(self) -> dict[str, Any]:
        """/v1/health's model facts, total waiting jobs and one entry per live replica."""
        waiting: dict[str | None, int] = {}
        running: dict[str | None, int] = {}
        for job in self.jobs.values():
            if job.state == QUEUED:
                waiting[job.replica] = waiting.get(job.replica, 0) + 1
            elif job.state == RUNNING:
                running[job.replica] = running.get(job.replica, 0) + 1
        replicas = [{"id": r.id, "device": r.facts.get("device"),
                     "queue_length": waiting.get(r.id, 0), "running": running.get(r.id, 0),
                     "prepared_volumes": r.prepared_volumes} for r in self.replicas.values()]
        facts = self.facts or {"model_id": None, "model_family": None, "demo_model": False, "device": None,
                               "dtype": None}
        devices = sorted({str(r["device"]) for r in replicas}) or [str(facts["device"])]
        return {**facts, "device": ", ".join(devices), "queue_length": sum(waiting.values()),
                "replicas": replicas}

    def _changed(self, job: JobRecord) -> None:
        job.version += 1


class JobBoardActor(JobBoard):
    """The board as an async Ray actor: everything of `JobBoard`, plus long-poll waits and replica pings."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._signals: dict[str, asyncio.Event] = {}
        self._last_ping = 0.0

    def _changed(self, job: JobRecord) -> None:
        super()._changed(job)
        signal = self._signals.pop(job.id, None)
        if signal is not None:
            signal.set()

    def expire(self) -> list[str]:
        gone = super().expire()
        for job_id in gone:   # a stream waiting on a forgotten job ends
            signal = self._signals.pop(job_id, None)
            if signal is not None:
                signal.set()
        return gone

    async def wait(self, job_id: str, seen: int, timeout: float) -> tuple[int, dict[str, Any]] | None:
        """(version, status) of the job once its version differs from `seen`, or after `timeout` s; None when
        the board no longer knows it."""
        job = self.jobs.get(job_id)
        if job is not None and job.version == seen:
            signal = self._signals.setdefault(job_id, asyncio.Event())
            try:
                await asyncio.wait_for(signal.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            job = self.jobs.get(job_id)
        if job is None:
            return None
        return job.version, job.status(self.position(job))

    async def live_health(self) -> dict[str, Any]:
        """`health` after dropping replicas whose process is gone (pinged at most every PING_INTERVAL_S)."""
        if time.monotonic() - self._last_ping >= PING_INTERVAL_S:
            self._last_ping = time.monotonic()
            await self._ping_replicas()
        return self.health()

    async def _ping_replicas(self) -> None:
        import ray

        async def alive(record: ReplicaRecord) -> bool:
            if record.actor is None:
                return True
            try:
                await asyncio.wait_for(record.actor.__ray_ready__.remote(), PING_TIMEOUT_S)
                return True
            except ray.exceptions.ActorDiedError:
                return False
            except Exception:   # slow or unreachable for now: not proof of death
                return True

        records = list(self.replicas.values())
        verdicts = await asyncio.gather(*(alive(r) for r in records))
        for record, ok in zip(records, verdicts):
            if not ok:
                self.replica_lost(record.id)
