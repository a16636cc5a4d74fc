"""The one place that touches Synapse's private internals.

Everything the module needs from Synapse beyond the public `ModuleApi` is reached through
here, so that a Synapse upgrade that renames something breaks one file, and the start-up
self-check below says so loudly instead of the module silently doing nothing.
"""

from __future__ import annotations

import collections
import functools
import importlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import synapse
from synapse.module_api.errors import ConfigError, SynapseError
from twisted.internet import defer
from twisted.internet import error as twisted_error

from synapse_xsign_uia.body import read_json_object
from synapse_xsign_uia.validation import RequestError, check_uia_auth

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest
    from synapse.module_api import ModuleApi
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

OLDEST_SUPPORTED = (1, 98, 0)
NEWEST_SUPPORTED = (1, 163, 2)
SUPPORTED_RANGE = "Synapse 1.98.0 to 1.163.2"

# Every private name the module relies on: "module:attribute".
REQUIRED_NAMES = (
    "synapse.rest.client.keys:SigningKeyUploadServlet",
    "synapse.rest.client.keys:register_servlets",
    "synapse.rest.client._base:interactive_auth_handler",
    "synapse.rest.admin:UserReplaceMasterCrossSigningKeyRestServlet",
    "synapse.rest.admin._base:assert_user_is_admin",
    "synapse.util.async_helpers:Linearizer",
    "synapse.module_api:make_deferred_yieldable",
    "synapse.logging.context:PreserveLoggingContext",
    "synapse.api.errors:InteractiveAuthIncompleteError",
    "synapse.api.errors:InvalidClientTokenError",
    # Device-list resync.
    "synapse.handlers.device:DeviceListUpdater",
    "synapse.handlers.device:DeviceListWorkerUpdater",
    "synapse.federation.federation_client:FederationClient",
    "synapse.util.retryutils:NotRetryingDestination",
    "synapse.api.errors:RequestSendFailed",
    "synapse.api.errors:HttpResponseException",
    "synapse.api.errors:FederationDeniedError",
    # Identity-reset notice.
    "synapse.server_notices.server_notices_manager:ServerNoticesManager",
)
# Methods of classes named above: "module:Class" -> method names.
REQUIRED_CLASS_METHODS = {
    "synapse.handlers.device:DeviceListUpdater": ("multi_user_device_resync",),
    "synapse.handlers.device:DeviceListWorkerUpdater": ("multi_user_device_resync",),
    "synapse.federation.federation_client:FederationClient": ("query_user_devices",),
    "synapse.server_notices.server_notices_manager:ServerNoticesManager": ("send_notice",),
}
REQUIRED_HS_METHODS = (
    "get_auth",
    "get_datastores",
    "get_e2e_keys_handler",
    "get_auth_handler",
    "get_worker_locks_handler",
    "get_clock",
    "get_reactor",
    "get_device_handler",
    "get_federation_client",
    # Not called at start-up: on a worker it raises (see send_server_notice).
    "get_server_notices_manager",
)
REQUIRED_HANDLER_METHODS = {
    "get_e2e_keys_handler": ("upload_signing_keys_for_user",),
    "get_auth_handler": ("validate_user_via_ui_auth",),
    "get_worker_locks_handler": ("acquire_lock",),
    "get_federation_client": ("query_user_devices",),
    "get_auth": ("is_server_admin",),
}
# The window column (`updatable_without_uia_before_ms`) is read and written with SQL: its
# store methods exist only in the main process's store on older releases.
REQUIRED_STORE_METHODS = (
    "get_e2e_cross_signing_keys_bulk",
    "mark_remote_users_device_caches_as_stale",
    "do_users_share_a_room",
    "get_destination_retry_timings",
)

_LOCK_NAME = "synapse_xsign_uia_upload"
_NOT_CACHED = object()


def parse_version(version: str) -> tuple[int, int, int]:
    parts: list[int] = []
    for part in version.split(".")[:3]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    while len(parts) < 3:
        parts.append(0)
    return (parts[0], parts[1], parts[2])


def _unsupported(reason: str) -> ConfigError:
    return ConfigError(
        f"synapse_xsign_uia supports {SUPPORTED_RANGE} and cannot run here: {reason}. "
        "Install a supported Synapse, or a release of the module that supports this one."
    )


def check_synapse_version(version: str | None = None) -> None:
    version = version if version is not None else synapse.__version__
    if not OLDEST_SUPPORTED <= parse_version(version) <= NEWEST_SUPPORTED:
        raise _unsupported(f"this is Synapse {version}")


# Looked up on every request by some callers; a name that resolved once stays resolved.
@functools.cache
def resolve(name: str) -> Any:
    module_name, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise _unsupported(f"{module_name}.{attr} is missing") from e


def check_internals(hs: HomeServer) -> None:
    """Refuse to start if any private name the module relies on is missing."""
    for name in REQUIRED_NAMES:
        resolve(name)
    for name, class_methods in REQUIRED_CLASS_METHODS.items():
        for method in class_methods:
            if not callable(getattr(resolve(name), method, None)):
                raise _unsupported(f"{name.replace(':', '.')}.{method} is missing")
    for method in REQUIRED_HS_METHODS:
        if not callable(getattr(hs, method, None)):
            raise _unsupported(f"HomeServer.{method} is missing")
    for getter, methods in REQUIRED_HANDLER_METHODS.items():
        handler = getattr(hs, getter)()
        for method in methods:
            if not callable(getattr(handler, method, None)):
                raise _unsupported(f"{type(handler).__name__}.{method} is missing")
    store = hs.get_datastores().main
    for method in REQUIRED_STORE_METHODS:
        if not callable(getattr(store, method, None)):
            raise _unsupported(f"the main datastore has no {method}")
    if not callable(getattr(getattr(store, "db_pool", None), "runInteraction", None)):
        raise _unsupported("the main datastore has no db_pool.runInteraction")


def install_servlet(name: str, replacement: type) -> type:
    """Put `replacement` where Synapse's `register_servlets` looks `name` up, and return the
    native class it replaces."""
    module_name, _, attr = name.partition(":")
    module = importlib.import_module(module_name)
    native: type = getattr(module, attr)
    if native is not replacement:
        setattr(module, attr, replacement)
    return native


def native_upload_servlet() -> type:
    cls: type = resolve("synapse.rest.client.keys:SigningKeyUploadServlet")
    # A second module instance in the same process finds our class already installed.
    return getattr(cls, "native_class", cls)


def interactive_auth_handler() -> Callable[[Any], Any]:
    return resolve("synapse.rest.client._base:interactive_auth_handler")  # type: ignore[no-any-return]


def parse_json_object(request: SynapseRequest, *, allow_empty_body: bool = False) -> dict[str, Any]:
    """The request's JSON body, read strictly (see `body.py`): Synapse's own reader keeps the
    last of duplicate keys and lets `1e999` through to fail in storage."""
    try:
        return read_json_object(request.content, allow_empty_body=allow_empty_body)
    except RequestError as e:
        raise SynapseError(e.status, e.message, e.errcode) from e


def rewind_request(request: SynapseRequest) -> None:
    """Let a native handler read the request body and authenticate the request again.

    Synapse records the requester on the request once and asserts that it happens only
    once; the native handler's own authentication records the same requester again.
    """
    content: Any = request.content
    content.seek(0)
    if getattr(request, "_requester", None) is not None:
        request._requester = None  # type: ignore[attr-defined]


def is_appservice(requester: Any) -> bool:
    # `app_service` up to Synapse 1.140, `app_service_id` after.
    return bool(
        getattr(requester, "app_service_id", None) or getattr(requester, "app_service", None)
    )


def delegated_auth_enabled(hs: HomeServer) -> bool:
    config: Any = hs.config
    mas = getattr(config, "mas", None)
    if mas is not None and getattr(mas, "enabled", False):
        return True
    msc3861 = getattr(config.experimental, "msc3861", None)
    return bool(msc3861 is not None and getattr(msc3861, "enabled", False))


def runs_with_workers(hs: HomeServer) -> bool:
    """Workers need Redis replication, so without Redis this process is the only writer."""
    config: Any = hs.config
    return bool(config.worker.worker_app is not None or config.redis.redis_enabled)


def synapse_version() -> tuple[int, int, int]:
    return parse_version(synapse.__version__)


def call_soon(hs: HomeServer, callback: Callable[[], None]) -> None:
    reactor: Any = hs.get_reactor()
    reactor.callLater(0, callback)


def stop_reactor(hs: HomeServer) -> None:
    reactor: Any = hs.get_reactor()
    reactor.stop()


def is_main_process(hs: HomeServer) -> bool:
    return hs.config.worker.worker_app is None


def listener_resources(hs: HomeServer) -> set[str]:
    names: set[str] = set()
    for listener in hs.config.server.listeners:
        options = getattr(listener, "http_options", None)
        for resource in getattr(options, "resources", ()) or ():
            names.update(resource.names)
    return names


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
        # Synapse's cache behind `get_e2e_cross_signing_keys_bulk`: user ID -> the user's
        # keys by type (None for a user without keys).
        cached_function = getattr(self.store, "_get_bare_e2e_cross_signing_keys", None)
        self._keys_cache: Any = getattr(cached_function, "cache", None)
        if not callable(getattr(self._keys_cache, "get_immediate", None)):
            self._keys_cache = None
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

    async def cached_keys(self, user_id: str, key_types: Collection[str]) -> dict[str, Any] | None:
        """The user's stored keys as Synapse's cache holds them, for read-only answers.

        None when the cache holds nothing for the user: the caller then decides under the
        lock from the database, rather than pay for a query here and read the database again.
        """
        if self._keys_cache is not None:
            hit = self._keys_cache.get_immediate(user_id, _NOT_CACHED)
            if hit is _NOT_CACHED:
                return None
            stored = hit or {}
        else:
            by_user = await self.store.get_e2e_cross_signing_keys_bulk([user_id])
            stored = by_user.get(user_id) or {}
        return {key_type: stored[key_type] for key_type in key_types if key_type in stored}

    def warm_keys_cache(self, user_id: str) -> None:
        """Fill Synapse's cache of the user's keys in the background, so that the next
        identical re-upload is answered from it without the lock."""
        if self._keys_cache is not None:
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
            cached_function = getattr(self.store, "_get_bare_e2e_cross_signing_keys", None)
            if cached_function is not None:
                cached_function.invalidate((user_id,))
        await self.e2e_keys_handler.upload_signing_keys_for_user(user_id, dict(body))


# --- The admin replacement window -------------------------------------------------------

ADMIN_WINDOW_SERVLET = "synapse.rest.admin:UserReplaceMasterCrossSigningKeyRestServlet"

# Who granted which window: Synapse's column holds only the expiry, and the replacement that
# uses a window may happen on another worker or after a restart.
_GRANTS_TABLE = "synapse_xsign_uia_replacement_grants"


def native_admin_window_servlet() -> type:
    cls: type = resolve(ADMIN_WINDOW_SERVLET)
    # A second module instance in the same process finds our class already installed.
    return getattr(cls, "native_class", cls)


def _token_candidates(request: SynapseRequest) -> list[bytes]:
    args: Any = request.args
    headers = request.requestHeaders.getRawHeaders(b"Authorization") or []
    return [
        *(header.split(b" ", 1)[-1] for header in headers),
        *(args.get(b"access_token") or []),
    ]


def _unparseable_as_guest_token(request: SynapseRequest) -> bool:
    """Whether Synapse's fallback for a token it does not know, parsing it as a guest
    macaroon, raises something Synapse does not catch (struct.error, IndexError, plain
    Exception: pymacaroons raises them all for some strings)."""
    import pymacaroons

    for token in _token_candidates(request):
        try:
            pymacaroons.Macaroon.deserialize(token.decode("ascii"))
        except (pymacaroons.exceptions.MacaroonException, TypeError, ValueError):
            continue
        except Exception:
            return True
    return False


async def _authenticate(request: SynapseRequest, get_user: Callable[[], Awaitable[Any]]) -> Any:
    """Synapse's authentication of the request, answering 401 where Synapse would fail
    with a 500 on a malformed access token."""
    invalid_token = resolve("synapse.api.errors:InvalidClientTokenError")
    # Synapse decodes the token as ASCII without catching the error.
    if any(not token.isascii() for token in _token_candidates(request)):
        raise invalid_token("Unrecognised access token: it is not ASCII")
    try:
        return await get_user()
    except SynapseError:
        raise
    except Exception:
        if _unparseable_as_guest_token(request):
            raise invalid_token("Invalid access token passed.") from None
        raise


async def get_user_by_req(api: ModuleApi, request: SynapseRequest) -> Any:
    """`ModuleApi.get_user_by_req`, with a 401 for an access token Synapse cannot parse."""
    return await _authenticate(request, lambda: api.get_user_by_req(request))


async def require_admin(hs: HomeServer, request: SynapseRequest) -> Any:
    """The requester, if a server admin; Synapse's own check, so that tokens that are admin by
    scope rather than by the `admin` flag (delegated auth) keep working."""
    auth: Any = hs.get_auth()
    requester = await _authenticate(request, lambda: auth.get_user_by_req(request))
    await resolve("synapse.rest.admin._base:assert_user_is_admin")(auth, requester)
    return requester


@attrs.frozen
class Window:
    """The replacement window of a user's latest master key, as stored."""

    master_key: str  # the unpadded-base64 public key it was opened for
    expires_ms: int | None


def _master_public_key(keydata: str) -> str:
    return str(next(iter(json.loads(keydata)["keys"].values())))


def _latest_master(cursor: Any, user_id: str, count: int = 1) -> list[tuple[int, str, int | None]]:
    cursor.execute(
        "SELECT stream_id, keydata, updatable_without_uia_before_ms FROM e2e_cross_signing_keys"
        " WHERE user_id = ? AND keytype = 'master' ORDER BY stream_id DESC LIMIT ?",
        (user_id, count),
    )
    return [(int(row[0]), str(row[1]), row[2]) for row in cursor.fetchall()]


def _set_expiry(cursor: Any, user_id: str, stream_id: int, expires_ms: int | None) -> None:
    cursor.execute(
        "UPDATE e2e_cross_signing_keys SET updatable_without_uia_before_ms = ?"
        " WHERE user_id = ? AND keytype = 'master' AND stream_id = ?",
        (expires_ms, user_id, stream_id),
    )


class ReplacementWindows:
    """Grant, read and revoke the window in Synapse's own `updatable_without_uia_before_ms`
    column, which every worker's upload decision reads, and record who granted it."""

    def __init__(self, api: ModuleApi, clock: Any) -> None:
        self._api = api
        self._clock = clock
        self._table_ready = False
        linearizer = resolve("synapse.util.async_helpers:Linearizer")
        self._table_linearizer = linearizer(name=_GRANTS_TABLE, clock=clock)

    async def _ensure_table(self) -> None:
        if self._table_ready:
            return

        def txn(cursor: Any) -> None:
            cursor.execute(
                f"CREATE TABLE IF NOT EXISTS {_GRANTS_TABLE} ("
                " user_id TEXT NOT NULL PRIMARY KEY,"
                " master_key TEXT NOT NULL,"
                " expires_ms BIGINT NOT NULL,"
                " granted_by TEXT NOT NULL,"
                " granted_at_ms BIGINT NOT NULL)"
            )

        # Concurrent CREATE TABLE IF NOT EXISTS can collide on PostgreSQL.
        async with self._table_linearizer.queue(()):
            if not self._table_ready:
                await self._api.run_db_interaction("synapse_xsign_uia_grants_table", txn)
                self._table_ready = True

    async def read(self, user_id: str) -> Window | None:
        """The latest master key's window; None when the user has no master key."""

        def txn(cursor: Any) -> Window | None:
            rows = _latest_master(cursor, user_id)
            if not rows:
                return None
            _, keydata, expires_ms = rows[0]
            return Window(_master_public_key(keydata), expires_ms)

        return await self._api.run_db_interaction("synapse_xsign_uia_read_window", txn)  # type: ignore[no-any-return]

    async def grant(self, user_id: str, duration_ms: int, granted_by: str) -> Window | None:
        """Open a window on the latest master key; None when the user has none."""
        await self._ensure_table()
        now_ms = int(self._clock.time_msec())
        expires_ms = now_ms + duration_ms

        def txn(cursor: Any) -> Window | None:
            rows = _latest_master(cursor, user_id)
            if not rows:
                return None
            stream_id, keydata, _ = rows[0]
            master_key = _master_public_key(keydata)
            _set_expiry(cursor, user_id, stream_id, expires_ms)
            cursor.execute(f"DELETE FROM {_GRANTS_TABLE} WHERE user_id = ?", (user_id,))
            cursor.execute(
                f"INSERT INTO {_GRANTS_TABLE}"
                " (user_id, master_key, expires_ms, granted_by, granted_at_ms)"
                " VALUES (?, ?, ?, ?, ?)",
                (user_id, master_key, expires_ms, granted_by, now_ms),
            )
            return Window(master_key, expires_ms)

        return await self._api.run_db_interaction("synapse_xsign_uia_grant_window", txn)  # type: ignore[no-any-return]

    async def revoke(self, user_id: str) -> Window | None:
        """Close the latest master key's window; returns it as it was before, or None when
        the user has no master key."""
        await self._ensure_table()

        def txn(cursor: Any) -> Window | None:
            rows = _latest_master(cursor, user_id)
            if not rows:
                return None
            stream_id, keydata, expires_ms = rows[0]
            if expires_ms is not None:
                _set_expiry(cursor, user_id, stream_id, None)
            cursor.execute(f"DELETE FROM {_GRANTS_TABLE} WHERE user_id = ?", (user_id,))
            return Window(_master_public_key(keydata), expires_ms)

        return await self._api.run_db_interaction("synapse_xsign_uia_revoke_window", txn)  # type: ignore[no-any-return]

    async def grantor(self, user_id: str, *, master_replaced: bool) -> str | None:
        """Who granted the window an upload just went through, or None when no admin did
        through this module (e.g. the Matrix Authentication Service's own endpoint).

        Called under the upload lock, right after the upload: the window belonged to the
        previous master key if the upload replaced it, else to the current one. A grant
        whose key is gone is spent, so it is removed.
        """

        def txn(cursor: Any) -> str | None:
            cursor.execute(
                f"SELECT master_key, expires_ms, granted_by FROM {_GRANTS_TABLE} WHERE user_id = ?",
                (user_id,),
            )
            grant = cursor.fetchone()
            if grant is None:
                return None
            rows = _latest_master(cursor, user_id, 2)
            used = rows[1] if master_replaced and len(rows) > 1 else rows[0] if rows else None
            if master_replaced:
                cursor.execute(f"DELETE FROM {_GRANTS_TABLE} WHERE user_id = ?", (user_id,))
            if used is None:
                return None
            master_key, expires_ms, granted_by = grant
            # A later write of the column by anyone else (say, delegated auth) makes the
            # recorded grant stale.
            if _master_public_key(used[1]) == master_key and used[2] == expires_ms:
                return str(granted_by)
            return None

        try:
            await self._ensure_table()
            return await self._api.run_db_interaction("synapse_xsign_uia_window_grantor", txn)  # type: ignore[no-any-return]
        except Exception:
            # The keys are already stored: a failed look-up must not fail the request.
            logger.warning("Could not look up who granted %s's window", user_id, exc_info=True)
            return None


# --- Device-list resync -----------------------------------------------------------------

# Checked when the resync endpoint is enabled (DeviceLists below): an instance attribute of
# the device handler, and a configuration attribute.
REQUIRED_RESYNC_ATTRIBUTES = (
    "HomeServer.get_device_handler().device_list_updater",
    "HomeServer.config.federation.federation_domain_whitelist",
)


def call_later(hs: HomeServer, delay_s: float, callback: Callable[..., object], *args: Any) -> Any:
    """The reactor's `callLater`: the callback runs in no logcontext. Synapse's own
    `Clock.call_later` changed its signature between the supported releases."""
    reactor: Any = hs.get_reactor()
    return reactor.callLater(delay_s, callback, *args)


def run_as_background_process(
    api: ModuleApi, desc: str, func: Callable[..., Awaitable[object]], *args: Any
) -> None:
    """Run `func` in its own logcontext, not awaited. A `ModuleApi` method in newer
    releases; before, only the module-level function (deprecated since)."""
    method = getattr(api, "run_as_background_process", None)
    if method is not None:
        method(desc, func, *args)
        return
    from synapse.module_api import run_as_background_process as run

    run(desc, func, *args)


# What a client learns of a failure inside this homeserver; the log has the rest.
INTERNAL_ERROR = "an error in this homeserver (its log has the details)"


@attrs.frozen
class ResyncFailure:
    """Why Synapse did not fetch a device list, in plain data."""

    # backoff | unreachable | timeout | remote_error | denied | error
    reason: str
    detail: str
    # When Synapse's backoff for the destination ends, in ms since the epoch.
    retry_at_ms: int | None = None
    remote_status: int | None = None


class _FetchObserver:
    """Sees why `FederationClient.query_user_devices` failed for the users being watched.

    Synapse's updater swallows the exception and answers None; the client is owed the
    reason. Installed on the federation client of this process, so it sees the fetch only
    where it runs: in a single process, or on the process that resyncs device lists.
    """

    def __init__(self) -> None:
        self._watched: dict[str, int] = {}
        self._failures: dict[str, BaseException] = {}

    def wrap(self, native: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def query_user_devices(
            destination: str, user_id: str, *args: Any, **kwargs: Any
        ) -> Any:
            try:
                return await native(destination, user_id, *args, **kwargs)
            except Exception as e:
                if user_id in self._watched:
                    self._failures[user_id] = e
                raise

        query_user_devices.xsign_uia_observer = self  # type: ignore[attr-defined]
        return query_user_devices

    def watch(self, user_id: str) -> None:
        self._watched[user_id] = self._watched.get(user_id, 0) + 1
        self._failures.pop(user_id, None)

    def release(self, user_id: str) -> BaseException | None:
        count = self._watched.get(user_id, 0) - 1
        if count > 0:
            self._watched[user_id] = count
            return self._failures.get(user_id)
        self._watched.pop(user_id, None)
        return self._failures.pop(user_id, None)


def _install_fetch_observer(hs: HomeServer) -> _FetchObserver:
    client: Any = hs.get_federation_client()
    current = client.query_user_devices
    observer = getattr(current, "xsign_uia_observer", None)
    if isinstance(observer, _FetchObserver):
        return observer
    observer = _FetchObserver()
    client.query_user_devices = observer.wrap(current)
    return observer


def _require_attribute(obj: Any, name: str, described: str) -> Any:
    if not hasattr(obj, name):
        raise _unsupported(f"{described} is missing")
    return getattr(obj, name)


class DeviceLists:
    """Remote users' device lists, through Synapse's device-list updater (which, on a
    worker, forwards to the process that writes device lists over replication)."""

    def __init__(self, api: ModuleApi) -> None:
        self.hs: HomeServer = api._hs
        self._store: Any = self.hs.get_datastores().main
        self._clock: Any = self.hs.get_clock()
        device_handler: Any = self.hs.get_device_handler()
        self._updater: Any = _require_attribute(
            device_handler, "device_list_updater", REQUIRED_RESYNC_ATTRIBUTES[0]
        )
        config: Any = self.hs.config
        _require_attribute(
            config.federation, "federation_domain_whitelist", REQUIRED_RESYNC_ATTRIBUTES[1]
        )
        self._observer = _install_fetch_observer(self.hs)

    async def is_server_admin(self, requester: Any) -> bool:
        """Synapse's own test, so that admins by token scope (delegated auth) count too."""
        auth: Any = self.hs.get_auth()
        return bool(await auth.is_server_admin(requester))

    def federation_allowed(self, server_name: str) -> bool:
        config: Any = self.hs.config
        allowed = config.federation.federation_domain_whitelist
        return allowed is None or server_name in allowed

    async def share_a_room(self, user_id: str, other_user_id: str) -> bool:
        """Whether both are joined to a room, by this server's current state."""
        shared = await self._store.do_users_share_a_room(user_id, [other_user_id])
        return other_user_id in shared

    async def resync(self, user_id: str) -> ResyncFailure | None:
        """Mark the cached list stale and have Synapse fetch it; None on success.

        Marking it stale first makes the updater fetch even though it holds a list, and
        leaves it marked if the fetch fails, so that Synapse's own retry loop fetches it
        when the remote server answers again.
        """
        destination = user_id.split(":", 1)[1]
        started_ms = int(self._clock.time_msec())
        await self._store.mark_remote_users_device_caches_as_stale([user_id])
        self._observer.watch(user_id)
        result: Any = None
        try:
            result = await self._updater.multi_user_device_resync([user_id])
        except Exception:
            # Synapse catches what the federation request raises, so this came from
            # elsewhere: replication to the main process, or handling the answer.
            logger.warning("Resyncing the device list of %s failed", user_id, exc_info=True)
            self._observer.release(user_id)
            return ResyncFailure("error", INTERNAL_ERROR)
        observed = self._observer.release(user_id)
        if result is not None and result.get(user_id) is not None:
            return None
        backoff = await self._backoff(destination)
        if observed is not None:
            failure = classify_fetch_error(observed)
        else:
            failure = _classify_by_backoff(backoff, started_ms)
        if failure.retry_at_ms is None and backoff is not None:
            failure = attrs.evolve(failure, retry_at_ms=backoff[1])
        return failure

    async def _backoff(self, destination: str) -> tuple[int, int] | None:
        """When Synapse last failed to reach `destination` and when its backoff ends, if it
        has not ended yet."""
        timings = await self._store.get_destination_retry_timings(destination)
        if timings is None or not timings.retry_last_ts:
            return None
        ends = int(timings.retry_last_ts + timings.retry_interval)
        if ends <= int(self._clock.time_msec()):
            return None
        return int(timings.retry_last_ts), ends


def classify_fetch_error(error: BaseException) -> ResyncFailure:
    """What an exception out of `FederationClient.query_user_devices` means for the client."""
    if isinstance(error, resolve("synapse.util.retryutils:NotRetryingDestination")):
        return ResyncFailure(
            "backoff",
            "backing off after earlier failures",
            retry_at_ms=int(error.retry_last_ts + error.retry_interval),
        )
    if isinstance(error, resolve("synapse.api.errors:FederationDeniedError")):
        return ResyncFailure("denied", "federation with it is not allowed")
    http_error = resolve("synapse.api.errors:HttpResponseException")
    if isinstance(error, resolve("synapse.api.errors:RequestSendFailed")):
        inner = error.inner_exception
        if isinstance(inner, http_error):
            # 5xx and 429 answers come wrapped.
            return _http_failure(inner)
        if isinstance(inner, defer.TimeoutError | TimeoutError | twisted_error.TimeoutError):
            return ResyncFailure("timeout", "the request timed out")
        return ResyncFailure("unreachable", _describe(inner))
    if isinstance(error, http_error):
        return _http_failure(error)
    return ResyncFailure("error", _describe(error))


def _http_failure(error: Any) -> ResyncFailure:
    status = int(error.code)
    detail = f"it answered HTTP {status}"
    try:
        errcode = error.to_synapse_error().errcode
    except Exception:
        errcode = None
    if errcode and errcode != "M_UNKNOWN":
        detail += f" {errcode}"
    elif error.msg:
        detail += f" {error.msg}"
    return ResyncFailure("remote_error", detail, remote_status=status)


def _describe(error: BaseException) -> str:
    """A short account of a network error, without Twisted's failure wrapping."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        # ResponseNeverReceived and friends wrap a list of twisted Failures.
        inner = getattr(reasons[0], "value", None)
        if isinstance(inner, BaseException):
            return _describe(inner)
    # Twisted's messages end in a full stop; the caller's sentence supplies its own.
    text = str(error).strip().rstrip(".") or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _classify_by_backoff(backoff: tuple[int, int] | None, started_ms: int) -> ResyncFailure:
    """What the destination's backoff says about a failed fetch whose exception this process
    did not see (on a worker, the fetch runs on the process that writes device lists)."""
    if backoff is None:
        # A 4xx answer or an unusable body leaves no backoff behind.
        return ResyncFailure("remote_error", "it answered with an error or an unusable body")
    last_failure_ms, ends_ms = backoff
    if last_failure_ms < started_ms:
        return ResyncFailure("backoff", "backing off after earlier failures", retry_at_ms=ends_ms)
    return ResyncFailure("unreachable", "no answer, or a server error", ends_ms)


# --- Identity-reset notice ----------------------------------------------------------------


def server_notices_mxid(hs: HomeServer) -> str | None:
    """The system user that sends server notices; None when `server_notices` is not set in
    homeserver.yaml."""
    config: Any = hs.config
    section = _require_attribute(config, "servernotices", "HomeServer.config.servernotices")
    mxid = _require_attribute(
        section, "server_notices_mxid", "HomeServer.config.servernotices.server_notices_mxid"
    )
    return None if mxid is None else str(mxid)


async def send_server_notice(hs: HomeServer, user_id: str, content: Mapping[str, Any]) -> None:
    """Send a message to the user's server-notices room, creating and inviting them to it
    if needed. Main process only: Synapse refuses to build its server-notices manager on a
    worker ("Workers cannot send server notices"), as each process would otherwise keep its
    own cache of which room is the user's and could create a second one."""
    manager: Any = hs.get_server_notices_manager()
    await manager.send_notice(user_id, dict(content))
