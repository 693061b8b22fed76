"""Every failure of a request as OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}``, so that
clients written for OpenAI (the ``openai`` package raises ``BadRequestError`` etc. from it) understand vlkit's too.

A user's mistake is a 4xx naming the field (``param``) it is about; the server keeps serving. Only a bug is a 500,
logged with its traceback, and its body says no more than that (the traceback stays in the server's log).
"""

from __future__ import annotations

import contextvars
import logging
import re
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger("vlkit.serve")

# OpenAI's error types by status.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


class ApiError(HTTPException):
    """A request that cannot be served, as the status and error body a client gets.

    An HTTPException, so that FastAPI passes it through untouched even when it is raised while the body is read.
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(status, message)
        self.message, self.param, self.code = message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500 else
                                                                   "invalid_request_error"),
                      "param": param, "code": code}}  # fmt: skip


# The error code of the request being answered, for /metrics: the app's request wrapper sets a fresh cell per request
# and reads it when the response starts (exception handlers run in the request's task, so they see the cell).
ERROR_CODE: contextvars.ContextVar[list[str | None] | None] = contextvars.ContextVar("vlkit_error_code", default=None)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    cell = ERROR_CODE.get()
    if cell is not None:
        cell[0] = code
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# pydantic names the branch of a union in an error's location ("str", "list[...]", "ImagePart", "function-after[...]")
_BRANCH = re.compile(r"(str|int|float|bool|none|list\[.*|dict\[.*|[a-z-]+\[.*|[A-Z]\w*)")


def _parts(loc: tuple | list) -> list:
    """The field path of an error's location: the "body" prefix and union branch names dropped, and the repeated
    name a tagged union inserts (its tag) collapsed."""
    out: list = []
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if isinstance(part, str) and _BRANCH.fullmatch(part):
            continue
        if not (out and isinstance(part, str) and out[-1] == part):
            out.append(part)
    return out


def _field(parts: list) -> str | None:
    """``["messages", 0, "content"]`` -> ``"messages[0].content"`` (OpenAI's way of naming a field)."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _validation_response(request: Request, exc: Any) -> JSONResponse:
    """FastAPI's validation errors (422, a list) as one 400 naming the first bad field, as OpenAI answers."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return error_response(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                               code="invalid_json")  # fmt: skip
    # The alternatives of a union fail together: name the field they share, else the first error's field.
    locations = [_parts(e.get("loc", ())) for e in errors] or [[]]
    shared = next((i for i, parts in enumerate(zip(*locations)) if len(set(map(str, parts))) > 1),
                  min(map(len, locations)))  # fmt: skip
    param = _field(locations[0][:shared] if shared else locations[0])
    if first.get("type") == "missing":
        message = f"missing required field '{param}'" if param else "the request body is missing (send a JSON object)"
    else:
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        given = first.get("input")
        if isinstance(given, (str, int, float, bool)) or given is None:
            message += f" (got {str(given)[:80]!r})"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return error_response(400, message + more, param, "invalid_value" if first.get("type") != "missing" else None)


def _http_response(request: Request, exc: HTTPException) -> JSONResponse:
    if isinstance(exc, ApiError):
        return error_response(exc.status_code, exc.message, exc.param, exc.code)
    message = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                       str(exc.detail))  # fmt: skip
    return error_response(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)


def _bug_response(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal error ({type(exc).__name__}); see the server log", code="internal_error")


def install_error_handlers(app: Any) -> None:
    """Route every exception a request can end in to OpenAI's error shape."""
    from fastapi.exceptions import RequestValidationError

    app.add_exception_handler(RequestValidationError, _validation_response)
    app.add_exception_handler(HTTPException, _http_response)
    app.add_exception_handler(Exception, _bug_response)
