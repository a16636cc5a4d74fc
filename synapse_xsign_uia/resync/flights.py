"""Single-flight bookkeeping: one fetch per user at a time, however many wait for it."""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
W = TypeVar("W")


class SingleFlight(Generic[K, W]):
    """Which keys have a fetch in flight, and who waits for each.

    A flight outlives its waiters: when every waiter has given up, the fetch still runs, and
    a new waiter joins it instead of starting another.
    """

    def __init__(self) -> None:
        # Waiters in a dict rather than a list: a flood's timeouts remove them one by one.
        self._flights: dict[K, dict[W, None]] = {}

    def __len__(self) -> int:
        """How many flights it remembers."""
        return len(self._flights)

    def join(self, key: K, waiter: W) -> bool:
        """Wait for `key`'s flight; True when there was none, so the caller starts it."""
        waiters = self._flights.get(key)
        if waiters is None:
            self._flights[key] = {waiter: None}
            return True
        waiters[waiter] = None
        return False

    def leave(self, key: K, waiter: W) -> None:
        waiters = self._flights.get(key)
        if waiters is not None:
            waiters.pop(waiter, None)

    def finish(self, key: K) -> list[W]:
        """End `key`'s flight, returning whoever still waits for it."""
        return list(self._flights.pop(key, {}))
