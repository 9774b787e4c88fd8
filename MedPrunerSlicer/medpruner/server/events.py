"""A job's progress and answer as Server-Sent Events (`GET /v1/jobs/{id}/events`).

Jobs run on the worker thread; streams are coroutines on the server's event loop. They meet in a
`JobFeed`: the worker bumps its version after each change and wakes the waiting streams with
`loop.call_soon_threadsafe`, so a stream sleeps until something changed (or the keep-alive is due)
instead of polling. A stream then compares the job's current state with what it has already sent
and sends only the difference: tokens that arrived while it was writing are merged into one
event, and a job keeps nothing per event, only its answer so far.

Event order in one stream: `progress` {"stage", "progress"} when either changes (progress in steps
of 0.01), `token` {"delta", "text"} when the answer grew, and one final `done`, `failed` or
`cancelled` carrying the job status (as GET /v1/jobs/{id}), after which the stream ends. The
deltas concatenate to the answer; a client that connects late first gets the current stage and
the answer so far as one token event. A stream that ends without a final event was closed by the
server stopping (`JobFeed.close`): uvicorn would otherwise hold the stop for its graceful timeout.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
from dataclasses import dataclass
from collections.abc import AsyncIterator, Callable
from typing import Any

KEEPALIVE_S = 15.0           # a comment line this often keeps idle proxies and clients from timing out
PROGRESS_STEPS = 100         # progress events in hundredths: one per token would double the events
FINISHED = ("done", "failed", "cancelled")


class JobFeed:
    """A change counter one thread bumps and event-loop coroutines wait on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.version = 0
        self.closed = False

    def changed(self) -> None:
        """Called by the thread that changed the job (after the change): wakes every waiting stream."""
        with self._lock:
            self.version += 1
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:   # that loop has closed: its stream is gone
                pass

    def close(self) -> None:
        """The server is stopping: its streams end now, without waiting for the job."""
        self.closed = True
        self.changed()

    async def wait(self, seen: int, timeout: float) -> int:
        """Wait until the version differs from `seen`, at most `timeout` s; returns the version then."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            if self.version != seen:
                return self.version
            self._waiters.add(entry)
        try:
            await asyncio.wait_for(entry[1].wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(entry)
        return self.version

    @property
    def waiting(self) -> int:
        """Streams waiting now (tests check that closed streams leave nothing behind)."""
        with self._lock:
            return len(self._waiters)


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One event in the text/event-stream format (the JSON is one line: no newline to escape)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass(frozen=True)
class Snapshot:
    """What a stream needs of a job at one moment; `final` is its status once it has finished."""

    state: str
    stage: str
    progress: float
    answer: str
    final: dict[str, Any] | None = None


async def status_events(snapshots: AsyncIterator[Snapshot | None]) -> AsyncIterator[bytes]:
    """The events for a sequence of snapshots of one job (None: nothing changed, send a keep-alive).

    The same stream whether the snapshots come from this process (`job_snapshots`) or from the job
    board of a replica set (`cluster_front`): the event shapes cannot drift between the two."""
    sent_chars = 0
    sent_progress: tuple[str, float] | None = None
    async for snapshot in snapshots:
        if snapshot is None:
            yield b": keep-alive\n\n"
            continue
        if snapshot.state not in FINISHED:
            shown = (snapshot.stage, math.floor(snapshot.progress * PROGRESS_STEPS + 1e-9) / PROGRESS_STEPS)
            if shown != sent_progress:
                sent_progress = shown
                yield sse("progress", {"stage": shown[0], "progress": shown[1]})
        if len(snapshot.answer) > sent_chars:
            yield sse("token", {"delta": snapshot.answer[sent_chars:], "text": snapshot.answer})
            sent_chars = len(snapshot.answer)
        if snapshot.state in FINISHED:
            yield sse(snapshot.state, snapshot.final)
            return


async def job_snapshots(job, status: Callable[[], dict[str, Any]],
                        keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[Snapshot | None]:
    """Snapshots of a job of this process (a jobs.Job) as it changes, until it finishes or its feed closes.

    The worker sets the answer before the state, so reading the state first and the answer second
    never gives a finished snapshot without the answer's last delta."""
    feed: JobFeed = job.feed
    while True:
        version = feed.version        # before reading the job: a later change wakes the wait below
        state = job.state
        finished = state in FINISHED
        yield Snapshot(state, job.stage, job.progress, job.answer, status() if finished else None)
        if finished or feed.closed:
            return
        if await feed.wait(version, keepalive_s) == version:
            yield None


def job_events(job, status: Callable[[], dict[str, Any]], keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[bytes]:
    """The event stream of `job` (a jobs.Job) until its final event; `status()` gives its final status."""
    return status_events(job_snapshots(job, status, keepalive_s))
