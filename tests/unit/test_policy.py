"""The decision table, row by row, and properties that must hold for any input."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from synapse_xsign_uia.policy import (
    RESETTING_RULES,
    Action,
    Consequences,
    Decision,
    Facts,
    Forecast,
    Rule,
    SessionVerdict,
    Toggles,
    UiaSessionRecord,
    changed_keys,
    consequences,
    decide,
    decide_early,
    forecast,
    is_identical,
    judge_uia_session,
    needs_lock,
    requested_keys,
)

MASTER = {"user_id": "@a:hs", "usage": ["master"], "keys": {"ed25519:M": "M"}}
OTHER_MASTER = {"user_id": "@a:hs", "usage": ["master"], "keys": {"ed25519:N": "N"}}
SSK = {"user_id": "@a:hs", "usage": ["self_signing"], "keys": {"ed25519:S": "S"}}
OTHER_SSK = {"user_id": "@a:hs", "usage": ["self_signing"], "keys": {"ed25519:T": "T"}}

ON = Toggles()
OFF = Toggles(
    first_upload_without_uia=False,
    identical_reupload_without_uia=False,
    appservice_without_uia=False,
)


def facts(**kwargs: Any) -> Facts:
    kwargs.setdefault("requested", {})
    kwargs.setdefault("stored", {})
    return Facts(**kwargs)


def test_row1_no_keys() -> None:
    assert decide(ON, facts(stored={"master": MASTER})) == Decision(Rule.NO_KEYS, Action.NOTHING)
    assert decide(OFF, facts()) == Decision(Rule.NO_KEYS, Action.NOTHING)


def test_row2_identical_reupload() -> None:
    stored = {"master": MASTER, "self_signing": SSK}
    for requested in ({"master": MASTER}, {"self_signing": SSK}, stored):
        assert decide(ON, facts(requested=requested, stored=stored)) == Decision(
            Rule.IDENTICAL_REUPLOAD, Action.NOTHING
        )


def test_row2_needs_every_key_to_match() -> None:
    stored = {"master": MASTER, "self_signing": SSK}
    requested = {"master": MASTER, "self_signing": OTHER_SSK}
    assert decide(ON, facts(requested=requested, stored=stored)).rule is Rule.UIA
    # A key type that is not stored yet is new, so not identical.
    assert (
        decide(
            ON, facts(requested={"master": MASTER, "self_signing": SSK}, stored={"master": MASTER})
        ).rule
        is Rule.UIA
    )


def test_row2_toggle_off_requires_uia() -> None:
    decision = decide(OFF, facts(requested={"master": MASTER}, stored={"master": MASTER}))
    assert decision == Decision(Rule.UIA, Action.REQUIRE_UIA)


def test_row3_first_upload() -> None:
    assert decide(ON, facts(requested={"master": MASTER})) == Decision(
        Rule.FIRST_UPLOAD, Action.UPLOAD
    )
    # Only a stored *master* key counts as "set up".
    assert (
        decide(ON, facts(requested={"master": MASTER}, stored={"self_signing": SSK})).rule
        is Rule.FIRST_UPLOAD
    )


def test_row3_toggle_off_requires_uia() -> None:
    assert decide(OFF, facts(requested={"master": MASTER})) == Decision(
        Rule.UIA, Action.REQUIRE_UIA
    )


def test_row4_appservice() -> None:
    f = facts(requested={"master": OTHER_MASTER}, stored={"master": MASTER}, is_appservice=True)
    assert decide(ON, f) == Decision(Rule.APPSERVICE, Action.UPLOAD)
    assert decide(OFF, f) == Decision(Rule.UIA, Action.REQUIRE_UIA)


def test_row5_window() -> None:
    base = {"requested": {"master": OTHER_MASTER}, "stored": {"master": MASTER}}
    assert decide(ON, facts(**base, window_expires_ms=2000, now_ms=1999)) == Decision(
        Rule.REPLACEMENT_WINDOW, Action.UPLOAD
    )
    # The window has no toggle: an admin opened it on purpose.
    assert (
        decide(OFF, facts(**base, window_expires_ms=2000, now_ms=1999)).rule
        is Rule.REPLACEMENT_WINDOW
    )
    assert decide(ON, facts(**base, window_expires_ms=2000, now_ms=2000)).rule is Rule.UIA
    assert decide(ON, facts(**base, window_expires_ms=None, now_ms=0)).rule is Rule.UIA


def test_row6_delegated_auth() -> None:
    f = facts(requested={"master": OTHER_MASTER}, stored={"master": MASTER}, delegated_auth=True)
    assert decide(ON, f) == Decision(Rule.DELEGATED_AUTH, Action.DELEGATE)
    # An open window still wins: that is how delegated auth approves a reset.
    f2 = facts(
        requested={"master": OTHER_MASTER},
        stored={"master": MASTER},
        delegated_auth=True,
        window_expires_ms=10,
        now_ms=5,
    )
    assert decide(ON, f2).rule is Rule.REPLACEMENT_WINDOW


def test_row7_uia() -> None:
    f = facts(requested={"master": OTHER_MASTER}, stored={"master": MASTER})
    assert decide(ON, f) == Decision(Rule.UIA, Action.REQUIRE_UIA)
    f = facts(requested={"self_signing": OTHER_SSK}, stored={"master": MASTER, "self_signing": SSK})
    assert decide(ON, f) == Decision(Rule.UIA, Action.REQUIRE_UIA)


def test_row7_refused_when_the_requester_cannot_do_uia() -> None:
    # An application service acting for a user has no access token of the user's.
    f = facts(requested={"master": OTHER_MASTER}, stored={"master": MASTER}, can_do_uia=False)
    assert decide(ON, f) == Decision(Rule.UIA, Action.REFUSE)
    # Every exemption still applies before it.
    assert decide(ON, attrs.evolve(f, is_appservice=True)).action is Action.UPLOAD
    assert decide(ON, attrs.evolve(f, window_expires_ms=1, now_ms=0)).action is Action.UPLOAD
    assert decide(ON, attrs.evolve(f, delegated_auth=True)).action is Action.DELEGATE


def test_an_identical_reupload_or_a_challenge_missing_from_the_cache_refreshes_it() -> None:
    f = facts(requested={"master": MASTER}, stored={"master": MASTER}, cache_missed=True)
    assert decide(ON, f) == Decision(Rule.IDENTICAL_REUPLOAD, Action.NOTHING, refresh_cache=True)
    f = facts(requested={"master": OTHER_MASTER}, stored={"master": MASTER}, cache_missed=True)
    assert decide(ON, f) == Decision(Rule.UIA, Action.REQUIRE_UIA, refresh_cache=True)
    assert decide(ON, attrs.evolve(f, cache_missed=False)).refresh_cache is False
    # Writes without UIA make the cache stale again: nothing to refresh.
    f = facts(requested={"master": MASTER}, stored={}, cache_missed=True)
    assert decide(ON, f).refresh_cache is False
    f = facts(
        requested={"master": OTHER_MASTER},
        stored={"master": MASTER},
        cache_missed=True,
        window_expires_ms=1,
        now_ms=0,
    )
    assert decide(ON, f).refresh_cache is False


def test_early_decisions_write_nothing_and_need_the_cache() -> None:
    assert decide_early(ON, {}, None) == Decision(Rule.NO_KEYS, Action.NOTHING)
    assert decide_early(OFF, {}, {"master": MASTER}) == Decision(Rule.NO_KEYS, Action.NOTHING)
    requested = {"master": MASTER}
    assert decide_early(ON, requested, {"master": MASTER}) == Decision(
        Rule.IDENTICAL_REUPLOAD, Action.NOTHING
    )
    # Not cached, different, or the toggle off: decided under the lock.
    assert decide_early(ON, requested, None) is None
    assert decide_early(ON, requested, {}) is None
    assert decide_early(ON, {"master": OTHER_MASTER}, {"master": MASTER}) is None
    assert decide_early(OFF, requested, {"master": MASTER}) is None


def test_consequences() -> None:
    stored = {"master": MASTER, "self_signing": SSK}
    new_master = {"master": OTHER_MASTER}
    new_ssk = {"self_signing": OTHER_SSK}
    assert consequences(Rule.UIA, stored, new_master) == Consequences(
        resets_identity=True, through_window=False, spends_window=False
    )
    assert consequences(Rule.UIA, stored, new_ssk) == Consequences(False, False, False)
    assert consequences(Rule.FIRST_UPLOAD, {}, new_master) == Consequences(False, False, False)
    assert consequences(Rule.REPLACEMENT_WINDOW, stored, new_master) == Consequences(
        resets_identity=True, through_window=True, spends_window=True
    )
    # New sub-keys alone leave the window open for the reset it was granted for.
    assert consequences(Rule.REPLACEMENT_WINDOW, stored, new_ssk) == Consequences(
        resets_identity=False, through_window=True, spends_window=False
    )
    assert consequences(Rule.APPSERVICE, stored, new_master).resets_identity


def test_requested_keys_ignores_null_and_other_fields() -> None:
    body = {"master_key": MASTER, "self_signing_key": None, "auth": {"type": "x"}, "other": 1}
    assert requested_keys(body) == {"master": MASTER}


def test_changed_keys() -> None:
    stored = {"master": MASTER, "self_signing": SSK}
    assert changed_keys({"master": MASTER, "self_signing": OTHER_SSK}, stored) == {
        "self_signing": OTHER_SSK
    }
    assert changed_keys({"master": MASTER}, stored) == {}
    assert changed_keys({"user_signing": SSK}, stored) == {"user_signing": SSK}


# Properties over arbitrary facts.

key_types = st.sampled_from(["master", "self_signing", "user_signing"])
keys = st.sampled_from([MASTER, OTHER_MASTER, SSK, OTHER_SSK])
key_maps = st.dictionaries(key_types, keys, max_size=3)
toggles = st.builds(Toggles, st.booleans(), st.booleans(), st.booleans())
all_facts = st.builds(
    Facts,
    requested=key_maps,
    stored=key_maps,
    is_appservice=st.booleans(),
    delegated_auth=st.booleans(),
    window_expires_ms=st.none() | st.integers(min_value=0, max_value=100),
    now_ms=st.integers(min_value=0, max_value=100),
    can_do_uia=st.booleans(),
    cache_missed=st.booleans(),
)


@given(toggles, key_maps, st.none() | key_maps)
def test_an_early_decision_is_the_one_made_under_the_lock(
    t: Toggles, requested: dict[str, Any], cached: dict[str, Any] | None
) -> None:
    """Answering from the cache gives what the full table gives over the same stored keys."""
    early = decide_early(t, requested, cached)
    if early is not None:
        assert early == decide(t, facts(requested=requested, stored=cached or {}))


@given(toggles, all_facts)
def test_only_a_resetting_rule_resets_an_identity(t: Toggles, f: Facts) -> None:
    decision = decide(t, f)
    written = changed_keys(f.requested, f.stored)
    if consequences(decision.rule, f.stored, written).resets_identity:
        assert decision.rule in RESETTING_RULES
        assert "master" in f.stored and "master" in written


@given(toggles, all_facts)
def test_a_stored_master_key_is_never_replaced_without_an_exemption(t: Toggles, f: Facts) -> None:
    decision = decide(t, f)
    replaces_stored = bool(changed_keys(f.requested, f.stored)) and "master" in f.stored
    if replaces_stored and decision.action is Action.UPLOAD:
        assert (t.appservice_without_uia and f.is_appservice) or f.window_open


@given(toggles, all_facts)
def test_nothing_is_written_only_when_nothing_changes(t: Toggles, f: Facts) -> None:
    if decide(t, f).action is Action.NOTHING:
        assert changed_keys(f.requested, f.stored) == {}


@given(toggles, all_facts)
def test_identical_requests_are_exactly_those_with_no_changes(t: Toggles, f: Facts) -> None:
    assert is_identical(f.requested, f.stored) == (
        bool(f.requested) and not changed_keys(f.requested, f.stored)
    )


@given(
    all_facts,
    st.sampled_from(
        ["first_upload_without_uia", "identical_reupload_without_uia", "appservice_without_uia"]
    ),
)
def test_turning_a_toggle_off_never_relaxes(f: Facts, name: str) -> None:
    """Strictness is monotonic: with an exemption switched off, a request that needed UIA
    still does."""
    lenient = ON
    strict = Toggles(
        **{
            **{
                k: True
                for k in (
                    "first_upload_without_uia",
                    "identical_reupload_without_uia",
                    "appservice_without_uia",
                )
            },
            name: False,
        }
    )
    if decide(lenient, f).action in (Action.REQUIRE_UIA, Action.DELEGATE):
        assert decide(strict, f).action in (Action.REQUIRE_UIA, Action.DELEGATE)


@given(toggles, all_facts)
def test_delegated_auth_replaces_uia(t: Toggles, f: Facts) -> None:
    action = decide(t, f).action
    if f.delegated_auth:
        assert action is not Action.REQUIRE_UIA
    else:
        assert action is not Action.DELEGATE


@pytest.mark.parametrize("rule", list(Rule))
def test_every_rule_is_reachable(rule: Rule) -> None:
    examples = {
        Rule.NO_KEYS: facts(),
        Rule.IDENTICAL_REUPLOAD: facts(requested={"master": MASTER}, stored={"master": MASTER}),
        Rule.FIRST_UPLOAD: facts(requested={"master": MASTER}),
        Rule.APPSERVICE: facts(
            requested={"master": OTHER_MASTER}, stored={"master": MASTER}, is_appservice=True
        ),
        Rule.REPLACEMENT_WINDOW: facts(
            requested={"master": OTHER_MASTER},
            stored={"master": MASTER},
            window_expires_ms=1,
            now_ms=0,
        ),
        Rule.DELEGATED_AUTH: facts(
            requested={"master": OTHER_MASTER}, stored={"master": MASTER}, delegated_auth=True
        ),
        Rule.UIA: facts(requested={"master": OTHER_MASTER}, stored={"master": MASTER}),
    }
    assert decide(ON, examples[rule]).rule is rule


# UIA sessions (`strict_uia_sessions`).

RECORD = UiaSessionRecord(device_id="PHONE", keys_fingerprint="A", spent=False)


def judge(record: UiaSessionRecord | None, **kwargs: Any) -> SessionVerdict:
    arguments: dict[str, Any] = {
        "device_id": "PHONE",
        "keys_fingerprint": "A",
        "brings_credentials": False,
        **kwargs,
    }
    return judge_uia_session(record, **arguments)


def test_a_session_authorises_the_write_it_was_offered_for() -> None:
    assert judge(RECORD) is SessionVerdict.AUTHORISES
    assert judge(RECORD, brings_credentials=True) is SessionVerdict.AUTHORISES


def test_a_spent_session_authorises_nothing() -> None:
    spent = attrs.evolve(RECORD, spent=True)
    assert judge(spent) is SessionVerdict.SPENT
    assert judge(spent, brings_credentials=True) is SessionVerdict.SPENT


def test_a_session_is_bound_to_its_device() -> None:
    assert judge(RECORD, device_id="LAPTOP") is SessionVerdict.OTHER_DEVICE
    assert judge(RECORD, device_id=None) is SessionVerdict.OTHER_DEVICE
    assert judge(RECORD, device_id="LAPTOP", brings_credentials=True) is (
        SessionVerdict.OTHER_DEVICE
    )


def test_a_session_alone_is_bound_to_its_keys() -> None:
    assert judge(RECORD, keys_fingerprint="B") is SessionVerdict.OTHER_KEYS
    # Credentials authenticate the request itself.
    assert judge(RECORD, keys_fingerprint="B", brings_credentials=True) is (
        SessionVerdict.AUTHORISES
    )


def test_a_session_the_module_never_offered() -> None:
    assert judge(None) is SessionVerdict.UNKNOWN
    # One created by this very request, which brought a password.
    assert judge(None, brings_credentials=True) is SessionVerdict.AUTHORISES


@given(
    st.none()
    | st.builds(
        UiaSessionRecord, st.sampled_from(["P", "L", None]), st.sampled_from("AB"), st.booleans()
    ),
    st.sampled_from(["P", "L", None]),
    st.sampled_from("AB"),
    st.booleans(),
)
def test_a_session_authorises_only_what_it_was_offered_for(
    record: UiaSessionRecord | None, device_id: str | None, fingerprint: str, credentials: bool
) -> None:
    verdict = judge_uia_session(
        record, device_id=device_id, keys_fingerprint=fingerprint, brings_credentials=credentials
    )
    if verdict is SessionVerdict.AUTHORISES:
        if record is None:
            assert credentials
        else:
            assert not record.spent and record.device_id == device_id
            assert credentials or record.keys_fingerprint == fingerprint


# --- Which decisions need the lock ------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "auth_sent", "needed"),
    [
        (Action.NOTHING, False, False),
        (Action.NOTHING, True, False),
        (Action.REFUSE, True, False),
        (Action.REQUIRE_UIA, False, False),
        (Action.REQUIRE_UIA, True, True),
        (Action.UPLOAD, False, True),
        (Action.UPLOAD, True, True),
        (Action.DELEGATE, False, True),
    ],
)
def test_only_a_decision_that_may_write_needs_the_lock(
    action: Action, auth_sent: bool, needed: bool
) -> None:
    assert needs_lock(Decision(Rule.UIA, action), auth_sent) is needed


@given(toggles, all_facts, st.booleans())
def test_a_decision_made_without_the_lock_never_writes(
    t: Toggles, f: Facts, auth_sent: bool
) -> None:
    """What is carried out without the lock writes nothing: no change, a refusal, or a
    challenge to a request that sent no `auth`."""
    decision = decide(t, f)
    if not needs_lock(decision, auth_sent):
        assert (
            not changed_keys(f.requested, f.stored)
            or decision.action is Action.REFUSE
            or (decision.action is Action.REQUIRE_UIA and not auth_sent)
        )
    if decision.action is Action.UPLOAD:
        assert needs_lock(decision, auth_sent)


@given(toggles, all_facts, st.booleans())
def test_the_forecast_is_the_decision_on_the_cached_keys(
    t: Toggles, f: Facts, auth_sent: bool
) -> None:
    """A write where the cached keys decide one that needs the lock; a challenge where they
    decide one to a request without `auth`, never to one with `auth`, which UIA may pass."""
    decision = decide(t, f)
    expected = (
        Forecast.WRITE
        if needs_lock(decision, auth_sent)
        else Forecast.CHALLENGE
        if decision.action is Action.REQUIRE_UIA
        else Forecast.READ_FIRST
    )
    assert forecast(t, f, auth_sent) is expected
    if forecast(t, f, auth_sent) is Forecast.CHALLENGE:
        assert not auth_sent


@pytest.mark.parametrize(
    ("auth_sent", "expected"), [(True, Forecast.WRITE), (False, Forecast.READ_FIRST)]
)
def test_with_nothing_cached_only_an_answer_to_a_challenge_is_forecast(
    auth_sent: bool, expected: Forecast
) -> None:
    """With nothing cached, a request with `auth` is taken for the answer to a challenge,
    which writes; one without may be a first upload or a challenge, read first."""
    assert forecast(Toggles(), None, auth_sent) is expected


def test_a_challenge_forecast_from_the_cache_yields_to_an_open_window() -> None:
    """The cache holds no window: the forecast is a challenge, the decision on the stored
    state (an admin window open) an upload without UIA."""
    stored = {"master": {"keys": {"ed25519:A": "A"}}}
    requested = {"master": {"keys": {"ed25519:B": "B"}}}
    from_cache = Facts(requested=requested, stored=stored, now_ms=1_000)
    assert forecast(Toggles(), from_cache, auth_sent=False) is Forecast.CHALLENGE
    from_database = attrs.evolve(from_cache, window_expires_ms=2_000)
    assert decide(Toggles(), from_database) == Decision(Rule.REPLACEMENT_WINDOW, Action.UPLOAD)


@pytest.mark.parametrize(
    ("facts", "without_auth", "with_auth"),
    [
        # No stored master key: a first upload, written without UIA.
        (Facts(requested={"master": {"k": 1}}, stored={}), Forecast.WRITE, Forecast.WRITE),
        # The same keys: answered "already stored".
        (
            Facts(requested={"master": {"k": 1}}, stored={"master": {"k": 1}}),
            Forecast.READ_FIRST,
            Forecast.READ_FIRST,
        ),
        # A replacement: challenged, and written once the answer to the challenge passes UIA.
        (
            Facts(requested={"master": {"k": 2}}, stored={"master": {"k": 1}}),
            Forecast.CHALLENGE,
            Forecast.WRITE,
        ),
        # Refused: no UIA for a requester without an access token of its own.
        (
            Facts(requested={"master": {"k": 2}}, stored={"master": {"k": 1}}, can_do_uia=False),
            Forecast.READ_FIRST,
            Forecast.READ_FIRST,
        ),
        # Synapse's delegated-auth answer, given under the lock.
        (
            Facts(requested={"master": {"k": 2}}, stored={"master": {"k": 1}}, delegated_auth=True),
            Forecast.WRITE,
            Forecast.WRITE,
        ),
    ],
)
def test_what_each_request_is_forecast(
    facts: Facts, without_auth: Forecast, with_auth: Forecast
) -> None:
    assert forecast(Toggles(), facts, auth_sent=False) is without_auth
    assert forecast(Toggles(), facts, auth_sent=True) is with_auth
