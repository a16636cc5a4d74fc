"""The device-list resync endpoint: a client asks its homeserver to fetch a remote user's
device list again.

- `endpoint.py`: the route, the checks of a request, the answer
- `service.py`: the fetch through Synapse, one per user at a time across the homeserver,
  with the cooldown
- `limits.py`: the per-requester token bucket and the per-user cooldown (pure)
- `flights.py`: single-flight bookkeeping (pure)
- `wording.py`: what a client is told when a fetch failed (pure)
"""

from synapse_xsign_uia.resync.endpoint import (
    RESOURCE_PATH,
    ResyncEndpoint,
    route_user_segment,
    serve_resync_endpoint,
)
from synapse_xsign_uia.resync.flights import SingleFlight
from synapse_xsign_uia.resync.limits import Cooldown, RateLimiter
from synapse_xsign_uia.resync.service import Outcome, ResyncService
from synapse_xsign_uia.resync.wording import (
    REASON_FIELD,
    REMOTE_STATUS_FIELD,
    UNSTABLE_PREFIX,
    failure_error,
)

__all__ = [
    "REASON_FIELD",
    "REMOTE_STATUS_FIELD",
    "RESOURCE_PATH",
    "UNSTABLE_PREFIX",
    "Cooldown",
    "Outcome",
    "RateLimiter",
    "ResyncEndpoint",
    "ResyncService",
    "SingleFlight",
    "failure_error",
    "route_user_segment",
    "serve_resync_endpoint",
]
