"""Errors that carry what the user needs to fix them, and the HTTP status the API maps them to."""
from __future__ import annotations


class SwapserveError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(SwapserveError, ValueError):
    status_code = 400
    error_type = "invalid_request_error"


class AdapterError(InvalidRequestError):
    """An adapter that cannot be loaded (bad path, bad format, over a limit)."""


class AdapterExistsError(AdapterError):
    """A load of a name already loaded, without replace: 400 on vLLM's /v1/load_lora_adapter (its convention),
    409 on swapserve's own admin routes (which check first; this is the answer to a race between two loads)."""


class ReloadInProgressError(AdapterError):
    """A reload of a name while another reload of it is still loading: the second waits its turn (409), so
    neither call reports a version the name does not end on."""
    status_code = 409
    error_type = "conflict_error"


class AdapterNotAllowedError(AdapterError):
    status_code = 403
    error_type = "permission_error"


class UnknownAdapterError(SwapserveError, KeyError):
    status_code = 404
    error_type = "not_found_error"

    def __str__(self) -> str:
        return self.message


class QueueFullError(SwapserveError):
    status_code = 429
    error_type = "rate_limit_error"
    retry_after = 1


class NotReadyError(SwapserveError):
    status_code = 503
    error_type = "service_unavailable"


class HostMemoryFullError(SwapserveError):
    """An adapter load found no room under --max-cpu-lora-bytes within --cpu-lora-wait: the host tier is held
    by adapters with requests in flight. Nothing is wrong with the request; retry after ``retry_after`` s."""

    status_code = 503
    error_type = "service_unavailable"
    retry_after = 2
