"""Let a client that sends its whole body before it reads (urllib, so the Slicer module; anything that sends
`Connection: close`) see a refusal that was answered before its body was read.

uvicorn closes such a connection as soon as the response is complete; closing a socket with unread
data makes the kernel send a reset, and the client reports "connection reset" instead of the 401,
413 or 429 the server sent. So when a response is complete and a request body of declared length
within the limit is still unread, this middleware sends the response in full but holds back its
end, reads and discards the rest of the body (nothing is stored, never more than was declared, and
for at most `DRAIN_BASE_S` plus one second per MB), then ends the response; refusals say
`Connection: close`, so the connection ends there. A body of unknown length (chunked) is not waited
for: that connection is cut off.
"""
from __future__ import annotations

import asyncio

from starlette.datastructures import Headers

DRAIN_IDLE_S = 10.0
DRAIN_BASE_S = 30.0
DRAIN_MIN_RATE = 1 << 20      # bytes per second a draining client must average


class DrainUnreadBody:
    """Pure ASGI middleware; `max_bytes` bounds what it will read and discard for one request."""

    def __init__(self, app, max_bytes: int, idle_timeout: float = DRAIN_IDLE_S) -> None:
        self.app, self.max_bytes, self.idle_timeout = app, max_bytes, idle_timeout

    async def __call__(self, scope, receive, send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else {}
        length = headers.get("content-length")
        if length is None or "transfer-encoding" in headers or not length.isdigit() or \
                not 0 < int(length) <= self.max_bytes:
            await self.app(scope, receive, send)
            return
        body_ended = False
        deadline_s = DRAIN_BASE_S + int(length) / DRAIN_MIN_RATE

        async def tracked_receive():
            nonlocal body_ended
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_ended = True
            return message

        async def draining_send(message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not body_ended:
                await send({**message, "more_body": True})   # the whole reply is on its way; its end waits
                loop = asyncio.get_running_loop()
                stop_at = loop.time() + deadline_s
                while not body_ended:
                    left = min(self.idle_timeout, stop_at - loop.time())
                    if left <= 0:
                        break
                    try:
                        await asyncio.wait_for(tracked_receive(), timeout=left)
                    except asyncio.TimeoutError:
                        break
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send(message)

        await self.app(scope, tracked_receive, draining_send)
