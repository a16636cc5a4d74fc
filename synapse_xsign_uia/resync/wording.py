"""What a client is told when a device list could not be fetched."""

from __future__ import annotations

import math
from typing import Any

from synapse_xsign_uia._synapse import FailureReason, ResyncFailure
from synapse_xsign_uia.resync.service import Outcome

UNSTABLE_PREFIX = "org.matrix.mscXXXX"
REASON_FIELD = f"{UNSTABLE_PREFIX}.reason"
REMOTE_STATUS_FIELD = f"{UNSTABLE_PREFIX}.remote_status"

_STALE_NOTE = (
    "The device list stays marked as stale, and this homeserver fetches it again when {server} "
    "answers."
)

# The first sentence of the `error` for each reason: `server`, `user_id` and `detail` are
# filled in, and `when` for a backoff.
_FIRST_SENTENCE = {
    FailureReason.BACKOFF: (
        "Requests to {server} failed recently, and this homeserver backs off from it{when}, so "
        "it did not ask for the device list of {user_id}."
    ),
    FailureReason.UNREACHABLE: "Could not reach {server} for the device list of {user_id}: {detail}.",
    FailureReason.TIMEOUT: "{server} did not answer for the device list of {user_id}: {detail}.",
    FailureReason.REMOTE_ERROR: "{server} did not send the device list of {user_id}: {detail}.",
    FailureReason.DENIED: "This homeserver does not federate with {server}.",
    FailureReason.ERROR: "Could not fetch the device list of {user_id} from {server}: {detail}.",
}


def _timed_out(user_id: str, server_name: str, timeout_ms: int) -> str:
    return (
        f"{server_name} did not send the device list of {user_id} within "
        f"{timeout_ms / 1000:g}s. This homeserver keeps waiting for it in the background; "
        "a change then reaches your clients through /sync."
    )


def _failed(user_id: str, server_name: str, failure: ResyncFailure, retry_after_ms: Any) -> str:
    when = f" for another {math.ceil(retry_after_ms / 1000)}s" if retry_after_ms else ""
    first = _FIRST_SENTENCE[failure.reason].format(
        server=server_name, user_id=user_id, detail=failure.detail, when=when
    )
    return f"{first} {_STALE_NOTE.format(server=server_name)}"


def failure_error(
    user_id: str, server_name: str, outcome: Outcome, now_ms: int, timeout_ms: int
) -> tuple[str, dict[str, Any]]:
    """The `error` message and extra fields of the 502 for a fetch that did not succeed."""
    failure = outcome.failure
    fields: dict[str, Any] = {}
    retry_at_ms = failure.retry_at_ms if failure is not None else None
    if retry_at_ms is not None and retry_at_ms > now_ms:
        fields["retry_after_ms"] = retry_at_ms - now_ms
    if failure is None:
        # Waiting for the fetch ran out of time; the fetch goes on.
        fields[REASON_FIELD] = FailureReason.TIMEOUT.value
        return _timed_out(user_id, server_name, timeout_ms), fields
    fields[REASON_FIELD] = failure.reason.value
    if failure.remote_status is not None:
        fields[REMOTE_STATUS_FIELD] = failure.remote_status
    return _failed(user_id, server_name, failure, fields.get("retry_after_ms")), fields
