"""`GET /_matrix/unstable/org.matrix.mscXXXX/user/{userId}/devices`: a client asks its
homeserver to fetch a remote user's device list again over federation.

Each request is checked in the order that costs least first (route, access token, user ID,
rate limit, shared room, federation), then the service fetches, and a failure is answered
with a 502 that says why.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from synapse.module_api.errors import Codes, SynapseError

from synapse_xsign_uia import metrics
from synapse_xsign_uia.outcomes import ResyncOutcome
from synapse_xsign_uia.resync.limits import RateLimiter
from synapse_xsign_uia.resync.service import Outcome, ResyncService
from synapse_xsign_uia.resync.wording import UNSTABLE_PREFIX, failure_error
from synapse_xsign_uia.user_ids import InvalidUserId, decode_path_segment, parse_user_id

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

    from synapse_xsign_uia._synapse import Caller, Synapse
    from synapse_xsign_uia.config import ResyncConfig
    from synapse_xsign_uia.store import Store

logger = logging.getLogger(__name__)

# Served as a Twisted leaf: the rest of the path, `{userId}/devices`, is parsed here.
RESOURCE_PATH = f"/_matrix/unstable/{UNSTABLE_PREFIX}/user"


def route_user_segment(postpath: Sequence[bytes] | None) -> bytes | None:
    """The still-encoded `{userId}` segment if the path below the resource is
    `{userId}/devices`, else None (the route does not exist)."""
    if postpath is None or len(postpath) != 2 or postpath[1] != b"devices" or not postpath[0]:
        return None
    return postpath[0]


def _retry_after(retry_after_ms: int) -> dict[str, str]:
    return {"Retry-After": str(math.ceil(retry_after_ms / 1000))}


class ResyncEndpoint:
    """Checks a request, asks the service, and answers."""

    def __init__(self, config: ResyncConfig, synapse: Synapse, store: Store) -> None:
        self._config = config
        self._synapse = synapse
        self._device_lists = synapse.device_lists()
        self._service = ResyncService(config, synapse, store)
        self._limiter: RateLimiter[str] = RateLimiter(config.rate_per_second, config.burst_count)
        self._metrics = metrics.for_server(synapse.server_name)

    async def on_GET(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        caller, user_id, server_name = await self._read(request)
        await self._check_allowed(caller, user_id, server_name)
        outcome = await self._service.resync(user_id)
        self._log(caller.user_id, user_id, outcome)
        if outcome.kind in (ResyncOutcome.FETCHED, ResyncOutcome.COOLDOWN):
            return 202, {}
        message, fields = failure_error(
            user_id, server_name, outcome, self._synapse.now_ms(), self._config.timeout_ms
        )
        headers = _retry_after(fields["retry_after_ms"]) if "retry_after_ms" in fields else None
        raise SynapseError(502, message, Codes.UNKNOWN, additional_fields=fields, headers=headers)

    async def _read(self, request: SynapseRequest) -> tuple[Caller, str, str]:
        """Who asks, for which remote user, on which server."""
        segment = route_user_segment(request.postpath)
        if segment is None:
            self._refuse(
                ResyncOutcome.INVALID, SynapseError(404, "Unrecognized request", Codes.UNRECOGNIZED)
            )
        try:
            caller = await self._synapse.requests.caller(request)
        except SynapseError as e:
            self._refuse(ResyncOutcome.UNAUTHORIZED, e)
        try:
            user_id = decode_path_segment(segment)
            server_name = parse_user_id(user_id)
        except InvalidUserId as e:
            self._refuse(ResyncOutcome.INVALID, SynapseError(400, str(e), Codes.INVALID_PARAM))
        if self._synapse.is_mine(user_id):
            message = f"{user_id} is a user of this homeserver, whose device list is never stale"
            self._refuse(ResyncOutcome.INVALID, SynapseError(400, message, Codes.INVALID_PARAM))
        return caller, user_id, server_name

    async def _check_allowed(self, caller: Caller, user_id: str, server_name: str) -> None:
        """Admins skip the rate limit and the shared-room check."""
        if not await self._synapse.requests.is_admin(caller):
            retry_after_ms = self._limiter.take(caller.user_id, self._synapse.now_ms())
            if retry_after_ms is not None:
                self._log(caller.user_id, user_id, Outcome(ResyncOutcome.RATE_LIMITED))
                raise SynapseError(
                    429,
                    "Too many device-list resync requests",
                    Codes.LIMIT_EXCEEDED,
                    additional_fields={"retry_after_ms": retry_after_ms},
                    headers=_retry_after(retry_after_ms),
                )
            if not await self._device_lists.share_a_room(caller.user_id, user_id):
                self._log(caller.user_id, user_id, Outcome(ResyncOutcome.NO_SHARED_ROOM))
                raise SynapseError(403, f"You do not share a room with {user_id}", Codes.FORBIDDEN)
        if not self._device_lists.federation_allowed(server_name):
            self._log(caller.user_id, user_id, Outcome(ResyncOutcome.FEDERATION_DENIED))
            raise SynapseError(
                403, f"This homeserver does not federate with {server_name}", Codes.FORBIDDEN
            )

    def _refuse(self, outcome: ResyncOutcome, error: SynapseError) -> NoReturn:
        """Refuse a request before it names a user: counted, not logged."""
        self._metrics.resync_request(outcome)
        raise error

    def _log(self, requester_id: str, user_id: str, outcome: Outcome) -> None:
        failure = outcome.failure
        logger.info(
            "device list resync: requester=%s user=%s outcome=%s%s",
            requester_id,
            user_id,
            outcome.kind.value,
            f" reason={failure.reason.value}" if failure is not None else "",
        )
        self._metrics.resync_request(outcome.kind)


def serve_resync_endpoint(config: ResyncConfig, synapse: Synapse, store: Store) -> ResyncEndpoint:
    endpoint = ResyncEndpoint(config, synapse, store)
    synapse.serve_json(RESOURCE_PATH, endpoint.on_GET)
    return endpoint
