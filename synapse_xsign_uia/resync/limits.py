"""Protecting the remote server and this one: a token bucket per requester and a cooldown
per fetched user. Pure code; the time is an argument."""

from __future__ import annotations

import math
from typing import Generic, TypeVar

K = TypeVar("K")


_LONGEST_WAIT_MS = 365 * 86_400_000


class RateLimiter(Generic[K]):
    """A token bucket per key: `burst_count` requests at once, refilled at
    `rate_per_second`."""

    def __init__(self, rate_per_second: float, burst_count: int) -> None:
        if rate_per_second <= 0 or burst_count <= 0:
            raise ValueError("rate_per_second and burst_count must be positive")
        # May underflow to 0 for absurdly small rates: then a bucket never refills.
        self._rate_per_ms = rate_per_second / 1000
        self._burst = float(burst_count)
        # A bucket untouched this long is full again and can be forgotten.
        self._refill_ms = self._wait_ms(self._burst)
        self._buckets: dict[K, tuple[float, int]] = {}
        self._last_sweep_ms: int | None = None

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: K, now_ms: int) -> int | None:
        """Take a token for `key`: None if there was one, else the milliseconds until
        there is."""
        self._sweep(now_ms)
        tokens, updated_ms = self._buckets.get(key, (self._burst, now_ms))
        # A clock that steps back must not hand out tokens.
        elapsed = max(0, now_ms - updated_ms)
        tokens = min(self._burst, tokens + elapsed * self._rate_per_ms)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, max(now_ms, updated_ms))
            return None
        self._buckets[key] = (tokens, max(now_ms, updated_ms))
        return max(1, self._wait_ms(1 - tokens))

    def _wait_ms(self, tokens: float) -> int:
        """How long `tokens` take to come back, at most a year."""
        wait = tokens / self._rate_per_ms if self._rate_per_ms > 0 else math.inf
        return _LONGEST_WAIT_MS if wait >= _LONGEST_WAIT_MS else math.ceil(wait)

    def _sweep(self, now_ms: int) -> None:
        if self._last_sweep_ms is not None and now_ms - self._last_sweep_ms < self._refill_ms:
            return
        self._last_sweep_ms = now_ms
        cutoff = now_ms - self._refill_ms
        for key in [k for k, (_, updated) in self._buckets.items() if updated <= cutoff]:
            del self._buckets[key]


class Cooldown(Generic[K]):
    """Which keys had a success in the last `period_ms`."""

    def __init__(self, period_ms: int) -> None:
        if period_ms <= 0:
            raise ValueError("period_ms must be positive")
        self._period_ms = period_ms
        self._started: dict[K, int] = {}
        self._last_sweep_ms: int | None = None

    def __len__(self) -> int:
        return len(self._started)

    def start(self, key: K, now_ms: int) -> None:
        self._sweep(now_ms)
        self._started[key] = now_ms

    def remaining_ms(self, key: K, now_ms: int) -> int:
        """Milliseconds left of `key`'s cooldown; 0 when it has none."""
        started = self._started.get(key)
        if started is None:
            return 0
        return max(0, min(self._period_ms, started + self._period_ms - now_ms))

    def _sweep(self, now_ms: int) -> None:
        if self._last_sweep_ms is not None and now_ms - self._last_sweep_ms < self._period_ms:
            return
        self._last_sweep_ms = now_ms
        cutoff = now_ms - self._period_ms
        for key in [k for k, started in self._started.items() if started <= cutoff]:
            del self._started[key]
