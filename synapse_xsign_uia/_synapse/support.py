"""Which Synapse the module runs on, and the start-up self-check: every private name the
module relies on, looked up once before it serves anything."""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

import synapse
from synapse.module_api.errors import ConfigError

if TYPE_CHECKING:
    from synapse.server import HomeServer

OLDEST_SUPPORTED = (1, 98, 0)
NEWEST_SUPPORTED = (1, 163, 2)
SUPPORTED_RANGE = "Synapse 1.98.0 to 1.163.2"


# Every private name the module relies on: "module:attribute".
REQUIRED_NAMES = (
    "synapse.rest.client.keys:SigningKeyUploadServlet",
    "synapse.rest.client.keys:register_servlets",
    "synapse.rest.client._base:interactive_auth_handler",
    "synapse.rest.admin:UserReplaceMasterCrossSigningKeyRestServlet",
    "synapse.rest.admin._base:assert_user_is_admin",
    "synapse.rest.admin:register_servlets",
    "synapse.module_api:make_deferred_yieldable",
    "synapse.logging.context:PreserveLoggingContext",
    "synapse.api.errors:InteractiveAuthIncompleteError",
    "synapse.api.errors:InvalidClientTokenError",
    # Device-list resync.
    "synapse.handlers.device:DeviceListUpdater",
    "synapse.handlers.device:DeviceListWorkerUpdater",
    "synapse.federation.federation_client:FederationClient",
    "synapse.util.retryutils:NotRetryingDestination",
    "synapse.api.errors:RequestSendFailed",
    "synapse.api.errors:HttpResponseException",
    "synapse.api.errors:FederationDeniedError",
    # Identity-reset notice.
    "synapse.server_notices.server_notices_manager:ServerNoticesManager",
)


# Methods of classes named above: "module:Class" -> method names.
REQUIRED_CLASS_METHODS = {
    "synapse.handlers.device:DeviceListUpdater": (
        "multi_user_device_resync",
        "_maybe_retry_device_resync",
    ),
    "synapse.handlers.device:DeviceListWorkerUpdater": ("multi_user_device_resync",),
    "synapse.federation.federation_client:FederationClient": ("query_user_devices",),
    "synapse.server_notices.server_notices_manager:ServerNoticesManager": ("send_notice",),
}


REQUIRED_HS_METHODS = (
    "get_auth",
    "get_datastores",
    "get_auth_handler",
    "get_clock",
    "get_reactor",
    "get_device_handler",
    "get_federation_client",
    # Not called at start-up: on a worker it raises (see send_server_notice).
    "get_server_notices_manager",
)


REQUIRED_HANDLER_METHODS = {
    "get_auth_handler": ("validate_user_via_ui_auth",),
    "get_federation_client": ("query_user_devices",),
    "get_auth": ("is_server_admin",),
}


# The window column (`updatable_without_uia_before_ms`) is read and written with SQL: its
# store methods exist only in the main process's store on older releases.
REQUIRED_STORE_METHODS = (
    "get_e2e_cross_signing_keys_bulk",
    "get_device",
    "mark_remote_users_device_caches_as_stale",
    "do_users_share_a_room",
    "get_destination_retry_timings",
    "get_users_server_still_shares_room_with",
)


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


# Looked up on every request by some callers; a name that resolved once stays resolved.
@functools.cache
def resolve(name: str) -> Any:
    module_name, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise _unsupported(f"{module_name}.{attr} is missing") from e


# Needed only where keys are written: the main process, and workers from Synapse 1.135 (on
# older releases a worker's device handler has no such methods, and no upload reaches it).
REQUIRED_WRITER_HANDLER_METHODS = {
    "get_device_handler": ("notify_device_update", "notify_user_signature_update"),
}
# Storing every key of an upload in one transaction; likewise only where keys are written.
REQUIRED_WRITER_STORE_METHODS = ("_set_e2e_cross_signing_key_txn",)
UPLOADS_ON_WORKERS = (1, 135, 0)


def writes_keys(hs: HomeServer) -> bool:
    """Whether Synapse serves the upload endpoint in this process."""
    return hs.config.worker.worker_app is None or synapse_version() >= UPLOADS_ON_WORKERS


def check_internals(hs: HomeServer) -> None:
    """Refuse to start if any private name the module relies on is missing."""
    for name in REQUIRED_NAMES:
        resolve(name)
    for name, class_methods in REQUIRED_CLASS_METHODS.items():
        for method in class_methods:
            if not callable(getattr(resolve(name), method, None)):
                raise _unsupported(f"{name.replace(':', '.')}.{method} is missing")
    for method in REQUIRED_HS_METHODS:
        if not callable(getattr(hs, method, None)):
            raise _unsupported(f"HomeServer.{method} is missing")
    writer = writes_keys(hs)
    handler_methods: dict[str, tuple[str, ...]] = dict(REQUIRED_HANDLER_METHODS)
    if writer:
        handler_methods.update(REQUIRED_WRITER_HANDLER_METHODS)
    for getter, methods in handler_methods.items():
        handler = getattr(hs, getter)()
        for method in methods:
            if not callable(getattr(handler, method, None)):
                raise _unsupported(f"{type(handler).__name__}.{method} is missing")
    store = hs.get_datastores().main
    for method in REQUIRED_STORE_METHODS:
        if not callable(getattr(store, method, None)):
            raise _unsupported(f"the main datastore has no {method}")
    if not callable(getattr(getattr(store, "db_pool", None), "runInteraction", None)):
        raise _unsupported("the main datastore has no db_pool.runInteraction")
    if writer:
        _check_key_writer(store)
    keys_cache_function(store)


def _check_key_writer(store: Any) -> None:
    for method in REQUIRED_WRITER_STORE_METHODS:
        if not callable(getattr(store, method, None)):
            raise _unsupported(f"the main datastore has no {method}")
    id_generator = getattr(store, "_cross_signing_id_gen", None)
    if not callable(getattr(id_generator, "get_next_mult", None)):
        raise _unsupported("the main datastore has no _cross_signing_id_gen.get_next_mult")


def keys_cache_function(store: Any) -> Any:
    """Synapse's cached function behind `get_e2e_cross_signing_keys_bulk`, whose cache the
    upload decision reads without a query and which it invalidates with workers."""
    function = getattr(store, "_get_bare_e2e_cross_signing_keys", None)
    cache = getattr(function, "cache", None)
    if not callable(getattr(cache, "get_immediate", None)) or not callable(
        getattr(function, "invalidate", None)
    ):
        raise _unsupported(
            "the main datastore has no cached _get_bare_e2e_cross_signing_keys with "
            "cache.get_immediate and invalidate"
        )
    return function


def synapse_version() -> tuple[int, int, int]:
    return parse_version(synapse.__version__)


def require_attribute(obj: Any, name: str, described: str) -> Any:
    if not hasattr(obj, name):
        raise _unsupported(f"{described} is missing")
    return getattr(obj, name)
