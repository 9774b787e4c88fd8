"""One error shape for every failure: {"error": {"code", "message", "hint"}} with the right status."""
from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """An error the client can act on."""

    def __init__(self, status: int, code: str, message: str, hint: str = "", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.hint = status, code, message, hint
        self.headers = headers or {}


_PRIVATE_PATHS: list[str] = []
_UID = re.compile(r"(?<![\w.])\d+(?:\.\d+){4,}(?!\w|\.\d)")   # DICOM UIDs: five or more dotted numbers
MAX_ECHO_CHARS = 64


def register_private_path(path) -> None:
    """A server folder whose name must never appear in a message a client receives."""
    _PRIVATE_PATHS.append(str(path))


def scrub(text: str) -> str:
    """A message fit for a client: no server paths, no DICOM UIDs."""
    for path in _PRIVATE_PATHS:
        text = text.replace(path, "<server folder>")
    return _UID.sub("<uid>", text)


def sentence(text: str) -> str:
    """A volume message that begins with the volume's label ("the uploaded volume ...") as a sentence."""
    return text[:1].upper() + text[1:]


def echo(value: str) -> str:
    """A client-sent value quoted in a message: repr'd, at most MAX_ECHO_CHARS characters of it."""
    return repr(value) if len(value) <= MAX_ECHO_CHARS else repr(value[:MAX_ECHO_CHARS]) + "..."


def error_response(status: int, code: str, message: str, hint: str = "", headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": scrub(message), "hint": scrub(hint)}}, status_code=status,
                        headers=headers)


def field_errors(errors) -> str:
    """'params.pruning.tau: Input should be less than or equal to 1' for each pydantic error."""
    parts = []
    for error in errors:
        where = ".".join(str(p)[:MAX_ECHO_CHARS] for p in error.get("loc", ()) if p != "body")
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", "invalid"))
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.hint, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(422, "invalid_request", field_errors(exc.errors()),
                              "Send multipart/form-data with a `params` JSON field and a `volume` file.")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), "See GET /docs for the API.")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(500, "internal_error", f"The server failed: {type(exc).__name__}.",
                              "See the server's log; the server keeps running.")
