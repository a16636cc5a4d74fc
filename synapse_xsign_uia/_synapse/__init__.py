"""The one place that touches Synapse's private internals.

Everything the module needs from Synapse beyond the public `ModuleApi` is reached through
this package, so that a Synapse upgrade that renames something breaks here, and the
start-up self-check (`check_internals`, in `support.py`) says so loudly instead of the
module silently doing nothing. The rest of the module imports the package and uses the
names below; one file per area:

- `support.py`: the supported Synapse range, the private names relied on, the self-check
- `homeserver.py`: servlets, deployment (workers, delegated auth), reactor, background runs
- `request_handling.py`: request bodies and authentication
- `uploads.py`: the per-user lock, the stored state, UIA and the key upload
- `windows.py`: the admin replacement window
- `device_lists.py`: device-list resync
- `notices.py`: server notices
"""

from synapse_xsign_uia._synapse.device_lists import (
    INTERNAL_ERROR,
    REQUIRED_RESYNC_ATTRIBUTES,
    DeviceLists,
    ResyncFailure,
    classify_fetch_error,
)
from synapse_xsign_uia._synapse.homeserver import (
    ADMIN_WINDOW_SERVLET,
    call_later,
    call_soon,
    delegated_auth_enabled,
    install_servlet,
    interactive_auth_handler,
    is_appservice,
    is_main_process,
    listener_resources,
    native_admin_window_servlet,
    native_upload_servlet,
    run_as_background_process,
    runs_with_workers,
    stop_reactor,
)
from synapse_xsign_uia._synapse.notices import send_server_notice, server_notices_mxid
from synapse_xsign_uia._synapse.request_handling import (
    get_user_by_req,
    parse_json_object,
    require_admin,
    rewind_request,
)
from synapse_xsign_uia._synapse.support import (
    NEWEST_SUPPORTED,
    OLDEST_SUPPORTED,
    REQUIRED_CLASS_METHODS,
    REQUIRED_HANDLER_METHODS,
    REQUIRED_HS_METHODS,
    REQUIRED_NAMES,
    REQUIRED_STORE_METHODS,
    SUPPORTED_RANGE,
    check_internals,
    check_synapse_version,
    parse_version,
    resolve,
    synapse_version,
)
from synapse_xsign_uia._synapse.uploads import Internals, StoredState
from synapse_xsign_uia._synapse.windows import ReplacementWindows, Window

__all__ = [
    "ADMIN_WINDOW_SERVLET",
    "INTERNAL_ERROR",
    "NEWEST_SUPPORTED",
    "OLDEST_SUPPORTED",
    "REQUIRED_CLASS_METHODS",
    "REQUIRED_HANDLER_METHODS",
    "REQUIRED_HS_METHODS",
    "REQUIRED_NAMES",
    "REQUIRED_RESYNC_ATTRIBUTES",
    "REQUIRED_STORE_METHODS",
    "SUPPORTED_RANGE",
    "DeviceLists",
    "Internals",
    "ReplacementWindows",
    "ResyncFailure",
    "StoredState",
    "Window",
    "call_later",
    "call_soon",
    "check_internals",
    "check_synapse_version",
    "classify_fetch_error",
    "delegated_auth_enabled",
    "get_user_by_req",
    "install_servlet",
    "interactive_auth_handler",
    "is_appservice",
    "is_main_process",
    "listener_resources",
    "native_admin_window_servlet",
    "native_upload_servlet",
    "parse_json_object",
    "parse_version",
    "require_admin",
    "resolve",
    "rewind_request",
    "run_as_background_process",
    "runs_with_workers",
    "send_server_notice",
    "server_notices_mxid",
    "stop_reactor",
    "synapse_version",
]
