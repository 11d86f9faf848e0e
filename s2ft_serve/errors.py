"""Domain exceptions. The server maps each class to one HTTP status and OpenAI's error shape."""

from __future__ import annotations


class S2FTError(Exception):
    """Base class of every error s2ft-serve raises on purpose."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequestError(S2FTError):
    """A request parameter is wrong (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(S2FTError):
    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(S2FTError):
    status_code = 403
    error_type = "permission_error"


class AdapterNotFoundError(S2FTError):
    """The adapter (or model) named does not exist (404)."""

    status_code = 404
    error_type = "not_found_error"

    def __init__(self, name: str, param: str | None = "model"):
        super().__init__(f"The model '{name}' does not exist.", param=param, code="model_not_found")
        self.name = name


class ConflictError(S2FTError):
    """The operation conflicts with the current state, e.g. a name already loaded (409)."""

    status_code = 409
    error_type = "conflict_error"


class AdapterValidationError(S2FTError):
    """An adapter folder is malformed; the message names the file, the tensor and the reason (422)."""

    status_code = 422
    error_type = "invalid_adapter_error"


class ModelNotSupportedError(S2FTError):
    """The base model is not a Llama-family causal LM."""

    status_code = 400
    error_type = "invalid_request_error"


class InsufficientMemoryError(S2FTError):
    """What the configuration preallocates (the KV cache) does not fit in the device's free memory."""

    status_code = 503
    error_type = "service_unavailable"


class RequestTooLargeError(S2FTError):
    """A request body beyond the server's `max_request_bytes`."""

    status_code = 413
    error_type = "invalid_request_error"


class QueueFullError(S2FTError):
    status_code = 429
    error_type = "rate_limit_error"


class EngineNotReadyError(S2FTError):
    status_code = 503
    error_type = "service_unavailable"


class DataValidationError(S2FTError):
    """A training data file is malformed; the message names the line and the reason."""

    status_code = 400
    error_type = "invalid_request_error"
