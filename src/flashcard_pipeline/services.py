"""Reaching the optional servers (Redis) up front, so an unreachable one is one clear line before any work,
not a traceback per item."""

from __future__ import annotations

import urllib.parse

from flashcard_pipeline.errors import ConfigurationError


def masked_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def check_redis(url: str, setting: str, *, timeout: float = 2.0) -> None:
    """Ping the Redis at ``url``; a :class:`ConfigurationError` naming ``setting`` (the variable that asked for
    Redis) when it cannot be reached or refuses us."""
    import redis
    from redis.exceptions import RedisError

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    except ValueError as exc:
        raise ConfigurationError(f"{setting}: not a Redis URL: {masked_url(url)} ({exc})") from None
    try:
        client.ping()
    except (RedisError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigurationError(f"cannot reach Redis at {masked_url(url)} ({setting}): {reason}") from None
    finally:
        client.close()
