"""HTTP client of the medpruner server (issue 5 API), on the standard library only.

urllib works in Slicer's Python without extra packages. Every call has a short timeout (the
timeout bounds each socket operation, so a large upload on a slow link still progresses), and
every failure becomes one exception of `errors` with a message and a hint the user can act on:

* no reply (refused, unknown host, timeout)  -> ServerUnreachable ("not running at URL: start it or check the address")
* 401 / 403                                  -> AuthenticationError (the token)
* 413                                        -> RequestTooLarge
* 400 / 422                                  -> InvalidRequest (names the field)
* 429 / 503                                  -> ServerBusy (retry_after)
* a job that failed on the server            -> JobFailed (the server's code, message and hint)

Requests to this computer never go through an HTTP proxy (a system proxy would otherwise turn a
running local server into "unreachable"); remote servers use the system's proxy settings.
"""
from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request
import uuid
from typing import Any

from .errors import (
    AuthenticationError,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    RequestTooLarge,
    ServerBusy,
    ServerError,
    ServerUnreachable,
)
from .settings import is_local_url, normalize_server_url

__all__ = ["JOB_STATES", "MedPrunerClient", "build_params"]

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
USER_AGENT = "MedPrunerSlicer/0.1"


def build_params(question: str, *, enabled: bool = True, gamma: float = 0.05, tau: float = 0.9,
                 slice_filter: bool = True, token_filter: bool = True, temperature: float = 2.0,
                 contextual_ratio: float = 0.05, merge: str = "reference", axis: str = "axial",
                 window: str = "auto", max_slices: int | None = None, max_new_tokens: int = 128,
                 compare: bool = False) -> dict[str, Any]:
    """The `params` JSON of POST /v1/jobs."""
    question = (question or "").strip()
    if not question:
        raise InvalidRequest("The question is empty.", "Type a question about the volume.", field="question")
    params: dict[str, Any] = {
        "question": question,
        "pruning": {"enabled": bool(enabled), "slice_filter": bool(slice_filter), "token_filter": bool(token_filter),
                    "gamma": float(gamma), "tau": float(tau), "temperature": float(temperature),
                    "contextual_ratio": float(contextual_ratio), "merge": merge},
        "axis": axis,
        "window": window,
        "max_new_tokens": int(max_new_tokens),
        "compare": bool(compare),
    }
    if max_slices:
        params["max_slices"] = int(max_slices)
    return params


def _multipart(fields: list[tuple[str, str, bytes, str]]) -> tuple[bytes, str]:
    """(name, filename or "", data, content type) parts -> (body, Content-Type header)."""
    boundary = "medpruner-" + uuid.uuid4().hex
    chunks = []
    for name, filename, data, content_type in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n"
                      .encode("ascii"))
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def _error_payload(body: bytes) -> dict[str, Any]:
    """{"code", "message", "hint", "field"} from the server's JSON error (or FastAPI's "detail")."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        text = body.decode("utf-8", "replace").strip()
        return {"message": text[:500]} if text else {}
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return data["error"]
    detail = data.get("detail") if isinstance(data, dict) else None
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):   # FastAPI validation error
        loc = [str(x) for x in detail[0].get("loc", []) if x not in ("body", "query", "path")]
        return {"code": "invalid_request", "message": str(detail[0].get("msg", "")), "field": ".".join(loc)}
    if isinstance(detail, str):
        return {"message": detail}
    return {}


class MedPrunerClient:
    """One server. Thread-safe (no shared mutable state besides the settings given at construction)."""

    def __init__(self, url: str, token: str = "", timeout: float = 10.0) -> None:
        self.url = normalize_server_url(url)
        self.token = (token or "").strip()
        self.timeout = float(timeout)
        handlers = [urllib.request.ProxyHandler({})] if is_local_url(self.url) else []
        self._opener = urllib.request.build_opener(*handlers)

    # -- transport ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                 accept: str = "application/json") -> tuple[bytes, dict[str, str]]:
        headers = {"Accept": accept, "User-Agent": USER_AGENT}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.read(), {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc) from None
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except (TimeoutError, ConnectionError, ssl.SSLError) as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, reason) -> ServerUnreachable:
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return ServerUnreachable(f"The server at {self.url} did not answer within {self.timeout:g} s.",
                                     "Check that the address is right and the server is running and not overloaded.",
                                     details=str(reason))
        if isinstance(reason, socket.gaierror):
            return ServerUnreachable(f"The server's host name in {self.url} cannot be found.",
                                     "Check the address (spelling, network, VPN).", details=str(reason))
        if isinstance(reason, ssl.SSLError):
            return ServerUnreachable(f"The secure (https) connection to {self.url} failed.",
                                     "Check the server's certificate, or use http:// on a trusted network.",
                                     details=str(reason))
        return ServerUnreachable(f"The MedPruner server is not running at {self.url}.",
                                 "Start it (Start local server) or check the address.", details=str(reason))

    def _http_error(self, exc: urllib.error.HTTPError) -> ServerError:
        try:
            body = exc.read()
        except OSError:
            body = b""
        err = _error_payload(body)
        status = exc.code
        message = str(err.get("message") or exc.reason or f"HTTP {status}")
        hint = str(err.get("hint") or "")
        code = str(err.get("code") or "")
        details = f"HTTP {status} from {self.url}\n{body.decode('utf-8', 'replace')[:2000]}"
        if status == 403 and code in ("forbidden_host", "forbidden_origin"):
            return ServerError(f"The server at {self.url} refused the request: {message}",
                               hint or "Use the address the server listens on.", details, status, code)
        if status in (401, 403):
            if self.token:
                return AuthenticationError(f"The server at {self.url} refused the token.",
                                           "Enter the token the server was started with (its --token-file).",
                                           details, status, code)
            return AuthenticationError(f"The server at {self.url} needs a token.",
                                       "Enter the server's token in the Server section.", details, status, code)
        if status == 413:
            return RequestTooLarge("The volume is larger than the server accepts.",
                                   hint or "Crop or downsample the volume (Crop Volume module), or raise the server's limit.",
                                   details, status, code)
        if status in (400, 422):
            field = str(err.get("field") or "")
            if not field and ": " in message and " " not in message.split(": ", 1)[0]:
                field = message.split(": ", 1)[0]   # the server's "params.pruning.tau: ..." form
            where = f" (field '{field}')" if field else ""
            return InvalidRequest(f"The server refused the request{where}: {message}",
                                  hint or "Check the question and the settings.", details, status, code, field=field)
        if status in (429, 503):
            retry = exc.headers.get("Retry-After") if exc.headers else None
            try:
                retry_after = float(retry) if retry is not None else None
            except ValueError:
                retry_after = None
            when = f" in {retry_after:g} s" if retry_after else " in a moment"
            return ServerBusy(f"The server is busy: {message}", hint or f"Try again{when}.", details, status, code,
                              retry_after=retry_after)
        if status == 404:
            return ServerError(f"Not found on the server: {message}",
                               hint or "The job may have expired or the server restarted: ask again.",
                               details, status, code)
        return ServerError(f"The server failed (HTTP {status}): {message}",
                           hint or "See the server's log for details.", details, status, code)

    def _json(self, method: str, path: str, **kwargs) -> dict[str, Any]:
        body, _headers = self._request(method, path, **kwargs)
        try:
            data = json.loads(body.decode("utf-8")) if body else {}
        except (UnicodeDecodeError, ValueError):
            raise ServerError(f"The reply from {self.url}{path} is not JSON.",
                              "Check that the address is a MedPruner server (and not another web service).",
                              details=body[:500].decode("utf-8", "replace")) from None
        if not isinstance(data, dict):
            raise ServerError(f"Unexpected reply from {self.url}{path}.", "Update the MedPruner server.",
                              details=str(data)[:500])
        return data

    # -- API ---------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """GET /v1/health."""
        return self._json("GET", "/v1/health")

    def check_token(self) -> dict[str, Any]:
        """Health, and when the server needs a token, proof that ours is accepted (AuthenticationError if not)."""
        info = self.health()
        if info.get("auth"):
            try:
                self.status("token-check")   # an unknown job: 404 with a good token, 401 with a bad one
            except AuthenticationError:
                raise
            except ServerError as exc:
                if exc.status != 404:
                    raise
        return info

    def submit(self, nrrd_bytes: bytes | None, params: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/jobs -> {job_id, state, position}. Only the voxels+geometry NRRD and the params are sent;
        with `nrrd_bytes` None, `params["volume_id"]` names a volume the server has already prepared."""
        if nrrd_bytes is None and not params.get("volume_id"):
            raise ValueError("submit() needs the volume's NRRD bytes or params['volume_id'].")
        parts = [("volume", "volume.nrrd", nrrd_bytes, "application/octet-stream")] if nrrd_bytes is not None else []
        parts.append(("params", "", json.dumps(params).encode("utf-8"), "application/json"))
        body, content_type = _multipart(parts)
        data = self._json("POST", "/v1/jobs", body=body, content_type=content_type)
        if not data.get("job_id"):
            raise ServerError("The server accepted the volume but returned no job id.", "Update the MedPruner server.",
                              details=json.dumps(data)[:500])
        return data

    def status(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id} -> state, stage, progress, position, error."""
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> None:
        """DELETE /v1/jobs/{id}; a job that is already gone or finished is not an error."""
        try:
            self._request("DELETE", f"/v1/jobs/{job_id}")
        except ServerError as exc:
            if exc.status not in (404, 409, 410):
                raise

    def result(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}/result -> report.json."""
        return self._json("GET", f"/v1/jobs/{job_id}/result")

    def heatmap(self, job_id: str, name: str) -> bytes:
        """GET /v1/jobs/{id}/heatmaps/{kept|attention} -> NRRD bytes."""
        if name not in ("kept", "attention"):
            raise ValueError(f"Unknown heatmap {name!r}.")
        body, _ = self._request("GET", f"/v1/jobs/{job_id}/heatmaps/{name}", accept="application/octet-stream")
        return body

    @staticmethod
    def raise_for_state(status: dict[str, Any]) -> None:
        """Turn a failed/cancelled job status into JobFailed / JobCancelled."""
        state = status.get("state")
        if state == "failed":
            err = status.get("error") or {}
            raise JobFailed(f"The server could not answer: {err.get('message') or 'the job failed.'}",
                            str(err.get("hint") or "See the server's log for details."),
                            details=json.dumps(err, indent=1), code=str(err.get("code") or ""))
        if state == "cancelled":
            raise JobCancelled("The question was cancelled.", "")
