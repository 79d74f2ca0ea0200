"""Rate limiting: a requests limit and a tokens limit per provider and model, in memory or shared in Redis."""

from flashcard_pipeline.resilience.ratelimit.algorithms import SlidingWindowLog, TokenBucket
from flashcard_pipeline.resilience.ratelimit.backends import LimitBackend, MemoryLimits
from flashcard_pipeline.resilience.ratelimit.events import (
    LimitCut,
    LimitPause,
    LimitRaise,
    LimitReason,
    LimitStatus,
    LimitWait,
)
from flashcard_pipeline.resilience.ratelimit.group import LimitGroup
from flashcard_pipeline.resilience.ratelimit.headers import RateLimitHeaders
from flashcard_pipeline.resilience.ratelimit.limiter import RateLimiter
from flashcard_pipeline.resilience.ratelimit.limits import RateLimits
from flashcard_pipeline.resilience.ratelimit.plan import check_requests_limit, plan_limit
from flashcard_pipeline.resilience.ratelimit.redis import RedisLimits, RedisRateLimiter
from flashcard_pipeline.resilience.ratelimit.settings import RateLimitSettings
from flashcard_pipeline.resilience.ratelimit.sharded import ShardedRateLimiter

__all__ = [
    "LimitBackend",
    "LimitCut",
    "LimitGroup",
    "LimitPause",
    "LimitRaise",
    "LimitReason",
    "LimitStatus",
    "LimitWait",
    "MemoryLimits",
    "RateLimitHeaders",
    "RateLimitSettings",
    "RateLimiter",
    "RateLimits",
    "RedisLimits",
    "RedisRateLimiter",
    "ShardedRateLimiter",
    "SlidingWindowLog",
    "TokenBucket",
    "check_requests_limit",
    "plan_limit",
]
