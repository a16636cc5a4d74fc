"""The one place that touches Synapse's private internals.

Everything the module needs from Synapse beyond the public `ModuleApi` is reached through
`Synapse`, one object created by the module's entry point and passed to the parts that need
it, so that a Synapse upgrade that renames something breaks here, and the start-up
self-check (`check_internals`, in `support.py`) says so loudly instead of the module silently
doing nothing. Nothing here knows the module's rules, and nothing here imports the rest of
the module. One file per area:

- `support.py`: the supported Synapse range, the private names relied on, the self-check
- `homeserver.py`: `Synapse`, the deployment's facts and the verbs of the homeserver
- `servlets.py`: taking over a Synapse servlet
- `requests.py`: who sent a request
- `keys.py`, `locks.py`: cross-signing keys (the stored state, UIA, the write of an upload
  in one transaction, the window column) and the per-user lock within a process
- `device_lists.py`: remote users' device lists
- `notices.py`: server notices
- `reactor.py`: background work
"""

from synapse_xsign_uia._synapse.device_lists import (
    INTERNAL_ERROR,
    REQUIRED_RESYNC_ATTRIBUTES,
    DeviceLists,
    FailureReason,
    ResyncFailure,
    classify_fetch_error,
)
from synapse_xsign_uia._synapse.homeserver import Synapse
from synapse_xsign_uia._synapse.keys import (
    MasterKeyRow,
    StoredState,
    latest_master_keys,
    set_window_expiry,
)
from synapse_xsign_uia._synapse.reactor import Started
from synapse_xsign_uia._synapse.requests import Caller
from synapse_xsign_uia._synapse.servlets import Native, NativeServlet, was_built
from synapse_xsign_uia._synapse.support import (
    NEWEST_SUPPORTED,
    OLDEST_SUPPORTED,
    REQUIRED_CLASS_METHODS,
    REQUIRED_HANDLER_METHODS,
    REQUIRED_HS_METHODS,
    REQUIRED_NAMES,
    REQUIRED_STORE_METHODS,
    REQUIRED_WRITER_HANDLER_METHODS,
    REQUIRED_WRITER_STORE_METHODS,
    SUPPORTED_RANGE,
    check_internals,
    check_synapse_version,
    parse_version,
    resolve,
    synapse_version,
)

__all__ = [
    "INTERNAL_ERROR",
    "NEWEST_SUPPORTED",
    "OLDEST_SUPPORTED",
    "REQUIRED_CLASS_METHODS",
    "REQUIRED_HANDLER_METHODS",
    "REQUIRED_HS_METHODS",
    "REQUIRED_NAMES",
    "REQUIRED_RESYNC_ATTRIBUTES",
    "REQUIRED_STORE_METHODS",
    "REQUIRED_WRITER_HANDLER_METHODS",
    "REQUIRED_WRITER_STORE_METHODS",
    "SUPPORTED_RANGE",
    "Caller",
    "DeviceLists",
    "FailureReason",
    "MasterKeyRow",
    "Native",
    "NativeServlet",
    "ResyncFailure",
    "Started",
    "StoredState",
    "Synapse",
    "check_internals",
    "check_synapse_version",
    "classify_fetch_error",
    "latest_master_keys",
    "parse_version",
    "resolve",
    "set_window_expiry",
    "synapse_version",
    "was_built",
]
