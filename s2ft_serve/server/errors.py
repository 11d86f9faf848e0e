"""One place that turns every failure into OpenAI's error shape `{"error": {message, type, param, code}}`.

Domain errors keep their status (s2ft_serve.errors); pydantic validation errors become 400, as
OpenAI answers them; HTTP errors (unknown route, wrong method) keep theirs; anything else is a
logged 500 that never takes the server down.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from s2ft_serve.errors import QueueFullError, RequestTooLargeError, S2FTError
from s2ft_serve.server.metrics import GENERATION_PATHS, UNKNOWN_ADAPTER_LABEL
from s2ft_serve.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
HTTP_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                    405: "invalid_request_error", 503: "service_unavailable"}


def ascii_json(content) -> str:
    """`content` as compact JSON with every non-ASCII character escaped: what a string UTF-8 cannot encode
    (a lone surrogate) is sent as."""
    return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


class SafeJSONResponse(JSONResponse):
    """Starlette's JSON, or, where a string holds a lone surrogate (JSON's `"\\udcff"` escape, a file name
    that is not UTF-8) that UTF-8 cannot encode, the same JSON with non-ASCII escaped (QA: an error echoing
    such a model name, or a listing of such an adapter, was a 500)."""

    def render(self, content) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return ascii_json(content).encode("ascii")


def error_response(status: int, message: str, error_type: str, param: str | None = None,
                   code: str | int | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=error_type, param=param, code=code))
    return SafeJSONResponse(body.model_dump(), status_code=status, headers=headers)


def domain_error_response(exc: S2FTError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, QueueFullError) else None
    return error_response(exc.status_code, exc.message, exc.error_type, exc.param, exc.code, headers)


def body_too_large(limit: int) -> RequestTooLargeError:
    """What a request body beyond `--max-request-bytes` is answered (the server's BodyLimit, the Ray ingress)."""
    return RequestTooLargeError(f"the request body is larger than this server accepts ({limit} bytes, "
                                "--max-request-bytes)", code="request_too_large")


def _branch(part) -> bool:
    """A location part that names a type pydantic tried, not a field or an index."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list", "none")
                                      or "[" in part or part.startswith(("literal", "function-")) or part[:1].isupper())


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first complaint as `field: reason`, and the field OpenAI would name as `param`."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":  # its location is a byte offset, not a field
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', 'invalid JSON')}", None
    # the field's own path: pydantic adds the union branch it tried (`content.str`, `prompt.list[int]`,
    # `tool_choice.literal['none','auto']`), which names no field of the request
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _branch(part)]
    param = ".".join(loc) or None
    reason = first.get("msg", "invalid value").removeprefix("Value error, ")  # our validators' own words
    if first.get("type") == "extra_forbidden":
        reason = "unknown field"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"{param}: {reason}" if param else reason) + more, param


async def _on_domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, S2FTError)
    count_refused(request, exc.status_code)
    return domain_error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    count_refused(request, 400)
    message, param = validation_message(exc)
    return error_response(400, message, "invalid_request_error", param)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    error_type = HTTP_ERROR_TYPES.get(exc.status_code, "invalid_request_error")
    return error_response(exc.status_code, str(exc.detail), error_type, headers=exc.headers)


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    count_refused(request, 500)
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")


def count_refused(request: Request, status: int) -> None:
    """Count a generation request refused before its route could (body validation, the API key, the
    model still loading); a request that reached `generation.serve` is counted there."""
    if request.url.path in GENERATION_PATHS and not getattr(request.state, "counted", False):
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.observe_request(UNKNOWN_ADAPTER_LABEL, status)


class UnexpectedErrors:
    """Answer an unexpected exception with the 500 error body, and end there. Starlette's own handler for
    `Exception` re-raises once it has answered, so uvicorn logged the traceback a second time and closed
    the keep-alive connection: a pooled client's next request failed with a reset (QA). Once a response
    has started (a stream), the exception goes on as before."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:
                raise
            response = await _on_unexpected_error(Request(scope, receive), exc)
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(S2FTError, _on_domain_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)  # what UnexpectedErrors does not see
    app.add_middleware(UnexpectedErrors)
