"""The service's outer layers as plain ASGI middleware: the request-body cap, the time limit of a
request (its body included, so a client that sends slowly is cut off too) and the access log.

The access log has one line per request: method, the route's template (never the raw path or
query string, which a caller may fill with anything), status, milliseconds and the caller's
token name (never the token).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

log = logging.getLogger("ecgplat.serve.access")


async def send_error(send, status: int, message: str, headers: dict | None = None) -> None:
    """A JSON ``{"error": message}`` response of `status`."""
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for a request body over `limit` bytes: from its Content-Length before it is read,
    or while it is read (a chunked body without one)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body over the upload limit of {self.limit} bytes"
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await send_error(send, 413, message)
        seen, started, answered = 0, False, False

        async def counted():
            nonlocal seen, answered
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    if not started and not answered:  # answered here: a body parser that
                        answered = True  # catches what it reads by would turn it into a 400
                        await send_error(send, 413, message)
                    raise _BodyTooLarge
            return msg

        async def watched(msg):
            nonlocal started
            if answered:
                return  # the 413 went out already
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, counted, watched)


class TimeLimit:
    """A request that has not finished after `seconds` is answered 408 (its body was still
    arriving) or 504 (the work took too long); the work is cancelled where it awaits."""

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_done, started = False, False

        async def tracked():
            nonlocal body_done
            msg = await receive()
            if msg["type"] == "http.request" and not msg.get("more_body", False):
                body_done = True
            return msg

        async def watched(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await asyncio.wait_for(self.app(scope, tracked, watched), self.seconds)
        except TimeoutError:
            if not started:
                if body_done or scope.get("method") in ("GET", "HEAD"):
                    await send_error(send, 504, f"request took longer than {self.seconds:g} s")
                else:
                    await send_error(send, 408, f"request body not received in {self.seconds:g} s")


class AccessLog:
    """One log line per request (module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def watched(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "(no route)"
            caller = (scope.get("state") or {}).get("caller", "-")
            ms = (time.perf_counter() - t0) * 1000
            log.info("%s %s %d %.1fms %s", scope.get("method"), template, status[0], ms, caller)
