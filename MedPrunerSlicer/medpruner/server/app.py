"""HTTP routes of `medpruner serve`. Handlers validate and queue; the model only runs on the worker.

Every request first passes `guard.RequestGuard` (Host, Origin, token, declared size), so no route,
not even a 404, answers a request that fails those, and no body byte is read before them.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError

from .. import __version__
from ..errors import InputError
from .drain import DrainUnreadBody
from .errors import ApiError, echo, field_errors, install_error_handlers
from .guard import HostPolicy, RequestGuard
from .jobs import DONE, QueueFull, Upload, request_from_params
from .page import install_page
from .schemas import JobParams
from .uploads import FORM_OVERHEAD_BYTES, check_volume_file, private_folder, receive_form

HEATMAPS = {"kept": "heatmap_kept.nrrd", "attention": "heatmap_attention.nrrd"}


@dataclass
class ServerSettings:
    token: str | None
    max_upload_bytes: int
    upload_root: Path
    max_volume_bytes: int = 1024 * 2**20
    policy: HostPolicy = field(default_factory=lambda: HostPolicy("127.0.0.1", 8765))


def _parse_params(text: str | None) -> JobParams:
    if text is None:
        raise ApiError(422, "invalid_params", "The form has no params field.",
                       'Send params as a JSON object, e.g. {"question": "Is there a liver lesion?"}.')
    try:
        return JobParams.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_params", f"params is not valid JSON: {exc.msg} at character {exc.pos}.",
                       'Send params as a JSON object, e.g. {"question": "Is there a liver lesion?"}.') from exc
    except ValidationError as exc:
        raise ApiError(422, "invalid_params", field_errors(exc.errors()),
                       "Fix the named field; unknown fields are refused.") from exc


def create_app(manager, settings: ServerSettings) -> FastAPI:
    """The API over `manager`: a jobs.JobManager (one process) or a cluster_front.ClusterJobManager (replicas)."""
    app = FastAPI(title="MedPruner server", version=__version__,
                  description="Ask a vision-language model about a CT/MR volume, with MedPruner token pruning.")
    install_error_handlers(app)
    app.add_middleware(RequestGuard, policy=settings.policy, token=settings.token,
                       max_body_bytes=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,  # the form's framing too
                       shown_limit_bytes=settings.max_upload_bytes)
    if settings.policy.origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=sorted(settings.policy.origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(DrainUnreadBody, max_bytes=settings.max_upload_bytes + FORM_OVERHEAD_BYTES)   # outermost

    def job_or_404(job_id: str):
        job = manager.get(job_id)
        if job is None:
            raise ApiError(404, "unknown_job", f"No job {echo(job_id)} on this server.",
                           "Finished jobs are deleted after a while; submit the question again.")
        return job

    @app.get("/v1/health")
    def health() -> dict:
        return {"status": "ok", **manager.health(), "version": __version__, "auth": settings.token is not None}

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request) -> JSONResponse:
        """multipart/form-data: `params` (JSON) and, unless params names a volume_id, the `volume` file."""
        try:
            # before the body: a full queue costs the client nothing to learn
            slot = await run_in_threadpool(manager.reserve)
        except QueueFull as exc:
            raise ApiError(429, "queue_full", f"The queue is full ({manager.max_queue} jobs waiting).",
                           "Try again in a little while.",
                           headers={"Retry-After": "10", "Connection": "close"}) from exc
        folder = private_folder(settings.upload_root)
        queued = False
        try:
            form = await receive_form(request, folder, settings.max_upload_bytes)
            job_params = _parse_params(form.params)
            try:
                ask_request = request_from_params(job_params)
                if job_params.window.strip().lower() not in ("auto", "mr", "percentile"):
                    from ..slicing import parse_window

                    parse_window(job_params.window)
            except (InputError, ValueError) as exc:
                message = getattr(exc, "message", str(exc))
                raise ApiError(422, "invalid_params", message, getattr(exc, "hint", "")) from exc
            upload = None
            if job_params.volume_id is not None:
                if form.volume is not None:
                    raise ApiError(422, "invalid_params", "Send either a volume file or a volume_id, not both.",
                                   "Leave out the file to ask about the prepared volume, or the volume_id to send "
                                   "a new one.")
                await run_in_threadpool(_check_prepared, manager, job_params.volume_id, ask_request)
            else:
                if form.volume is None:
                    raise ApiError(400, "no_file", "No volume file was sent.",
                                   "Attach the volume as the multipart field 'volume', or give a volume_id.")
                kind, path = await run_in_threadpool(check_volume_file, form.volume, settings.max_volume_bytes)
                upload = Upload(folder=folder, path=path, kind=kind)
            job = await run_in_threadpool(manager.submit, slot, ask_request, upload, job_params.volume_id)
            queued = upload is not None
        except ApiError as exc:   # an unread rest of the body is discarded if of declared length, else cut off
            exc.headers["Connection"] = "close"
            raise
        except QueueFull as exc:   # the server began stopping while the body arrived
            raise ApiError(503, "stopping", "The server is shutting down.", "Try again once it is back.") from exc
        finally:
            await run_in_threadpool(manager.release, slot)
            if not queued:
                shutil.rmtree(folder, ignore_errors=True)
        return JSONResponse({"job_id": job.id, "state": job.state, "position": manager.position(job)},
                            status_code=202)

    @app.get("/v1/jobs/{job_id}")
    def status(job_id: str) -> dict:
        job = job_or_404(job_id)
        return job.status(manager.position(job))

    @app.get("/v1/jobs/{job_id}/events")
    def events(job_id: str) -> StreamingResponse:
        """Server-Sent Events: progress, the answer token by token, then the final status (see `events`).

        Closing the stream leaves the job running; only DELETE cancels it."""
        stream = manager.events(job_or_404(job_id))
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def finished_file(job_id: str, name: str) -> Path:
        job = job_or_404(job_id)
        if job.state != DONE:
            hint = ("Poll GET /v1/jobs/{id} until its state is 'done'." if job.state in ("queued", "running") else
                    "It will never have one: its status (GET /v1/jobs/{id}) says why; submit the question again.")
            raise ApiError(409, "not_done", f"Job {job.id} is {job.state}, so it has no result.", hint)
        return job.out_dir / name

    @app.get("/v1/jobs/{job_id}/result")
    def result(job_id: str) -> JSONResponse:
        path = finished_file(job_id, "report.json")
        return JSONResponse(json.loads(path.read_text()))

    @app.get("/v1/jobs/{job_id}/heatmaps/{kind}")
    def heatmap(job_id: str, kind: str) -> FileResponse:
        if kind not in HEATMAPS:
            raise ApiError(404, "not_found", f"No heatmap {echo(kind)}.", "Use 'kept' or 'attention'.")
        path = finished_file(job_id, HEATMAPS[kind])
        return FileResponse(path, media_type="application/octet-stream", filename=HEATMAPS[kind])

    @app.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str) -> dict:
        job = job_or_404(job_id)
        manager.cancel(job)
        return job.status(manager.position(job))

    install_page(app)   # the web viewer at `/` (same origin, so no CORS)
    return app


def _check_prepared(manager, volume_id: str, ask_request) -> None:
    """A follow-up names a prepared volume this server holds, with the same preparation settings."""
    verdict = manager.prepared_verdict(volume_id, ask_request)
    if verdict == "unknown":
        raise ApiError(404, "unknown_volume", f"No prepared volume {echo(volume_id)} on this server.",
                       "It expired or was evicted: send the volume file again.")
    if verdict is not None:
        raise ApiError(409, "settings_mismatch",
                       "The slicing or pruning settings differ from those the volume was prepared with "
                       f"({verdict}).",
                       "Send the volume file again with the new settings, or keep the earlier settings.")
