"""The UIA-session bookkeeping without a homeserver: the keys' fingerprint, what counts as
credentials of a request's own, and the offers a process keeps in memory."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from synapse_xsign_uia import uia_sessions
from synapse_xsign_uia.uia_sessions import UiaSessions, brings_credentials, keys_fingerprint

KEYS = {
    "master": {"user_id": "@a:hs", "usage": ["master"], "keys": {"ed25519:M": "M"}},
    "self_signing": {
        "user_id": "@a:hs",
        "usage": ["self_signing"],
        "keys": {"ed25519:S": "S"},
        "signatures": {"@a:hs": {"ed25519:M": "sig"}},
    },
}


def reordered(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: reordered(value[k]) for k in reversed(list(value))}
    return value


def test_the_fingerprint_ignores_order_and_spacing() -> None:
    again = json.loads(json.dumps(reordered(KEYS), indent=4))
    assert keys_fingerprint(again) == keys_fingerprint(KEYS)
    assert len(keys_fingerprint(KEYS)) == 64


def test_the_fingerprint_sees_every_change() -> None:
    other = json.loads(json.dumps(KEYS))
    other["self_signing"]["signatures"]["@a:hs"]["ed25519:M"] = "other"
    assert keys_fingerprint(other) != keys_fingerprint(KEYS)
    assert keys_fingerprint({"master": KEYS["master"]}) != keys_fingerprint(KEYS)


@given(
    st.dictionaries(
        st.sampled_from(["master", "self_signing"]), st.dictionaries(st.text(), st.text())
    )
)
def test_equal_keys_have_equal_fingerprints(keys: dict[str, Any]) -> None:
    assert keys_fingerprint(json.loads(json.dumps(keys))) == keys_fingerprint(keys)


def test_credentials_are_a_stage_attempted() -> None:
    assert brings_credentials({"type": "m.login.password", "session": "S", "password": "p"})
    assert brings_credentials({"type": "m.login.password", "password": "p"})
    assert not brings_credentials({"session": "S"})
    assert not brings_credentials({"session": "S", "type": None})
    assert not brings_credentials(None)
    assert not brings_credentials("S")


class Clock:
    is_main_process = False
    with_workers = False

    def __init__(self) -> None:
        self.now = 1_000_000_000

    def now_ms(self) -> int:
        return self.now


# Without workers an offer stays in memory: the request it answered plays no part.
NO_REQUEST = cast(Any, None)


def caller(device_id: str) -> Any:
    return SimpleNamespace(user_id="@a:hs", device_id=device_id)


def test_offers_in_memory_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uia_sessions, "MAX_REMEMBERED_OFFERS", 3)
    clock = Clock()
    sessions = UiaSessions(cast(Any, clock), cast(Any, None))
    for n in range(5):
        sessions.offered(f"S{n}", caller("PHONE"), KEYS, NO_REQUEST)
    assert list(sessions._offers) == ["S2", "S3", "S4"]
    # The first offer of a session counts.
    sessions.offered("S4", caller("LAPTOP"), {}, NO_REQUEST)
    assert sessions._offers["S4"].device_id == "PHONE"
    assert sessions._offers["S4"].keys_hash == keys_fingerprint(KEYS)


def test_offers_are_forgotten_with_synapse_s_session(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    sessions = UiaSessions(cast(Any, clock), cast(Any, None))
    sessions.offered("OLD", caller("PHONE"), KEYS, NO_REQUEST)
    clock.now += uia_sessions.SESSION_LIFETIME_MS + 1
    sessions.offered("NEW", caller("PHONE"), KEYS, NO_REQUEST)
    assert list(sessions._offers) == ["NEW"]
