"""Prometheus counters, served on Synapse's own metrics listener (`/_synapse/metrics`).

Synapse serves the default `prometheus_client` registry on every supported release
(`synapse.metrics.REGISTRY` is `prometheus_client.REGISTRY`), so the counters register
there. Every series carries a `server_name` label, as Synapse's own metrics do in recent
releases: several homeservers may share one Python process, and with it the registry. The
metrics are documented in docs/metrics.md.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from synapse.module_api.errors import Codes

from synapse_xsign_uia.outcomes import AdminAction, ResyncOutcome, UploadOutcome, UploadResult
from synapse_xsign_uia.policy import RESETTING_RULES, Rule, SessionVerdict

SERVER_NAME_LABEL = "server_name"

UPLOAD_DECISIONS = "synapse_xsign_uia_upload_decisions_total"
ADMIN_WINDOW = "synapse_xsign_uia_admin_window_total"
RESYNC_REQUESTS = "synapse_xsign_uia_resync_requests_total"
RESYNC_FEDERATION_REQUESTS = "synapse_xsign_uia_resync_federation_requests_total"
IDENTITY_RESETS = "synapse_xsign_uia_identity_resets_total"
DEVICE_LIST_REPAIR_USERS = "synapse_xsign_uia_device_list_repair_users_total"

# The `rule` label of a request refused before a decision-table row was chosen.
VALIDATION = "validation"
# Stands in for an errcode or status outside the known set, so that no client can grow
# the number of series.
OTHER = "other"

RESET_RULES = tuple(rule.value for rule in Rule if rule in RESETTING_RULES)
ADMIN_ACTIONS = tuple(action.value for action in AdminAction)
RESYNC_OUTCOMES = tuple(outcome.value for outcome in ResyncOutcome)


def _refused(*errcodes: str) -> tuple[str, ...]:
    return tuple(UploadResult(UploadOutcome.REFUSED, code).label for code in errcodes)


_NOTHING_WRITTEN = (UploadOutcome.NOTHING_WRITTEN.value,)
# The refusals the module itself answers once a row is chosen, before anything is written.
_REFUSED_AFTER_DECIDING = _refused(
    "M_INVALID_SIGNATURE", "M_MISSING_PARAM", "M_INVALID_PARAM", "M_FORBIDDEN"
)
_WRITES = (UploadOutcome.UPLOADED.value, *_REFUSED_AFTER_DECIDING)

# Each row's outcomes that are known in advance: their series exist at 0 from start-up, so
# that `rate()` and `increase()` see the first one. Others (an errcode Synapse answers
# with, say) appear when they first happen.
UPLOAD_OUTCOMES: Mapping[str, Sequence[str]] = {
    VALIDATION: _refused("M_BAD_JSON", "M_INVALID_PARAM"),
    Rule.NO_KEYS.value: _NOTHING_WRITTEN,
    Rule.IDENTICAL_REUPLOAD.value: _NOTHING_WRITTEN,
    Rule.FIRST_UPLOAD.value: _WRITES,
    Rule.APPSERVICE.value: _WRITES,
    Rule.REPLACEMENT_WINDOW.value: _WRITES,
    Rule.DELEGATED_AUTH.value: (
        UploadResult(UploadOutcome.DELEGATED, "200").label,
        *_REFUSED_AFTER_DECIDING,
    ),
    # Synapse answers a wrong password with a new challenge: it counts as `uia_challenge`.
    Rule.UIA.value: (
        UploadOutcome.UIA_CHALLENGE.value,
        *(
            UploadResult(UploadOutcome.UIA_SESSION_REFUSED, verdict.value).label
            for verdict in SessionVerdict
            if verdict is not SessionVerdict.AUTHORISES
        ),
        *_WRITES,
    ),
}

_MAX_REMEMBERED_SERIES = 256
# Outcome names are the module's own; only what follows a ':' can come from elsewhere.
_OUTCOME_KIND = re.compile(r"[a-z][a-z_]{0,31}")
_ERRCODES = frozenset(code.value for code in Codes) | frozenset(
    outcome.partition(":")[2]
    for outcomes in UPLOAD_OUTCOMES.values()
    for outcome in outcomes
    if outcome.startswith(f"{UploadOutcome.REFUSED.value}:")
)


_SESSION_VERDICTS = frozenset(verdict.value for verdict in SessionVerdict)


def upload_outcome_label(outcome: str) -> str:
    """The `outcome` label of an upload decision: the outcome of its log line, with an
    errcode or HTTP status that is not a known one replaced by `other`.

    Errcodes are kept, bounded by the set Synapse defines: they are the reason a request
    was refused, which operators want to tell apart (a buggy client from a key-ID collision).
    """
    kind, separator, detail = outcome.partition(":")
    if not _OUTCOME_KIND.fullmatch(kind):
        return OTHER
    if not separator:
        return kind
    if kind == UploadOutcome.REFUSED.value:
        known = detail in _ERRCODES
    elif kind == UploadOutcome.DELEGATED.value:
        known = len(detail) == 3 and detail.isascii() and detail.isdigit() and detail[0] in "12345"
    elif kind == UploadOutcome.UIA_SESSION_REFUSED.value:
        known = detail in _SESSION_VERDICTS
    else:
        known = False
    return outcome if known else f"{kind}:{OTHER}"


def _counter(
    registry: CollectorRegistry, name: str, documentation: str, labelnames: Iterable[str]
) -> Counter:
    """The counter `name`, registered once per process.

    A second copy of this file (reloaded, or imported under another name) finds its
    counters already registered: it takes those over instead of failing, so counts
    continue.
    """
    try:
        return Counter(name, documentation, labelnames, registry=registry)
    except ValueError:
        # `prometheus_client` has no public look-up by name.
        existing = getattr(registry, "_names_to_collectors", {}).get(name)
        if isinstance(existing, Counter):
            return existing
        raise


@attrs.frozen
class _Counters:
    upload_decisions: Counter
    admin_window: Counter
    resync_requests: Counter
    resync_federation_requests: Counter
    identity_resets: Counter
    device_list_repair_users: Counter


_counters: _Counters | None = None


def _process_counters() -> _Counters:
    global _counters
    if _counters is None:
        _counters = _Counters(
            upload_decisions=_counter(
                REGISTRY,
                UPLOAD_DECISIONS,
                "Cross-signing key uploads, by the decision-table rule that applied and the "
                "outcome",
                (SERVER_NAME_LABEL, "rule", "outcome"),
            ),
            admin_window=_counter(
                REGISTRY,
                ADMIN_WINDOW,
                "Admin replacement windows granted and revoked through the admin API, and "
                "used by a master-key replacement",
                (SERVER_NAME_LABEL, "action"),
            ),
            resync_requests=_counter(
                REGISTRY,
                RESYNC_REQUESTS,
                "Client requests to the device-list resync endpoint, by outcome",
                (SERVER_NAME_LABEL, "outcome"),
            ),
            resync_federation_requests=_counter(
                REGISTRY,
                RESYNC_FEDERATION_REQUESTS,
                "Device-list fetches over federation started by the resync endpoint",
                (SERVER_NAME_LABEL,),
            ),
            identity_resets=_counter(
                REGISTRY,
                IDENTITY_RESETS,
                "Replacements of a stored master cross-signing key, by the rule that allowed it",
                (SERVER_NAME_LABEL, "rule"),
            ),
            device_list_repair_users=_counter(
                REGISTRY,
                DEVICE_LIST_REPAIR_USERS,
                "Remote users whose device lists an admin's repair of their server marked stale",
                (SERVER_NAME_LABEL,),
            ),
        )
    return _counters


class Metrics:
    """The module's counters for one homeserver."""

    def __init__(self, server_name: str) -> None:
        self._server_name = server_name
        self._counters = _process_counters()
        self._upload_series: dict[tuple[Rule | None, UploadResult], Any] = {}
        for rule, outcomes in UPLOAD_OUTCOMES.items():
            for outcome in outcomes:
                self._counters.upload_decisions.labels(server_name, rule, outcome)
        for action in ADMIN_ACTIONS:
            self._counters.admin_window.labels(server_name, action)
        for resync_outcome in RESYNC_OUTCOMES:
            self._counters.resync_requests.labels(server_name, resync_outcome)
        self._counters.resync_federation_requests.labels(server_name)
        for reset_rule in RESET_RULES:
            self._counters.identity_resets.labels(server_name, reset_rule)
        self._counters.device_list_repair_users.labels(server_name)

    def upload_decision(self, rule: Rule | None, result: UploadResult) -> None:
        """One upload decision: `rule` None when the request was refused before a row was
        chosen."""
        series = self._upload_series.get((rule, result))
        if series is None:
            rule_label = VALIDATION if rule is None else _label(rule, Rule)
            series = self._counters.upload_decisions.labels(
                self._server_name, rule_label, upload_outcome_label(result.label)
            )
            # Every upload counts here: finding the series is most of the cost of counting,
            # and the pairs seen are few (the labels are bounded; the bound holds the rest).
            if len(self._upload_series) < _MAX_REMEMBERED_SERIES:
                self._upload_series[(rule, result)] = series
        series.inc()

    def admin_window(self, action: AdminAction) -> None:
        self._counters.admin_window.labels(self._server_name, _label(action, AdminAction)).inc()

    def resync_request(self, outcome: ResyncOutcome) -> None:
        label = _label(outcome, ResyncOutcome)
        self._counters.resync_requests.labels(self._server_name, label).inc()

    def identity_reset(self, rule: Rule) -> None:
        label = rule.value if rule in RESETTING_RULES else OTHER
        self._counters.identity_resets.labels(self._server_name, label).inc()

    def resync_federation_request(self) -> None:
        self._counters.resync_federation_requests.labels(self._server_name).inc()

    def device_list_repair(self, users_marked: int) -> None:
        self._counters.device_list_repair_users.labels(self._server_name).inc(users_marked)


def _label(value: enum.Enum, kind: type[enum.Enum]) -> str:
    """The label of an enum member; `other` for anything else, which no caller should pass."""
    return str(value.value) if isinstance(value, kind) else OTHER


_by_server: dict[str, Metrics] = {}


def for_server(server_name: str) -> Metrics:
    """The counters of the homeserver `server_name`, shared by every module instance that
    serves it."""
    metrics = _by_server.get(server_name)
    if metrics is None:
        metrics = _by_server[server_name] = Metrics(server_name)
    return metrics
