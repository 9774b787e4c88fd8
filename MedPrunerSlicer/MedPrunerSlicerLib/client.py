"""HTTP client of the medpruner server (issue 5 API), on the standard library only.

urllib works in Slicer's Python (3.9 in Slicer 5.8) without extra packages, and brings the system's
proxy settings and https. Bodies move in chunks (`CHUNK_BYTES`), so that a slow link is never
mistaken for a dead server:

* the timeout (default 10 s) bounds each socket operation, never a whole body: connecting, each
  chunk of an upload, the wait for the reply (which keeps waiting as long as the kernel is still
  sending our body, i.e. while bytes move), each read of a download;
* `progress(done_bytes, total_bytes, seconds)` is called as chunks move (total 0: the server did not
  say) and `cancelled()` is checked between chunks and while waiting, so Cancel stops an upload
  mid-body (`JobCancelled`); the multipart body is (header, slices of the volume, trailer): the
  volume is never copied into a second buffer;
* a reply shorter than its Content-Length is an error that says so;
* when the server answers before it has read the whole body (401/413/429, then it closes), the send
  fails with a reset or broken pipe: the reply is read anyway, so the user sees the server's error.

Every failure becomes one exception of `errors` with a message and a hint the user can act on:

* no reply (refused, unknown host, timeout)  -> ServerUnreachable ("not running at URL: start it or check the address";
                                                "did not answer within N s" for every timeout, Python 3.9 included,
                                                where `socket.timeout` is not yet `TimeoutError`)
* 401 / 403                                  -> AuthenticationError (the token)
* 413                                        -> RequestTooLarge
* 400 / 422                                  -> InvalidRequest (names the field)
* 429 / 503                                  -> ServerBusy (retry_after)
* a job that failed on the server            -> JobFailed (the server's code, message and hint)
* cancelled() became true                    -> JobCancelled

Requests to this computer never go through an HTTP proxy (a system proxy would otherwise turn a
running local server into "unreachable"); remote servers use the system's proxy settings.
"""
from __future__ import annotations

import functools
import http.client
import json
import selectors
import socket
import ssl
import struct
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
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

__all__ = ["CHUNK_BYTES", "JOB_STATES", "CancelCheck", "MedPrunerClient", "ProgressCallback", "build_params"]

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
USER_AGENT = "MedPrunerSlicer/0.1"
CHUNK_BYTES = 256 * 1024     # one step of an upload or a download: progress and Cancel are checked between steps
POLL_S = 0.1                 # how often Cancel is checked while a socket waits
TLS_PIECE_BYTES = 64 * 1024  # one TLS write (it must complete within the timeout)

# progress(done_bytes, total_bytes, seconds since the transfer began); total 0 when the server did not say
ProgressCallback = Callable[[int, int, float], None]
CancelCheck = Callable[[], bool]
# what a timeout is on every Python Slicer ships: on 3.9 socket.timeout is not yet TimeoutError
_TIMEOUTS = (socket.timeout, TimeoutError)
# what a send gets when the server has answered early and closed: its reply may still be readable
_CLOSED_WHILE_SENDING = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


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


def _multipart(fields: list[tuple[str, str, bytes, str]]) -> tuple[list[bytes], str]:
    """(name, filename or "", data, content type) parts -> (body pieces, Content-Type header).

    The pieces are sent one after the other: the volume's bytes are never copied into one big body."""
    boundary = "medpruner-" + uuid.uuid4().hex
    pieces: list[bytes] = []
    for name, filename, data, content_type in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        pieces.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n"
                      .encode("ascii"))
        pieces.append(data)
        pieces.append(b"\r\n")
    pieces.append(f"--{boundary}--\r\n".encode("ascii"))
    return pieces, f"multipart/form-data; boundary={boundary}"


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def _unsent_bytes(sock: socket.socket) -> int | None:
    """Bytes of ours the kernel has not yet had acknowledged (None where the platform cannot say).

    While this shrinks, the link is moving our body even though every send() has returned."""
    try:
        if sys.platform.startswith("linux"):
            import fcntl
            import termios

            return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        if sys.platform == "darwin":
            return sock.getsockopt(socket.SOL_SOCKET, 0x1024)   # SO_NWRITE
    except (OSError, ValueError, AttributeError, ImportError):
        return None
    return None


class _Transfer:
    """One request's progress, Cancel and outcome, shared by the body, the connection and the reader."""

    def __init__(self, total: int, progress: ProgressCallback | None, cancelled: CancelCheck | None) -> None:
        self.total = total
        self.progress = progress
        self.cancelled = cancelled
        self.done = 0                     # body bytes handed to the kernel (upload) or received (download)
        self.reported = -1
        self.started = time.monotonic()
        self.broken: OSError | None = None   # sending stopped: the server closed or answered; read its reply anyway
        self.sock: socket.socket | None = None   # the connection's socket, once connected

    def check_cancel(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise JobCancelled("The question was cancelled.", "")

    def report(self, value: int | None = None) -> None:
        """Call `progress` with `value` (default: `done`), never twice with the same value, never going back."""
        value = self.done if value is None else value
        if self.progress is None or value <= self.reported:
            return
        self.reported = value
        self.progress(value, self.total, time.monotonic() - self.started)

    def report_delivered(self) -> None:
        """Upload progress as the peer acknowledges it: bytes still queued in our kernel do not count yet
        (they are several MB on a fast machine, seconds of a slow link)."""
        unsent = _unsent_bytes(self.sock) if self.sock is not None else None
        self.report(self.done if unsent is None else max(0, self.done - unsent))

    def where(self) -> str:
        """Where a failed upload stopped, for the error's details."""
        if not self.total:
            return ""
        return f" while sending the request body ({_megabytes(self.done)} of {_megabytes(self.total)} sent)"


class _Body:
    """An iterable request body (urllib sends each item as it comes): slices of at most CHUNK_BYTES.

    Progress is reported after each slice went out and Cancel is checked before the next one; after
    the server closed the connection (an early refusal), the rest is not sent."""

    def __init__(self, pieces: list[bytes], transfer: _Transfer) -> None:
        self.pieces = pieces
        self.transfer = transfer
        self.length = sum(len(piece) for piece in pieces)

    def __iter__(self) -> Iterator[memoryview]:
        transfer = self.transfer
        for piece in self.pieces:
            view = memoryview(piece).cast("B")
            for start in range(0, len(view), CHUNK_BYTES):
                transfer.check_cancel()
                if transfer.broken is not None:
                    return
                chunk = view[start:start + CHUNK_BYTES]
                yield chunk
                if transfer.broken is not None:
                    return
                transfer.done += len(chunk)
                transfer.report_delivered()


def _select(sock: socket.socket, events: int, transfer: _Transfer, limit: float | None) -> int:
    """Wait until `sock` is ready for `events` (selectors.EVENT_*), checking Cancel every POLL_S.
    The ready events, 0 once `limit` seconds passed (None: no limit)."""
    deadline = None if limit is None else time.monotonic() + limit
    with selectors.DefaultSelector() as selector:
        selector.register(sock, events)
        while True:
            left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            ready = selector.select(max(left, 0.0))
            if ready:
                return ready[0][1]
            transfer.check_cancel()
            if deadline is not None and time.monotonic() >= deadline:
                return 0


def _early_reply_visible(sock: socket.socket) -> bool:
    """Whether a readable socket during an upload means the server answered (or closed). Not under TLS:
    a TLS 1.3 server sends session tickets at any time, which make the socket readable too."""
    return not isinstance(sock, ssl.SSLSocket)


def _wait_writable(sock: socket.socket, transfer: _Transfer) -> bool:
    """Block until `sock` takes more of the body (True), or the server has answered or closed before
    the body was sent (False). socket.timeout when nothing moved for the socket's timeout."""
    events = selectors.EVENT_WRITE | (selectors.EVENT_READ if _early_reply_visible(sock) else 0)
    ready = _select(sock, events, transfer, sock.gettimeout())
    if not ready:
        raise socket.timeout("timed out")
    return not ready & selectors.EVENT_READ


def _wait_delivered(sock: socket.socket, transfer: _Transfer) -> bool:
    """After the last send: wait while the kernel still sends our body (a slow link drains a full send
    buffer for seconds), restarting the timeout whenever the queue shrinks; progress follows it.
    False where the platform cannot tell (see `_unsent_bytes`), True once delivered or answered."""
    if transfer.broken is not None:   # sending stopped: nothing more will leave (a reset leaves a stale count)
        return True
    unsent = _unsent_bytes(sock)
    if unsent is None:
        return False
    timeout = sock.gettimeout()
    watch_reply = _early_reply_visible(sock)
    idle_since = time.monotonic()
    while unsent > 0:
        if watch_reply:
            if _select(sock, selectors.EVENT_READ, transfer, POLL_S):
                return True
        else:
            time.sleep(POLL_S)
            transfer.check_cancel()
        still = _unsent_bytes(sock)
        if still is None:
            return True
        if still < unsent:
            idle_since = time.monotonic()
            transfer.report_delivered()
        elif timeout is not None and time.monotonic() - idle_since >= timeout:
            raise socket.timeout("timed out")
        unsent = still
    return True


class _TransferConnection:
    """Mixin for http.client's connections: a body sent piece by piece, each piece under the socket's
    timeout with Cancel checked while blocked; sending stops when the server answers or closes early,
    and the reply is read anyway; the wait for the reply lasts as long as our body is still moving."""

    def __init__(self, *args: Any, transfer: _Transfer | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._transfer = transfer

    def send(self, data: Any) -> None:
        transfer = self._transfer
        if transfer is None or not isinstance(data, (bytes, bytearray, memoryview)):
            super().send(data)
            return
        if transfer.broken is not None:
            return
        if self.sock is None:
            self.connect()
        transfer.sock = self.sock
        sys.audit("http.client.send", self, data)
        view = memoryview(data).cast("B")
        # TLS writes a whole piece under one timeout: smaller pieces keep that a per-operation bound
        piece = TLS_PIECE_BYTES if isinstance(self.sock, ssl.SSLSocket) else len(view)
        try:
            while view:
                if not _wait_writable(self.sock, transfer):
                    transfer.broken = ConnectionAbortedError("the server answered before the whole body was sent")
                    return
                view = view[self.sock.send(view[:piece]):]
        except _CLOSED_WHILE_SENDING as exc:
            transfer.broken = exc

    def getresponse(self) -> http.client.HTTPResponse:
        transfer = self._transfer
        if transfer is not None and self.sock is not None:
            delivered = _wait_delivered(self.sock, transfer)
            limit = self.sock.gettimeout()
            if limit is not None and not delivered:
                limit += self._drain_allowance(transfer)
            # Once the whole body is out the server is creating the job: its reply (with the job's id, which a
            # Cancel needs to reach the job) is waited for instead of leaving an orphan job behind.
            watch = _Transfer(0, None, None) if transfer.total and transfer.broken is None else transfer
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
            if not pending and not _select(self.sock, selectors.EVENT_READ, watch, limit):
                raise socket.timeout("timed out")
            if transfer.broken is None:
                transfer.report(transfer.done)   # the server answers: it has read the whole body
        return super().getresponse()

    def _drain_allowance(self, transfer: _Transfer) -> float:
        """Seconds a full kernel send buffer takes to drain at the rate seen so far (for platforms where
        `_unsent_bytes` cannot watch it drain)."""
        try:
            buffered = min(transfer.done, self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        except OSError:
            return 0.0
        rate = transfer.done / max(time.monotonic() - transfer.started, 1e-3)
        return buffered / max(rate, 1.0)


class _HTTPConnection(_TransferConnection, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_TransferConnection, http.client.HTTPSConnection):
    pass


_CONNECTION_CLASSES = {http.client.HTTPConnection: _HTTPConnection, http.client.HTTPSConnection: _HTTPSConnection}


class _TransferRequest(urllib.request.Request):
    """A urllib request that carries its `_Transfer` to the connection that sends it."""

    def __init__(self, *args: Any, transfer: _Transfer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transfer = transfer


def _connection_for(http_class: type, request: urllib.request.Request) -> Any:
    return functools.partial(_CONNECTION_CLASSES.get(http_class, http_class),
                             transfer=getattr(request, "transfer", None))


class _HTTPHandler(urllib.request.HTTPHandler):
    def do_open(self, http_class: type, req: urllib.request.Request, **kwargs: Any) -> http.client.HTTPResponse:
        return super().do_open(_connection_for(http_class, req), req, **kwargs)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def do_open(self, http_class: type, req: urllib.request.Request, **kwargs: Any) -> http.client.HTTPResponse:
        return super().do_open(_connection_for(http_class, req), req, **kwargs)


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
        handlers: list[Any] = [urllib.request.ProxyHandler({})] if is_local_url(self.url) else []
        handlers += [_HTTPHandler, _HTTPSHandler]   # replace urllib's own: chunked sends, early replies read
        self._opener = urllib.request.build_opener(*handlers)

    # -- transport ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | list[bytes] | None = None,
                 content_type: str | None = None, accept: str = "application/json",
                 progress: ProgressCallback | None = None,
                 cancelled: CancelCheck | None = None) -> tuple[bytes, dict[str, str]]:
        """One HTTP exchange. `body` may be a list of pieces sent one after the other. `progress` follows
        the request body when there is one, else the response body."""
        headers = {"Accept": accept, "User-Agent": USER_AGENT}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        pieces = [body] if isinstance(body, (bytes, bytearray, memoryview)) else body
        upload = _Transfer(sum(len(piece) for piece in pieces or ()), progress if pieces else None, cancelled)
        data = None
        if pieces is not None:
            data = _Body(pieces, upload)
            headers["Content-Length"] = str(data.length)   # urllib sends an iterable as is when told its length
        request = _TransferRequest(self.url + path, data=data, method=method, headers=headers, transfer=upload)
        try:
            upload.check_cancel()
            with self._opener.open(request, timeout=self.timeout) as response:
                if upload.broken is not None:   # a success can't follow a body cut short
                    raise upload.broken
                # after an upload the reply is small and must be read whole (it names the job to cancel)
                download = _Transfer(0, progress, cancelled) if pieces is None else _Transfer(0, None, None)
                return self._read(response, download), {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc) from None
        except urllib.error.URLError as exc:   # what urllib wraps: connecting and sending
            raise self._failure(exc.reason, upload) from None
        except _TIMEOUTS as exc:   # not wrapped: waiting for the reply and reading it (socket.timeout on 3.9)
            raise self._failure(exc, upload) from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._failure(exc, upload) from None

    def _read(self, response: http.client.HTTPResponse, transfer: _Transfer) -> bytes:
        """The response body in chunks (each read under the timeout), checked against its Content-Length."""
        declared = (response.headers.get("Content-Length") or "").strip()
        expected = int(declared) if declared.isdigit() else None
        transfer.total = expected or 0
        chunks = []
        incomplete = False
        try:
            while True:
                transfer.check_cancel()
                chunk = response.read1(CHUNK_BYTES)
                if not chunk:
                    break
                chunks.append(chunk)
                transfer.done += len(chunk)
                transfer.report()
        except http.client.IncompleteRead:   # a chunked reply that stopped mid-chunk
            incomplete = True
        except ConnectionError as exc:
            raise ServerUnreachable(f"The connection to {self.url} was lost while receiving the reply.",
                                    "Try again; check the network and the server's log.",
                                    details=f"{exc} after {transfer.done} bytes") from None
        if incomplete or (expected is not None and transfer.done != expected):
            of = f" of {expected}" if expected is not None else ""
            raise ServerError(f"The reply from {self.url} was cut short: {transfer.done}{of} bytes arrived.",
                              "The connection was interrupted; try again, and check the network or the server's log.",
                              details=f"Content-Length: {declared or 'none'}, received {transfer.done} bytes")
        return b"".join(chunks)

    def _failure(self, reason: object, transfer: _Transfer) -> ServerError:
        """The exception for a request that got no usable reply (Cancel wins over what it caused)."""
        if transfer.cancelled is not None and transfer.cancelled():
            return JobCancelled("The question was cancelled.", "")
        return self._unreachable(reason, transfer)

    def _unreachable(self, reason: object, transfer: _Transfer | None = None) -> ServerUnreachable:
        where = transfer.where() if transfer is not None else ""
        if isinstance(reason, _TIMEOUTS):
            return ServerUnreachable(f"The server at {self.url} did not answer within {self.timeout:g} s.",
                                     "Check that the address is right and the server is running and not overloaded.",
                                     details=f"{reason}{where}")
        if isinstance(reason, socket.gaierror):
            return ServerUnreachable(f"The server's host name in {self.url} cannot be found.",
                                     "Check the address (spelling, network, VPN).", details=str(reason))
        if isinstance(reason, ssl.SSLError):
            return ServerUnreachable(f"The secure (https) connection to {self.url} failed.",
                                     "Check the server's certificate, or use http:// on a trusted network.",
                                     details=f"{reason}{where}")
        if transfer is not None and transfer.broken is not None:
            return ServerUnreachable(f"The server at {self.url} closed the connection while the request was "
                                     "being sent.", "Check the server's log (it may have stopped or refused the "
                                     "upload), then try again.",
                                     details=f"{transfer.broken}{where}; then: {reason}")
        if isinstance(reason, http.client.HTTPException) and not isinstance(reason, ConnectionError):
            return ServerUnreachable(f"The reply from {self.url} is not valid HTTP.",
                                     "Check that the address is a MedPruner server (and not another service).",
                                     details=repr(reason))
        return ServerUnreachable(f"The MedPruner server is not running at {self.url}.",
                                 "Start it (Start local server) or check the address.", details=f"{reason}{where}")

    def _http_error(self, exc: urllib.error.HTTPError) -> ServerError:
        try:
            body = exc.read()
        except (OSError, http.client.HTTPException):   # socket.timeout (3.9) is an OSError
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

    def submit(self, nrrd_bytes: bytes | None, params: dict[str, Any], progress: ProgressCallback | None = None,
               cancelled: CancelCheck | None = None) -> dict[str, Any]:
        """POST /v1/jobs -> {job_id, state, position}. Only the voxels+geometry NRRD and the params are sent;
        with `nrrd_bytes` None, `params["volume_id"]` names a volume the server has already prepared.

        The body goes out in chunks: `progress(sent, total, seconds)` follows it, `cancelled()` is checked
        between chunks and while waiting (JobCancelled at once); the timeout bounds each chunk, not the body."""
        if nrrd_bytes is None and not params.get("volume_id"):
            raise ValueError("submit() needs the volume's NRRD bytes or params['volume_id'].")
        parts = [("volume", "volume.nrrd", nrrd_bytes, "application/octet-stream")] if nrrd_bytes is not None else []
        parts.append(("params", "", json.dumps(params).encode("utf-8"), "application/json"))
        pieces, content_type = _multipart(parts)
        data = self._json("POST", "/v1/jobs", body=pieces, content_type=content_type, progress=progress,
                          cancelled=cancelled)
        if not data.get("job_id"):
            raise ServerError("The server accepted the volume but returned no job id.", "Update the MedPruner server.",
                              details=json.dumps(data)[:500])
        return data

    def status(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id} -> state, stage, progress, position, error, answer_so_far (the answer as it is
        generated; the whole answer once done; absent on servers older than answer streaming)."""
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> None:
        """DELETE /v1/jobs/{id}; a job that is already gone or finished is not an error."""
        try:
            self._request("DELETE", f"/v1/jobs/{job_id}")
        except ServerError as exc:
            if exc.status not in (404, 409, 410):
                raise

    def result(self, job_id: str, progress: ProgressCallback | None = None,
               cancelled: CancelCheck | None = None) -> dict[str, Any]:
        """GET /v1/jobs/{id}/result -> report.json (read in chunks, like `heatmap`)."""
        return self._json("GET", f"/v1/jobs/{job_id}/result", progress=progress, cancelled=cancelled)

    def heatmap(self, job_id: str, name: str, progress: ProgressCallback | None = None,
                cancelled: CancelCheck | None = None) -> bytes:
        """GET /v1/jobs/{id}/heatmaps/{kept|attention} -> NRRD bytes.

        Read in chunks, each under the timeout: `progress(received, total, seconds)` (total 0 when the
        server did not send a Content-Length), `cancelled()` between chunks; a short body is an error."""
        if name not in ("kept", "attention"):
            raise ValueError(f"Unknown heatmap {name!r}.")
        body, _ = self._request("GET", f"/v1/jobs/{job_id}/heatmaps/{name}", accept="application/octet-stream",
                                progress=progress, cancelled=cancelled)
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
