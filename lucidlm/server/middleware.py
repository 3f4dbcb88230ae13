"""Guards around every request, as plain ASGI middleware (they never buffer a streamed response):

- `RequestCounter`: counts answered requests by route and status for /metrics;
- `BearerAuth`: with an API key, every route but /health and the explorer page's static files needs
  `Authorization: Bearer KEY` (401 otherwise);
- `BodyLimit`: request bodies over the limit get 413 before anything parses them.
"""

from __future__ import annotations

import secrets

from .http_errors import error_response
from .metrics import Metrics


def _header(scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k.lower() == name), None)


class RequestCounter:
    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the client gets if the app raises before answering

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # Unknown paths share one label, so scanners cannot grow the metric without bound.
            self.metrics.request(scope["path"] if scope["path"] in self.routes else "other", status)


# Open without a key: the health check, and the explorer page's own files (a browser cannot send
# a Bearer header when it opens a page; the page asks for the key and sends it on every call).
OPEN_PATHS = frozenset({"/health", "/", "/explore/static/explorer.js", "/explore/static/explorer.css"})


class BearerAuth:
    def __init__(self, app, api_key: str, open_paths: frozenset[str] = OPEN_PATHS):
        self.app, self.key, self.open_paths = app, api_key.encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            scheme, _, token = (_header(scope, b"authorization") or b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                message = ("Incorrect API key provided" if scheme else
                           "No API key provided: send the header 'Authorization: Bearer YOUR_KEY'")
                response = error_response(401, message, code="invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuse bodies over `max_bytes` (413): at once when Content-Length says so, else while
    reading a chunked body, which is then handed on whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self):
        return error_response(413, f"the request body is larger than {self.max_bytes} bytes",
                              code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                return await error_response(400, "invalid Content-Length header")(scope, receive, send)
            if int(length) > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards only the disconnect can come

        return await self.app(scope, replay, send)
