"""Refuse malformed JSON bodies with a 422 before FastAPI parses them.

Python's `json` accepts what JSON does not (`NaN`, `Infinity`, and `1e999`, which becomes
inf), raises RecursionError (not a decode error) on deep nesting, and a body of invalid UTF-8
surfaces as a bare 400. This ASGI middleware reads a JSON request body once (bounded by
`max_bytes`), checks it strictly, and hands the same bytes on; other requests pass untouched.
"""

from __future__ import annotations

import json
import math

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body

MAX_JSON_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 32
_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


class MalformedJson(ValueError):
    pass


def _refuse_constant(name: str):
    raise MalformedJson(
        f"{name} is not a JSON number; send a finite number (or leave the field out)"
    )


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedJson(f"{text} overflows a 64-bit float; send a finite number")
    return value


def _depth(value, limit: int) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion on hostile input)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            todo.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def check_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH):
    """Parse `raw` as strict JSON: UTF-8, finite numbers only, nested at most `max_depth`.
    Raises MalformedJson naming the problem; returns the parsed value."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJson(
            f"the body is not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
            "encode JSON as UTF-8"
        ) from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except MalformedJson:
        raise
    except json.JSONDecodeError as exc:
        raise MalformedJson(f"the body is not valid JSON ({exc})") from None
    except RecursionError:
        raise MalformedJson(f"the body nests deeper than {max_depth} levels") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise MalformedJson(f"the body is not valid JSON ({exc})") from None
    if (raw.count(b"[") + raw.count(b"{")) > max_depth and _depth(value, max_depth) > max_depth:
        raise MalformedJson(f"the body nests deeper than {max_depth} levels")
    return value


def _is_json(scope: Scope) -> bool:
    for key, value in scope.get("headers") or ():
        if key == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or (
                media.startswith(b"application/") and media.endswith(b"+json")
            )
    return False


class JsonBodyGuard:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_JSON_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _METHODS or not _is_json(scope):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                answer = JSONResponse(
                    error_body("too_large", f"a JSON body may be at most {self.max_bytes} bytes"),
                    status_code=413,
                )
                return await answer(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        if raw:
            try:
                check_json(raw)
            except MalformedJson as exc:
                answer = JSONResponse(error_body("malformed_body", str(exc)), status_code=422)
                return await answer(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
