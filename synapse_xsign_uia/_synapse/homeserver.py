"""`Synapse`: the one object through which the module reaches the running homeserver.

Created once, by the module's entry point, and passed to every part that needs Synapse. It
offers verbs and facts about the deployment, and knows none of the module's rules.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from synapse.module_api import DirectServeJsonResource

from synapse_xsign_uia._synapse.device_lists import DeviceLists
from synapse_xsign_uia._synapse.keys import CrossSigningKeys
from synapse_xsign_uia._synapse.notices import ServerNotices
from synapse_xsign_uia._synapse.reactor import (
    Started,
    run_after_response,
    run_in_background,
    sleep,
)
from synapse_xsign_uia._synapse.requests import Requests
from synapse_xsign_uia._synapse.servlets import (
    AdminRoute,
    Handler,
    NativeServlet,
    Replacement,
    add_admin_route,
    replace_servlet,
)
from synapse_xsign_uia._synapse.support import check_internals, writes_keys

if TYPE_CHECKING:
    import re

    from synapse.http.site import SynapseRequest
    from synapse.module_api import ModuleApi
    from synapse.server import HomeServer

T = TypeVar("T")


def _delegated_auth(hs: HomeServer) -> bool:
    config: Any = hs.config
    mas = getattr(config, "mas", None)
    if mas is not None and getattr(mas, "enabled", False):
        return True
    msc3861 = getattr(config.experimental, "msc3861", None)
    return bool(msc3861 is not None and getattr(msc3861, "enabled", False))


def _listener_resources(hs: HomeServer) -> set[str]:
    names: set[str] = set()
    for listener in hs.config.server.listeners:
        options = getattr(listener, "http_options", None)
        for resource in getattr(options, "resources", ()) or ():
            names.update(resource.names)
    return names


class _JsonResource(DirectServeJsonResource):
    """A Twisted leaf resource: it gets every path below the one it is registered at."""

    isLeaf = True

    def __init__(
        self, clock: Any, on_get: Callable[[SynapseRequest], Awaitable[tuple[int, Any]]]
    ) -> None:
        # Newer Synapse releases take the homeserver's clock here; older ones have no such
        # argument.
        if "clock" in inspect.signature(DirectServeJsonResource.__init__).parameters:
            super().__init__(clock=clock)
        else:
            super().__init__()
        self._on_get = on_get

    async def _async_render_GET(self, request: SynapseRequest) -> tuple[int, Any]:
        return await self._on_get(request)


class Synapse:
    """The running homeserver, as the module sees it."""

    def __init__(self, api: ModuleApi) -> None:
        hs: HomeServer = api._hs
        check_internals(hs)
        self._api = api
        self._hs = hs
        self._clock: Any = hs.get_clock()
        self._store: Any = hs.get_datastores().main
        self._device_lists: DeviceLists | None = None
        config: Any = hs.config
        self.server_name: str = api.server_name
        # This process's name among the homeserver's processes (`master` for the main one).
        self.instance_name = str(getattr(config.worker, "instance_name", None) or "master")
        # Synapse serves its admin API, and sends server notices, from the main process.
        self.is_main_process: bool = config.worker.worker_app is None
        # Workers need Redis replication, so without Redis this process is the only writer.
        self.with_workers = bool(config.worker.worker_app is not None or config.redis.redis_enabled)
        # Authentication delegated to the Matrix Authentication Service (or MSC3861).
        self.delegated_auth = _delegated_auth(hs)
        self.requests = Requests(api, hs)
        self.keys = CrossSigningKeys(api, hs, with_workers=self.with_workers)
        self.notices = ServerNotices(hs)

    def device_lists(self) -> DeviceLists:
        """Remote users' device lists (the resync and repair endpoints' verbs), set up on
        first use."""
        if self._device_lists is None:
            self._device_lists = DeviceLists(self._api, self._hs)
        return self._device_lists

    # Servlets and resources.

    def replace_servlet(
        self,
        servlet: NativeServlet,
        handlers: Mapping[str, Handler],
        patterns: Sequence[re.Pattern[str]] | None = None,
    ) -> Replacement:
        return replace_servlet(self._hs, servlet, handlers, patterns)

    def serves(self, servlet: NativeServlet) -> bool:
        """Whether Synapse builds `servlet` in this process, by its configuration."""
        if servlet is NativeServlet.ADMIN_WINDOW:
            return self.serves_admin_api
        return "client" in _listener_resources(self._hs) and writes_keys(self._hs)

    @property
    def serves_admin_api(self) -> bool:
        """Whether this process serves Synapse's admin API (the main process, on its client
        listeners)."""
        return self.is_main_process and "client" in _listener_resources(self._hs)

    def add_admin_route(
        self, name: str, pattern: re.Pattern[str], handlers: Mapping[str, Handler]
    ) -> AdminRoute:
        """Serve `pattern` under `/_synapse/admin/` with Synapse's admin API; `name` names
        it in Synapse's request metrics. `route.registrations` counts the listeners that
        serve it, for the start-up self-check."""
        route = AdminRoute(name, pattern, handlers)
        add_admin_route(self._hs, route)
        return route

    def serve_json(
        self, path: str, on_get: Callable[[SynapseRequest], Awaitable[tuple[int, Any]]]
    ) -> None:
        """Serve `GET` on `path` and every path below it (a new top-level path: Synapse's own
        resources cannot take module resources beneath them) with JSON answers."""
        self._api.register_web_resource(path, _JsonResource(self._clock, on_get))

    # Users.

    def is_mine(self, user_id: str) -> bool:
        return self._api.is_mine(user_id)

    async def existing_user(self, user_id: str) -> str | None:
        """The user's ID as registered (Synapse matches IDs case-insensitively), or None."""
        return await self._api.check_user_exists(user_id)

    async def device_display_name(self, user_id: str, device_id: str) -> str | None:
        """The display name the user gave the device; None when it has none (or is gone)."""
        device = await self._store.get_device(user_id, device_id)
        name = device.get("display_name") if device else None
        return None if name is None else str(name)

    # Email.

    @property
    def can_send_email(self) -> bool:
        """Whether homeserver.yaml's `email` section lets Synapse send email (it needs at
        least `notif_from`)."""
        config: Any = self._hs.config
        return getattr(config.email, "email_notif_from", None) is not None

    async def email_addresses(self, user_id: str) -> list[str]:
        """The user's email addresses; Synapse stores only verified ones."""
        threepids = await self._api.get_threepids_for_user(user_id)
        return [str(t["address"]) for t in threepids if t.get("medium") == "email"]

    async def send_email(self, address: str, subject: str, html: str, text: str) -> None:
        """Send an email from the homeserver (`email.notif_from`), through its SMTP server."""
        await self._api.send_mail(address, subject, html, text)

    # Time, background work and the database.

    def now_ms(self) -> int:
        return int(self._clock.time_msec())

    def call_later(self, delay_s: float, callback: Callable[..., object], *args: Any) -> Any:
        """The reactor's `callLater`: the callback runs in no logcontext. Synapse's own
        `Clock.call_later` changed its signature between the supported releases."""
        reactor: Any = self._hs.get_reactor()
        return reactor.callLater(delay_s, callback, *args)

    async def sleep(self, seconds: float) -> None:
        await sleep(self._hs.get_reactor(), seconds)

    def stop(self) -> None:
        """Stop the homeserver."""
        reactor: Any = self._hs.get_reactor()
        reactor.stop()

    def run_in_background(
        self, desc: str, func: Callable[..., Awaitable[object]], *args: Any
    ) -> None:
        run_in_background(self._api, desc, func, *args)

    def run_after_response(
        self,
        request: SynapseRequest,
        desc: str,
        func: Callable[..., Awaitable[object]],
        *args: Any,
    ) -> None:
        """Run `func(*args)` in the background once the response to `request` is on its
        way, so that its work does not hold the response up."""
        run_after_response(self._api, self._hs.get_reactor(), request, desc, func, *args)

    def start(self, func: Callable[..., Awaitable[T]], *args: Any) -> Started[T]:
        """Start `func(*args)` now, for the request being served, to await or discard once
        the request has done what it does meanwhile."""
        return Started(func, *args)

    def run_periodically(self, desc: str, func: Callable[[], Awaitable[object]], ms: int) -> None:
        """Run `func` every `ms` milliseconds in this process."""
        self._api.looping_background_call(func, ms, desc=desc, run_on_all_instances=True)

    async def run_db_interaction(self, desc: str, func: Callable[..., T], *args: Any) -> T:
        """Run `func(cursor, *args)` in one database transaction."""
        return await self._api.run_db_interaction(desc, func, *args)

    async def run_db_statement(self, desc: str, func: Callable[..., T], *args: Any) -> T:
        """Run `func(cursor, *args)`, whose statements each stand on their own, without a
        transaction around them: one statement is atomic on its own, and a transaction costs
        two more round trips to the database. (On SQLite they run in one transaction.)"""
        result: T = await self._api.run_db_interaction(desc, func, *args, db_autocommit=True)
        return result
