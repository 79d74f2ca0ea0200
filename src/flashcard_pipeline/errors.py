"""Structured exceptions: every failure says what kind it is, whether retrying can help, and
how long the server asked us to wait.

The LLM client raises these; the ledger stores ``category`` and ``code`` for each failed call;
the CLI maps them to exit codes. Messages never contain secrets: the client redacts before raising.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar


class ErrorCategory(StrEnum):
    VALIDATION = "validation"
    AUTHENTICATION = "authentication"
    RATE_LIMIT = "rate_limit"
    CIRCUIT_OPEN = "circuit_open"
    EXTERNAL_SERVICE = "external_service"
    NETWORK = "network"
    TIMEOUT = "timeout"
    BUDGET = "budget"
    CONFIGURATION = "configuration"
    INVALID_RESPONSE = "invalid_response"
    INTERNAL = "internal"


class StructuredError(Exception):
    """Base of every error the pipeline raises on purpose."""

    category: ClassVar[ErrorCategory] = ErrorCategory.INTERNAL
    default_code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False
    #: Errors that stop the whole run (refused key, exhausted credit), not just one item.
    aborts_run: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
        timestamp: datetime | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details = dict(details or {})
        self.retry_after = retry_after
        self.timestamp = timestamp or datetime.now(UTC)

    def to_dict(self) -> dict[str, Any]:
        cause = self.__cause__
        return {
            "type": type(self).__name__,
            "category": self.category.value,
            "code": self.code,
            "message": self.message,
            "details": self.details,
            "retry_after": self.retry_after,
            "retryable": self.retryable,
            "timestamp": self.timestamp.isoformat(),
            "cause": None if cause is None else f"{type(cause).__name__}: {cause}",
        }

    def __str__(self) -> str:
        return self.message


class ConfigurationError(StructuredError):
    category = ErrorCategory.CONFIGURATION
    default_code = "configuration_error"


class InputError(StructuredError):
    """The vocabulary file cannot be read at all (not a row problem: those are reported and skipped)."""

    category = ErrorCategory.VALIDATION
    default_code = "bad_input"


class BudgetExceededError(StructuredError):
    category = ErrorCategory.BUDGET
    default_code = "budget_exceeded"
    aborts_run = True


class APIError(StructuredError):
    """The provider answered with an HTTP error status."""

    category = ErrorCategory.EXTERNAL_SERVICE
    default_code = "api_error"

    def __init__(self, message: str, *, status_code: int | None = None, response: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.status_code = status_code
        self.response = response
        if status_code is not None:
            self.details.setdefault("status_code", status_code)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["status_code"] = self.status_code
        return data


class BadRequestError(APIError):
    category = ErrorCategory.VALIDATION
    default_code = "bad_request"


class AuthenticationError(APIError):
    category = ErrorCategory.AUTHENTICATION
    default_code = "authentication_failed"
    aborts_run = True


class InsufficientCreditsError(APIError):
    category = ErrorCategory.BUDGET
    default_code = "insufficient_credits"
    aborts_run = True


class RateLimitError(APIError):
    category = ErrorCategory.RATE_LIMIT
    default_code = "rate_limited"
    retryable = True


class ServerError(APIError):
    category = ErrorCategory.EXTERNAL_SERVICE
    default_code = "server_error"
    retryable = True


class RequestTimeoutError(APIError):
    """HTTP 408, or our own connect/read timeout expiring."""

    category = ErrorCategory.TIMEOUT
    default_code = "timeout"
    retryable = True


class NetworkError(StructuredError):
    """The connection failed or dropped before a full answer arrived."""

    category = ErrorCategory.NETWORK
    default_code = "network_error"
    retryable = True


class InvalidResponseError(StructuredError):
    """The provider answered 200 but the answer is not usable."""

    category = ErrorCategory.INVALID_RESPONSE
    default_code = "invalid_response"
    retryable = True


class MalformedJSONError(InvalidResponseError):
    default_code = "malformed_json"


class SchemaViolationError(InvalidResponseError):
    default_code = "schema_violation"


class EmptyContentError(InvalidResponseError):
    default_code = "empty_content"


class TruncatedOutputError(InvalidResponseError):
    default_code = "truncated_output"


class ProviderError(InvalidResponseError):
    """An error object inside an HTTP 200 body (OpenRouter does this when an upstream fails mid-way)."""

    category = ErrorCategory.EXTERNAL_SERVICE
    default_code = "provider_error"


class CircuitBreakerError(StructuredError):
    category = ErrorCategory.CIRCUIT_OPEN
    default_code = "circuit_open"
    retryable = True
