"""The structured exception hierarchy: retryability, serialisation to JSON and back."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from flashcard_pipeline import errors
from flashcard_pipeline.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    BudgetExceededError,
    CircuitBreakerError,
    ConfigurationError,
    ContentCheckError,
    EmptyContentError,
    ErrorCategory,
    InputError,
    InsufficientCreditsError,
    MalformedJSONError,
    NetworkError,
    ProviderError,
    RateLimitError,
    RequestTimeoutError,
    SchemaViolationError,
    ServerError,
    StructuredError,
    TruncatedOutputError,
    ValidationError,
    error_from_dict,
)

WHEN = datetime(2025, 3, 1, 12, 30, 15, 250000, tzinfo=UTC)


def all_error_classes() -> list[type[StructuredError]]:
    return [value for value in vars(errors).values()
            if isinstance(value, type) and issubclass(value, StructuredError)]


def example(cls: type[StructuredError]) -> StructuredError:
    """An instance with every field set, including the class's own extra fields."""
    extra: dict[str, Any] = {}
    if issubclass(cls, APIError):
        extra = {"status_code": 503, "response": '{"error": "upstream"}'}
    elif issubclass(cls, CircuitBreakerError):
        extra = {"circuit_state": "open"}
    elif issubclass(cls, ValidationError):
        extra = {"field_errors": {"term": "must not be empty"}}
    return cls(f"{cls.__name__} happened", code="some_code", details={"model": "m", "attempt": 2},
               retry_after=2.5, timestamp=WHEN, **extra)


def test_the_categories_the_issue_asks_for_exist() -> None:
    wanted = {"validation", "authentication", "rate_limit", "circuit_open", "external_service", "network",
              "timeout", "budget", "configuration", "internal"}
    assert wanted <= {c.value for c in ErrorCategory}


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_survives_a_json_round_trip(cls: type[StructuredError]) -> None:
    original = example(cls)
    text = json.dumps(original.to_dict(), allow_nan=False)
    loaded = error_from_dict(json.loads(text))
    assert type(loaded) is cls
    assert loaded.to_dict() == original.to_dict()
    assert (loaded.category, loaded.code, loaded.message, loaded.retry_after, loaded.timestamp) == (
        cls.category, "some_code", f"{cls.__name__} happened", 2.5, WHEN)
    assert loaded.retryable is cls.retryable and loaded.aborts_run is cls.aborts_run
    assert StructuredError.from_dict(original.to_dict()).to_dict() == original.to_dict()


def test_class_specific_fields_round_trip() -> None:
    api = error_from_dict(json.loads(json.dumps(RateLimitError(
        "slow down", status_code=429, response="busy", retry_after=7.0).to_dict())))
    assert isinstance(api, RateLimitError)
    assert (api.status_code, api.response, api.retry_after) == (429, "busy", 7.0)

    breaker = error_from_dict(CircuitBreakerError("open", circuit_state="half_open", retry_after=30.0).to_dict())
    assert isinstance(breaker, CircuitBreakerError)
    assert (breaker.circuit_state, breaker.retry_after) == ("half_open", 30.0)
    assert breaker.category is ErrorCategory.CIRCUIT_OPEN and breaker.retryable

    invalid = error_from_dict(ValidationError("bad row", field_errors={"term": "empty", "type": "unknown"}).to_dict())
    assert isinstance(invalid, ValidationError)
    assert invalid.field_errors == {"term": "empty", "type": "unknown"}
    assert invalid.details["field_errors"] == invalid.field_errors


def test_the_cause_is_kept_as_text_across_the_round_trip() -> None:
    try:
        try:
            raise ConnectionResetError("peer went away")
        except ConnectionResetError as exc:
            raise NetworkError("connection dropped", code="read_error") from exc
    except NetworkError as error:
        raised = error
    assert raised.cause == "ConnectionResetError: peer went away"
    loaded = error_from_dict(json.loads(json.dumps(raised.to_dict())))
    assert loaded.cause == "ConnectionResetError: peer went away"
    assert loaded.__cause__ is None  # no live exception is invented
    assert loaded.to_dict() == raised.to_dict()

    explicit = ServerError("boom", cause=TimeoutError("slow"))
    assert explicit.__cause__ is not None and explicit.to_dict()["cause"] == "TimeoutError: slow"


def test_to_dict_is_strict_json_whatever_the_details_hold() -> None:
    class Opaque:
        def __str__(self) -> str:
            return "opaque"

    error = ServerError("x", details={"when": WHEN, "ids": {3}, "pair": (1, 2), "ratio": float("nan"),
                                      "obj": Opaque(), 7: "int key"})
    data = json.loads(json.dumps(error.to_dict(), allow_nan=False))
    assert data["details"] == {"when": WHEN.isoformat(), "ids": [3], "pair": [1, 2], "ratio": None,
                               "obj": "opaque", "7": "int key"}
    assert error.details["pair"] == (1, 2), "serialising does not change the live error"


def test_a_non_finite_retry_after_is_strict_json_and_an_endless_wait_survives_the_round_trip() -> None:
    endless = RateLimitError("slow down", status_code=429, retry_after=float("inf"),
                             details={"limits": [1.5, float("inf"), {"reset": float("-inf")}]})
    text = json.dumps(endless.to_dict(), allow_nan=False)
    data = json.loads(text)
    assert data["retry_after"] == "inf" and data["details"]["limits"] == [1.5, None, {"reset": None}]
    loaded = error_from_dict(data)
    assert type(loaded) is RateLimitError and loaded.retry_after == float("inf"), "still too long to wait"
    assert loaded.status_code == 429 and loaded.to_dict() == endless.to_dict()
    assert error_from_dict(json.loads(json.dumps(ServerError("x", retry_after=float("-inf")).to_dict(),
                                                 allow_nan=False))).retry_after == float("-inf")

    meaningless = ServerError("x", retry_after=float("nan"), details={"ratio": float("nan")})
    data = json.loads(json.dumps(meaningless.to_dict(), allow_nan=False))
    assert data["retry_after"] is None and data["details"] == {"ratio": None}
    assert error_from_dict(data).retry_after is None
    assert endless.retry_after == float("inf"), "serialising does not change the live error"


@pytest.mark.parametrize(("written", "read"), [(None, None), (3, 3.0), ("2.5", 2.5), ("Infinity", float("inf")),
                                               ("soon", None), ([1], None), (True, None), (10**400, float("inf"))],
                         ids=["none", "int", "text", "Infinity", "soon", "list", "bool", "huge-int"])
def test_the_loader_reads_what_it_can_of_retry_after(written: Any, read: float | None) -> None:
    loaded = error_from_dict({"type": "RateLimitError", "message": "m", "retry_after": written})
    assert loaded.retry_after == read
    json.dumps(loaded.to_dict(), allow_nan=False)


def test_an_unknown_type_loads_as_the_most_general_class_of_its_category() -> None:
    data = RateLimitError("throttled", retry_after=3.0).to_dict() | {"type": "FutureThrottleError"}
    loaded = error_from_dict(data)
    assert type(loaded) is RateLimitError and loaded.retryable and loaded.retry_after == 3.0
    odd = error_from_dict({"type": "Mystery", "category": "no-such-category", "message": "?"})
    assert type(odd) is StructuredError and odd.category is ErrorCategory.INTERNAL and not odd.retryable


def test_a_missing_timestamp_is_filled_in() -> None:
    before = datetime.now(UTC)
    loaded = error_from_dict({"type": "ServerError", "message": "m", "code": "server_error"})
    assert loaded.timestamp >= before and loaded.code == "server_error" and loaded.details == {}


PERMANENT = [BadRequestError, AuthenticationError, InsufficientCreditsError, APIError, ConfigurationError,
             ValidationError, InputError, BudgetExceededError, StructuredError]
TRANSIENT = [RateLimitError, ServerError, RequestTimeoutError, NetworkError, EmptyContentError,
             TruncatedOutputError, MalformedJSONError, SchemaViolationError, ContentCheckError, ProviderError,
             CircuitBreakerError]


@pytest.mark.parametrize("cls", PERMANENT, ids=lambda c: c.__name__)
def test_permanent_errors_say_they_are_not_retryable(cls: type[StructuredError]) -> None:
    assert not example(cls).retryable


@pytest.mark.parametrize("cls", TRANSIENT, ids=lambda c: c.__name__)
def test_transient_errors_say_they_are_retryable(cls: type[StructuredError]) -> None:
    error = example(cls)
    assert error.retryable and not error.aborts_run


def test_every_class_is_classified() -> None:
    assert set(all_error_classes()) == set(PERMANENT) | set(TRANSIENT) | {errors.InvalidResponseError}


def test_only_refusals_of_the_whole_account_abort_the_run() -> None:
    aborting = {cls for cls in all_error_classes() if cls.aborts_run}
    assert aborting == {AuthenticationError, InsufficientCreditsError, BudgetExceededError}


def test_input_errors_are_validation_errors_with_their_own_code() -> None:
    error = InputError("words.csv: file is empty", code="empty_file")
    assert isinstance(error, ValidationError) and error.category is ErrorCategory.VALIDATION
    assert error.code == "empty_file" and InputError("x").code == "bad_input"


def test_api_errors_keep_their_status_in_details() -> None:
    error = ServerError("bad gateway", status_code=502)
    assert error.details["status_code"] == 502 and error.to_dict()["status_code"] == 502


def test_brief_gives_one_line_and_the_driver_s_message_of_a_database_error() -> None:
    import sqlite3

    import sqlalchemy.exc

    wrapped = sqlalchemy.exc.OperationalError("UPDATE items SET a=? WHERE id=?", ("secret-ish value", 1),
                                              sqlite3.OperationalError("database is locked"))
    assert "\n" in str(wrapped) and "UPDATE items" in str(wrapped)
    assert errors.brief(wrapped) == "OperationalError: database is locked"
    assert errors.brief(OSError("disk full\nmore detail")) == "OSError: disk full"
    assert errors.brief(TimeoutError()) == "TimeoutError"
