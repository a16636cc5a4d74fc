"""Device-list resync: asking Synapse to fetch a remote user's device list, and what became
of the fetch."""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.internet import error as twisted_error

from synapse_xsign_uia._synapse.device_list_state import (
    Destination,
    RemoteServer,
    RemoteUser,
    check_columns_txn,
    destination_txn,
    remote_server_txn,
    remote_user_txn,
)
from synapse_xsign_uia._synapse.reactor import run_in_background, sleep
from synapse_xsign_uia._synapse.support import require_attribute, resolve

if TYPE_CHECKING:
    from synapse.module_api import ModuleApi
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)


# Checked when the resync endpoint is enabled (DeviceLists below): an instance attribute of
# the device handler, and a configuration attribute.
REQUIRED_RESYNC_ATTRIBUTES = (
    "HomeServer.get_device_handler().device_list_updater",
    "HomeServer.config.federation.federation_domain_whitelist",
)


# How often, and how long apart, a worker reads the backoff record that another process
# writes after a failed fetch (a failure that leaves none is an error answer from the remote).
_BACKOFF_READS = 6
_BACKOFF_READ_INTERVAL_S = 0.1

# What a client learns of a failure inside this homeserver; the log has the rest.
INTERNAL_ERROR = "an error in this homeserver (its log has the details)"


class FailureReason(enum.Enum):
    """Why Synapse did not fetch a device list; the value is what clients and logs see."""

    BACKOFF = "backoff"  # Synapse backs off from the remote server after earlier failures
    UNREACHABLE = "unreachable"  # no connection, or no answer
    TIMEOUT = "timeout"  # the request timed out
    REMOTE_ERROR = "remote_error"  # the remote server answered with an error
    DENIED = "denied"  # federation with the remote server is not allowed
    ERROR = "error"  # something failed in this homeserver


@attrs.frozen
class ResyncFailure:
    """Why Synapse did not fetch a device list, in plain data."""

    reason: FailureReason
    detail: str
    # When Synapse's backoff for the destination ends, in ms since the epoch.
    retry_at_ms: int | None = None
    remote_status: int | None = None


# Told of every device-list fetch this process makes: the user, and why it failed (None: the
# remote server sent the list).
FetchListener = Callable[[str, "ResyncFailure | None"], None]


class _FetchObserver:
    """Sees every `FederationClient.query_user_devices` of this process, and why it failed
    for the users being watched.

    Synapse's updater swallows the exception and answers None; the client is owed the
    reason. Installed on the federation client of this process, so it sees the fetch only
    where it runs: in a single process, or on the process that resyncs device lists.
    """

    def __init__(self) -> None:
        self._watched: dict[str, int] = {}
        self._failures: dict[str, BaseException] = {}
        self.listeners: list[FetchListener] = []

    def wrap(self, native: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def query_user_devices(
            destination: str, user_id: str, *args: Any, **kwargs: Any
        ) -> Any:
            try:
                result = await native(destination, user_id, *args, **kwargs)
            except Exception as e:
                if user_id in self._watched:
                    self._failures[user_id] = e
                self._tell(user_id, classify_fetch_error(e))
                raise
            self._tell(user_id, None)
            return result

        query_user_devices.xsign_uia_observer = self  # type: ignore[attr-defined]
        return query_user_devices

    def _tell(self, user_id: str, failure: ResyncFailure | None) -> None:
        for listener in self.listeners:
            try:
                listener(user_id, failure)
            except Exception:
                logger.exception("Recording the fetch of %s's device list failed", user_id)

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


class DeviceLists:
    """Remote users' device lists, through Synapse's device-list updater (which, on a
    worker, forwards to the process that writes device lists over replication)."""

    def __init__(self, api: ModuleApi, hs: HomeServer) -> None:
        self._api = api
        self._hs = hs
        self._store: Any = hs.get_datastores().main
        self._clock: Any = hs.get_clock()
        device_handler: Any = hs.get_device_handler()
        self._updater: Any = require_attribute(
            device_handler, "device_list_updater", REQUIRED_RESYNC_ATTRIBUTES[0]
        )
        config: Any = hs.config
        require_attribute(
            config.federation, "federation_domain_whitelist", REQUIRED_RESYNC_ATTRIBUTES[1]
        )
        self._observer = _install_fetch_observer(hs)

    def observe_fetches(self, listener: FetchListener) -> None:
        """Call `listener` after every device-list fetch this process makes, whoever asked
        for it (the module, Synapse's retry loop, a device-list update)."""
        self._observer.listeners.append(listener)

    # The state of remote device lists, for the operator.

    async def check_tables(self) -> None:
        """Raise if a table or column of Synapse's that the status reads is missing."""
        await self._store.db_pool.runInteraction(
            "synapse_xsign_uia_check_device_list_tables", check_columns_txn
        )

    async def remote_user(self, user_id: str) -> RemoteUser:
        tracked, stale_since_ms, devices = await self._store.db_pool.runInteraction(
            "synapse_xsign_uia_remote_user", remote_user_txn, user_id
        )
        sharing = await self._store.get_users_server_still_shares_room_with([user_id])
        keys = (await self._store.get_e2e_cross_signing_keys_bulk([user_id])).get(user_id)
        return RemoteUser(
            user_id=user_id,
            tracked=tracked,
            shares_room=user_id in sharing,
            stale_since_ms=stale_since_ms,
            device_count=devices,
            cross_signing_keys=_key_ids(keys or {}),
        )

    async def remote_server(self, server_name: str) -> RemoteServer:
        server: RemoteServer = await self._store.db_pool.runInteraction(
            "synapse_xsign_uia_remote_server", remote_server_txn, server_name
        )
        return server

    async def destination(self, server_name: str) -> Destination:
        found: Destination = await self._store.db_pool.runInteraction(
            "synapse_xsign_uia_destination", destination_txn, server_name
        )
        return found

    async def mark_stale(self, user_ids: list[str]) -> None:
        """Mark the lists stale, as Synapse does when it misses an update: its retry loop
        fetches them."""
        await self._store.mark_remote_users_device_caches_as_stale(user_ids)

    def retry_stale_now(self) -> bool:
        """Start Synapse's retry loop for stale lists now rather than at its next turn, if
        this process runs it; it skips a turn already running. Whether it started."""
        if not isinstance(self._updater, resolve("synapse.handlers.device:DeviceListUpdater")):
            return False
        run_in_background(
            self._api, "synapse_xsign_uia_retry_stale", self._updater._maybe_retry_device_resync
        )
        return True

    def federation_allowed(self, server_name: str) -> bool:
        config: Any = self._hs.config
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
            return ResyncFailure(FailureReason.ERROR, INTERNAL_ERROR)
        observed = self._observer.release(user_id)
        if result is not None and result.get(user_id) is not None:
            return None
        backoff = await self._backoff(destination)
        reads = 1
        while observed is None and backoff is None and reads < _BACKOFF_READS:
            # The failure happened in the process that fetches device lists, which records
            # its backoff from the destination in the background, moments after it answers.
            await sleep(self._hs.get_reactor(), _BACKOFF_READ_INTERVAL_S)
            backoff = await self._backoff(destination)
            reads += 1
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


def _key_ids(keys: Mapping[str, Any]) -> dict[str, str]:
    """`ed25519:<public key>` of each cached cross-signing key, by type."""
    found: dict[str, str] = {}
    for key_type, key in keys.items():
        key_ids = list((key or {}).get("keys", {}))
        if key_ids:
            found[str(key_type)] = str(key_ids[0])
    return found


def classify_fetch_error(error: BaseException) -> ResyncFailure:
    """What an exception out of `FederationClient.query_user_devices` means for the client."""
    if isinstance(error, resolve("synapse.util.retryutils:NotRetryingDestination")):
        return ResyncFailure(
            FailureReason.BACKOFF,
            "backing off after earlier failures",
            retry_at_ms=int(error.retry_last_ts + error.retry_interval),
        )
    if isinstance(error, resolve("synapse.api.errors:FederationDeniedError")):
        return ResyncFailure(FailureReason.DENIED, "federation with it is not allowed")
    http_error = resolve("synapse.api.errors:HttpResponseException")
    if isinstance(error, resolve("synapse.api.errors:RequestSendFailed")):
        inner = error.inner_exception
        if isinstance(inner, http_error):
            # 5xx and 429 answers come wrapped.
            return _http_failure(inner)
        if isinstance(inner, defer.TimeoutError | TimeoutError | twisted_error.TimeoutError):
            return ResyncFailure(FailureReason.TIMEOUT, "the request timed out")
        return ResyncFailure(FailureReason.UNREACHABLE, _describe(inner))
    if isinstance(error, http_error):
        return _http_failure(error)
    return ResyncFailure(FailureReason.ERROR, _describe(error))


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
    return ResyncFailure(FailureReason.REMOTE_ERROR, detail, remote_status=status)


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
        return ResyncFailure(
            FailureReason.REMOTE_ERROR, "it answered with an error or an unusable body"
        )
    last_failure_ms, ends_ms = backoff
    if last_failure_ms < started_ms:
        return ResyncFailure(
            FailureReason.BACKOFF, "backing off after earlier failures", retry_at_ms=ends_ms
        )
    return ResyncFailure(FailureReason.UNREACHABLE, "no answer, or a server error", ends_ms)
