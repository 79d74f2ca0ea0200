"""The Lua scripts of the Redis limiter: one per operation, so each is atomic on the server.

The bucket arithmetic mirrors :class:`~flashcard_pipeline.resilience.ratelimit.algorithms.TokenBucket`.
"""

from __future__ import annotations

from typing import Any

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
-- A new live limit (adaptive, not configured): refilled to now, never holding more than the new burst.
local function relimit(b, now, rate, burst)
  local tokens = advance(b, now)
  if now > b.last then b.last = now end
  b.rate = rate
  b.burst = burst
  if tokens > burst then tokens = burst end
  b.tokens = tokens
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
  -- free, but not through a pause: a 429's Retry-After holds whatever the limits are (the bucket is stored so
  -- that a pause finds it)
  if redis.call('EXISTS', KEYS[1]) == 0 then save(KEYS[1], b) end
  local act = now
  if b.frozen_until > now then act = b.frozen_until end
  if max_wait >= 0 and act - now > max_wait then
    return {0, num(act - now), num(now), num(b.rate), num(b.frozen_total)}
  end
  return {1, num(act), num(now), num(b.rate), num(b.frozen_total)}
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
relimit(b, now, tonumber(ARGV[2]), tonumber(ARGV[3]))
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
relimit(b, now, tonumber(ARGV[8]), tonumber(ARGV[9]))
save(KEYS[2], b)
return {1, tostring(version)}
""".replace("__TTL__", str(KEY_TTL_MS))


def register_scripts(client: Any) -> dict[str, Any]:
    return {name: client.register_script(body) for name, body in (
        ("take", _TAKE), ("reserve", _RESERVE), ("cancel", _CANCEL), ("settle", _SETTLE), ("pause", _PAUSE),
        ("set_limit", _SET_LIMIT), ("state", _STATE), ("adapt", _ADAPT))}
