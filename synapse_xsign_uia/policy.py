"""The upload decision table, as pure functions over plain data.

Nothing here imports Synapse: the servlet gathers the facts, this module decides, and the
servlet carries the decision out. The rows are documented in docs/how-it-works.md.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs

# Request body field -> the key type Synapse stores it under.
KEY_FIELDS: Mapping[str, str] = {
    "master_key": "master",
    "self_signing_key": "self_signing",
    "user_signing_key": "user_signing",
}

JsonKey = Mapping[str, Any]


class Rule(enum.Enum):
    """The decision-table row that applied; the value is what logs and metrics show."""

    NO_KEYS = "no_keys"
    IDENTICAL_REUPLOAD = "identical_reupload"
    FIRST_UPLOAD = "first_upload"
    APPSERVICE = "appservice"
    REPLACEMENT_WINDOW = "replacement_window"
    DELEGATED_AUTH = "delegated_auth"
    UIA = "uia"


class Action(enum.Enum):
    """What the servlet must do next."""

    NOTHING = "nothing"  # answer 200 {} and write nothing
    UPLOAD = "upload"  # upload without UIA
    DELEGATE = "delegate"  # answer as Synapse's delegated-auth (MAS) flow does
    REQUIRE_UIA = "require_uia"  # Synapse's own UIA, then upload
    REFUSE = "refuse"  # UIA is required but the requester cannot complete it: 403


# The rules under which a stored master key can be replaced. With delegated auth Synapse's
# own servlet answers, so the module does not see the write.
RESETTING_RULES = frozenset({Rule.UIA, Rule.REPLACEMENT_WINDOW, Rule.APPSERVICE})


@attrs.frozen
class Toggles:
    first_upload_without_uia: bool = True
    identical_reupload_without_uia: bool = True
    appservice_without_uia: bool = True


@attrs.frozen
class Facts:
    """What the decision depends on, gathered by the servlet.

    `requested` maps key type (`master`, ...) to the key in the request; `stored` to the key
    Synapse holds. `window_expires_ms` is the admin-granted window of the stored master key.
    """

    requested: Mapping[str, JsonKey]
    stored: Mapping[str, JsonKey]
    is_appservice: bool = False
    delegated_auth: bool = False
    window_expires_ms: int | None = None
    now_ms: int = 0
    # Synapse's UIA needs an access token of the user's own; an application service has none.
    can_do_uia: bool = True
    # Whether Synapse's cache of the user's keys was empty when the request came.
    cache_missed: bool = False

    @property
    def window_open(self) -> bool:
        return window_open(self.window_expires_ms, self.now_ms)


@attrs.frozen
class Decision:
    rule: Rule
    action: Action
    # Fill Synapse's cache of the user's keys, where it held nothing for the user, so that
    # the next identical re-upload is answered from it, before the lock, and the next
    # challenge is forecast from it (`forecast`). Only where the request is carried
    # out without a write (`needs_lock`): a write makes the cache stale again.
    refresh_cache: bool = False


@attrs.frozen
class Consequences:
    """What a write under a decision means beyond the keys stored."""

    # The stored master key was replaced: the user's identity changed.
    resets_identity: bool
    # The write went through an admin-granted window: audited with the admin's ID.
    through_window: bool
    # The window is spent: a new master key starts without one. New sub-keys alone leave
    # it open for the reset it was granted for.
    spends_window: bool


def window_open(expires_ms: int | None, now_ms: int) -> bool:
    """Whether an admin-granted window that ends at `expires_ms` is open at `now_ms`."""
    return expires_ms is not None and now_ms < expires_ms


def requested_keys(body: Mapping[str, Any]) -> dict[str, JsonKey]:
    """The cross-signing keys present in a request body, by key type.

    A field that is absent or JSON `null` carries no key.
    """
    return {
        key_type: body[field]
        for field, key_type in KEY_FIELDS.items()
        if body.get(field) is not None
    }


def is_identical(requested: Mapping[str, JsonKey], stored: Mapping[str, JsonKey]) -> bool:
    """True when the request has keys and each equals the stored key of its type."""
    return bool(requested) and all(
        key_type in stored and stored[key_type] == key for key_type, key in requested.items()
    )


def changed_keys(
    requested: Mapping[str, JsonKey], stored: Mapping[str, JsonKey]
) -> dict[str, JsonKey]:
    """The requested keys that differ from what is stored: the only ones to write."""
    return {
        key_type: key
        for key_type, key in requested.items()
        if key_type not in stored or stored[key_type] != key
    }


def decide_early(
    toggles: Toggles, requested: Mapping[str, JsonKey], cached: Mapping[str, JsonKey] | None
) -> Decision | None:
    """Rows 1 and 2 from Synapse's cache of the stored keys (`cached`, None when it holds
    nothing for the user), before the lock: answers that write nothing. None when the
    request must be decided under the lock, from the database."""
    if not requested:
        return Decision(Rule.NO_KEYS, Action.NOTHING)
    if (
        toggles.identical_reupload_without_uia
        and cached is not None
        and is_identical(requested, cached)
    ):
        return Decision(Rule.IDENTICAL_REUPLOAD, Action.NOTHING)
    return None


def decide(toggles: Toggles, facts: Facts) -> Decision:
    """The first row of the decision table that applies."""
    if not facts.requested:
        return Decision(Rule.NO_KEYS, Action.NOTHING)
    if toggles.identical_reupload_without_uia and is_identical(facts.requested, facts.stored):
        return Decision(Rule.IDENTICAL_REUPLOAD, Action.NOTHING, refresh_cache=facts.cache_missed)
    if toggles.first_upload_without_uia and "master" not in facts.stored:
        return Decision(Rule.FIRST_UPLOAD, Action.UPLOAD)
    if toggles.appservice_without_uia and facts.is_appservice:
        return Decision(Rule.APPSERVICE, Action.UPLOAD)
    if "master" in facts.stored and facts.window_open:
        return Decision(Rule.REPLACEMENT_WINDOW, Action.UPLOAD)
    if facts.delegated_auth:
        return Decision(Rule.DELEGATED_AUTH, Action.DELEGATE)
    if not facts.can_do_uia:
        return Decision(Rule.UIA, Action.REFUSE)
    return Decision(Rule.UIA, Action.REQUIRE_UIA, refresh_cache=facts.cache_missed)


def needs_lock(decision: Decision, auth_sent: bool) -> bool:
    """Whether carrying `decision` out may write the user's keys, so that it must be made
    again, and carried out, under the user's lock. A request answered without a write needs
    no lock; nor does one that will only be challenged: without `auth` it cannot pass UIA."""
    if decision.action in (Action.NOTHING, Action.REFUSE):
        return False
    if decision.action is Action.REQUIRE_UIA:
        return auth_sent
    return True


class Forecast(enum.Enum):
    """What Synapse's cache of the stored keys says a request will come to, before the
    database is read; only so that the work the decision will need can start early."""

    # A UIA challenge: Synapse's UIA builds it while the stored state is read.
    CHALLENGE = "challenge"
    # A write (`needs_lock`): the lock is taken at once, and the stored state read once,
    # under it, rather than once to decide and again under the lock.
    WRITE = "write"
    # Neither, or the cache does not tell: the stored state is read first.
    READ_FIRST = "read_first"


def forecast(toggles: Toggles, cached_facts: Facts | None, auth_sent: bool) -> Forecast:
    """The forecast of a request from Synapse's cache of the stored keys (`cached_facts`: no
    window, which the cache does not hold; None when the cache holds nothing for the user).

    Only a forecast: the decision is still `decide` on what the database holds. A challenge
    built for a request decided otherwise (an admin window is open, another process has just
    written the keys) is not answered; it leaves a UIA session that nobody is sent, which
    Synapse expires. A request wrongly forecast to write holds the lock for nothing. A
    request with `auth` is never forecast a challenge: UIA may pass it, and must then run
    under the lock; with nothing cached it is forecast to write, as the answer to a
    challenge."""
    if cached_facts is None:
        return Forecast.WRITE if auth_sent else Forecast.READ_FIRST
    decision = decide(toggles, cached_facts)
    if needs_lock(decision, auth_sent):
        return Forecast.WRITE
    if decision.action is Action.REQUIRE_UIA:
        return Forecast.CHALLENGE
    return Forecast.READ_FIRST


class SessionVerdict(enum.Enum):
    """Whether a completed UIA session may authorise a write (`strict_uia_sessions`); the
    value is what logs and metrics show."""

    AUTHORISES = "authorises"
    SPENT = "spent"  # it already authorised a write
    OTHER_DEVICE = "other_device"  # its challenge went to another device
    OTHER_KEYS = "other_keys"  # its challenge was for other keys, and no credentials came
    UNKNOWN = "unknown"  # no challenge of the module's offered it, and no credentials came


@attrs.frozen
class UiaSessionRecord:
    """What the module recorded of a UIA session it offered."""

    device_id: str | None  # the device its challenge went to
    keys_fingerprint: str  # of the keys its challenge was for
    spent: bool


def judge_uia_session(
    record: UiaSessionRecord | None,
    *,
    device_id: str | None,
    keys_fingerprint: str,
    brings_credentials: bool,
) -> SessionVerdict:
    """Whether a session whose stages are complete may authorise writing the keys of a
    request (their `keys_fingerprint`) from `device_id`.

    A session authorises one write, from the device its challenge went to. A request that
    brings no credentials of its own may write only the keys the challenge was for: the
    user authenticated that change, not another. A request with credentials (a password)
    authenticates itself, so its keys are the change the user authenticated.
    """
    if record is None:
        return SessionVerdict.AUTHORISES if brings_credentials else SessionVerdict.UNKNOWN
    if record.spent:
        return SessionVerdict.SPENT
    if record.device_id != device_id:
        return SessionVerdict.OTHER_DEVICE
    if not brings_credentials and record.keys_fingerprint != keys_fingerprint:
        return SessionVerdict.OTHER_KEYS
    return SessionVerdict.AUTHORISES


def consequences(
    rule: Rule, stored: Mapping[str, JsonKey], written: Mapping[str, JsonKey]
) -> Consequences:
    """What writing `written` over `stored` under `rule` means."""
    replaces_master = "master" in written and "master" in stored
    through_window = rule is Rule.REPLACEMENT_WINDOW
    return Consequences(
        resets_identity=replaces_master and rule in RESETTING_RULES,
        through_window=through_window,
        spends_window=through_window and "master" in written,
    )
