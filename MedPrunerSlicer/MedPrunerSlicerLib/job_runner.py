"""Run one blocking job (HTTP calls) on a worker thread; hand its events to the main thread.

Pure Python (threading + queue), no Qt: the widget drains the queue from a `qt.QTimer`
(e.g. every 100 ms), a test drains it in a loop. Callbacks run only inside `drain()`, i.e. on
the caller's thread, so they may create MRML nodes and touch widgets safely.

The job function receives a `JobContext`: `ctx.emit(kind, payload)` queues an event,
`ctx.cancelled` says whether Cancel was pressed, `ctx.wait(seconds)` sleeps but wakes at once
on Cancel. Its return value is delivered to `on_done`, an exception to `on_error`.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["JobContext", "JobRunner"]

_DONE, _ERROR, _EVENT = "done", "error", "event"


class JobContext:
    def __init__(self, events: queue.Queue, cancel_event: threading.Event) -> None:
        self._events = events
        self._cancel = cancel_event

    def emit(self, kind: str, payload: Any = None) -> None:
        self._events.put((_EVENT, (kind, payload)))

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True when woken by Cancel."""
        return self._cancel.wait(seconds)


class JobRunner:
    """At most one job at a time."""

    def __init__(self) -> None:
        self._events: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._callbacks: dict[str, Callable] = {}
        self._finished = True

    @property
    def running(self) -> bool:
        """True from start() until the job's final event has been drained."""
        return not self._finished

    def start(self, job: Callable[[JobContext], Any], on_event: Callable[[str, Any], None] | None = None,
              on_done: Callable[[Any], None] | None = None,
              on_error: Callable[[BaseException], None] | None = None) -> None:
        if self.running:
            raise RuntimeError("A job is already running.")
        self._events = queue.Queue()
        self._cancel = threading.Event()
        self._callbacks = {"event": on_event, "done": on_done, "error": on_error}
        self._finished = False
        context = JobContext(self._events, self._cancel)

        def work() -> None:
            try:
                result = job(context)
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the main thread
                self._events.put((_ERROR, exc))
            else:
                self._events.put((_DONE, result))

        self._thread = threading.Thread(target=work, name="MedPrunerSlicer job", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Ask the job to stop; it will end with an error event (JobCancelled) at its next check."""
        self._cancel.set()

    def drain(self) -> bool:
        """Deliver every queued event to its callback (call on the main thread). True while running."""
        while True:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                return self.running
            if kind == _EVENT:
                callback = self._callbacks.get("event")
                if callback:
                    callback(*payload)
                continue
            self._finished = True
            callback = self._callbacks.get("done" if kind == _DONE else "error")
            if callback:
                callback(payload)
            elif kind == _ERROR:
                raise payload
            return False

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker thread to end (e.g. on module cleanup, after cancel())."""
        if self._thread is not None:
            self._thread.join(timeout)
