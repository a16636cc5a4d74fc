"""The lock on writing a user's keys: whoever holds it reads the stored state, decides and
writes, and nobody else writes that user's keys meanwhile.

Within a process, waiters queue in arrival order (the seam's per-user lock). Across processes
(with workers) the lock is a lease in the module's table: taken with one statement, renewed
every second by the process that holds it, and given up after a few seconds by a process
that died, so that a crash mid-upload does not block the user's next upload, or an admin's
grant, for longer than that. Synapse's own cross-worker lock would hold them for two minutes.
The write itself ends the lease in its own transaction (`fence`), so a process that stalled
past its lease, and lost the lock to another, writes nothing, and a write costs no trip to
the database to release the lease.

An upload reads the stored state in the database interaction that takes the lease; one that
did not write gives the lock up once its response is on its way: the client waits for
neither trip to the database.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from synapse_xsign_uia.store import end_user_lock_txn

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

    from synapse_xsign_uia._synapse import Synapse
    from synapse_xsign_uia.store import Store

T = TypeVar("T")

logger = logging.getLogger(__name__)

LEASE_MS = 5_000
RENEW_EVERY_MS = 1_000
# How long a waiter first waits before it asks again, and at most.
FIRST_RETRY_S = 0.01
LONGEST_RETRY_S = 0.25


class UserLock:
    """The lock on writing users' keys, for one process."""

    def __init__(self, synapse: Synapse, store: Store) -> None:
        self._synapse = synapse
        self._store = store
        self._across_processes = synapse.with_workers
        # This process, as the holder of leases; a new one after each start, so that a
        # restarted process never renews the leases of the one that died.
        self._holder = f"{synapse.instance_name}/{secrets.token_hex(8)}"
        # User ID -> the token of the lease this process holds on their lock.
        self._held: dict[str, str] = {}
        if self._across_processes:
            synapse.run_periodically(
                "synapse_xsign_uia_renew_user_locks", self._renew, RENEW_EVERY_MS
            )

    @contextlib.asynccontextmanager
    async def hold(self, user_id: str) -> AsyncIterator[None]:
        """The lock, given up before the caller goes on."""
        if not self._across_processes:
            # Nothing to read: no trip to the database.
            async with self._synapse.keys.process_lock(user_id):
                yield
            return
        async with self.hold_reading(user_id, _read_nothing):
            yield

    @contextlib.asynccontextmanager
    async def hold_reading(
        self, user_id: str, read: Callable[[Any], T], request: SynapseRequest | None = None
    ) -> AsyncIterator[T]:
        """The lock, and what `read(cursor)` reads once it is held: with workers, in the
        database interaction that takes the lease. A write ends the lease in its own
        transaction (`fence`). Otherwise, with `request`, the lock is given up once the
        response to it is on its way (a waiter of this process still waits for that);
        without, before the caller goes on."""
        async with contextlib.AsyncExitStack() as held:
            # The process lock first: waiters of this process queue here, not in the database.
            await held.enter_async_context(self._synapse.keys.process_lock(user_id))
            if not self._across_processes:
                yield await self._synapse.run_db_statement("synapse_xsign_uia_locked_read", read)
                return
            token = secrets.token_hex(16)
            state = await self._acquire(user_id, token, read)
            self._held[user_id] = token
            try:
                yield state
            finally:
                # Not held any more where a write's transaction ended the lease (`written`).
                if self._held.pop(user_id, None) is not None:
                    if request is None:
                        await self._release(user_id, token)
                    else:
                        self._synapse.run_after_response(
                            request,
                            "synapse_xsign_uia_release_user_lock",
                            self._release_then,
                            user_id,
                            token,
                            held.pop_all(),
                        )

    def fence(self, user_id: str) -> Callable[[Any], None] | None:
        """What a write for `user_id` runs in its own transaction to make sure this process
        still holds the lock, and to end its lease with the commit (then `written`); None
        without workers, where the process lock is enough."""
        token = self._held.get(user_id)
        if token is None:
            return None

        def fence(cursor: Any) -> None:
            end_user_lock_txn(cursor, user_id, token)

        return fence

    def written(self, user_id: str) -> None:
        """The write whose transaction ran `fence` committed, and its lease ended with it:
        only the process lock is left to give up."""
        self._held.pop(user_id, None)

    async def _acquire(self, user_id: str, token: str, read: Callable[[Any], T]) -> T:
        wait_s = FIRST_RETRY_S
        while True:
            now_ms = self._synapse.now_ms()
            taken = await self._store.try_lock_user(
                user_id, self._holder, token, now_ms, now_ms + LEASE_MS, read
            )
            if taken is not None:
                return taken.read
            await self._synapse.sleep(wait_s)
            wait_s = min(wait_s * 2, LONGEST_RETRY_S)

    async def _release(self, user_id: str, token: str) -> None:
        try:
            await self._store.unlock_user(user_id, token)
        except Exception:
            # The lease ends on its own within seconds.
            logger.warning("Could not release the lock on %s's keys", user_id, exc_info=True)

    async def _release_then(
        self, user_id: str, token: str, process_lock: contextlib.AsyncExitStack
    ) -> None:
        """Release the lease, then the process lock, whose waiters would otherwise find the
        lease still taken."""
        async with process_lock:
            await self._release(user_id, token)

    async def _renew(self) -> None:
        if not self._held:
            return
        try:
            await self._store.renew_user_locks(self._holder, self._synapse.now_ms() + LEASE_MS)
        except Exception:
            logger.warning("Could not renew the locks this process holds", exc_info=True)


def _read_nothing(_cursor: Any) -> None:
    return None
