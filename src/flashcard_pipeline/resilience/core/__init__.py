"""The engine's core: time, the per-call context, the policy protocol and the events every policy emits.

Nothing here knows a particular policy; ``retry/``, ``breaker/`` and ``ratelimit/`` build on it and never on
each other.
"""
