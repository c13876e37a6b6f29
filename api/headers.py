"""The response headers a hospital's security review asks of a web service that serves patient data.

Every answer: no MIME sniffing, no framing by another site (clickjacking), no referrer. Every answer
but the page's own files: never cached, since a shared workstation's browser would otherwise keep
studies, images and reports on its disk. The page: a content security policy that allows its own
script, style and API calls and nothing else. Over HTTPS: browsers are told to keep to it (HSTS).
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_PREFIX = "/ui"
EVERY = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}
DATA = {"Cache-Control": "no-store"}
PAGE = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                   "img-src 'self' blob: data:; base-uri 'none'; form-action 'self'; "
                                   "frame-ancestors 'none'"}
HTTPS = {"Strict-Transport-Security": "max-age=31536000"}


class SecurityHeaders:
    """ASGI middleware adding the headers above where the route did not set them itself. It only touches the
    response's start, so streamed answers (server-sent events) pass through unbuffered."""

    def __init__(self, app: ASGIApp, *, https: bool) -> None:
        self.app, self.https = app, https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        page = scope["path"] == PAGE_PREFIX or scope["path"].startswith(PAGE_PREFIX + "/")
        wanted = {**EVERY, **(PAGE if page else DATA), **(HTTPS if self.https else {})}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in wanted.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
