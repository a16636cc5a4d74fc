"""Reading a request as Synapse would, with a 4xx where Synapse would fail with a 500:
its body, and who sent it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from synapse.module_api.errors import SynapseError

from synapse_xsign_uia._synapse.support import resolve
from synapse_xsign_uia.body import read_json_object
from synapse_xsign_uia.validation import RequestError

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest
    from synapse.module_api import ModuleApi
    from synapse.server import HomeServer


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
