"""Who sent a request, as Synapse authenticates it, with a 401 where Synapse would fail with
a 500 on a malformed access token."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs
from synapse.module_api.errors import SynapseError

from synapse_xsign_uia._synapse.support import resolve

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest
    from synapse.module_api import ModuleApi
    from synapse.server import HomeServer


@attrs.frozen
class Caller:
    """The authenticated sender of a request."""

    user_id: str
    # The device of the access token; None for an application service's own token.
    device_id: str | None
    # The client's address, as Synapse sees it (behind a proxy with `x_forwarded`).
    ip_address: str
    # An application service acting for the user.
    is_appservice: bool
    # Whether the request came with an access token of the user's own (an application
    # service's has none), which Synapse's UIA needs.
    has_user_token: bool
    # Synapse's requester, handed back to the seam's verbs that need it.
    requester: Any = attrs.field(repr=False, eq=False)


def _ip_address(request: SynapseRequest) -> str:
    # Synapse's request gives the client's address from `X-Forwarded-For` where the listener
    # trusts it.
    client: Any = request
    return str(getattr(client.getClientAddress(), "host", "unknown"))


def _caller(requester: Any, request: SynapseRequest) -> Caller:
    device_id = getattr(requester, "device_id", None)
    return Caller(
        user_id=requester.user.to_string(),
        device_id=None if device_id is None else str(device_id),
        ip_address=_ip_address(request),
        # `app_service` up to Synapse 1.140, `app_service_id` after.
        is_appservice=bool(
            getattr(requester, "app_service_id", None) or getattr(requester, "app_service", None)
        ),
        has_user_token=bool(getattr(requester, "access_token_id", None)),
        requester=requester,
    )


def rewind(request: SynapseRequest) -> None:
    """Let a native handler read the request body and authenticate the request again.

    Synapse records the requester on the request once and asserts that it happens only
    once; the native handler's own authentication records the same requester again.
    """
    content: Any = request.content
    content.seek(0)
    if getattr(request, "_requester", None) is not None:
        request._requester = None  # type: ignore[attr-defined]


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


class Requests:
    """Authentication of the requests the module serves."""

    def __init__(self, api: ModuleApi, hs: HomeServer) -> None:
        self._api = api
        self._auth: Any = hs.get_auth()

    async def caller(self, request: SynapseRequest) -> Caller:
        """The sender of `request` (`ModuleApi.get_user_by_req`)."""
        requester = await _authenticate(request, lambda: self._api.get_user_by_req(request))
        return _caller(requester, request)

    async def admin(self, request: SynapseRequest) -> Caller:
        """The sender of `request` if a server admin, else 403; Synapse's own check, so that
        tokens that are admin by scope rather than by the `admin` flag (delegated auth)
        count too."""
        requester = await _authenticate(request, lambda: self._auth.get_user_by_req(request))
        await resolve("synapse.rest.admin._base:assert_user_is_admin")(self._auth, requester)
        return _caller(requester, request)

    async def is_admin(self, caller: Caller) -> bool:
        """Synapse's own test, so that admins by token scope (delegated auth) count too."""
        return bool(await self._auth.is_server_admin(caller.requester))
