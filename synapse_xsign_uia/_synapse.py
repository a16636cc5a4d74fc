"""The one place that touches Synapse's private internals.

Everything the module needs from Synapse beyond the public `ModuleApi` is reached through
here, so that a Synapse upgrade that renames something breaks one file, and the start-up
self-check below says so loudly instead of the module silently doing nothing.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import synapse
from synapse.module_api.errors import ConfigError

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest
    from synapse.module_api import ModuleApi
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

OLDEST_SUPPORTED = (1, 98, 0)
NEWEST_SUPPORTED = (1, 163, 2)
SUPPORTED_RANGE = "Synapse 1.98.0 to 1.163.2"

# Every private name the module relies on: "module:attribute".
REQUIRED_NAMES = (
    "synapse.rest.client.keys:SigningKeyUploadServlet",
    "synapse.rest.client.keys:register_servlets",
    "synapse.rest.client._base:interactive_auth_handler",
    "synapse.rest.admin:UserReplaceMasterCrossSigningKeyRestServlet",
    "synapse.http.servlet:parse_json_object_from_request",
    "synapse.util.async_helpers:Linearizer",
    "synapse.api.errors:InteractiveAuthIncompleteError",
)
REQUIRED_HS_METHODS = (
    "get_datastores",
    "get_e2e_keys_handler",
    "get_auth_handler",
    "get_worker_locks_handler",
    "get_clock",
    "get_reactor",
)
REQUIRED_HANDLER_METHODS = {
    "get_e2e_keys_handler": ("upload_signing_keys_for_user",),
    "get_auth_handler": ("validate_user_via_ui_auth",),
    "get_worker_locks_handler": ("acquire_lock",),
}
REQUIRED_STORE_METHODS = (
    "get_e2e_cross_signing_key",
    "get_master_cross_signing_key_updatable_before",
    "allow_master_cross_signing_key_replacement_without_uia",
)

_LOCK_NAME = "synapse_xsign_uia_upload"


def parse_version(version: str) -> tuple[int, int, int]:
    parts: list[int] = []
    for part in version.split(".")[:3]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    while len(parts) < 3:
        parts.append(0)
    return (parts[0], parts[1], parts[2])


def _unsupported(reason: str) -> ConfigError:
    return ConfigError(
        f"synapse_xsign_uia supports {SUPPORTED_RANGE} and cannot run here: {reason}. "
        "Install a supported Synapse, or a release of the module that supports this one."
    )


def check_synapse_version(version: str | None = None) -> None:
    version = version if version is not None else synapse.__version__
    if not OLDEST_SUPPORTED <= parse_version(version) <= NEWEST_SUPPORTED:
        raise _unsupported(f"this is Synapse {version}")


def resolve(name: str) -> Any:
    module_name, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise _unsupported(f"{module_name}.{attr} is missing") from e


def check_internals(hs: HomeServer) -> None:
    """Refuse to start if any private name the module relies on is missing."""
    for name in REQUIRED_NAMES:
        resolve(name)
    for method in REQUIRED_HS_METHODS:
        if not callable(getattr(hs, method, None)):
            raise _unsupported(f"HomeServer.{method} is missing")
    for getter, methods in REQUIRED_HANDLER_METHODS.items():
        handler = getattr(hs, getter)()
        for method in methods:
            if not callable(getattr(handler, method, None)):
                raise _unsupported(f"{type(handler).__name__}.{method} is missing")
    store = hs.get_datastores().main
    for method in REQUIRED_STORE_METHODS:
        if not callable(getattr(store, method, None)):
            raise _unsupported(f"the main datastore has no {method}")


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


def parse_json_object(request: SynapseRequest) -> dict[str, Any]:
    parse = resolve("synapse.http.servlet:parse_json_object_from_request")
    return parse(request)  # type: ignore[no-any-return]


def rewind_body(request: SynapseRequest) -> None:
    """Let a native handler read the request body again."""
    content: Any = request.content
    content.seek(0)


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


def synapse_version() -> tuple[int, int, int]:
    return parse_version(synapse.__version__)


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


@attrs.frozen
class StoredState:
    """The user's cross-signing keys as stored, read fresh from the database."""

    keys: Mapping[str, Mapping[str, Any]]
    window_expires_ms: int | None
    taken_device_ids: frozenset[str]


class Internals:
    """Access to the parts of a running homeserver that the module needs."""

    def __init__(self, api: ModuleApi) -> None:
        self.hs: HomeServer = api._hs
        self._api = api
        self.store: Any = self.hs.get_datastores().main
        self.e2e_keys_handler: Any = self.hs.get_e2e_keys_handler()
        self.auth_handler: Any = self.hs.get_auth_handler()
        self.clock: Any = self.hs.get_clock()
        self.with_workers = runs_with_workers(self.hs)
        linearizer = resolve("synapse.util.async_helpers:Linearizer")
        self._linearizer = linearizer(name=_LOCK_NAME, clock=self.clock)

    def now_ms(self) -> int:
        return int(self.clock.time_msec())

    @asynccontextmanager
    async def upload_lock(self, user_id: str) -> AsyncIterator[None]:
        """Serialise uploads for one user: in this process always, and across processes
        with Synapse's database-backed worker lock when there are workers."""
        async with self._linearizer.queue(user_id):
            if not self.with_workers:
                yield
                return
            async with self.hs.get_worker_locks_handler().acquire_lock(_LOCK_NAME, user_id):
                yield

    async def cached_keys(self, user_id: str, key_types: Collection[str]) -> dict[str, Any]:
        """Stored keys through Synapse's cache: for read-only answers."""
        found: dict[str, Any] = {}
        for key_type in key_types:
            key = await self.store.get_e2e_cross_signing_key(user_id, key_type)
            if key is not None:
                found[key_type] = key
        return found

    async def read_stored_state(self, user_id: str, device_ids: Collection[str]) -> StoredState:
        """One database transaction: the latest key of each type, the master key's window,
        and which of `device_ids` the user already has (cross-signing keys take device IDs).

        Read past Synapse's caches, which another worker may not have invalidated yet.
        """
        wanted = sorted(set(device_ids))

        def txn(cursor: Any) -> StoredState:
            cursor.execute(
                "SELECT keytype, keydata, updatable_without_uia_before_ms"
                " FROM e2e_cross_signing_keys WHERE user_id = ? ORDER BY stream_id",
                (user_id,),
            )
            keys: dict[str, Any] = {}
            window: int | None = None
            for key_type, keydata, updatable_before in cursor.fetchall():
                keys[key_type] = json.loads(keydata)
                if key_type == "master":
                    window = updatable_before
            taken: set[str] = set()
            if wanted:
                marks = ", ".join("?" for _ in wanted)
                cursor.execute(
                    f"SELECT device_id FROM devices WHERE user_id = ? AND device_id IN ({marks})",
                    (user_id, *wanted),
                )
                taken = {row[0] for row in cursor.fetchall()}
            return StoredState(keys, window, frozenset(taken))

        return await self._api.run_db_interaction("synapse_xsign_uia_stored_state", txn)  # type: ignore[no-any-return]

    async def validate_uia(self, requester: Any, request: SynapseRequest, body: Any) -> None:
        """Synapse's own UIA, every stage the server offers, never the grace-period skip."""
        await self.auth_handler.validate_user_via_ui_auth(
            requester,
            request,
            body,
            "reset the device signing key on your account",
            can_skip_ui_auth=False,
        )

    async def upload_keys(self, user_id: str, body: Mapping[str, Any]) -> None:
        await self.e2e_keys_handler.upload_signing_keys_for_user(user_id, dict(body))
