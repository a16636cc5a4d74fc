"""What the upload decision needs from a running homeserver: the per-user lock, the stored
state read past Synapse's caches, Synapse's UIA and its key upload."""

from __future__ import annotations

import collections
import json
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
from synapse.module_api.errors import SynapseError
from twisted.internet import defer

from synapse_xsign_uia._synapse.homeserver import run_as_background_process, runs_with_workers
from synapse_xsign_uia._synapse.support import keys_cache_function, resolve
from synapse_xsign_uia._synapse.windows import ReplacementWindows
from synapse_xsign_uia.validation import check_uia_auth

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest
    from synapse.module_api import ModuleApi
    from synapse.server import HomeServer

_LOCK_NAME = "synapse_xsign_uia_upload"
_NOT_CACHED = object()


class _UserLocks:
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
    """`async with` for one key of `_UserLocks` (a class: cheaper than a generator)."""

    __slots__ = ("_key", "_locks")

    def __init__(self, locks: _UserLocks, key: str) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        await self._locks.acquire(self._key)

    async def __aexit__(self, *exc_info: object) -> None:
        self._locks.release(self._key)


@attrs.frozen
class StoredState:
    """The user's cross-signing keys as stored, read fresh from the database."""

    keys: Mapping[str, Mapping[str, Any]]
    window_expires_ms: int | None
    taken_device_ids: frozenset[str]


class Internals:
    """Access to the parts of a running homeserver that the module needs."""

    def __init__(self, api: ModuleApi) -> None:
        self.hs: HomeServer = api._hs
        self._api = api
        self.store: Any = self.hs.get_datastores().main
        self.e2e_keys_handler: Any = self.hs.get_e2e_keys_handler()
        self.auth_handler: Any = self.hs.get_auth_handler()
        self.clock: Any = self.hs.get_clock()
        self.with_workers = runs_with_workers(self.hs)
        # Synapse's cached function behind `get_e2e_cross_signing_keys_bulk`; its cache
        # maps user ID -> the user's keys by type (None for a user without keys).
        self._cached_keys_function: Any = keys_cache_function(self.store)
        self._user_locks = _UserLocks()
        self.windows = ReplacementWindows(api, self.clock)

    def now_ms(self) -> int:
        return int(self.clock.time_msec())

    def upload_lock(self, user_id: str) -> AbstractAsyncContextManager[None]:
        """Serialise uploads for one user: in this process always, and across processes
        with Synapse's database-backed worker lock when there are workers."""
        if not self.with_workers:
            return self._user_locks.hold(user_id)
        return self._process_and_worker_lock(user_id)

    @asynccontextmanager
    async def _process_and_worker_lock(self, user_id: str) -> AsyncIterator[None]:
        worker_locks = self.hs.get_worker_locks_handler()
        # The process lock first: waiters of this process queue here, not in the database.
        async with self._user_locks.hold(user_id), worker_locks.acquire_lock(_LOCK_NAME, user_id):
            yield

    def cached_keys(self, user_id: str, key_types: Collection[str]) -> dict[str, Any] | None:
        """The user's stored keys as Synapse's cache holds them, for read-only answers.

        None when the cache holds nothing for the user: the caller then decides under the
        lock from the database, rather than pay for a query here and read the database again.
        """
        hit = self._cached_keys_function.cache.get_immediate(user_id, _NOT_CACHED)
        if hit is _NOT_CACHED:
            return None
        stored = hit or {}
        return {key_type: stored[key_type] for key_type in key_types if key_type in stored}

    def warm_keys_cache(self, user_id: str) -> None:
        """Fill Synapse's cache of the user's keys in the background, so that the next
        identical re-upload is answered from it without the lock."""
        run_as_background_process(
            self._api,
            "synapse_xsign_uia_warm_keys_cache",
            self.store.get_e2e_cross_signing_keys_bulk,
            [user_id],
        )

    async def read_stored_state(self, user_id: str, device_ids: Collection[str]) -> StoredState:
        """The latest key of each type, the master key's window, and which of `device_ids`
        the user already has (cross-signing keys take device IDs), read past Synapse's
        caches, which another worker may not have invalidated yet.

        One statement, so one consistent snapshot without a transaction around it: every
        upload that may write reads this, and a transaction costs two more round trips to
        PostgreSQL.
        """
        wanted = sorted(set(device_ids))
        marks = ", ".join("?" for _ in wanted)
        sql = (
            "SELECT stream_id, keytype, keydata, updatable_without_uia_before_ms"
            " FROM e2e_cross_signing_keys WHERE user_id = ?"
        )
        if wanted:
            sql += (
                " UNION ALL SELECT NULL, NULL, device_id, NULL FROM devices"
                f" WHERE user_id = ? AND device_id IN ({marks})"
            )
        args = (user_id, user_id, *wanted) if wanted else (user_id,)

        def txn(cursor: Any) -> StoredState:
            cursor.execute(sql, args)
            latest: dict[str, tuple[int, str, int | None]] = {}
            taken: set[str] = set()
            for stream_id, key_type, keydata, updatable_before in cursor.fetchall():
                if key_type is None:
                    taken.add(keydata)
                elif key_type not in latest or stream_id > latest[key_type][0]:
                    latest[key_type] = (stream_id, keydata, updatable_before)
            keys = {key_type: json.loads(row[1]) for key_type, row in latest.items()}
            window = latest["master"][2] if "master" in latest else None
            return StoredState(keys, window, frozenset(taken))

        return await self.store.db_pool.runInteraction(  # type: ignore[no-any-return]
            "synapse_xsign_uia_stored_state", txn, db_autocommit=True
        )

    async def validate_uia(self, requester: Any, request: SynapseRequest, body: Any) -> None:
        """Synapse's own UIA, every stage the server offers, never the grace-period skip."""
        check_uia_auth(body.get("auth"))
        if "auth" in body and body["auth"] is None:
            # Synapse 1.98 fails on `"auth": null` with a 500; later releases treat it as
            # absent, as this does on every release.
            body = {field: value for field, value in body.items() if field != "auth"}
        if not getattr(requester, "access_token_id", None):
            # Synapse's UIA needs a user's access token (an application service acting for
            # a user has none) and would fail with a 500.
            raise SynapseError(
                403,
                "This requester cannot complete user-interactive authentication, which is "
                "required to replace existing cross-signing keys",
                "M_FORBIDDEN",
            )
        await self.auth_handler.validate_user_via_ui_auth(
            requester,
            request,
            body,
            "reset the device signing key on your account",
            can_skip_ui_auth=False,
        )

    async def upload_keys(self, user_id: str, body: Mapping[str, Any]) -> None:
        if self.with_workers:
            # Synapse verifies new sub-keys against the stored master key through its cache,
            # which may not yet have seen a replacement made by another process.
            self._cached_keys_function.invalidate((user_id,))
        await self.e2e_keys_handler.upload_signing_keys_for_user(user_id, dict(body))
