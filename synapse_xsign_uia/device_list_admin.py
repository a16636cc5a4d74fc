"""The operator's view and repair of remote users' device lists, under Synapse's admin API:

- `GET /_synapse/admin/v1/remote_device_lists/users/<user_id>`: what this homeserver holds
  of one remote user's device list, and its backoff from their server;
- `GET /_synapse/admin/v1/remote_device_lists/servers/<server_name>`: the tracked users of a
  remote server, how many lists are still stale, the last repair;
- `POST /_synapse/admin/v1/remote_device_lists/servers/<server_name>/repair`: mark every
  tracked list of that server stale, so that Synapse's retry loop fetches them again.

Also `FetchRecorder`, which records every fetch of a device list in the process that fetches
them, since Synapse keeps no such record.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from synapse.module_api.errors import Codes, SynapseError

from synapse_xsign_uia import metrics
from synapse_xsign_uia.errors import read_json_body
from synapse_xsign_uia.store import Repair
from synapse_xsign_uia.user_ids import (
    InvalidServerName,
    InvalidUserId,
    check_server_name,
    parse_user_id,
)

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

    from synapse_xsign_uia._synapse import ResyncFailure, Synapse
    from synapse_xsign_uia._synapse.device_list_state import Destination, RemoteServer
    from synapse_xsign_uia.store import Store

logger = logging.getLogger(__name__)

_PREFIX = "/_synapse/admin/v1/remote_device_lists"
USER_PATH = f"{_PREFIX}/users/{{userId}}"
SERVER_PATH = f"{_PREFIX}/servers/{{serverName}}"
REPAIR_PATH = f"{_PREFIX}/servers/{{serverName}}/repair"

# The path templates as documented, their patterns, and their methods.
PATTERNS: dict[str, tuple[re.Pattern[str], tuple[str, ...]]] = {
    USER_PATH: (re.compile(f"^{_PREFIX}/users/(?P<user_id>[^/]*)$"), ("GET",)),
    SERVER_PATH: (re.compile(f"^{_PREFIX}/servers/(?P<server_name>[^/]*)$"), ("GET",)),
    REPAIR_PATH: (re.compile(f"^{_PREFIX}/servers/(?P<server_name>[^/]*)/repair$"), ("POST",)),
}

Response = tuple[int, dict[str, Any]]


def _bad(message: str) -> SynapseError:
    return SynapseError(HTTPStatus.BAD_REQUEST, message, Codes.INVALID_PARAM)


def _not_found(message: str) -> SynapseError:
    return SynapseError(HTTPStatus.NOT_FOUND, message, Codes.NOT_FOUND)


def destination_body(destination: Destination) -> dict[str, Any]:
    return {
        "server_name": destination.server_name,
        "reachable": destination.reachable,
        "failing_since_ts": destination.failing_since_ms,
        "last_failed_attempt_ts": destination.last_failed_attempt_ms,
        "retry_interval_ms": destination.retry_interval_ms,
        "next_retry_ts": destination.next_retry_ms,
    }


def _repair_body(repair: Repair | None) -> dict[str, Any] | None:
    if repair is None:
        return None
    return {
        "requested_ts": repair.requested_ms,
        "requested_by": repair.requested_by,
        "users_marked": repair.users_marked,
    }


class DeviceListAdmin:
    """The three endpoints, on the main process (Synapse serves its admin API there)."""

    def __init__(self, synapse: Synapse, store: Store) -> None:
        self._synapse = synapse
        self._store = store
        self._device_lists = synapse.device_lists()
        self._metrics = metrics.for_server(synapse.server_name)

    @property
    def routes(self) -> dict[str, tuple[str, re.Pattern[str], dict[str, Any]]]:
        """Each path template's servlet name (for Synapse's request metrics), pattern and
        handlers."""
        handlers: dict[str, tuple[str, dict[str, Any]]] = {
            USER_PATH: ("RemoteDeviceListUserServlet", {"GET": self.user_status}),
            SERVER_PATH: ("RemoteDeviceListServerServlet", {"GET": self.server_status}),
            REPAIR_PATH: ("RemoteDeviceListRepairServlet", {"POST": self.repair}),
        }
        return {
            template: (name, PATTERNS[template][0], methods)
            for template, (name, methods) in handlers.items()
        }

    async def user_status(self, request: SynapseRequest, user_id: str) -> Response:
        await self._synapse.requests.admin(request)
        try:
            parse_user_id(user_id)
        except InvalidUserId as e:
            raise _bad(str(e)) from e
        if self._synapse.is_mine(user_id):
            raise _bad(f"{user_id} is a user of this homeserver, which keeps no copy of it")
        user = await self._device_lists.remote_user(user_id)
        fetched = await self._store.fetch_record(user_id)
        if not user.known and fetched is None:
            raise _not_found(f"This homeserver knows nothing of the device list of {user_id}")
        destination = await self._device_lists.destination(user_id.partition(":")[2])
        failed = None
        if fetched is not None and fetched.failed_ms is not None:
            failed = {
                "ts": fetched.failed_ms,
                "reason": fetched.failure_reason,
                "error": fetched.failure_detail,
            }
        return HTTPStatus.OK, {
            "user_id": user_id,
            "tracked": user.tracked,
            "shares_room": user.shares_room,
            "stale": user.stale_since_ms is not None,
            "stale_since_ts": user.stale_since_ms,
            "last_fetched_ts": None if fetched is None else fetched.fetched_ms,
            "last_failed_fetch": failed,
            "device_count": user.device_count,
            "cross_signing_keys": user.cross_signing_keys,
            "server": destination_body(destination),
        }

    async def server_status(self, request: SynapseRequest, server_name: str) -> Response:
        await self._synapse.requests.admin(request)
        self._check_remote(server_name)
        server = await self._device_lists.remote_server(server_name)
        repair = await self._store.last_repair(server_name)
        if not server.tracked_users and not server.stale_users and repair is None:
            raise _not_found(f"This homeserver tracks no device list of a user on {server_name}")
        return HTTPStatus.OK, await self._server_body(server, repair)

    async def repair(self, request: SynapseRequest, server_name: str) -> Response:
        admin = await self._synapse.requests.admin(request)
        # No field is read, but a body must be what Synapse's admin API takes: none, or a
        # JSON object.
        read_json_body(request, allow_empty_body=True)
        self._check_remote(server_name)
        users = list((await self._device_lists.remote_server(server_name)).tracked_users)
        if not users:
            raise _not_found(f"This homeserver tracks no device list of a user on {server_name}")
        await self._device_lists.mark_stale(users)
        repair = Repair(self._synapse.now_ms(), admin.user_id, len(users))
        await self._store.record_repair(server_name, repair)
        started = self._device_lists.retry_stale_now()
        logger.info(
            "Device-list repair: admin=%s server=%s users_marked_stale=%d retry_started=%s",
            admin.user_id,
            server_name,
            len(users),
            started,
        )
        self._metrics.device_list_repair(len(users))
        server = await self._device_lists.remote_server(server_name)
        return HTTPStatus.OK, {
            **await self._server_body(server, repair),
            "marked_stale": len(users),
        }

    def _check_remote(self, server_name: str) -> None:
        try:
            check_server_name(server_name)
        except InvalidServerName as e:
            raise _bad(str(e)) from e
        if server_name.lower() == self._synapse.server_name.lower():
            raise _bad(f"{server_name} is this homeserver, whose device lists are never stale")

    async def _server_body(self, server: RemoteServer, repair: Repair | None) -> dict[str, Any]:
        destination = await self._device_lists.destination(server.server_name)
        return {
            "server_name": server.server_name,
            "tracked_users": len(server.tracked_users),
            "stale_users": server.stale_users,
            "oldest_stale_since_ts": server.oldest_stale_since_ms,
            "last_repair": _repair_body(repair),
            "server": destination_body(destination),
        }


class FetchRecorder:
    """Records when each remote user's device list was last fetched, and the last failure,
    for the status endpoint: in whichever process fetches (the main process, or the first
    `device_lists` writer), whoever asked for the fetch."""

    def __init__(self, synapse: Synapse, store: Store) -> None:
        self._synapse = synapse
        self._store = store
        synapse.device_lists().observe_fetches(self._on_fetch)

    def _on_fetch(self, user_id: str, failure: ResyncFailure | None) -> None:
        # Not awaited: the fetch's caller must not wait for, or fail with, the record.
        self._synapse.run_in_background(
            "synapse_xsign_uia_record_device_list_fetch",
            self._record,
            user_id,
            self._synapse.now_ms(),
            failure,
        )

    async def _record(self, user_id: str, now_ms: int, failure: ResyncFailure | None) -> None:
        try:
            await self._store.record_fetch(
                user_id,
                now_ms,
                None if failure is None else failure.reason.value,
                None if failure is None else failure.detail,
            )
        except Exception:
            logger.warning("Recording the fetch of %s's device list failed", user_id, exc_info=True)


def serve_device_list_admin(synapse: Synapse, store: Store) -> list[Any]:
    """Serve the endpoints with Synapse's admin API; the routes, for the self-check."""
    admin = DeviceListAdmin(synapse, store)
    return [
        synapse.add_admin_route(name, pattern, handlers)
        for name, pattern, handlers in admin.routes.values()
    ]
