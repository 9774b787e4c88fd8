"""HTTP routes of `medpruner serve`. Handlers validate and queue; the model only runs on the worker."""
from __future__ import annotations

import hmac
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError

from .. import __version__
from ..errors import InputError
from ..pipeline import preparation_settings, settings_differences
from .errors import ApiError, error_response, field_errors, install_error_handlers
from .jobs import DONE, JobManager, QueueFull, request_from_params
from .schemas import JobParams
from .uploads import private_folder, read_volume, save_upload

HEATMAPS = {"kept": "heatmap_kept.nrrd", "attention": "heatmap_attention.nrrd"}


@dataclass
class ServerSettings:
    token: str | None
    max_upload_bytes: int
    upload_root: Path


def create_app(manager: JobManager, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="MedPruner server", version=__version__,
                  description="Ask a vision-language model about a CT/MR volume, with MedPruner token pruning.")
    install_error_handlers(app)

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        # Refuse at once on the declared size; the streaming copy enforces it when no size is declared.
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_upload_bytes + 2**20:
            return error_response(413, "upload_too_large", f"The request is larger than the server's limit of "
                                  f"{settings.max_upload_bytes // 2**20} MB.",
                                  "Send a smaller volume, or start the server with a larger --max-upload-mb.")
        return await call_next(request)

    def require_token(request: Request) -> None:
        if settings.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise ApiError(401, "unauthorized", "Missing or wrong access token.",
                           "Send 'Authorization: Bearer <token>' with the token the server was started with.",
                           headers={"WWW-Authenticate": "Bearer"})

    def job_or_404(job_id: str):
        job = manager.get(job_id)
        if job is None:
            raise ApiError(404, "unknown_job", f"No job {job_id!r} on this server.",
                           "Finished jobs are deleted after a while; submit the question again.")
        return job

    @app.get("/v1/health")
    def health() -> dict:
        engine = manager.engine
        return {
            "status": "ok",
            "model_id": engine.model_id,
            "model_family": engine.adapter.family,
            "device": str(engine.device),
            "dtype": str(engine.dtype).replace("torch.", ""),
            "version": __version__,
            "queue_length": manager.queue_length(),
            "auth": settings.token is not None,
        }

    @app.post("/v1/jobs", status_code=202, dependencies=[Depends(require_token)])
    async def submit(params: str = Form(...), volume: UploadFile | None = File(None)) -> JSONResponse:
        try:
            job_params = JobParams.model_validate(json.loads(params))
        except json.JSONDecodeError as exc:
            raise ApiError(422, "invalid_params", f"params is not valid JSON: {exc.msg} at character {exc.pos}.",
                           'Send params as a JSON object, e.g. {"question": "Is there a liver lesion?"}.') from exc
        except ValidationError as exc:
            raise ApiError(422, "invalid_params", field_errors(exc.errors()),
                           "Fix the named field; unknown fields are refused.") from exc
        try:
            request = request_from_params(job_params)
            if job_params.window.strip().lower() not in ("auto", "mr", "percentile"):
                from ..slicing import parse_window

                parse_window(job_params.window)
        except (InputError, ValueError) as exc:
            message = getattr(exc, "message", str(exc))
            raise ApiError(422, "invalid_params", message, getattr(exc, "hint", "")) from exc

        image = None
        if job_params.volume_id is not None:
            if volume is not None and volume.filename:
                raise ApiError(422, "invalid_params", "Send either a volume file or a volume_id, not both.",
                               "Leave out the file to ask about the prepared volume, or the volume_id to send a "
                               "new one.")
            cache = manager.prepared_cache
            entry = cache.get(job_params.volume_id) if cache is not None else None
            if entry is None:
                raise ApiError(404, "unknown_volume", f"No prepared volume {job_params.volume_id!r} on this server.",
                               "It expired or was evicted: send the volume file again.")
            requested = preparation_settings(manager.engine, request)
            if entry.settings != requested:
                raise ApiError(409, "settings_mismatch",
                               "The slicing or pruning settings differ from those the volume was prepared with "
                               f"({settings_differences(entry.settings, requested)}).",
                               "Send the volume file again with the new settings, or keep the earlier settings.")
        else:
            if volume is None or not volume.filename:
                raise ApiError(400, "no_file", "No volume file was sent.",
                               "Attach the volume as the multipart field 'volume', or give a volume_id.")
            folder = private_folder(settings.upload_root)
            try:
                path = await save_upload(volume, folder, settings.max_upload_bytes)
                image = await run_in_threadpool(read_volume, path, folder, settings.max_upload_bytes)
            finally:
                shutil.rmtree(folder, ignore_errors=True)   # only the voxels in memory are kept
        try:
            job = manager.submit(request, image, job_params.volume_id)
        except QueueFull as exc:
            raise ApiError(429, "queue_full", f"The queue is full ({manager.max_queue} jobs waiting).",
                           "Try again in a little while.", headers={"Retry-After": "10"}) from exc
        return JSONResponse({"job_id": job.id, "state": job.state, "position": manager.position(job)},
                            status_code=202)

    @app.get("/v1/jobs/{job_id}", dependencies=[Depends(require_token)])
    def status(job_id: str) -> dict:
        job = job_or_404(job_id)
        return job.status(manager.position(job))

    def finished_file(job_id: str, name: str) -> Path:
        job = job_or_404(job_id)
        if job.state != DONE:
            hint = ("Poll GET /v1/jobs/{id} until its state is 'done'." if job.state in ("queued", "running") else
                    "It will never have one: its status (GET /v1/jobs/{id}) says why; submit the question again.")
            raise ApiError(409, "not_done", f"Job {job_id} is {job.state}, so it has no result.", hint)
        return job.out_dir / name

    @app.get("/v1/jobs/{job_id}/result", dependencies=[Depends(require_token)])
    def result(job_id: str) -> JSONResponse:
        path = finished_file(job_id, "report.json")
        return JSONResponse(json.loads(path.read_text()))

    @app.get("/v1/jobs/{job_id}/heatmaps/{kind}", dependencies=[Depends(require_token)])
    def heatmap(job_id: str, kind: str) -> FileResponse:
        if kind not in HEATMAPS:
            raise ApiError(404, "not_found", f"No heatmap {kind!r}.", "Use 'kept' or 'attention'.")
        path = finished_file(job_id, HEATMAPS[kind])
        return FileResponse(path, media_type="application/octet-stream", filename=HEATMAPS[kind])

    @app.delete("/v1/jobs/{job_id}", dependencies=[Depends(require_token)])
    def cancel(job_id: str) -> dict:
        job = job_or_404(job_id)
        manager.cancel(job)
        return job.status(manager.position(job))

    return app
