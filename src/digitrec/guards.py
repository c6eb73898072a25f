"""What stands between the network and the app: pure ASGI middlewares that refuse a request before the app
sees it (a body too large, a post from another site's page, a Host name the server does not answer), the
headers every response carries for browsers, and uvicorn's protocol with deadlines for slow clients.

No FastAPI here: each piece speaks ASGI or asyncio, and `create_app` and `serve` (server.py) put them together.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from .hosts import AllowedHosts, host_of


class BodySizeLimit:
    """Pure ASGI middleware: answer 413 as soon as a request body passes `max_bytes`, before anyone parses it."""

    def __init__(
        self,
        app: Callable,
        max_bytes: int,
        fast_path: Callable | None = None,
        counted: Callable[[int], None] | None = None,
    ):
        self.app = app
        self.max_bytes = max_bytes
        # fast_path(scope, body, send, receive) -> bool: answers the request itself (True) or leaves it to the app
        # (False); `receive` tells it when the client leaves
        self.fast_path = fast_path
        self.counted = counted  # counted(413), so the app's statistics include the requests refused here

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        # Read the (small) body here so chunked uploads are bounded too, then replay it to the app.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(send)
                return
            if not message.get("more_body"):
                break
        if self.fast_path is not None and await self.fast_path(scope, b"".join(chunks), send, receive):
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Callable) -> None:
        if self.counted is not None:
            self.counted(413)
        mb = self.max_bytes / 1024 / 1024
        await send_error(send, 413, f"the request is larger than {mb:g} MB; send a smaller image.")


async def send_error(
    send: Callable, status: int, detail: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Answer `{"detail": detail}` in JSON straight through ASGI: what the middlewares that refuse a request
    before the app sees it send (the app's own errors go through its exception handlers)."""
    body = json.dumps({"detail": detail}).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


# The page's policy: its own scripts, styles and requests only; images also from data: (the favicon) and blob:
# (an upload's preview); no plugins, no <base>, no form posts elsewhere, and no framing by other sites.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
BROWSER_HEADERS = [
    (b"x-content-type-options", b"nosniff"),  # a file is run or shown only as the type it is served as
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
    (b"referrer-policy", b"no-referrer"),
]


class BrowserGuard:
    """Pure ASGI middleware: refuse a POST another site's page makes a visitor's browser send, and give every
    response the headers that keep the page from being framed, sniffed or leaking its address.

    Without it any page the visitor opens can post corrections (a multipart POST needs no CORS preflight; the
    page cannot read the answer, but the row is stored). Browsers say where a request comes from: Sec-Fetch-Site
    (same-origin, or none for one the user typed), else Origin, which must name the host the request was sent
    to. A request with neither (curl, scripts, old browsers) is not a browser's on another site's behalf, and
    passes: the rule of Go's http.CrossOriginProtection.
    """

    def __init__(self, app: Callable, counted: Callable[[int], None] | None = None):
        self.app = app
        self.counted = counted

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and self._cross_origin(dict(scope["headers"])):
            await self._refuse(send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                # The page's policy on every HTML answer at / and under /static/, decided by what is sent, not by
                # the address's ending: /static/index.html/ served the page without it (a page without its
                # policy is unguarded). /docs runs Swagger UI's inline script: the policy is the page's only.
                html = any(k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in headers)
                ours = scope["path"] == "/" or scope["path"].startswith("/static/")
                policy = [(b"content-security-policy", PAGE_POLICY.encode())] if html and ours else []
                message = message | {"headers": headers + BROWSER_HEADERS + policy}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @staticmethod
    def _cross_origin(headers: dict[bytes, bytes]) -> bool:
        site = headers.get(b"sec-fetch-site")
        if site is not None:
            return site not in (b"same-origin", b"none")
        origin = headers.get(b"origin")
        if origin is None:
            return False
        return origin.partition(b"://")[2].lower() != headers.get(b"host", b"").lower()

    async def _refuse(self, send: Callable) -> None:
        if self.counted is not None:
            self.counted(403)
        detail = "a page on another site may not send requests here; use the page this server serves."
        await send_error(send, 403, detail, BROWSER_HEADERS)


class HostGuard:
    """Pure ASGI middleware: answer only requests whose `Host` header names this server (DNS-rebinding guard).

    A page on an attacker's domain that re-resolves to this machine (DNS rebinding) is same-origin with the
    attacker's name, so BrowserGuard lets it through and the browser lets it read every answer; its requests
    still say that name in `Host`. Anything `allowed` does not answer (a missing, repeated or malformed Host
    header too) is refused with 400 before any other middleware or route sees it, static files included; a
    WebSocket handshake is closed (1008, policy violation). With "*" in `allowed` every request passes.
    """

    def __init__(self, app: Callable, allowed: AllowedHosts, counted: Callable[[int], None] | None = None):
        self.app = app
        self.allowed = allowed
        self.counted = counted

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self.allowed.any or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        sent = [value for name, value in scope["headers"] if name == b"host"]
        host = host_of(sent[0].decode("latin-1")) if len(sent) == 1 else None
        if host is not None and self.allowed.allows(host):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await self._refuse(send, host)

    async def _refuse(self, send: Callable, host: str | None) -> None:
        if self.counted is not None:
            self.counted(400)
        if host is None:
            detail = (
                "the request's Host header is missing, repeated or not a host name; send the name or address "
                "you reached this server by."
            )
        else:  # host_of's answer: letters, digits, dots, hyphens, underscores or an IP address, nothing else
            detail = (
                f"this server does not answer to the host name {host!r}; if that is the name you reach it by, "
                f"restart digitrec serve with --allowed-hosts {host} (an app of your own: "
                f"create_app(..., allowed_hosts=[{host!r}]))."
            )
        await send_error(send, 400, detail, BROWSER_HEADERS)


# Slow clients: deadlines for the request head and body

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
MAX_HEADER_BYTES = 64 * 1024


def guarded_http_protocol(
    header_timeout: float = HEADER_TIMEOUT_S,
    max_header_bytes: int = MAX_HEADER_BYTES,
    body_timeout: float = BODY_TIMEOUT_S,
) -> type:
    """uvicorn's httptools protocol with deadlines for the request head and body, for `uvicorn.run(..., http=...)`.

    uvicorn times out idle keep-alive connections but not a client that opens a connection and sends its
    headers a byte at a time or never finishes them (slowloris), nor one that sends its headers and then stalls
    its body: each such client holds a connection and a slot of `limit_concurrency` for as long as it likes.
    Here the head (request line and headers) must be complete within `header_timeout` seconds of the connection
    opening or of the request's first byte, and within `max_header_bytes`; the body must then be complete within
    `body_timeout` seconds of the head. Otherwise the connection is closed (with 408 or 431 when part of a head
    arrived, 408 for a late body). Responses and idle keep-alive connections are left to uvicorn's own limits.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    too_large = f"send at most {max_header_bytes / 1024:g} KB of request line and headers"

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_bytes = 0
            self._head_timer: asyncio.TimerHandle | None = None
            self._body_timer: asyncio.TimerHandle | None = None
            self._in_head = True  # waiting for a request head; a client that sends nothing is held to it too
            # the request target and the headers as the parser hands them over, however they arrived
            self._parsed_head_bytes = 0
            self._began_here = False  # whether the head being received began in the read being parsed
            self._completed_here = False  # whether a request ended in it
            self._refused = False
            self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _disarm_body_timer(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def data_received(self, data: bytes) -> None:
            self._began_here = self._completed_here = False
            super().data_received(data)  # the parser calls on_message_begin / on_headers_complete in here
            if self._in_head and self._head_timer is not None and not self.transport.is_closing():
                # A head that began in this read after an earlier request ended in it owns only its own part of
                # it: the rest were pipelined requests and their bodies (counted whole, 70 KB of small GETs was a
                # 431 that lost their answers). Of that part the parser has handed over the target and the whole
                # headers so far. Any other read counts whole (a head's first read of 100 KB is refused at once).
                pipelined = self._began_here and self._completed_here
                self._head_bytes = self._parsed_head_bytes if pipelined else self._head_bytes + len(data)
                if self._head_bytes > max_header_bytes:
                    self._refuse(431, "Request Header Fields Too Large", too_large)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            self._began_here = True
            self._head_bytes = 0
            self._parsed_head_bytes = 0
            self._arm_head_timer()  # a kept-alive connection: the next request's clock starts at its first byte

        def on_url(self, url: bytes) -> None:
            self._parsed_head_bytes += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._parsed_head_bytes += len(name) + len(value) + 4  # ": " and CRLF
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._refused or self.transport.is_closing():
                return
            if self._parsed_head_bytes > max_header_bytes:
                # a head that arrived whole in one read (up to asyncio's 256 KB) passed the count in
                # data_received, which only sees a head still incomplete: a 70,000-byte header was served
                self._refuse(431, "Request Header Fields Too Large", too_large)
                return
            self._in_head = False
            self._disarm_head_timer()
            self._disarm_body_timer()
            # armed before the app starts: a GET's on_message_complete follows at once and disarms it
            self._body_timer = self.loop.call_later(body_timeout, self._body_timed_out)
            limit = self.limit_concurrency
            if limit is None or (len(self.connections) < limit and len(self.tasks) < limit):
                super().on_headers_complete()
                return
            # Over limit_concurrency uvicorn answers with its own app: 503 text/plain, no Retry-After. Ours
            # answers in JSON like every other error; the check above is uvicorn's, made off for this request.
            logging.getLogger("uvicorn.error").warning("Exceeded concurrency limit.")
            app, self.app, self.limit_concurrency = self.app, server_busy, None
            try:
                super().on_headers_complete()
            finally:
                self.app, self.limit_concurrency = app, limit

        def on_body(self, body: bytes) -> None:
            if not self._refused:  # a refused request has no cycle to take its body
                super().on_body(body)

        def on_message_complete(self) -> None:
            self._completed_here = True
            self._disarm_body_timer()
            if not self._refused:
                super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            self._disarm_body_timer()
            super().connection_lost(exc)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._in_head and not self.transport.is_closing():
                if self._head_bytes:
                    self._refuse(408, "Request Timeout", "send the request headers promptly")
                else:  # nothing arrived (an idle pre-connection): just close, as the keep-alive timeout does
                    self.transport.close()

        def _body_timed_out(self) -> None:
            self._body_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and self.cycle.response_started:  # answered already (a 413): just close
                self.transport.close()
                return
            # the app waits in receive(); closing the transport hands it http.disconnect
            self._refuse(
                408, "Request Timeout", f"send the whole request body within {body_timeout:g} seconds"
            )

        def send_400_response(self, msg: str) -> None:
            # uvicorn's answer to bytes its parser refuses ("Invalid HTTP request received.") was text/plain
            if self.transport.is_closing():  # refused already (a 431): one answer per connection
                return
            self._refuse(
                400,
                "Bad Request",
                "",
                detail="the request is not valid HTTP/1.1 (its request line, a header or its Content-Length "
                "cannot be parsed); send a well-formed request.",
            )

        def _refuse(self, status: int, reason: str, advice: str, detail: str = "") -> None:
            self._disarm_head_timer()
            self._disarm_body_timer()
            self._in_head = False
            self._refused = True
            body = json.dumps({"detail": detail or f"{reason.lower()}: {advice}."}).encode()
            # the headers BrowserGuard gives every answer of the app's: README promises them on every response
            browser = b"".join(name + b": " + value + b"\r\n" for name, value in BROWSER_HEADERS)
            self.transport.write(
                f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n".encode()
                + browser
                + b"\r\n"
                + body
            )
            self.transport.close()

    HeaderDeadlineProtocol.__name__ = HeaderDeadlineProtocol.__qualname__ = "HeaderDeadlineProtocol"
    return HeaderDeadlineProtocol


BUSY_RETRY_AFTER_S = 1


async def server_busy(scope: dict, receive: Callable, send: Callable) -> None:
    """The answer when every connection slot is taken: 503 in JSON with Retry-After, and the connection closed."""
    detail = f"the server is busy with other requests; send it again in {BUSY_RETRY_AFTER_S} s."
    headers = [(b"retry-after", str(BUSY_RETRY_AFTER_S).encode()), (b"connection", b"close")]
    # answered in place of the app, and so of BrowserGuard: its headers are added here
    await send_error(send, 503, detail, headers + BROWSER_HEADERS)
