"""Rate limits in Redis, shared by every process (on any machine) that uses the same key.

Each operation is one Lua script, so it is atomic on the server: a take, a Go-style reservation, a
cancel, a refund, a pause, a limit change, a state read, and the compare-and-set that shares the
adaptive loop's planned limit. The bucket is the same token bucket as
:class:`~flashcard_pipeline.resilience.token_bucket.TokenBucket` (same arithmetic, in Lua), stored
as a hash that expires a day after its last use.

Time is Redis's own ``TIME`` unless the limiter is given a clock (tests and simulations, where every
participant shares that clock): processes on different machines then agree on time without
synchronised clocks, and a waiter sleeps the delay the server computed. All keys of one group share
a hash tag, so the two-limit take works on Redis Cluster too.

Only the token bucket runs in Redis; ``RL_ALGORITHM=sliding_window`` is in-memory only.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.resilience.clock import Clock, SystemClock
from flashcard_pipeline.resilience.rate_limiter import (
    DEFAULT_RESERVATION_TTL,
    TIME_EPSILON,
    AcquireMetrics,
    ReservationMetrics,
    ReservationState,
    TokenReservation,
)
from flashcard_pipeline.resilience.token_bucket import INF, AlgorithmName

__all__ = ["KEY_TTL_MS", "RedisLimits", "RedisRateLimiter", "SharedAdaptiveState"]

#: A limit unused for a day is forgotten (its adaptive state with it).
KEY_TTL_MS = 86_400_000
_NEVER = "-1e300"

# Shared by every script: time, load/advance/save of one bucket hash. A negative rate means unlimited.
_PRELUDE = """
local function num(x) return string.format('%.17g', x) end
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function save(key, b)
  redis.call('HSET', key, 'rate', num(b.rate), 'burst', num(b.burst), 'tokens', num(b.tokens),
             'last', num(b.last), 'last_event', num(b.last_event), 'frozen_until', num(b.frozen_until),
             'frozen_total', num(b.frozen_total), 'config_rate', num(b.config_rate),
             'config_burst', num(b.config_burst))
  redis.call('PEXPIRE', key, __TTL__)
end
local function load(key, rate0, burst0, now)
  local v = redis.call('HMGET', key, 'rate', 'burst', 'tokens', 'last', 'last_event', 'frozen_until',
                       'frozen_total', 'config_rate', 'config_burst')
  local b
  if not v[1] then
    b = {rate = rate0, burst = burst0, tokens = burst0, last = now, last_event = now, frozen_until = -1e300,
         frozen_total = 0, config_rate = rate0, config_burst = burst0}
  else
    b = {rate = tonumber(v[1]), burst = tonumber(v[2]), tokens = tonumber(v[3]), last = tonumber(v[4]),
         last_event = tonumber(v[5]), frozen_until = tonumber(v[6]), frozen_total = tonumber(v[7]),
         config_rate = tonumber(v[8]), config_burst = tonumber(v[9])}
  end
  if rate0 ~= nil and (b.config_rate ~= rate0 or b.config_burst ~= burst0) then
    -- New configuration (e.g. another --rpm): it replaces the old limit; the bucket keeps its level.
    b.rate = rate0; b.burst = burst0; b.config_rate = rate0; b.config_burst = burst0
    if b.tokens > b.burst then b.tokens = b.burst end
    save(key, b)
  end
  return b
end
local function advance(b, now)
  local start = b.last
  if b.frozen_until > start then start = b.frozen_until end
  if now <= start or b.rate == 0 then return b.tokens end
  if b.rate < 0 then return b.burst end
  local t = b.tokens + (now - start) * b.rate
  if t > b.burst then t = b.burst end
  return t
end
local function delay(b, now, deficit)
  if deficit <= 0 then
    if b.frozen_until > now then return b.frozen_until - now end
    return 0
  end
  if b.rate == 0 then return -1 end
  local start = b.last
  if b.frozen_until > start then start = b.frozen_until end
  local lead = 0
  if start > now then lead = start - now end
  return lead + deficit / b.rate
end
""".replace("__TTL__", str(KEY_TTL_MS))

# KEYS: buckets. ARGV: now, then (amount, rate0, burst0) per key. All or nothing, no waiting.
_TAKE = _PRELUDE + """
local now = clock(ARGV[1])
local buckets, worst, blocked = {}, 0, 0
for i, key in ipairs(KEYS) do
  local amount, rate0, burst0 = tonumber(ARGV[i * 3 - 1]), tonumber(ARGV[i * 3]), tonumber(ARGV[i * 3 + 1])
  local b = load(key, rate0, burst0, now)
  buckets[i] = b
  if b.rate >= 0 and amount > 0 then
    local wait
    if amount > b.burst then wait = -1 else wait = delay(b, now, amount - advance(b, now)) end
    if wait < 0 then return {0, '-1', tostring(i - 1), num(now)} end
    if wait > 0 and (blocked == 0 or wait > worst) then worst = wait; blocked = i end
  end
end
if blocked > 0 then return {0, num(worst), tostring(blocked - 1), num(now)} end
for i, key in ipairs(KEYS) do
  local b, amount = buckets[i], tonumber(ARGV[i * 3 - 1])
  if b.rate >= 0 and amount > 0 then
    b.tokens = advance(b, now) - amount
    if now > b.last then b.last = now end
    b.last_event = now
  end
  save(key, b)
end
return {1, '0', '-1', num(now)}
"""

# KEYS[1]. ARGV: now, amount, max_wait (-1 = none), rate0, burst0. Go's reserveN.
_RESERVE = _PRELUDE + """
local now = clock(ARGV[1])
local amount, max_wait = tonumber(ARGV[2]), tonumber(ARGV[3])
local b = load(KEYS[1], tonumber(ARGV[4]), tonumber(ARGV[5]), now)
if b.rate < 0 or amount <= 0 then
  return {1, num(now), num(now), num(b.rate), num(b.frozen_total)}
end
if amount > b.burst then return {0, '-1', num(now), num(b.rate), num(b.frozen_total)} end
local tokens = advance(b, now) - amount
local wait = delay(b, now, -tokens)
if wait < 0 or (max_wait >= 0 and wait > max_wait) then
  return {0, num(wait), num(now), num(b.rate), num(b.frozen_total)}
end
b.tokens = tokens
if now > b.last then b.last = now end
b.last_event = now + wait
save(KEYS[1], b)
return {1, num(b.last_event), num(now), num(b.rate), num(b.frozen_total)}
"""

# KEYS[1]. ARGV: now, amount, time_to_act, rate at reservation. Go's CancelAt; returns tokens restored.
_CANCEL = _PRELUDE + """
local now = clock(ARGV[1])
local amount, tta, rate_at = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[1]) == 0 then return '0' end
local b = load(KEYS[1], nil, nil, now)
if b.rate < 0 or amount <= 0 or tta < now then return '0' end
local restore = amount - (b.last_event - tta) * rate_at
if restore <= 0 then return '0' end
local before = advance(b, now)
local tokens = before + restore
if tokens > b.burst then tokens = b.burst end
b.tokens = tokens
if now > b.last then b.last = now end
if tta == b.last_event and rate_at > 0 then
  local previous = tta - amount / rate_at
  if previous >= now then b.last_event = previous end
end
save(KEYS[1], b)
return num(tokens - before)
"""

# KEYS[1] bucket, KEYS[2] its per-second usage hash. ARGV: now, delta (+ refund, - charge), used (recorded).
_SETTLE = _PRELUDE + """
local now = clock(ARGV[1])
local delta, used = tonumber(ARGV[2]), tonumber(ARGV[3])
if delta ~= 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  local b = load(KEYS[1], nil, nil, now)
  if delta > 0 and b.last_event > now then
    -- As in the in-memory bucket: no refund while reservations are queued (one could act next to them).
    delta = 0
  end
  if b.rate >= 0 and delta ~= 0 then
    local tokens = advance(b, now) + delta
    if tokens > b.burst then tokens = b.burst end
    b.tokens = tokens
    if now > b.last then b.last = now end
    save(KEYS[1], b)
  end
end
if used > 0 then
  redis.call('HINCRBYFLOAT', KEYS[2], tostring(math.floor(now)), used)
  redis.call('PEXPIRE', KEYS[2], 120000)
end
return num(now)
"""

# KEYS: buckets. ARGV: now, seconds. Nobody acts before now + seconds; buckets drain.
_PAUSE = _PRELUDE + """
local now = clock(ARGV[1])
local seconds = tonumber(ARGV[2])
local added = 0
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local b = load(key, nil, nil, now)
    local untill = now + seconds
    local start = now
    if b.frozen_until > now then start = b.frozen_until end
    if untill > start then
      local tokens = advance(b, now)
      if tokens > 0 then tokens = 0 end
      b.tokens = tokens
      if now > b.last then b.last = now end
      added = untill - start
      b.frozen_until = untill
      b.frozen_total = b.frozen_total + added
      if b.last_event > now then b.last_event = b.last_event + added end
      save(key, b)
    end
  end
end
return num(added)
"""

# KEYS[1]. ARGV: now, rate, burst, rate0, burst0. Adaptive change of the live limit (config unchanged).
_SET_LIMIT = _PRELUDE + """
local now = clock(ARGV[1])
local b = load(KEYS[1], tonumber(ARGV[4]), tonumber(ARGV[5]), now)
local tokens = advance(b, now)
if now > b.last then b.last = now end
b.rate = tonumber(ARGV[2])
b.burst = tonumber(ARGV[3])
if tokens > b.burst then tokens = b.burst end
b.tokens = tokens
save(KEYS[1], b)
return num(now)
"""

# KEYS[1] bucket, KEYS[2] usage hash, KEYS[3] adaptive state. ARGV: now.
_STATE = _PRELUDE + """
local now = clock(ARGV[1])
local exists = redis.call('EXISTS', KEYS[1])
local out = {num(now), tostring(exists)}
if exists == 1 then
  local b = load(KEYS[1], nil, nil, now)
  local paused = 0
  if b.frozen_until > now then paused = b.frozen_until - now end
  for _, v in ipairs({b.rate, b.burst, advance(b, now), paused, b.frozen_total}) do out[#out + 1] = num(v) end
else
  for _ = 1, 5 do out[#out + 1] = '0' end
end
local used, fields = 0, redis.call('HGETALL', KEYS[2])
for i = 1, #fields, 2 do
  local second = tonumber(fields[i])
  if second > now - 60 then used = used + tonumber(fields[i + 1]) else redis.call('HDEL', KEYS[2], fields[i]) end
end
out[#out + 1] = num(used)
local s = redis.call('HMGET', KEYS[3], 'version', 'planned', 'ceiling', 'header', 'changed_at', 'decreased_at')
for i = 1, 6 do out[#out + 1] = s[i] or '' end
return out
"""

# KEYS[1] adaptive state, KEYS[2] bucket. ARGV: now, expected version, planned, ceiling, header, changed_at,
# decreased_at, rate, burst, rate0, burst0. Compare-and-set: applies only if nobody changed it meanwhile.
_ADAPT = _PRELUDE + """
local now = clock(ARGV[1])
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if version ~= tonumber(ARGV[2]) then return {0, tostring(version)} end
version = version + 1
redis.call('HSET', KEYS[1], 'version', tostring(version), 'planned', ARGV[3], 'ceiling', ARGV[4],
           'header', ARGV[5], 'changed_at', ARGV[6], 'decreased_at', ARGV[7])
redis.call('PEXPIRE', KEYS[1], __TTL__)
local b = load(KEYS[2], tonumber(ARGV[10]), tonumber(ARGV[11]), now)
local tokens = advance(b, now)
if now > b.last then b.last = now end
b.rate = tonumber(ARGV[8])
b.burst = tonumber(ARGV[9])
if tokens > b.burst then tokens = b.burst end
b.tokens = tokens
save(KEYS[2], b)
return {1, tostring(version)}
""".replace("__TTL__", str(KEY_TTL_MS))


def _encode_rate(rate: float) -> float:
    return -1.0 if rate == INF else rate


def _decode_rate(raw: Any) -> float:
    value = float(raw)
    return INF if value < 0 else value


def _float(raw: Any) -> float:
    return float(raw.decode() if isinstance(raw, bytes) else raw)


def _optional(raw: Any) -> float | None:
    text = raw.decode() if isinstance(raw, bytes) else raw
    return None if text in ("", None) else float(text)


@dataclass
class RedisPart:
    """One limiter's share of a grant: refunds and charges go back to its bucket."""

    limiter: RedisRateLimiter
    amount: float
    time_to_act: float
    rate: float


@dataclass(frozen=True)
class SharedAdaptiveState:
    """The adaptive loop's state as all processes see it (``version`` guards compare-and-set)."""

    version: int
    planned: float | None
    ceiling: float | None
    header: float | None
    changed_at: float | None
    decreased_at: float | None
    #: What this limit admitted in the last minute, over every process (recorded on success).
    used_last_minute: float
    now: float


class RedisRateLimiter:
    """One limit stored in Redis under ``prefix``; same public API as the in-memory ``RateLimiter``.

    ``rate`` and ``burst`` are the configuration: a process whose configuration differs from the
    stored one replaces it (processes sharing a limit must agree), while adaptive changes
    (:meth:`set_limit`) leave it alone.
    """

    def __init__(self, client: Any, rate: float, burst: float, *, name: str = "limit",
                 prefix: str = "flashcard-pipeline:ratelimit:", clock: Clock | None = None,
                 reservation_ttl: float = DEFAULT_RESERVATION_TTL, scripts: dict[str, Any] | None = None) -> None:
        self.client = client
        self.name = name
        self.algorithm: AlgorithmName = "token_bucket"
        tag, _, leaf = name.rpartition(":")
        tag, leaf = (tag, leaf) if tag else (name, "bucket")
        base = f"{prefix}{{{tag}}}:{leaf}"
        self.key = base
        self.usage_key = base + ":used"
        self.state_key = base + ":adaptive"
        self._config = (float(rate), float(burst))
        self._rate, self._burst = float(rate), float(burst)
        self._clock_given = clock is not None
        self.clock: Clock = clock or SystemClock()
        self.reservation_ttl = reservation_ttl
        self.metrics = AcquireMetrics()
        self.reservation_metrics = ReservationMetrics()
        self._scripts = scripts if scripts is not None else _register(client)
        self._pending: dict[int, TokenReservation] = {}

    def __repr__(self) -> str:
        return f"RedisRateLimiter(key={self.key!r}, rate={self._rate!r}, burst={self._burst!r})"

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def _now(self) -> str:
        return repr(self.clock.monotonic()) if self._clock_given else ""

    def _config_args(self) -> list[Any]:
        rate, burst = self._config
        return [repr(_encode_rate(rate)), repr(burst)]

    # -- acquiring ---------------------------------------------------------------------------------

    async def _reserve_raw(self, n: float, max_wait: float) -> tuple[bool, float, float, float, float]:
        """(ok, time to act, server now, rate then, frozen total), times on the server's scale."""
        raw = await self._scripts["reserve"](keys=[self.key], args=[
            self._now(), repr(float(n)), "-1" if max_wait == INF else repr(max_wait), *self._config_args()])
        ok, when, now, rate, frozen = int(raw[0]), _float(raw[1]), _float(raw[2]), _float(raw[3]), _float(raw[4])
        return bool(ok), when, now, _decode_rate(rate), frozen

    async def acquire(self, n: float = 1.0, *, key: str | None = None) -> float:
        started = self.clock.monotonic()
        ok, when, now, rate, frozen = await self._reserve_raw(n, INF)
        if not ok:
            raise ValueError(f"{self.name}: {n:g} tokens can never be granted (burst {self._burst:g})")
        self.metrics.acquired += 1
        self.metrics.tokens += n
        if when - now <= TIME_EPSILON:
            return 0.0
        part = RedisPart(self, n, when, rate)
        try:
            await self._sleep_until(part, when - now, frozen)
        except asyncio.CancelledError:
            await self._cancel_parts((part,))
            self.metrics.abandoned += 1
            raise
        waited = self.clock.monotonic() - started
        self.metrics.waited += 1
        self.metrics.wait_time += waited
        return waited

    async def _sleep_until(self, part: RedisPart, delay: float, frozen_seen: float) -> None:
        """Sleep the server's delay, then follow any pause that started meanwhile."""
        while delay > TIME_EPSILON:
            await self.clock.sleep(delay)
            state = await self._bucket_state()
            frozen = state["frozen_total"]
            if frozen <= frozen_seen:
                return
            delay = frozen - frozen_seen
            part.time_to_act += delay
            frozen_seen = frozen

    async def try_acquire(self, n: float = 1.0, *, key: str | None = None) -> bool:
        ok, *_ = await self._reserve_raw(n, 0.0)
        if ok:
            self.metrics.acquired += 1
            self.metrics.tokens += n
        return ok

    async def reserve(self, n: float = 1.0, max_wait: float = INF, *, key: str | None = None) -> TokenReservation:
        if n < 0 or math.isnan(n):
            raise ValueError(f"cannot reserve {n!r} tokens")
        local = self.clock.monotonic()
        ok, when, now, rate, frozen = await self._reserve_raw(n, max_wait)
        if not ok:
            self.reservation_metrics.refused += 1
            return TokenReservation(ok=False, tokens=n, time_to_act=INF, delay=INF, expires_at=-INF, made_at=local,
                                    _host=self, state=ReservationState.REFUSED)
        delay = max(0.0, when - now)
        reservation = TokenReservation(
            ok=True, tokens=n, time_to_act=local + delay, delay=delay, expires_at=local + delay + self.reservation_ttl,
            made_at=local, _host=self, _parts=(RedisPart(self, n, when, rate),), _frozen_seen=frozen)
        self.reservation_metrics.made += 1
        self._sweep(local)
        self._pending[id(reservation)] = reservation
        return reservation

    def _sweep(self, now: float) -> None:
        """As in memory: reservations nobody executed or cancelled in time count as expired and are dropped
        (their tokens stay spent), so abandoned ones neither pile up nor go uncounted."""
        for reservation in [r for r in self._pending.values() if now > r.expires_at]:
            reservation._expire()

    def _forget(self, reservation: TokenReservation) -> None:
        self._pending.pop(id(reservation), None)

    async def _cancel_parts(self, parts: Sequence[Any]) -> float:
        returned = 0.0
        for part in parts:
            raw = await self._scripts["cancel"](keys=[part.limiter.key], args=[
                self._now(), repr(part.amount), repr(part.time_to_act), repr(_encode_rate(part.rate))])
            returned += _float(raw)
        return returned

    async def _frozen(self, parts: Sequence[Any]) -> float:
        return (await self._bucket_state())["frozen_total"]

    # -- what the per-call policy uses ---------------------------------------------------------------

    async def settle_grant(self, parts: Sequence[Any], delta: float, used: float) -> None:
        if delta or used:
            await self.settle(delta, used)

    async def settle(self, delta: float, used: float) -> None:
        """Refund (``delta`` > 0) or charge tokens, and record ``used`` for the shared last-minute usage."""
        if delta > 0:
            self.metrics.refunded += delta
        elif delta < 0:
            self.metrics.charged -= delta
        await self._scripts["settle"](keys=[self.key, self.usage_key], args=[self._now(), repr(delta), repr(used)])

    async def refund(self, n: float, *, key: str | None = None) -> None:
        if n > 0:
            await self.settle(n, 0.0)

    async def pause(self, seconds: float) -> None:
        if seconds > 0 and not math.isnan(seconds):
            await self._scripts["pause"](keys=[self.key], args=[self._now(), repr(seconds)])

    async def set_limit(self, rate: float, burst: float) -> None:
        await self._scripts["set_limit"](keys=[self.key], args=[
            self._now(), repr(_encode_rate(rate)), repr(burst), *self._config_args()])
        self._rate, self._burst = float(rate), float(burst)

    async def shared_state(self) -> SharedAdaptiveState:
        state = await self._bucket_state()
        return state["adaptive"]  # type: ignore[no-any-return]

    async def propose(self, expected: SharedAdaptiveState, *, planned: float, ceiling: float | None,
                      header: float | None, decreased_at: float | None, rate: float, burst: float) -> bool:
        """Set the shared planned limit (and the bucket's rate) if no other process changed it since ``expected``."""
        raw = await self._scripts["adapt"](keys=[self.state_key, self.key], args=[
            self._now(), str(expected.version), _text(planned), _text(ceiling), _text(header),
            repr(expected.now), _text(decreased_at), repr(_encode_rate(rate)), repr(burst), *self._config_args()])
        if int(raw[0]):
            self._rate, self._burst = float(rate), float(burst)
            return True
        return False

    async def _bucket_state(self) -> dict[str, Any]:
        raw = await self._scripts["state"](keys=[self.key, self.usage_key, self.state_key], args=[self._now()])
        now = _float(raw[0])
        exists = int(raw[1])
        rate, burst, available, paused, frozen, used = (_float(v) for v in raw[2:8])
        version, planned, ceiling, header, changed, decreased = raw[8:14]
        adaptive = SharedAdaptiveState(
            version=int(_optional(version) or 0), planned=_optional(planned), ceiling=_optional(ceiling),
            header=_optional(header), changed_at=_optional(changed), decreased_at=_optional(decreased),
            used_last_minute=used, now=now)
        if not exists:
            rate, burst = self._config
            available, paused, frozen = burst, 0.0, 0.0
        else:
            rate = _decode_rate(rate)
        return {"now": now, "rate": rate, "burst": burst, "available": available, "paused_for": paused,
                "frozen_total": frozen, "adaptive": adaptive}

    async def state(self) -> dict[str, Any]:
        """Live state from Redis (every process's tokens) plus this process's metrics."""
        self._sweep(self.clock.monotonic())
        state = await self._bucket_state()
        rate = state["rate"]
        return {
            "name": self.name,
            "backend": "redis",
            "key": self.key,
            "algorithm": self.algorithm,
            "shards": 1,
            "rate_per_second": rate if math.isfinite(rate) else None,
            "rate_per_minute": rate * 60 if math.isfinite(rate) else None,
            "burst": state["burst"],
            "available": state["available"] if math.isfinite(rate) else None,
            "paused_for": round(state["paused_for"], 3),
            "used_last_minute_all_processes": state["adaptive"].used_last_minute,
            "acquire": self.metrics.to_dict(),
            "reservations": self.reservation_metrics.to_dict(),
            "pending_reservations": len(self._pending),
        }


def _text(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _register(client: Any) -> dict[str, Any]:
    return {name: client.register_script(body) for name, body in (
        ("take", _TAKE), ("reserve", _RESERVE), ("cancel", _CANCEL), ("settle", _SETTLE), ("pause", _PAUSE),
        ("set_limit", _SET_LIMIT), ("state", _STATE), ("adapt", _ADAPT))}


class RedisLimits:
    """A :class:`~flashcard_pipeline.resilience.rate_limit_policy.LimitBackend` in Redis: every process using the
    same URL and prefix shares the buckets, the pauses after 429s and the adaptive limits."""

    name = "redis"

    def __init__(self, url_or_client: Any, *, prefix: str = "flashcard-pipeline:ratelimit:",
                 algorithm: AlgorithmName = "token_bucket", clock: Clock | None = None,
                 reservation_ttl: float = DEFAULT_RESERVATION_TTL) -> None:
        if algorithm != "token_bucket":
            raise ConfigurationError("the Redis rate-limit backend implements token_bucket only; "
                                     "unset RL_ALGORITHM or use RL_BACKEND=memory")
        if isinstance(url_or_client, str):
            import redis.asyncio as redis_asyncio

            self.client = redis_asyncio.from_url(url_or_client)
            self._owns = True
        else:
            self.client = url_or_client
            self._owns = False
        self.prefix = prefix
        self.algorithm: AlgorithmName = algorithm
        self.clock = clock
        self.reservation_ttl = reservation_ttl
        self._scripts = _register(self.client)

    def make(self, name: str, rate: float, burst: float, *, shardable: bool = True) -> RedisRateLimiter:
        """One bucket in Redis (shared by every process, so never sharded)."""
        return RedisRateLimiter(self.client, rate, burst, name=name, prefix=self.prefix, clock=self.clock,
                                reservation_ttl=self.reservation_ttl, scripts=self._scripts)

    async def take(self, limiters: Sequence[RedisRateLimiter], amounts: Sequence[float],
                   key: str | None) -> tuple[list[Any] | None, float, int]:
        args: list[Any] = [limiters[0]._now()]
        for limiter, amount in zip(limiters, amounts, strict=True):
            args.extend([repr(float(amount)), *limiter._config_args()])
        raw = await self._scripts["take"](keys=[limiter.key for limiter in limiters], args=args)
        ok, wait, blocked, now = int(raw[0]), _float(raw[1]), int(raw[2]), _float(raw[3])
        if not ok:
            return None, INF if wait < 0 else wait, blocked
        parts: list[Any] = []
        for limiter, amount in zip(limiters, amounts, strict=True):
            limiter.metrics.acquired += 1
            limiter.metrics.tokens += amount
            parts.append([RedisPart(limiter, amount, now, limiter.rate)])
        return parts, 0.0, -1

    async def aclose(self) -> None:
        if self._owns:
            await self.client.aclose()
