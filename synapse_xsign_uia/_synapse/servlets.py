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


def _method(native: Any, name: str, handler: Handler) -> Callable[..., Awaitable[Answer]]:
    async def on_method(self: Any, request: SynapseRequest, **path_args: str) -> Answer:
        async def pass_on(passed: SynapseRequest) -> Answer:
            rewind(passed)
            return await getattr(native, name)(self, passed, **path_args)  # type: ignore[no-any-return]

        return await handler(request, pass_on, **path_args)

    # What Synapse's own servlets do: an incomplete UIA is answered with its 401 challenge.
    wrapped: Callable[..., Awaitable[Answer]] = resolve(
        "synapse.rest.client._base:interactive_auth_handler"
    )(on_method)
    return wrapped


def replace_servlet(
    servlet: NativeServlet,
    handlers: Mapping[str, Handler],
    patterns: Sequence[re.Pattern[str]] | None = None,
) -> type:
    """Install a subclass of `servlet` whose `on_<METHOD>`s (the keys of `handlers`) call the
    module's handlers, and return it.

    The subclass keeps the native class name, so Synapse's per-servlet request metrics stay
    continuous, and counts its instances, so that the start-up self-check can tell whether
    Synapse built it.
    """
    native = native_class(servlet)

    def __init__(self: Any, hs: Any) -> None:
        native.__init__(self, hs)
        type(self).instances += 1

    namespace: dict[str, Any] = {
        "__init__": __init__,
        "__module__": __name__,
        "native_class": native,
        "instances": 0,
        **{name: _method(native, name, handler) for name, handler in handlers.items()},
    }
    if patterns is not None:
        namespace["PATTERNS"] = list(patterns)
    replacement = type(native.__name__, (native,), namespace)
    module_name, _, attribute = servlet.value.partition(":")
    setattr(importlib.import_module(module_name), attribute, replacement)
    return replacement


def was_built(replacement: type) -> bool:
    """Whether Synapse instantiated `replacement` for one of its listeners."""
    return int(getattr(replacement, "instances", 0)) > 0


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


def add_admin_route(route: AdminRoute) -> None:
    """Have Synapse serve `route` wherever it serves its admin API (the main process), by
    wrapping the function with which it registers its admin servlets."""
    module_name, _, attribute = ADMIN_REGISTER.partition(":")
    module = importlib.import_module(module_name)
    current = getattr(module, attribute)
    routes: list[AdminRoute] | None = getattr(current, "xsign_uia_routes", None)
    if routes is None:
        native = current
        added: list[AdminRoute] = []

        def register_servlets(hs: Any, http_server: Any) -> None:
            native(hs, http_server)
            # Synapse serves its admin API from the main process only.
            if hs.config.worker.worker_app is None:
                for added_route in added:
                    added_route.register(http_server)

        register_servlets.xsign_uia_routes = added  # type: ignore[attr-defined]
        setattr(module, attribute, register_servlets)
        routes = added
    routes.append(route)
