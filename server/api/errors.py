"""Error responses: OpenAI's shape on /v1/*, TGI's on /generate*, one status per error class.

OpenAI: {"error": {"message": str, "type": str, "param": str | None, "code": int}}  (code = HTTP status, as vLLM)
TGI:    {"error": str, "error_type": str}
"""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.errors import InvalidRequestError, SwapserveError

log = logging.getLogger("swapserve.api")

_TGI_TYPES = {400: "validation", 401: "authentication", 403: "authentication", 404: "validation", 409: "validation",
              413: "validation", 422: "validation", 429: "overloaded", 503: "unhealthy"}
_HTTP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable"}


class AuthError(SwapserveError):
    status_code = 401
    error_type = "authentication_error"


class ForbiddenError(SwapserveError):
    status_code = 403
    error_type = "permission_error"


class ConflictError(SwapserveError):
    status_code = 409
    error_type = "conflict_error"


class PayloadTooLargeError(SwapserveError):
    status_code = 413
    error_type = "invalid_request_error"


def is_tgi_path(path: str) -> bool:
    return path == "/generate" or path.startswith("/generate_stream")


def error_payload(path: str, status: int, message: str, error_type: str, param: str | None = None) -> dict:
    """The JSON body for an error on `path` (TGI's shape on /generate*, OpenAI's elsewhere)."""
    if is_tgi_path(path):
        return {"error": message, "error_type": _TGI_TYPES.get(status, "generation")}
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def error_response(path: str, status: int, message: str, error_type: str | None = None,
                   param: str | None = None, headers: dict | None = None) -> JSONResponse:
    error_type = error_type or _HTTP_TYPES.get(status, "internal_error")
    return JSONResponse(error_payload(path, status, message, error_type, param), status, headers=headers)


def status_for(exc: SwapserveError, path: str) -> int:
    """HTTP status of `exc` on `path`: its own, except TGI answers validation failures with 422."""
    if is_tgi_path(path) and isinstance(exc, InvalidRequestError) and exc.status_code == 400:
        return 422
    return exc.status_code


def swapserve_error_response(path: str, exc: SwapserveError, message: str | None = None) -> JSONResponse:
    retry_after = getattr(exc, "retry_after", None)  # QueueFullError (429), HostMemoryFullError (503)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    if isinstance(exc, AuthError):
        headers = {"WWW-Authenticate": "Bearer"}
    return error_response(path, status_for(exc, path), message or exc.message, exc.error_type, exc.param, headers)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])/[^\s'\"`,;()\[\]{}<>]+")
_ROUTES = ("/v1/", "/generate", "/metrics", "/tokenize", "/detokenize", "/health", "/console", "/ping", "/version",
           "/invocations", "/load", "/unload")


def scrub_paths(text: str) -> str:
    """``text`` with each absolute filesystem path as <path> (API routes named in it are kept)."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(0) if m.group(0).startswith(_ROUTES) else "<path>", text)


def client_message(request: Request, exc: SwapserveError) -> str:
    """What the caller is told about ``exc``: a tenant key gets no server paths (another tenant's adapter
    directories, the roots, the cache); the unrestricted key gets them as they are, as the log and the admin
    routes do."""
    return scrub_paths(exc.message) if getattr(request.state, "tenant", None) is not None else exc.message


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """('field: problem; ...', first offending field) from pydantic's error list. The field is a request
    field's name (``prompt``, ``json_schema``), never the name pydantic gives a union's branch
    (``constrained-str``, ``list[int]``) nor a list index: those are left out."""
    parts, param = [], None
    for err in exc.errors()[:5]:
        loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path")
               and (isinstance(p, int) or str(p).isidentifier())]
        param = param or next((p for p in reversed(loc) if isinstance(p, str)), None)
        loc = [str(p) for p in loc]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", param


async def _on_swapserve_error(request: Request, exc: SwapserveError) -> JSONResponse:
    return swapserve_error_response(request.url.path, exc, client_message(request, exc))


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(exc)
    status = 422 if is_tgi_path(request.url.path) else 400
    return error_response(request.url.path, status, message, "invalid_request_error", param)


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    path = request.url.path
    status = 422 if exc.status_code == 400 and is_tgi_path(path) else exc.status_code  # a body FastAPI could not parse
    return error_response(path, status, str(exc.detail), headers=exc.headers)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}", "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SwapserveError, _on_swapserve_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
