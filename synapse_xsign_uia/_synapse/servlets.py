"""Taking over one of Synapse's servlets.

Synapse's client and admin resources are Twisted leaf resources, so a module resource
registered beneath them is never reached. What works on every supported release is to
replace the class that Synapse's `register_servlets` looks up when it builds the listeners
(modules load just before): a subclass of the native servlet, so that everything the module
does not answer itself stays Synapse's.
"""

from __future__ import annotations

import enum
import importlib
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from synapse_xsign_uia._synapse.requests import rewind
from synapse_xsign_uia._synapse.support import resolve

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

Answer = tuple[int, Any]
# Synapse's own handling of the request, for a module handler that passes it on.
Native = Callable[["SynapseRequest"], Awaitable[Answer]]
# A module handler: the request, Synapse's own handling of it, then the path's arguments
# by name.
Handler = Callable[..., Awaitable[Answer]]


class NativeServlet(enum.Enum):
    """The servlets the module takes over, by the name `register_servlets` looks up. For the
    admin servlet that is the name in `synapse.rest.admin`, not `synapse.rest.admin.users`:
    replacing the other one changes nothing, silently."""

    UPLOAD = "synapse.rest.client.keys:SigningKeyUploadServlet"
    ADMIN_WINDOW = "synapse.rest.admin:UserReplaceMasterCrossSigningKeyRestServlet"

    @property
    def description(self) -> str:
        if self is NativeServlet.UPLOAD:
            return "the cross-signing upload servlet"
        return "the replacement-window admin servlet"


def native_class(servlet: NativeServlet) -> Any:
    found = resolve(servlet.value)
    # A second module instance in the same process finds a replacement already installed.
    return getattr(found, "native_class", found)


# The module's state on one homeserver is kept on the homeserver object itself, so that it
# lives and dies with it: the classes and functions installed in Synapse's modules are
# process-wide, and a reference from them would keep a shut-down homeserver alive (Synapse
# can shut a homeserver down and build another in the same process).
_ON_HS = "_synapse_xsign_uia_servlets"


class Replacement:
    """The module's handlers of one native servlet on one homeserver, and how many servlets
    Synapse built with them (for the start-up self-check)."""

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self.handlers = dict(handlers)
        self.instances = 0


def _replacements(hs: Any) -> dict[NativeServlet, Replacement]:
    found: dict[NativeServlet, Replacement] | None = getattr(hs, _ON_HS, None)
    if found is None:
        found = {}
        setattr(hs, _ON_HS, found)
    return found


def _method(native: Any, name: str) -> Callable[..., Awaitable[Answer]]:
    async def on_method(self: Any, request: SynapseRequest, **path_args: str) -> Answer:
        async def pass_on(passed: SynapseRequest) -> Answer:
            rewind(passed)
            return await getattr(native, name)(self, passed, **path_args)  # type: ignore[no-any-return]

        replacement: Replacement | None = self.xsign_uia_replacement
        handler = None if replacement is None else replacement.handlers.get(name)
        if handler is None:
            # A homeserver of this process that does not load the module.
            return await getattr(native, name)(self, request, **path_args)  # type: ignore[no-any-return]
        return await handler(request, pass_on, **path_args)

    # What Synapse's own servlets do: an incomplete UIA is answered with its 401 challenge.
    wrapped: Callable[..., Awaitable[Answer]] = resolve(
        "synapse.rest.client._base:interactive_auth_handler"
    )(on_method)
    return wrapped


def replace_servlet(
    hs: Any,
    servlet: NativeServlet,
    handlers: Mapping[str, Handler],
    patterns: Sequence[re.Pattern[str]] | None = None,
) -> Replacement:
    """Have the servlets Synapse builds for `hs` from now on call the module's handlers for
    the methods `handlers` names (`on_POST`, ...): a subclass of `servlet`, installed once
    per process, finds them on the homeserver it is built for.

    The subclass keeps the native class name, so Synapse's per-servlet request metrics stay
    continuous.
    """
    replacement = Replacement(handlers)
    _replacements(hs)[servlet] = replacement
    module_name, _, attribute = servlet.value.partition(":")
    module = importlib.import_module(module_name)
    if getattr(getattr(module, attribute), "native_class", None) is not None:
        return replacement
    native = native_class(servlet)

    def __init__(self: Any, hs: Any) -> None:
        native.__init__(self, hs)
        found = _replacements(hs).get(servlet)
        self.xsign_uia_replacement = found
        if found is not None:
            found.instances += 1

    namespace: dict[str, Any] = {
        "__init__": __init__,
        "__module__": __name__,
        "native_class": native,
        **{name: _method(native, name) for name in handlers},
    }
    if patterns is not None:
        namespace["PATTERNS"] = list(patterns)
    setattr(module, attribute, type(native.__name__, (native,), namespace))
    return replacement


def was_built(replacement: Replacement) -> bool:
    """Whether Synapse built the servlet with the module's handlers for a listener."""
    return replacement.instances > 0


# Synapse builds its admin API by calling this, on every supported release, with the admin
# resource of each listener that serves it: a module resource cannot sit beneath that
# resource, but a path registered on it is served like Synapse's own admin endpoints.
ADMIN_REGISTER = "synapse.rest.admin:register_servlets"


class AdminRoute:
    """A path of the module's own under `/_synapse/admin/`, with a handler per method
    (`GET`, `POST`, ...), each called with the request and the path's arguments by name."""

    def __init__(
        self, name: str, pattern: re.Pattern[str], handlers: Mapping[str, Handler]
    ) -> None:
        self.name = name
        self.pattern = pattern
        self.handlers = dict(handlers)
        self.registrations = 0

    def register(self, http_server: Any) -> None:
        for method, handler in self.handlers.items():
            http_server.register_paths(method, [self.pattern], handler, self.name)
        self.registrations += 1


_ROUTES_ON_HS = "_synapse_xsign_uia_admin_routes"


def add_admin_route(hs: Any, route: AdminRoute) -> None:
    """Have Synapse serve `route` wherever it serves the admin API of `hs` (the main
    process), by wrapping, once per process, the function with which it registers its admin
    servlets."""
    routes: list[AdminRoute] | None = getattr(hs, _ROUTES_ON_HS, None)
    if routes is None:
        routes = []
        setattr(hs, _ROUTES_ON_HS, routes)
    routes.append(route)
    module_name, _, attribute = ADMIN_REGISTER.partition(":")
    module = importlib.import_module(module_name)
    native = getattr(module, attribute)
    if getattr(native, "xsign_uia_wrapped", False):
        return

    def register_servlets(hs: Any, http_server: Any) -> None:
        native(hs, http_server)
        # Synapse serves its admin API from the main process only.
        if hs.config.worker.worker_app is None:
            for added_route in getattr(hs, _ROUTES_ON_HS, ()):
                added_route.register(http_server)

    register_servlets.xsign_uia_wrapped = True  # type: ignore[attr-defined]
    setattr(module, attribute, register_servlets)
