"""Structured exceptions: every failure says what kind it is, whether retrying can help, and
how long the server asked us to wait.

The LLM client raises these; the ledger stores ``category`` and ``code`` for each failed call;
the retry policy decides on ``retryable``, ``aborts_run`` and ``retry_after`` alone; the CLI maps
them to exit codes. Messages never contain secrets: the client redacts before raising.
``to_dict`` and :func:`error_from_dict` carry an error through JSON (logs, dead-letter records)
and back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar


def brief(error: BaseException) -> str:
    """An error in one line for a warning that repeats while a run goes on: a database driver's own message, not
    the statement and its parameters SQLAlchemy adds to it (several lines of SQL and values on the console)."""
    cause = getattr(error, "orig", None)
    cause = cause if isinstance(cause, BaseException) else error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


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


def _jsonable(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps`` accepts (strict JSON: no NaN), whatever ``details`` held."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _seconds(value: Any) -> float | None:
    """``value`` as a float, None if it is none or NaN (a wait that says nothing); an int too big for a float
    is the endless wait it means."""
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf
    except (TypeError, ValueError):
        return None
    return None if math.isnan(seconds) else seconds


def _json_retry_after(value: float | None) -> float | str | None:
    """``retry_after`` as strict JSON: an endless wait is ``"inf"``, which :func:`error_from_dict` reads back,
    so the retry policy still sees a wait too long to make instead of no wait at all."""
    seconds = _seconds(value)
    if seconds is None or math.isfinite(seconds):
        return seconds
    return "inf" if seconds > 0 else "-inf"


class StructuredError(Exception):
    """Base of every error the pipeline raises on purpose."""

    category: ClassVar[ErrorCategory] = ErrorCategory.INTERNAL
    default_code: ClassVar[str] = "internal_error"
    #: Whether the same call may succeed if made again (the retry policy also checks its categories).
    retryable: ClassVar[bool] = False
    #: Errors that stop the whole run (refused key, exhausted credit), not just one item.
    aborts_run: ClassVar[bool] = False
    #: Constructor keywords beyond the base ones that ``to_dict`` writes and ``from_dict`` reads back.
    extra_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
        timestamp: datetime | None = None,
        cause: BaseException | str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details = dict(details or {})
        self.retry_after = retry_after
        self.timestamp = timestamp or datetime.now(UTC)
        self._cause_text: str | None = None
        if isinstance(cause, BaseException):
            self.__cause__ = cause
        else:
            self._cause_text = cause

    @property
    def cause(self) -> str | None:
        """``"Type: message"`` of the underlying exception, also after a round trip through JSON."""
        if self.__cause__ is not None:
            return f"{type(self.__cause__).__name__}: {self.__cause__}"
        return self._cause_text

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON (``json.dumps(..., allow_nan=False)`` accepts it): a log line or dead-letter record never
        fails to be written because of what the error carries."""
        data: dict[str, Any] = {
            "type": type(self).__name__,
            "category": self.category.value,
            "code": self.code,
            "message": self.message,
            "details": _jsonable(self.details),
            "retry_after": _json_retry_after(self.retry_after),
            "retryable": self.retryable,
            "aborts_run": self.aborts_run,
            "timestamp": self.timestamp.isoformat(),
            "cause": self.cause,
        }
        for name in self.extra_fields:
            data[name] = _jsonable(getattr(self, name))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StructuredError:
        """Rebuild an error written by :meth:`to_dict` (see :func:`error_from_dict`)."""
        return error_from_dict(data)

    def __str__(self) -> str:
        return self.message


def _subclasses(root: type[StructuredError]) -> list[type[StructuredError]]:
    """Every subclass of ``root``, breadth-first, so a name or category resolves to the most general class."""
    found: list[type[StructuredError]] = []
    queue = [root]
    while queue:
        cls = queue.pop(0)
        found.append(cls)
        queue.extend(sub for sub in cls.__subclasses__() if sub not in found and sub not in queue)
    return found


def error_from_dict(data: Mapping[str, Any]) -> StructuredError:
    """The inverse of :meth:`StructuredError.to_dict`.

    The class is found by ``type``; a record from a newer version whose type this one does not know
    becomes the most general class of the same category, so it is still handled as that kind.
    """
    classes = _subclasses(StructuredError)
    name, category = data.get("type"), data.get("category")
    cls = next((c for c in classes if c.__name__ == name), None)
    if cls is None:
        cls = next((c for c in classes if c.category.value == category), StructuredError)
    timestamp = data.get("timestamp")
    kwargs: dict[str, Any] = {
        "code": data.get("code"),
        "details": dict(data.get("details") or {}),
        "retry_after": _seconds(data.get("retry_after")),
        "timestamp": datetime.fromisoformat(timestamp) if isinstance(timestamp, str) else None,
        "cause": data.get("cause"),
    }
    kwargs.update({field: data[field] for field in cls.extra_fields if field in data})
    return cls(str(data.get("message", "")), **kwargs)


class ConfigurationError(StructuredError):
    category = ErrorCategory.CONFIGURATION
    default_code = "configuration_error"


class ValidationError(StructuredError):
    """Values that fail validation; ``field_errors`` maps each offending field to what is wrong with it."""

    category = ErrorCategory.VALIDATION
    default_code = "validation_failed"
    extra_fields = ("field_errors",)

    def __init__(self, message: str, *, field_errors: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.field_errors = dict(field_errors or {})
        if self.field_errors:
            self.details.setdefault("field_errors", dict(self.field_errors))


class InputError(ValidationError):
    """The vocabulary file cannot be read at all (not a row problem: those are reported and skipped)."""

    default_code = "bad_input"


class BudgetExceededError(StructuredError):
    category = ErrorCategory.BUDGET
    default_code = "budget_exceeded"
    aborts_run = True


class APIError(StructuredError):
    """The provider answered with an HTTP error status."""

    category = ErrorCategory.EXTERNAL_SERVICE
    default_code = "api_error"
    extra_fields = ("status_code", "response")

    def __init__(self, message: str, *, status_code: int | None = None, response: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.status_code = status_code
        self.response = response
        if status_code is not None:
            self.details.setdefault("status_code", status_code)


class BadRequestError(APIError):
    """400, 404, 413, 422 and moderation refusals: the request itself is wrong, so asking again is waste."""

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
    """Content that is not JSON: asking again is a re-ask, drawn from its own small budget."""

    default_code = "malformed_json"


class SchemaViolationError(InvalidResponseError):
    """JSON that breaks the schema or a domain rule: also a re-ask."""

    default_code = "schema_violation"


class ContentCheckError(SchemaViolationError):
    """A schema-valid answer that fails a content check (the example lacks the term, a Hanja reading is wrong).

    Re-asked once with the problems; an answer that still fails is kept and its item flagged for review, so
    ``value`` carries the parsed answer and ``details["problems"]`` the reasons.
    """

    default_code = "content_check"

    def __init__(self, message: str, *, value: Any = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.value = value

    @property
    def problems(self) -> list[str]:
        return [str(p) for p in self.details.get("problems", [])]


class EmptyContentError(InvalidResponseError):
    default_code = "empty_content"


class TruncatedOutputError(InvalidResponseError):
    default_code = "truncated_output"


class ProviderError(InvalidResponseError):
    """An error object inside an HTTP 200 body (OpenRouter does this when an upstream fails mid-way)."""

    category = ErrorCategory.EXTERNAL_SERVICE
    default_code = "provider_error"


class CircuitBreakerError(StructuredError):
    """A breaker refused the call without sending it; ``retry_after`` is when it will let one through."""

    category = ErrorCategory.CIRCUIT_OPEN
    default_code = "circuit_open"
    retryable = True
    extra_fields = ("circuit_state",)

    def __init__(self, message: str, *, circuit_state: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.circuit_state = circuit_state
        if circuit_state is not None:
            self.details.setdefault("circuit_state", circuit_state)


__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "BudgetExceededError",
    "CircuitBreakerError",
    "ConfigurationError",
    "EmptyContentError",
    "ErrorCategory",
    "InputError",
    "InsufficientCreditsError",
    "InvalidResponseError",
    "MalformedJSONError",
    "NetworkError",
    "ProviderError",
    "RateLimitError",
    "RequestTimeoutError",
    "SchemaViolationError",
    "ServerError",
    "StructuredError",
    "TruncatedOutputError",
    "ValidationError",
    "error_from_dict",
]
