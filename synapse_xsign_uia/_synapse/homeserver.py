"""The homeserver process: which servlets Synapse installs, how it is deployed (workers,
delegated auth), its reactor and its background runner."""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from synapse_xsign_uia._synapse.support import resolve

if TYPE_CHECKING:
    from synapse.module_api import ModuleApi
    from synapse.server import HomeServer


def install_servlet(name: str, replacement: type) -> type:
    """Put `replacement` where Synapse's `register_servlets` looks `name` up, and return the
    native class it replaces."""
    module_name, _, attr = name.partition(":")
    module = importlib.import_module(module_name)
    native: type = getattr(module, attr)
    if native is not replacement:
        setattr(module, attr, replacement)
    return native


def native_upload_servlet() -> type:
    cls: type = resolve("synapse.rest.client.keys:SigningKeyUploadServlet")
    # A second module instance in the same process finds our class already installed.
    return getattr(cls, "native_class", cls)


def interactive_auth_handler() -> Callable[[Any], Any]:
    return resolve("synapse.rest.client._base:interactive_auth_handler")  # type: ignore[no-any-return]


def is_appservice(requester: Any) -> bool:
    # `app_service` up to Synapse 1.140, `app_service_id` after.
    return bool(
        getattr(requester, "app_service_id", None) or getattr(requester, "app_service", None)
    )


def delegated_auth_enabled(hs: HomeServer) -> bool:
    config: Any = hs.config
    mas = getattr(config, "mas", None)
    if mas is not None and getattr(mas, "enabled", False):
        return True
    msc3861 = getattr(config.experimental, "msc3861", None)
    return bool(msc3861 is not None and getattr(msc3861, "enabled", False))


def runs_with_workers(hs: HomeServer) -> bool:
    """Workers need Redis replication, so without Redis this process is the only writer."""
    config: Any = hs.config
    return bool(config.worker.worker_app is not None or config.redis.redis_enabled)


def call_soon(hs: HomeServer, callback: Callable[[], None]) -> None:
    reactor: Any = hs.get_reactor()
    reactor.callLater(0, callback)


def stop_reactor(hs: HomeServer) -> None:
    reactor: Any = hs.get_reactor()
    reactor.stop()


def is_main_process(hs: HomeServer) -> bool:
    return hs.config.worker.worker_app is None


def listener_resources(hs: HomeServer) -> set[str]:
    names: set[str] = set()
    for listener in hs.config.server.listeners:
        options = getattr(listener, "http_options", None)
        for resource in getattr(options, "resources", ()) or ():
            names.update(resource.names)
    return names


ADMIN_WINDOW_SERVLET = "synapse.rest.admin:UserReplaceMasterCrossSigningKeyRestServlet"


def native_admin_window_servlet() -> type:
    cls: type = resolve(ADMIN_WINDOW_SERVLET)
    # A second module instance in the same process finds our class already installed.
    return getattr(cls, "native_class", cls)


def call_later(hs: HomeServer, delay_s: float, callback: Callable[..., object], *args: Any) -> Any:
    """The reactor's `callLater`: the callback runs in no logcontext. Synapse's own
    `Clock.call_later` changed its signature between the supported releases."""
    reactor: Any = hs.get_reactor()
    return reactor.callLater(delay_s, callback, *args)


def run_as_background_process(
    api: ModuleApi, desc: str, func: Callable[..., Awaitable[object]], *args: Any
) -> None:
    """Run `func` in its own logcontext, not awaited. A `ModuleApi` method in newer
    releases; before, only the module-level function (deprecated since)."""
    method = getattr(api, "run_as_background_process", None)
    if method is not None:
        method(desc, func, *args)
        return
    from synapse.module_api import run_as_background_process as run

    run(desc, func, *args)
