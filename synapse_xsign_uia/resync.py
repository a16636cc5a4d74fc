"""`GET /_matrix/unstable/org.matrix.mscXXXX/user/{userId}/devices`: a client asks its
homeserver to fetch a remote user's device list again over federation (seed 003).

The pure parts come first (user ID grammar, the per-requester token bucket, the per-user
cooldown, the single-flight bookkeeping) and take the time as an argument, so they are
tested without a homeserver. The glue after them waits on Synapse's own device-list updater.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import math
import re
import urllib.parse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs
from synapse.api.errors import Codes, SynapseError
from synapse.module_api import DirectServeJsonResource, make_deferred_yieldable
from twisted.internet import defer

from synapse_xsign_uia import _synapse, metrics
from synapse_xsign_uia.config import ResyncConfig

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest
    from synapse.module_api import ModuleApi

logger = logging.getLogger(__name__)

UNSTABLE_PREFIX = "org.matrix.mscXXXX"
# Registered as a Twisted leaf: the rest of the path, `{userId}/devices`, is parsed here.
RESOURCE_PATH = f"/_matrix/unstable/{UNSTABLE_PREFIX}/user"
REASON_FIELD = f"{UNSTABLE_PREFIX}.reason"
REMOTE_STATUS_FIELD = f"{UNSTABLE_PREFIX}.remote_status"

K = TypeVar("K")
W = TypeVar("W")


# --- User IDs ---------------------------------------------------------------------------


class InvalidUserId(ValueError):
    """The path does not name a valid Matrix user ID; the message says why."""


_MAX_USER_ID_BYTES = 255
_DNS_NAME = re.compile(r"^[A-Za-z0-9.-]{1,255}$")
_PORT = re.compile(r"^[0-9]{1,5}$")


def _valid_server_name(server_name: str) -> bool:
    """The spec's server-name grammar: a DNS name, an IPv4 address or a bracketed IPv6
    address, then an optional port."""
    host, port = server_name, None
    if server_name.startswith("["):
        close = server_name.find("]")
        if close == -1:
            return False
        host, rest = server_name[: close + 1], server_name[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                return False
            port = rest[1:]
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
    else:
        if ":" in server_name:
            host, port = server_name.split(":", 1)
        # A dotted quad is also a DNS name by the grammar's characters; nothing to add.
        if not _DNS_NAME.match(host):
            return False
    return port is None or (_PORT.match(port) is not None and 0 < int(port) <= 65535)


def parse_user_id(user_id: str) -> str:
    """The server name of a valid user ID, or `InvalidUserId`.

    Localparts are checked against the historical grammar (printable ASCII except ':'),
    which every server must still accept for existing users.
    """
    if not user_id.startswith("@"):
        raise InvalidUserId(f"{user_id!r} is not a user ID: it must start with '@'")
    if len(user_id.encode("utf-8")) > _MAX_USER_ID_BYTES:
        raise InvalidUserId(f"A user ID is at most {_MAX_USER_ID_BYTES} bytes long")
    localpart, sep, server_name = user_id[1:].partition(":")
    if not sep or not localpart or not server_name:
        raise InvalidUserId(f"{user_id!r} is not a user ID: expected '@localpart:server.name'")
    if any(not 0x21 <= ord(ch) <= 0x7E for ch in localpart):
        raise InvalidUserId(
            f"{user_id!r} is not a user ID: the localpart may only hold printable ASCII"
        )
    if not _valid_server_name(server_name):
        raise InvalidUserId(f"{user_id!r} is not a user ID: {server_name!r} is not a server name")
    return server_name


def route_user_segment(postpath: Sequence[bytes] | None) -> bytes | None:
    """The still-encoded `{userId}` segment if the path below the resource is
    `{userId}/devices`, else None (the route does not exist)."""
    if postpath is None or len(postpath) != 2 or postpath[1] != b"devices" or not postpath[0]:
        return None
    return postpath[0]


def decode_user_segment(segment: bytes) -> str:
    """Percent-decode the `{userId}` path segment (Twisted splits the path before
    decoding, so an encoded '/' stays inside the segment)."""
    try:
        return urllib.parse.unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidUserId("The user ID in the path is not valid UTF-8") from e


# --- Protecting the remote server and this one -----------------------------------------


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


class SingleFlight(Generic[K, W]):
    """Which keys have a fetch in flight, and who waits for each.

    A flight outlives its waiters: when every waiter has given up, the fetch still runs, and
    a new waiter joins it instead of starting another.
    """

    def __init__(self) -> None:
        # Waiters in a dict rather than a list: a flood's timeouts remove them one by one.
        self._flights: dict[K, dict[W, None]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def in_flight(self, key: K) -> bool:
        return key in self._flights

    def waiting(self, key: K) -> int:
        return len(self._flights.get(key, ()))

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


# --- Answers ----------------------------------------------------------------------------

FETCHED = "fetched"
COOLDOWN = "cooldown"
FAILED = "failed"
TIMED_OUT = "timed_out"


@attrs.frozen
class Outcome:
    kind: str
    failure: _synapse.ResyncFailure | None = None


_STALE_NOTE = (
    "The device list stays marked as stale, and this homeserver fetches it again when {server} "
    "answers."
)


def failure_error(
    user_id: str,
    server_name: str,
    outcome: Outcome,
    now_ms: int,
    timeout_ms: int,
) -> tuple[str, dict[str, Any]]:
    """The `error` message and extra fields of the 502 for a fetch that did not succeed."""
    failure = outcome.failure
    fields: dict[str, Any] = {}
    retry_at_ms = failure.retry_at_ms if failure is not None else None
    if retry_at_ms is not None and retry_at_ms > now_ms:
        fields["retry_after_ms"] = retry_at_ms - now_ms

    if outcome.kind == TIMED_OUT or failure is None:
        fields[REASON_FIELD] = "timeout"
        message = (
            f"{server_name} did not send the device list of {user_id} within "
            f"{timeout_ms / 1000:g}s. This homeserver keeps waiting for it in the background; "
            "a change then reaches your clients through /sync."
        )
        return message, fields

    fields[REASON_FIELD] = failure.reason
    if failure.remote_status is not None:
        fields[REMOTE_STATUS_FIELD] = failure.remote_status
    if failure.reason == "backoff":
        when = (
            f" for another {math.ceil(fields['retry_after_ms'] / 1000)}s"
            if "retry_after_ms" in fields
            else ""
        )
        first = (
            f"Requests to {server_name} failed recently, and this homeserver backs off from "
            f"it{when}, so it did not ask for the device list of {user_id}."
        )
    elif failure.reason == "unreachable":
        first = f"Could not reach {server_name} for the device list of {user_id}: {failure.detail}."
    elif failure.reason == "timeout":
        first = f"{server_name} did not answer for the device list of {user_id}: {failure.detail}."
    elif failure.reason == "remote_error":
        first = f"{server_name} did not send the device list of {user_id}: {failure.detail}."
    elif failure.reason == "denied":
        first = f"This homeserver does not federate with {server_name}."
    else:
        first = (
            f"Could not fetch the device list of {user_id} from {server_name}: {failure.detail}."
        )
    return f"{first} {_STALE_NOTE.format(server=server_name)}", fields


# --- Synapse glue -----------------------------------------------------------------------


class ResyncService:
    """Fetches device lists through Synapse's updater, one flight per user, with the
    cooldown; waits for a fetch at most `timeout_ms`."""

    def __init__(self, config: ResyncConfig, api: ModuleApi, internals: _synapse.Internals) -> None:
        self._config = config
        self._api = api
        self._hs = internals.hs
        self._clock = internals.clock
        self._device_lists = _synapse.DeviceLists(api)
        self._cooldown: Cooldown[str] = Cooldown(config.per_user_cooldown_ms)
        self._flights: SingleFlight[str, defer.Deferred[Outcome]] = SingleFlight()
        self._metrics = metrics.for_server(api.server_name)

    @property
    def device_lists(self) -> _synapse.DeviceLists:
        return self._device_lists

    def now_ms(self) -> int:
        return int(self._clock.time_msec())

    async def resync(self, user_id: str) -> Outcome:
        if self._cooldown.remaining_ms(user_id, self.now_ms()) > 0:
            return Outcome(COOLDOWN)
        waiter: defer.Deferred[Outcome] = defer.Deferred()
        if self._flights.join(user_id, waiter):
            self._metrics.resync_federation_request()
            _synapse.run_as_background_process(
                self._api, "synapse_xsign_uia_device_list_resync", self._fetch, user_id
            )
        timer = _synapse.call_later(
            self._hs, self._config.timeout_ms / 1000, self._give_up, user_id, waiter
        )
        try:
            return await make_deferred_yieldable(waiter)
        finally:
            if timer.active():
                timer.cancel()

    async def _fetch(self, user_id: str) -> None:
        try:
            failure = await self._device_lists.resync(user_id)
        except Exception:
            logger.exception("Fetching the device list of %s failed", user_id)
            failure = _synapse.ResyncFailure("error", _synapse.INTERNAL_ERROR)
        if failure is None:
            self._cooldown.start(user_id, self.now_ms())
            outcome = Outcome(FETCHED)
            logger.info("Fetched the device list of %s", user_id)
        else:
            outcome = Outcome(FAILED, failure)
            logger.info(
                "Could not fetch the device list of %s (%s: %s); it stays marked stale",
                user_id,
                failure.reason,
                failure.detail,
            )
        waiters = self._flights.finish(user_id)
        if waiters:
            # Fired from the reactor, in no logcontext, as Synapse expects of a Deferred
            # that its waiters await through `make_deferred_yieldable`.
            _synapse.call_later(self._hs, 0, self._wake, waiters, outcome)

    def _give_up(self, user_id: str, waiter: defer.Deferred[Outcome]) -> None:
        self._flights.leave(user_id, waiter)
        if not waiter.called:
            waiter.callback(Outcome(TIMED_OUT))

    @staticmethod
    def _wake(waiters: list[defer.Deferred[Outcome]], outcome: Outcome) -> None:
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(outcome)


class ResyncHandler:
    """Checks a request in the order that costs least first, then asks the service."""

    def __init__(self, config: ResyncConfig, api: ModuleApi, internals: _synapse.Internals) -> None:
        self._config = config
        self._api = api
        self.service = ResyncService(config, api, internals)
        self._limiter: RateLimiter[str] = RateLimiter(config.rate_per_second, config.burst_count)
        self._metrics = metrics.for_server(api.server_name)

    async def on_GET(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        segment = route_user_segment(request.postpath)
        if segment is None:
            self._metrics.resync_request(metrics.RESYNC_INVALID)
            raise SynapseError(404, "Unrecognized request", Codes.UNRECOGNIZED)
        try:
            requester = await _synapse.get_user_by_req(self._api, request)
        except SynapseError:
            self._metrics.resync_request(metrics.RESYNC_UNAUTHORIZED)
            raise
        requester_id = requester.user.to_string()
        try:
            user_id = decode_user_segment(segment)
            server_name = parse_user_id(user_id)
        except InvalidUserId as e:
            self._metrics.resync_request(metrics.RESYNC_INVALID)
            raise SynapseError(400, str(e), Codes.INVALID_PARAM) from e
        if self._api.is_mine(user_id):
            self._metrics.resync_request(metrics.RESYNC_INVALID)
            raise SynapseError(
                400,
                f"{user_id} is a user of this homeserver, whose device list is never stale",
                Codes.INVALID_PARAM,
            )

        devices = self.service.device_lists
        if not await devices.is_server_admin(requester):
            retry_after_ms = self._limiter.take(requester_id, self.service.now_ms())
            if retry_after_ms is not None:
                self._log(requester_id, user_id, "rate_limited")
                raise SynapseError(
                    429,
                    "Too many device-list resync requests",
                    Codes.LIMIT_EXCEEDED,
                    additional_fields={"retry_after_ms": retry_after_ms},
                    headers={"Retry-After": str(math.ceil(retry_after_ms / 1000))},
                )
            if not await devices.share_a_room(requester_id, user_id):
                self._log(requester_id, user_id, "no_shared_room")
                raise SynapseError(
                    403,
                    f"You do not share a room with {user_id}",
                    Codes.FORBIDDEN,
                )
        if not devices.federation_allowed(server_name):
            self._log(requester_id, user_id, "federation_denied")
            raise SynapseError(
                403, f"This homeserver does not federate with {server_name}", Codes.FORBIDDEN
            )

        outcome = await self.service.resync(user_id)
        self._log(requester_id, user_id, outcome.kind, outcome.failure)
        if outcome.kind in (FETCHED, COOLDOWN):
            return 202, {}
        message, fields = failure_error(
            user_id, server_name, outcome, self.service.now_ms(), self._config.timeout_ms
        )
        headers = None
        if "retry_after_ms" in fields:
            headers = {"Retry-After": str(math.ceil(fields["retry_after_ms"] / 1000))}
        raise SynapseError(502, message, Codes.UNKNOWN, additional_fields=fields, headers=headers)

    def _log(
        self,
        requester_id: str,
        user_id: str,
        outcome: str,
        failure: _synapse.ResyncFailure | None = None,
    ) -> None:
        logger.info(
            "device list resync: requester=%s user=%s outcome=%s%s",
            requester_id,
            user_id,
            outcome,
            f" reason={failure.reason}" if failure is not None else "",
        )
        self._metrics.resync_request(outcome)


class DeviceListResyncResource(DirectServeJsonResource):
    """The route's Twisted resource; `isLeaf` hands it every path below `RESOURCE_PATH`."""

    isLeaf = True

    def __init__(self, handler: ResyncHandler, clock: Any) -> None:
        # Newer Synapse releases take the homeserver's clock here; older ones have no such
        # argument.
        if "clock" in inspect.signature(DirectServeJsonResource.__init__).parameters:
            super().__init__(clock=clock)
        else:
            super().__init__()
        self.handler = handler

    async def _async_render_GET(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        return await self.handler.on_GET(request)


def register_resync_resource(
    config: ResyncConfig, api: ModuleApi, internals: _synapse.Internals
) -> DeviceListResyncResource:
    resource = DeviceListResyncResource(ResyncHandler(config, api, internals), internals.clock)
    api.register_web_resource(RESOURCE_PATH, resource)
    return resource
