"""What became of a request, as the logs and the metrics name it: each name defined once."""

from __future__ import annotations

import enum

import attrs


class UploadOutcome(enum.Enum):
    """What an upload request came to."""

    NOTHING_WRITTEN = "nothing_written"  # 200, no key written
    UPLOADED = "uploaded"  # 200, keys written
    UIA_CHALLENGE = "uia_challenge"  # 401 with the UIA flows
    # A fresh 401 challenge: the session the request presented may not authorise this
    # write (`strict_uia_sessions`); the detail says why.
    UIA_SESSION_REFUSED = "uia_session_refused"
    REFUSED = "refused"  # 4xx; the detail is the errcode
    DELEGATED = "delegated"  # Synapse's delegated-auth answer; the detail is its status
    # 503, nothing written: with workers, the process was held up for longer than its lease on
    # the user's lock, which another process may have taken meanwhile.
    LOCK_LOST = "lock_lost"


@attrs.frozen
class UploadResult:
    outcome: UploadOutcome
    detail: str | None = None

    @property
    def label(self) -> str:
        """`outcome` or `outcome:detail`, as in the log line and the metric label."""
        if self.detail is None:
            return self.outcome.value
        return f"{self.outcome.value}:{self.detail}"


class AdminAction(enum.Enum):
    """What happened to an admin-granted replacement window."""

    GRANT = "grant"
    REVOKE = "revoke"
    USED = "used"  # a master-key replacement went through it


class ResyncOutcome(enum.Enum):
    """What a device-list resync request came to."""

    # The service's answers.
    FETCHED = "fetched"
    COOLDOWN = "cooldown"  # fetched recently: answered without asking again
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    # Refusals before the service is asked.
    RATE_LIMITED = "rate_limited"
    NO_SHARED_ROOM = "no_shared_room"
    FEDERATION_DENIED = "federation_denied"
    INVALID = "invalid"
    UNAUTHORIZED = "unauthorized"
