"""One question end to end: volume node -> request -> poll -> result nodes, without blocking.

Main thread: `AskSession.start()` checks the volume and copies it (`snapshot_volume`) and looks up
what the scene says this volume was already prepared as on this server (`conversation`). The worker
thread then fingerprints the copy; when an earlier answer prepared exactly these voxels with these
settings, it names that `volume_id` instead of sending the voxels (a follow-up: the server answers
from the cached pruned prefix), and falls back to sending the volume when the server no longer holds
it (`unknown_volume`) or refuses the settings (`settings_mismatch`). Otherwise it encodes the NRRD and
submits it in chunks: the progress says the bytes sent, the total and the rate ("Sending the volume:
12.3 / 45.0 MB (3.1 MB/s)", at most ~10 updates a second), and Cancel stops the upload mid-body.
It polls the job's stage and progress, downloads the report and, unless the scene already holds
them for this prepared volume (a follow-up shares them), both heatmaps in chunks with the same
progress and Cancel, and decodes them (numpy only). Back on the main thread (`poll()`, called from a timer), the result nodes are
created and shown. Progress, completion and errors reach the caller through callbacks; this module
never touches widgets.

Callbacks (all optional, all called on the thread that calls `poll()`):
    on_progress(stage: str, fraction: float | None, message: str)
    on_partial_answer(text: str)  # the whole answer so far, each time it grew (from the polled status's
                                  # `answer_so_far`); the last call carries the final answer, before on_done
    on_done(result: ResultNodes)
    on_error(exc: Exception)      # MedPrunerSlicerError subclasses carry message/hint/details
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .client import MedPrunerClient
from .conversation import Provenance, ReuseCandidate, reuse_candidates, settings_key
from .errors import JobCancelled, ServerBusy, ServerError
from .job_runner import JobContext, JobRunner
from .nrrd_io import decode_nrrd
from .result_nodes import ResultNodes, create_result_nodes
from .volume_export import VolumeSnapshot, acquisition_warning, snapshot_volume

__all__ = ["STALE_VOLUME_CODES", "AskOutcome", "AskSession", "run_job"]

STAGE_TEXT = {
    "reuse": "Asking about the volume the server already prepared",
    "upload": "Sending the volume",
    "queued": "Waiting in the server's queue",
    "load": "Reading the volume",
    "preprocess": "Preparing slices",
    "vision": "Vision encoder",
    "prune": "Pruning tokens",
    "answer": "Answering",
    "write": "Writing heatmaps",
    "download": "Receiving the result",
}
RESEND_TEXT = "The server no longer holds the prepared volume; sending it again"
DOWNLOAD_TEXT = "Receiving the heatmaps"   # + ": 12.3 / 45.0 MB (3.1 MB/s)" (`_transfer_progress`)

# Server error codes meaning "this volume_id cannot be used": send the volume instead.
STALE_VOLUME_CODES = ("unknown_volume", "settings_mismatch")


@dataclass
class AskOutcome:
    job_id: str
    report: dict[str, Any]
    kept: tuple | None        # None: not downloaded, the scene's heatmaps of this prepared volume are shared
    attention: tuple | None
    fingerprint: str = ""
    volume_sent: bool = True
    upload_s: float = 0.0                       # encoding + sending the volume (0 when it was not sent)
    reused_from: ReuseCandidate | None = None   # the prepared volume named instead of sending the voxels


def _stage_message(status: dict[str, Any]) -> tuple[str, float | None, str]:
    state = status.get("state", "")
    if state == "queued":
        position = status.get("position")
        text = STAGE_TEXT["queued"] + (f" (position {position})" if position not in (None, 0) else "")
        return "queued", None, text
    stage = str(status.get("stage") or state or "running")
    progress = status.get("progress")
    return stage, (float(progress) if progress is not None else None), STAGE_TEXT.get(stage, stage.capitalize())


def _check_cancel(ctx: JobContext, client: MedPrunerClient, job_id: str | None = None) -> None:
    if ctx.cancelled:
        if job_id:
            try:
                client.cancel(job_id)
            except Exception:  # noqa: BLE001, S110 - cancelling is best effort; the user asked to stop
                pass
        raise JobCancelled("The question was cancelled.", "")


def _transfer_text(label: str, done: int, total: int, seconds: float) -> str:
    """"Sending the volume: 12.3 / 45.0 MB (3.1 MB/s)" (no total when the server did not say one)."""
    amount = f"{done / 1e6:.1f} / {total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
    rate = f" ({done / seconds / 1e6:.1f} MB/s)" if seconds > 0 else ""
    return f"{label}: {amount}{rate}"


def _transfer_progress(ctx: JobContext, stage: str, label: str,
                       min_interval: float = 0.1) -> Callable[[int, int, float], None]:
    """A client `progress` callback emitting (stage, fraction, text) at most every `min_interval` s, and
    always at the end: a live bar and rate on a slow link without flooding the main thread's queue."""
    last = [float("-inf")]

    def report(done: int, total: int, seconds: float) -> None:
        now = time.monotonic()
        if (total and done >= total) or now - last[0] >= min_interval:
            last[0] = now
            fraction = min(done / total, 1.0) if total else None
            ctx.emit("progress", (stage, fraction, _transfer_text(label, done, total, seconds)))

    return report


def _submit(ctx: JobContext, client: MedPrunerClient, data: bytes | None, params: dict[str, Any],
            busy_retries: int) -> tuple[dict[str, Any], float]:
    """POST the job, waiting out a busy server; returns (reply, seconds the accepted request took).

    The volume's bytes and rate show as they go; Cancel stops the upload mid-body (JobCancelled)."""
    attempt = 0
    while True:
        started = time.monotonic()
        progress = _transfer_progress(ctx, "upload", STAGE_TEXT["upload"]) if data is not None else None
        try:
            return (client.submit(data, params, progress=progress, cancelled=lambda: ctx.cancelled),
                    time.monotonic() - started)
        except ServerBusy as exc:
            if attempt == busy_retries:
                raise
            attempt += 1
            ctx.emit("progress", ("queued", None, f"Server busy, retrying ({attempt}/{busy_retries})"))
            if ctx.wait(exc.retry_after or 2.0):
                _check_cancel(ctx, client)


def _follow(ctx: JobContext, client: MedPrunerClient, submitted: dict[str, Any], poll_interval: float) -> str:
    """Poll a submitted job to its end; its id when done (JobFailed / JobCancelled otherwise).

    The answer so far is emitted ("partial_answer", text) whenever it changed, the final one included,
    so the answer box fills while the model writes; not for a job that failed or was cancelled, whose
    error follows at once. A server without `answer_so_far` emits none."""
    job_id = str(submitted["job_id"])
    ctx.emit("submitted", job_id)
    status = submitted
    shown = ""
    while True:
        _check_cancel(ctx, client, job_id)
        answer = status.get("answer_so_far")
        if isinstance(answer, str) and answer != shown and status.get("state") not in ("failed", "cancelled"):
            shown = answer
            ctx.emit("partial_answer", answer)
        if status.get("state") in ("done", "failed", "cancelled"):
            break
        ctx.emit("progress", _stage_message(status))
        ctx.wait(poll_interval)
        _check_cancel(ctx, client, job_id)
        status = client.status(job_id)
    MedPrunerClient.raise_for_state(status)
    return job_id


def _download(ctx: JobContext, client: MedPrunerClient, job_id: str, **outcome: Any) -> AskOutcome:
    """The report and, unless the scene already holds them, both heatmaps (None when skipped).

    A follow-up answered from a prepared volume whose heatmaps the input already has (its volume_id in
    `ctx.shared_volume_ids`, set by `AskSession.start`) shares those nodes: downloading and decoding
    hundreds of MB again would only make a copy."""
    ctx.emit("progress", ("download", 1.0, STAGE_TEXT["download"]))
    report = client.result(job_id)
    if report.get("prefix_reused") and str(report.get("volume_id") or "") in getattr(ctx, "shared_volume_ids", ()):
        return AskOutcome(job_id=job_id, report=report, kept=None, attention=None, **outcome)
    kept = decode_nrrd(client.heatmap(job_id, "kept", progress=_transfer_progress(ctx, "download", DOWNLOAD_TEXT),
                                      cancelled=lambda: ctx.cancelled))
    _check_cancel(ctx, client)
    attention = decode_nrrd(client.heatmap(job_id, "attention",
                                           progress=_transfer_progress(ctx, "download", DOWNLOAD_TEXT),
                                           cancelled=lambda: ctx.cancelled))
    return AskOutcome(job_id=job_id, report=report, kept=kept, attention=attention, **outcome)


def run_job(ctx: JobContext, client: MedPrunerClient, snapshot: VolumeSnapshot, params: dict[str, Any],
            poll_interval: float = 0.25, busy_retries: int = 3, reuse: Sequence[ReuseCandidate] = ()) -> AskOutcome:
    """The worker thread's part (also usable synchronously with a dummy context in scripts).

    `reuse`: prepared volumes an earlier answer recorded for this volume node, server and settings;
    one whose fingerprint equals the snapshot's is asked about by `volume_id`, without sending voxels.
    """
    fingerprint = snapshot.fingerprint()
    candidate = next((c for c in reuse if c.fingerprint == fingerprint), None)
    if candidate is not None:
        ctx.emit("progress", ("reuse", None, STAGE_TEXT["reuse"]))
        try:
            submitted, _ = _submit(ctx, client, None, {**params, "volume_id": candidate.volume_id},
                                          busy_retries)
            job_id = _follow(ctx, client, submitted, poll_interval)
            return _download(ctx, client, job_id, fingerprint=fingerprint, volume_sent=False, upload_s=0.0,
                             reused_from=candidate)
        except ServerError as exc:
            if exc.code not in STALE_VOLUME_CODES:
                raise
            ctx.emit("progress", ("upload", 0.0, RESEND_TEXT))
    else:
        ctx.emit("progress", ("upload", 0.0, STAGE_TEXT["upload"]))
    started = time.monotonic()
    data = snapshot.to_nrrd()
    encode_s = time.monotonic() - started
    _check_cancel(ctx, client)
    submitted, send_s = _submit(ctx, client, data, params, busy_retries)
    job_id = _follow(ctx, client, submitted, poll_interval)
    return _download(ctx, client, job_id, fingerprint=fingerprint, volume_sent=True, upload_s=encode_s + send_s)


class AskSession:
    """Asks one question at a time about a volume node of `scene`; creates the result on completion."""

    def __init__(self, scene, client_factory: Callable[[], MedPrunerClient],
                 on_progress: Callable[[str, float | None, str], None] | None = None,
                 on_done: Callable[[ResultNodes], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 poll_interval: float = 0.25,
                 on_partial_answer: Callable[[str], None] | None = None) -> None:
        self.scene = scene
        self.client_factory = client_factory
        self.on_progress = on_progress
        self.on_partial_answer = on_partial_answer
        self.on_done = on_done
        self.on_error = on_error
        self.poll_interval = poll_interval
        self.runner = JobRunner()
        self.job_id: str | None = None
        self.started_at: float | None = None
        self._input_node = None   # the node itself: after a scene close, an ID could name another node
        self._server_url = ""
        self._settings_key = ""
        self._input_warning: str | None = None

    @property
    def running(self) -> bool:
        return self.runner.running

    def start(self, volume_node, params: dict[str, Any], reuse: bool = True) -> None:
        """Check and copy the volume (raises VolumeExportError at once), then run the job in the background.

        With `reuse`, a volume this server already prepared with these settings (recorded on an earlier
        answer about `volume_node`) is asked about without sending its voxels again. Heatmaps the scene
        already holds for the prepared volume the server answers from are not downloaded again: the new
        answer shares them (`result_nodes`).
        """
        if self.running:
            raise RuntimeError("A question is already being answered; cancel it first.")
        snapshot = snapshot_volume(volume_node)
        self._input_warning = acquisition_warning(volume_node)
        client = self.client_factory()
        self._server_url = client.url
        self._input_node = volume_node
        self._settings_key = settings_key(params)
        candidates = reuse_candidates(self.scene, volume_node, client.url, self._settings_key) if reuse else []
        from .result_nodes import heatmap_volume_ids

        shared = heatmap_volume_ids(self.scene, volume_node, client.url)   # read here: MRML is main-thread only
        self.job_id = None
        self.started_at = time.monotonic()

        def job(ctx: JobContext) -> AskOutcome:
            ctx.shared_volume_ids = shared   # type: ignore[attr-defined]  # read by _download
            return run_job(ctx, client, snapshot, params, self.poll_interval, reuse=candidates)

        self.runner.start(job, on_event=self._event, on_done=self._done, on_error=self._error)

    def cancel(self) -> None:
        self.runner.cancel()

    def poll(self) -> bool:
        """Drain the worker's events (main thread). True while the job is still running."""
        return self.runner.drain()

    def wait(self, timeout: float = 60.0, interval: float = 0.05) -> None:
        """Block, polling, until the job ends (scripts and tests; the GUI uses a timer instead)."""
        deadline = time.monotonic() + timeout
        while self.poll():
            if time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"The question took more than {timeout:g} s.")
            time.sleep(interval)

    # -- callbacks from drain(), main thread --------------------------------------------------
    def _event(self, kind: str, payload: Any) -> None:
        if kind == "submitted":
            self.job_id = payload
        elif kind == "progress" and self.on_progress:
            self.on_progress(*payload)
        elif kind == "partial_answer" and self.on_partial_answer:
            self.on_partial_answer(payload)

    def _done(self, outcome: AskOutcome) -> None:
        try:
            input_node, self._input_node = self._input_node, None
            provenance = Provenance(
                volume_id=str(outcome.report.get("volume_id") or ""),
                fingerprint=outcome.fingerprint,
                settings_key=self._settings_key,
                volume_sent=outcome.volume_sent,
                upload_s=outcome.upload_s,
                wall_s=time.monotonic() - (self.started_at or time.monotonic()),
                saved_s=Provenance.saved_seconds(outcome.report, outcome.volume_sent, outcome.reused_from),
            )
            if self._input_warning:   # Slicer's own verdict on the series joins the server's notes
                notes = outcome.report.setdefault("input", {}).setdefault("notes", [])
                notes.append(self._input_warning)
            result = create_result_nodes(self.scene, input_node, outcome.report, outcome.kept, outcome.attention,
                                         outcome.job_id, self._server_url, attributes=provenance.attributes())
        except Exception as exc:  # noqa: BLE001
            self._error(exc)
            return
        if self.on_done:
            self.on_done(result)

    def _error(self, exc: BaseException) -> None:
        self._input_node = None   # do not keep a node of the scene alive after the job
        if self.on_error:
            self.on_error(exc)
        else:
            raise exc
