"""A user's cross-signing keys in Synapse: the per-user lock within a process, the stored
state read past Synapse's caches, Synapse's UIA, the write of an upload's keys in one
transaction, and the replacement-window column of the master key's row."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import attrs

from synapse_xsign_uia._synapse.locks import UserLocks
from synapse_xsign_uia._synapse.reactor import run_after_response
from synapse_xsign_uia._synapse.requests import Caller
from synapse_xsign_uia._synapse.support import keys_cache_function, resolve

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest
    from synapse.module_api import ModuleApi
    from synapse.server import HomeServer

# The order Synapse writes the key types in.
_KEY_TYPES = ("master", "self_signing", "user_signing")
_NOT_CACHED = object()

JsonKey = Mapping[str, Any]


@attrs.frozen
class StoredState:
    """The user's cross-signing keys as stored, read fresh from the database."""

    keys: Mapping[str, JsonKey]
    # When the admin-granted replacement window of the stored master key ends.
    window_expires_ms: int | None
    # Which of the public keys asked about are device IDs of the user already.
    taken_device_ids: frozenset[str]


@attrs.frozen
class MasterKeyRow:
    """One stored master key of a user, with its replacement window."""

    stream_id: int
    public_key: str  # unpadded base64
    window_expires_ms: int | None


def latest_master_keys(cursor: Any, user_id: str, count: int = 1) -> list[MasterKeyRow]:
    """The user's latest `count` master keys, newest first, inside a transaction."""
    cursor.execute(
        "SELECT stream_id, keydata, updatable_without_uia_before_ms FROM e2e_cross_signing_keys"
        " WHERE user_id = ? AND keytype = 'master' ORDER BY stream_id DESC LIMIT ?",
        (user_id, count),
    )
    return [
        MasterKeyRow(
            int(stream_id), str(next(iter(json.loads(keydata)["keys"].values()))), expires_ms
        )
        for stream_id, keydata, expires_ms in cursor.fetchall()
    ]


def set_window_expiry(cursor: Any, user_id: str, row: MasterKeyRow, expires_ms: int | None) -> None:
    """Set (or clear, with None) the replacement window of one master key row, inside a
    transaction. Synapse's own column: under delegated auth Synapse reads it too."""
    cursor.execute(
        "UPDATE e2e_cross_signing_keys SET updatable_without_uia_before_ms = ?"
        " WHERE user_id = ? AND keytype = 'master' AND stream_id = ?",
        (expires_ms, user_id, row.stream_id),
    )


def _stored_state_query(user_id: str, device_ids: Collection[str]) -> tuple[str, tuple[str, ...]]:
    wanted = sorted(set(device_ids))
    sql = (
        "SELECT stream_id, keytype, keydata, updatable_without_uia_before_ms"
        " FROM e2e_cross_signing_keys WHERE user_id = ?"
    )
    if not wanted:
        return sql, (user_id,)
    marks = ", ".join("?" for _ in wanted)
    sql += (
        " UNION ALL SELECT NULL, NULL, device_id, NULL FROM devices"
        f" WHERE user_id = ? AND device_id IN ({marks})"
    )
    return sql, (user_id, user_id, *wanted)


def _stored_state(rows: list[tuple[Any, ...]]) -> StoredState:
    latest: dict[str, tuple[int, str, int | None]] = {}
    taken: set[str] = set()
    for stream_id, key_type, keydata, updatable_before in rows:
        if key_type is None:
            taken.add(keydata)
        elif key_type not in latest or stream_id > latest[key_type][0]:
            latest[key_type] = (stream_id, keydata, updatable_before)
    keys = {key_type: json.loads(row[1]) for key_type, row in latest.items()}
    window = latest["master"][2] if "master" in latest else None
    return StoredState(keys, window, frozenset(taken))


class CrossSigningKeys:
    """Synapse's handling of cross-signing keys, as verbs."""

    def __init__(self, api: ModuleApi, hs: HomeServer, *, with_workers: bool) -> None:
        self._api = api
        self._hs = hs
        self._store: Any = hs.get_datastores().main
        self._device_handler: Any = hs.get_device_handler()
        self._auth_handler: Any = hs.get_auth_handler()
        self._with_workers = with_workers
        # Synapse's cached function behind `get_e2e_cross_signing_keys_bulk`; its cache
        # maps user ID -> the user's keys by type (None for a user without keys).
        self._cached_keys_function: Any = keys_cache_function(self._store)
        self._user_locks = UserLocks()
        # What `user_interactive_auth` raises while UIA is incomplete; the servlet answers
        # it with the 401 challenge.
        self.uia_challenge: type[Exception] = resolve(
            "synapse.api.errors:InteractiveAuthIncompleteError"
        )

    def process_lock(self, user_id: str) -> AbstractAsyncContextManager[None]:
        """Mutual exclusion per user within this process, in arrival order."""
        return self._user_locks.hold(user_id)

    def cached(self, user_id: str, key_types: Collection[str]) -> dict[str, JsonKey] | None:
        """The user's stored keys of `key_types` as Synapse's cache holds them, without a
        query; None when the cache holds nothing for the user."""
        hit = self._cached_keys_function.cache.get_immediate(user_id, _NOT_CACHED)
        if hit is _NOT_CACHED:
            return None
        stored = hit or {}
        return {key_type: stored[key_type] for key_type in key_types if key_type in stored}

    def warm_cache(self, user_id: str, request: SynapseRequest) -> None:
        """Fill Synapse's cache of the user's keys in the background, once the response to
        `request` is on its way. Through Synapse's own cached function, which drops what it
        read if the cache was invalidated meanwhile."""
        run_after_response(
            self._api,
            self._hs.get_reactor(),
            request,
            "synapse_xsign_uia_warm_keys_cache",
            self._store.get_e2e_cross_signing_keys_bulk,
            [user_id],
        )

    async def stored_state(self, user_id: str, device_ids: Collection[str]) -> StoredState:
        """The latest key of each type, the master key's window, and which of `device_ids`
        the user already has (cross-signing keys take device IDs), read past Synapse's
        caches, which another worker may not have invalidated yet."""
        return await self._store.db_pool.runInteraction(  # type: ignore[no-any-return]
            "synapse_xsign_uia_stored_state",
            self.stored_state_reading(user_id, device_ids),
            db_autocommit=True,
        )

    @staticmethod
    def stored_state_reading(
        user_id: str, device_ids: Collection[str]
    ) -> Callable[[Any], StoredState]:
        """`stored_state` as a step of a database interaction (`cursor` -> the state), for
        an interaction that does something else first, such as taking the user's lock.

        One statement, so one consistent snapshot without a transaction around it: a
        transaction costs two more round trips to PostgreSQL."""
        sql, args = _stored_state_query(user_id, device_ids)

        def read(cursor: Any) -> StoredState:
            cursor.execute(sql, args)
            return _stored_state(cursor.fetchall())

        return read

    async def user_interactive_auth(
        self, caller: Caller, request: SynapseRequest, body: Mapping[str, Any], description: str
    ) -> str | None:
        """Synapse's own UIA, every stage the server offers, never the grace-period skip;
        the ID of the session that passed. Raises `uia_challenge` (the servlet answers it
        with a 401) until the user has authenticated."""
        if "auth" in body and body["auth"] is None:
            # Synapse 1.98 fails on `"auth": null` with a 500; later releases treat it as
            # absent, as this does on every release.
            body = {field: value for field, value in body.items() if field != "auth"}
        _, session_id = await self._auth_handler.validate_user_via_ui_auth(
            caller.requester, request, dict(body), description, can_skip_ui_auth=False
        )
        return None if session_id is None else str(session_id)

    @staticmethod
    def challenged_session(challenge: Exception) -> str:
        """The ID of the UIA session a `uia_challenge` offers."""
        return str(challenge.session_id)  # type: ignore[attr-defined]

    async def fresh_uia_challenge(
        self, caller: Caller, request: SynapseRequest, body: Mapping[str, Any], description: str
    ) -> Exception:
        """A new UIA session for the request, and Synapse's challenge for it (a `uia_challenge`
        to raise): the session the request named, if any, is left out."""
        without_auth = {field: value for field, value in body.items() if field != "auth"}
        try:
            await self.user_interactive_auth(caller, request, without_auth, description)
        except self.uia_challenge as e:
            return e
        raise RuntimeError("Synapse's UIA passed a request without authentication")

    async def store(
        self,
        user_id: str,
        keys: Mapping[str, JsonKey],
        also: Sequence[Callable[[Any], None]] = (),
    ) -> None:
        """Store `keys` (by key type, checked by the caller) in one database transaction,
        then tell what Synapse tells after an upload. Each of `also(cursor)` runs first, in
        order, in the same transaction; what one raises undoes the write.

        Synapse's own `upload_signing_keys_for_user` stores each key type in a transaction of
        its own: a failure between two of them leaves half an identity. Here the rows of
        every key (the key, the device ID its public key takes, the invalidation of Synapse's
        cache of the user's keys, which workers receive through the cache stream) are written
        together or not at all, and nobody is notified of a write that failed.
        """
        ordered = [(key_type, keys[key_type]) for key_type in _KEY_TYPES if key_type in keys]
        if not ordered:
            return
        if self._with_workers:
            # Synapse's signature checks elsewhere read the master key through this cache,
            # which may not yet have seen a replacement made by another process.
            self._cached_keys_function.invalidate((user_id,))
        id_generator = self._store._cross_signing_id_gen
        async with id_generator.get_next_mult(len(ordered)) as stream_ids:
            await self._store.db_pool.runInteraction(
                "synapse_xsign_uia_set_cross_signing_keys",
                self._store_txn,
                user_id,
                list(zip(ordered, stream_ids, strict=True)),
                also,
            )
        await self._notify(user_id, keys)

    def _store_txn(
        self,
        txn: Any,
        user_id: str,
        rows: list[tuple[tuple[str, JsonKey], int]],
        also: Sequence[Callable[[Any], None]],
    ) -> None:
        for step in also:
            step(txn)
        for (key_type, key), stream_id in rows:
            self._store._set_e2e_cross_signing_key_txn(txn, user_id, key_type, key, stream_id)

    async def _notify(self, user_id: str, keys: Mapping[str, JsonKey]) -> None:
        """What Synapse's upload notifies: the user's own clients of a new user-signing key
        (the signature stream), and everyone sharing an encrypted room, local or remote, of
        a new master or self-signing key (the device-list stream, by the key's device ID)."""
        if "user_signing" in keys:
            await self._device_handler.notify_user_signature_update(user_id, [user_id])
        device_ids = [
            str(next(iter(keys[key_type]["keys"].values())))
            for key_type in ("master", "self_signing")
            if key_type in keys
        ]
        if device_ids:
            await self._device_handler.notify_device_update(user_id, device_ids)
