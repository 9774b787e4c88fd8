"""The checks every request passes before any route runs or any body byte is read.

In order: the Host header must name this server (a DNS-rebinding page names its own domain), a
browser Origin must be this server's own or one given with --allow-origin (any other web page the
radiologist opens could otherwise submit jobs), the access token must be right (every path but
/v1/health and the web page's own files, which hold no data; the docs included, and before a 404),
and a declared Content-Length must be within the upload limit.

Every refusal closes the connection. Before it does, a body of declared length within the limit is
read and discarded (`drain.DrainUnreadBody`; nothing is stored, within a deadline), so a client that
sends its whole body before reading the reply (urllib, the Slicer module) still sees the 401 or 429
instead of a reset connection; a body of unknown length (chunked) is cut off at once. A request that
declares both a length and chunked framing is refused (400): the two disagree about where it ends.
"""
from __future__ import annotations

import hmac
import ipaddress
import socket
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from .errors import error_response
from .page import is_page_path

OPEN_PATHS = frozenset({"/v1/health"})
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def split_host(value: str) -> tuple[str, int | None]:
    """'[::1]:8765' -> ('::1', 8765); 'Example.org.' -> ('example.org', None); ('', None) if unparsable."""
    value = value.strip().lower()
    port = None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            host, port_text = value, ""
        elif host.count(":"):   # a bare IPv6 address without brackets
            host, port_text = value, ""
        port = port_text or None
    if port is not None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            return "", None
        port = int(port)
    return host.rstrip("."), port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostPolicy:
    """Which Host names and browser Origins this server answers to."""

    def __init__(self, listen_host: str, port: int, allowed_hosts: list[str] | tuple[str, ...] = (),
                 allow_origins: list[str] | tuple[str, ...] = ()) -> None:
        self.port = port
        self.wildcard = listen_host.strip().strip("[]") in WILDCARD_HOSTS
        names = set(LOOPBACK_NAMES) | {split_host(h)[0] or h.lower() for h in allowed_hosts}
        if not self.wildcard:
            names.add(listen_host.strip().strip("[]").lower())
        else:   # listening on every address: the machine's own names, and any IP literal (no DNS to rebind)
            for name in (socket.gethostname(), socket.getfqdn()):
                names.add(name.lower().rstrip("."))
        self.names = frozenset(n for n in names if n)
        self.origins = frozenset(o.rstrip("/").lower() for o in allow_origins)

    def host_ok(self, host_header: str | None) -> bool:
        if not host_header:
            return False
        host, _ = split_host(host_header)
        return bool(host) and (host in self.names or (self.wildcard and _is_ip(host)))

    def origin_ok(self, origin: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self.origins:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.path or parts.query:
            return False
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return False
        return port == self.port and self.host_ok(parts.netloc)


class RequestGuard:
    """Pure ASGI middleware: Host, Origin, token and declared size, before routing and before the body."""

    def __init__(self, app, *, policy: HostPolicy, token: str | None, max_body_bytes: int,
                 shown_limit_bytes: int | None = None) -> None:
        self.app, self.policy, self.token, self.max_body_bytes = app, policy, token, max_body_bytes
        self.shown_limit_bytes = shown_limit_bytes or max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope):
        headers = Headers(scope=scope)
        close = {"Connection": "close"}
        if "content-length" in headers and "transfer-encoding" in headers:
            return error_response(400, "bad_request", "The request declares both a Content-Length and a "
                                  "Transfer-Encoding.", "Send one of them.", close)
        if not self.policy.host_ok(headers.get("host")):
            return error_response(403, "forbidden_host", "This server does not answer to the host name the request "
                                  "was sent to.", "Use the address the server listens on (e.g. 127.0.0.1), or start "
                                  "it with --allowed-host NAME.", close)
        origin = headers.get("origin")
        if origin is not None and not self.policy.origin_ok(origin):
            return error_response(403, "forbidden_origin", "Requests from other web sites are refused.",
                                  "Call the API from a script or the Slicer module, or start the server with "
                                  "--allow-origin ORIGIN for a web page you trust.", close)
        if self.token is not None and scope["path"] not in OPEN_PATHS and not is_page_path(scope["path"]):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return error_response(401, "unauthorized", "Missing or wrong access token.",
                                      "Send 'Authorization: Bearer <token>' with the token the server was started with.",
                                      {"WWW-Authenticate": "Bearer", **close})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return error_response(413, "upload_too_large", f"The request is larger than the server's limit of "
                                  f"{self.shown_limit_bytes // 2**20} MB.", "Send a smaller volume, or start the server "
                                  "with a larger --max-upload-mb.", close)
        return None
