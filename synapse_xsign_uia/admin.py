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

from synapse.module_api import UserID
from synapse.module_api.errors import Codes, SynapseError

from synapse_xsign_uia import _synapse, metrics
from synapse_xsign_uia.config import Config
from synapse_xsign_uia.policy import window_open

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest
    from synapse.module_api import ModuleApi

logger = logging.getLogger(__name__)

DURATION_FIELD = "duration_ms"

# Synapse 1.98's pattern has no `$`, so it also answered paths with trailing segments.
PATTERNS = [
    re.compile(
        "^/_synapse/admin/v1/users/(?P<user_id>[^/]*)/_allow_cross_signing_replacement_without_uia$"
    )
]

Response = tuple[int, dict[str, Any]]


def parse_duration(body: dict[str, Any], default_ms: int, max_ms: int) -> int:
    """The window length a `POST` body asks for, in milliseconds."""
    if DURATION_FIELD not in body:
        return default_ms
    value = body[DURATION_FIELD]
    # JSON `true` is a Python bool, which is an int; `1000.0` is a float, however whole.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= max_ms:
        raise SynapseError(
            HTTPStatus.BAD_REQUEST,
            f"'{DURATION_FIELD}' must be a positive integer number of milliseconds, at most "
            f"max_replacement_window ({max_ms} ms); got {value!r}",
            Codes.INVALID_PARAM,
        )
    return value


class ReplacementWindowAdmin:
    """The endpoint's logic for one homeserver (the main process)."""

    def __init__(self, config: Config, api: ModuleApi, internals: _synapse.Internals) -> None:
        self._config = config
        self._api = api
        self._internals = internals
        self._windows = internals.windows
        self._metrics = metrics.for_server(api.server_name)

    async def _target(self, request: SynapseRequest, user_id: str) -> tuple[str, str]:
        """The admin's ID and the canonical ID of the local user the request is about.

        Authentication comes first, so that nobody without an admin token learns whether a
        user exists.
        """
        requester = await _synapse.require_admin(self._internals.hs, request)
        target = UserID.from_string(user_id)  # 400 M_INVALID_PARAM when malformed
        if not self._api.is_mine(target):
            raise SynapseError(
                HTTPStatus.BAD_REQUEST,
                "Only local users can be granted a cross-signing replacement window",
                Codes.INVALID_PARAM,
            )
        return requester.user.to_string(), target.to_string()

    async def _existing(self, user_id: str) -> str:
        canonical = await self._api.check_user_exists(user_id)
        if canonical is None:
            raise SynapseError(HTTPStatus.NOT_FOUND, "User not found", Codes.NOT_FOUND)
        return canonical

    @staticmethod
    def _no_master_key() -> SynapseError:
        return SynapseError(
            HTTPStatus.NOT_FOUND, "User has no master cross-signing key", Codes.NOT_FOUND
        )

    async def grant(self, request: SynapseRequest, user_id: str) -> Response:
        admin, target = await self._target(request, user_id)
        body = _synapse.parse_json_object(request, allow_empty_body=True)
        duration_ms = parse_duration(
            body, self._config.replacement_window_ms, self._config.max_replacement_window_ms
        )
        target = await self._existing(target)
        # Under the upload lock, an upload already deciding finishes before the grant lands.
        async with self._internals.upload_lock(target):
            window = await self._windows.grant(target, duration_ms, admin)
        if window is None or window.expires_ms is None:
            raise self._no_master_key()
        logger.info(
            "Cross-signing replacement window granted: admin=%s user=%s master_key=%s "
            "duration_ms=%d expires_ms=%d",
            admin,
            target,
            window.master_key,
            duration_ms,
            window.expires_ms,
        )
        self._metrics.admin_window(metrics.GRANT)
        return HTTPStatus.OK, {"updatable_without_uia_before_ms": window.expires_ms}

    async def status(self, request: SynapseRequest, user_id: str) -> Response:
        _, target = await self._target(request, user_id)
        target = await self._existing(target)
        window = await self._windows.read(target)
        if window is None:
            raise self._no_master_key()
        return HTTPStatus.OK, {
            "updatable_without_uia_before_ms": window.expires_ms,
            # The upload decision's comparison, on the same clock.
            "replaceable_without_uia": window_open(window.expires_ms, self._internals.now_ms()),
        }

    async def revoke(self, request: SynapseRequest, user_id: str) -> Response:
        admin, target = await self._target(request, user_id)
        target = await self._existing(target)
        # Under the upload lock: once this answers, no upload can still use the window.
        async with self._internals.upload_lock(target):
            before = await self._windows.revoke(target)
        if before is None:
            raise self._no_master_key()
        was_open = window_open(before.expires_ms, self._internals.now_ms())
        logger.info(
            "Cross-signing replacement window revoked: admin=%s user=%s master_key=%s "
            "was_open=%s expires_ms=%s",
            admin,
            target,
            before.master_key,
            was_open,
            before.expires_ms,
        )
        self._metrics.admin_window(metrics.REVOKE)
        return HTTPStatus.OK, {}


def build_admin_window_servlet(admin: ReplacementWindowAdmin) -> type:
    """A subclass of Synapse's own servlet for the endpoint, answering `POST`, `GET` and
    `DELETE`.

    It keeps the native class name, so Synapse's per-servlet request metrics stay continuous.
    """
    native: Any = _synapse.native_admin_window_servlet()

    class UserReplaceMasterCrossSigningKeyRestServlet(native):  # type: ignore[misc,valid-type]
        native_class = native
        instances = 0

        def __init__(self, hs: Any) -> None:
            super().__init__(hs)
            UserReplaceMasterCrossSigningKeyRestServlet.instances += 1

        async def on_POST(self, request: SynapseRequest, user_id: str) -> Response:
            return await admin.grant(request, user_id)

        async def on_GET(self, request: SynapseRequest, user_id: str) -> Response:
            return await admin.status(request, user_id)

        async def on_DELETE(self, request: SynapseRequest, user_id: str) -> Response:
            return await admin.revoke(request, user_id)

    UserReplaceMasterCrossSigningKeyRestServlet.PATTERNS = PATTERNS
    UserReplaceMasterCrossSigningKeyRestServlet.__module__ = __name__
    return UserReplaceMasterCrossSigningKeyRestServlet
