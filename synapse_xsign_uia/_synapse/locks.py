"""A lock per user within one process, in arrival order."""

from __future__ import annotations

import collections
from contextlib import AbstractAsyncContextManager

from twisted.internet import defer

from synapse_xsign_uia._synapse.support import resolve


class UserLocks:
    """Mutual exclusion per user within this process, in arrival order.

    Synapse's `Linearizer` does the same with more machinery (queue entries, debug logs)
    than an uncontended upload needs, and every upload that may write takes this lock.
    """

    def __init__(self) -> None:
        # Held keys -> who waits for them, first in line first.
        self._waiting: dict[str, collections.deque[defer.Deferred[None]]] = {}

    def hold(self, key: str) -> AbstractAsyncContextManager[None]:
        return _Held(self, key)

    async def acquire(self, key: str) -> None:
        queue = self._waiting.get(key)
        if queue is None:
            self._waiting[key] = collections.deque()
            return
        turn: defer.Deferred[None] = defer.Deferred()
        queue.append(turn)
        try:
            await resolve("synapse.module_api:make_deferred_yieldable")(turn)
        except BaseException:
            if turn in queue:
                queue.remove(turn)
            else:
                # The lock was handed over just as the wait was given up.
                self.release(key)
            raise

    def release(self, key: str) -> None:
        queue = self._waiting[key]
        if not queue:
            del self._waiting[key]
            return
        # The next holder resumes inside `callback`, in its own logging context; this
        # caller's context must be the current one again afterwards.
        with resolve("synapse.logging.context:PreserveLoggingContext")():
            queue.popleft().callback(None)


class _Held:
    """`async with` for one key of `UserLocks` (a class: cheaper than a generator)."""

    __slots__ = ("_key", "_locks")

    def __init__(self, locks: UserLocks, key: str) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        await self._locks.acquire(self._key)

    async def __aexit__(self, *exc_info: object) -> None:
        self._locks.release(self._key)
