"""`/_synapse/admin/v1/users/<user_id>/_allow_cross_signing_replacement_without_uia`: grant
(`POST`), inspect (`GET`) and revoke (`DELETE`) a window in which the user may replace their
master cross-signing key without User-Interactive Auth.

Synapse stores such a grant but honours it only under delegated auth; the upload servlet
(decision-table row 5) honours it on every deployment. `POST` keeps Synapse's documented
request and response, so the Matrix Authentication Service and existing scripts keep working.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from synapse.module_api.errors import Codes, SynapseError

from synapse_xsign_uia import metrics, validation
from synapse_xsign_uia.errors import matrix_error, read_json_body
from synapse_xsign_uia.outcomes import AdminAction
from synapse_xsign_uia.policy import window_open
from synapse_xsign_uia.user_ids import InvalidUserId, parse_user_id

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

    from synapse_xsign_uia._synapse import Native, Synapse
    from synapse_xsign_uia.config import Config
    from synapse_xsign_uia.store import Store, Window
    from synapse_xsign_uia.user_lock import UserLock

logger = logging.getLogger(__name__)

# Synapse 1.98's pattern has no `$`, so it also answered paths with trailing segments.
PATTERNS = [
    re.compile(
        "^/_synapse/admin/v1/users/(?P<user_id>[^/]*)/_allow_cross_signing_replacement_without_uia$"
    )
]

Response = tuple[int, dict[str, Any]]


def _no_master_key() -> SynapseError:
    return SynapseError(
        HTTPStatus.NOT_FOUND, "User has no master cross-signing key", Codes.NOT_FOUND
    )


class ReplacementWindowAdmin:
    """The endpoint, on the main process (Synapse serves its admin API there)."""

    def __init__(self, config: Config, synapse: Synapse, store: Store, lock: UserLock) -> None:
        self._config = config
        self._synapse = synapse
        self._store = store
        self._lock = lock
        self._metrics = metrics.for_server(synapse.server_name)

    @property
    def handlers(self) -> dict[str, Any]:
        """The servlet's methods."""
        return {"on_POST": self.grant, "on_GET": self.status, "on_DELETE": self.revoke}

    async def _target(self, request: SynapseRequest, user_id: str) -> tuple[str, str]:
        """The admin's ID and the local user the request is about.

        Authentication comes first, so that nobody without an admin token learns whether a
        user exists.
        """
        admin = await self._synapse.requests.admin(request)
        try:
            parse_user_id(user_id)
        except InvalidUserId as e:
            raise SynapseError(HTTPStatus.BAD_REQUEST, str(e), Codes.INVALID_PARAM) from e
        if not self._synapse.is_mine(user_id):
            # As Synapse answers, and documents: no such user here.
            raise SynapseError(
                HTTPStatus.NOT_FOUND,
                f"User not found: {user_id} is not a user of this homeserver",
                Codes.NOT_FOUND,
            )
        return admin.user_id, user_id

    async def _registered(self, user_id: str) -> str:
        """The user's ID as registered (Synapse matches IDs case-insensitively), or 404."""
        registered = await self._synapse.existing_user(user_id)
        if registered is None:
            raise SynapseError(HTTPStatus.NOT_FOUND, "User not found", Codes.NOT_FOUND)
        return registered

    async def grant(self, request: SynapseRequest, _native: Native, user_id: str) -> Response:
        admin, target = await self._target(request, user_id)
        body = read_json_body(request, allow_empty_body=True)
        try:
            duration_ms = validation.window_duration_ms(
                body, self._config.replacement_window_ms, self._config.max_replacement_window_ms
            )
        except validation.RequestError as e:
            raise matrix_error(e) from e
        target = await self._registered(target)
        # Under the upload lock, an upload already deciding finishes before the grant lands.
        async with self._lock.hold(target):
            now_ms = self._synapse.now_ms()
            window = await self._store.grant_window(target, now_ms + duration_ms, admin, now_ms)
        if window is None or window.expires_ms is None:
            raise _no_master_key()
        logger.info(
            "Cross-signing replacement window granted: admin=%s user=%s master_key=%s "
            "duration_ms=%d expires_ms=%d",
            admin,
            target,
            window.master_key,
            duration_ms,
            window.expires_ms,
        )
        self._metrics.admin_window(AdminAction.GRANT)
        return HTTPStatus.OK, {"updatable_without_uia_before_ms": window.expires_ms}

    async def status(self, request: SynapseRequest, _native: Native, user_id: str) -> Response:
        _, target = await self._target(request, user_id)
        window = await self._store.read_window(await self._registered(target))
        if window is None:
            raise _no_master_key()
        return HTTPStatus.OK, {
            "updatable_without_uia_before_ms": window.expires_ms,
            # The upload decision's comparison, on the same clock.
            "replaceable_without_uia": window_open(window.expires_ms, self._synapse.now_ms()),
        }

    async def revoke(self, request: SynapseRequest, _native: Native, user_id: str) -> Response:
        admin, target = await self._target(request, user_id)
        target = await self._registered(target)
        # Under the upload lock: once this answers, no upload can still use the window.
        async with self._lock.hold(target):
            before = await self._store.revoke_window(target)
        if before is None:
            raise _no_master_key()
        self._log_revoke(admin, target, before)
        self._metrics.admin_window(AdminAction.REVOKE)
        return HTTPStatus.OK, {}

    def _log_revoke(self, admin: str, target: str, before: Window) -> None:
        logger.info(
            "Cross-signing replacement window revoked: admin=%s user=%s master_key=%s "
            "was_open=%s expires_ms=%s",
            admin,
            target,
            before.master_key,
            window_open(before.expires_ms, self._synapse.now_ms()),
            before.expires_ms,
        )
