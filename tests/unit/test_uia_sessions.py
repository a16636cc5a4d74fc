"""The pure parts of the UIA-session bookkeeping: the keys' fingerprint and what counts as
credentials of a request's own."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from synapse_xsign_uia.uia_sessions import brings_credentials, keys_fingerprint

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
