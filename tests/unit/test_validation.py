"""Request checks that need no database, with real signed keys."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_xsign_uia.policy import requested_keys
from synapse_xsign_uia.validation import (
    RequestError,
    check_body_shape,
    check_keys,
    check_replacements,
    check_signatures,
    public_key,
)
from tests.harness.client import CrossSigningKeys, SigningKeyPair

USER = "@alice:example.org"


def refused(call: Any, *args: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        call(*args)
    return info.value


@pytest.fixture
def keys() -> CrossSigningKeys:
    return CrossSigningKeys(USER)


def test_valid_request_passes(keys: CrossSigningKeys) -> None:
    requested = requested_keys(keys.body())
    check_body_shape(keys.body())
    check_keys(requested, USER)
    check_signatures(requested, {}, USER)


@pytest.mark.parametrize("field", ["master_key", "self_signing_key", "user_signing_key", "auth"])
@pytest.mark.parametrize("value", ["x", 1, [], True])
def test_fields_must_be_objects(field: str, value: Any) -> None:
    error = refused(check_body_shape, {field: value})
    assert (error.status, error.errcode) == (400, "M_BAD_JSON")
    assert field in error.message


def mutated(keys: CrossSigningKeys, field: str, change: Any) -> dict[str, Any]:
    body = keys.body()
    change(body[field])
    return body


@pytest.mark.parametrize(
    ("change", "errcode", "words"),
    [
        (lambda k: k.update(user_id="@mallory:example.org"), "M_INVALID_PARAM", "user_id"),
        (lambda k: k.pop("user_id"), "M_INVALID_PARAM", "user_id"),
        (lambda k: k.update(usage=["something_else"]), "M_INVALID_PARAM", "usage"),
        (lambda k: k.update(usage="master"), "M_BAD_JSON", "usage"),
        (lambda k: k.update(usage=[1]), "M_BAD_JSON", "usage"),
        (lambda k: k.pop("usage"), "M_BAD_JSON", "usage"),
        (lambda k: k.update(keys=[]), "M_BAD_JSON", "keys"),
        (lambda k: k.pop("keys"), "M_BAD_JSON", "keys"),
        (lambda k: k.update(keys={}), "M_INVALID_PARAM", "exactly one"),
        (lambda k: k["keys"].update({"ed25519:AAAA": "AAAA"}), "M_INVALID_PARAM", "exactly one"),
        (lambda k: k.update(keys={"curve25519:abc": "abc"}), "M_INVALID_PARAM", "ed25519"),
        (lambda k: k.update(keys={"ed25519:abc": "abd"}), "M_INVALID_PARAM", "does not match"),
        (lambda k: k.update(keys={"ed25519:abc": "abc"}), "M_INVALID_PARAM", "not a valid ed25519"),
        (lambda k: k.update(keys={"ed25519:abc": 5}), "M_BAD_JSON", "strings"),
        (lambda k: k.update(signatures="sig"), "M_BAD_JSON", "signatures"),
        (lambda k: k.update(signatures={USER: {"ed25519:x": 1}}), "M_BAD_JSON", "signatures"),
    ],
)
@pytest.mark.parametrize("field", ["master_key", "self_signing_key", "user_signing_key"])
def test_malformed_keys(
    keys: CrossSigningKeys, field: str, change: Any, errcode: str, words: str
) -> None:
    body = mutated(keys, field, change)
    error = refused(check_keys, requested_keys(body), USER)
    assert (error.status, error.errcode) == (400, errcode)
    assert words in error.message
    assert field in error.message


def test_two_keys_with_one_public_key(keys: CrossSigningKeys) -> None:
    keys.user_signing = keys.self_signing
    error = refused(check_keys, requested_keys(keys.body()), USER)
    assert (error.status, error.errcode) == (400, "M_INVALID_PARAM")
    assert "same public key" in error.message


def test_subkeys_signed_by_the_request_master(keys: CrossSigningKeys) -> None:
    body = keys.body()
    body["self_signing_key"] = keys.self_signing_key(signer=SigningKeyPair())
    error = refused(check_signatures, requested_keys(body), {}, USER)
    assert (error.status, error.errcode) == (400, "M_INVALID_SIGNATURE")
    assert "self_signing_key" in error.message


def test_subkeys_signed_by_the_stored_master_when_none_is_sent(keys: CrossSigningKeys) -> None:
    stored = {"master": keys.master_key()}
    check_signatures(requested_keys(keys.body(master=False)), stored, USER)
    other = CrossSigningKeys(USER)
    error = refused(check_signatures, requested_keys(other.body(master=False)), stored, USER)
    assert error.errcode == "M_INVALID_SIGNATURE"


def test_subkey_signed_by_the_old_master_is_refused_with_a_new_master(
    keys: CrossSigningKeys,
) -> None:
    stored = {"master": keys.master_key(), "self_signing": keys.self_signing_key()}
    new = CrossSigningKeys(USER)
    body = {"master_key": new.master_key(), "self_signing_key": keys.self_signing_key()}
    assert (
        refused(check_signatures, requested_keys(body), stored, USER).errcode
        == "M_INVALID_SIGNATURE"
    )


def test_unsigned_subkey(keys: CrossSigningKeys) -> None:
    body = keys.body()
    body["user_signing_key"].pop("signatures")
    assert (
        refused(check_signatures, requested_keys(body), {}, USER).errcode == "M_INVALID_SIGNATURE"
    )


def test_subkey_without_any_master(keys: CrossSigningKeys) -> None:
    error = refused(check_signatures, requested_keys(keys.body(master=False)), {}, USER)
    assert (error.status, error.errcode) == (400, "M_MISSING_PARAM")


def test_tampered_subkey(keys: CrossSigningKeys) -> None:
    body = keys.body()
    body["self_signing_key"]["usage"].append("extra")
    assert (
        refused(check_signatures, requested_keys(body), {}, USER).errcode == "M_INVALID_SIGNATURE"
    )


def test_key_id_in_use(keys: CrossSigningKeys) -> None:
    changed = requested_keys(keys.body())
    taken = {public_key(changed["self_signing"])}
    error = refused(check_replacements, changed, {}, taken)
    assert (error.status, error.errcode, error.message) == (403, "M_FORBIDDEN", "Key ID in use")


def test_same_public_key_with_other_content(keys: CrossSigningKeys) -> None:
    stored = {"master": keys.master_key()}
    resigned = copy.deepcopy(keys.master_key())
    resigned["signatures"] = {USER: {"ed25519:DEVICE": "c2ln"}}
    error = refused(check_replacements, {"master": resigned}, stored, set())
    assert (error.status, error.errcode) == (400, "M_INVALID_PARAM")
    assert "/keys/signatures/upload" in error.message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
key_like = st.fixed_dictionaries(
    {},
    optional={
        "user_id": st.sampled_from([USER, "@bob:example.org"]) | json_values,
        "usage": st.lists(st.sampled_from(["master", "self_signing", "user_signing"]), max_size=2)
        | json_values,
        "keys": st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=2)
        | json_values,
        "signatures": st.dictionaries(
            st.just(USER),
            st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2),
            max_size=1,
        )
        | json_values,
    },
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "master_key": key_like | json_values,
            "self_signing_key": key_like | json_values,
            "user_signing_key": key_like | json_values,
            "auth": json_values,
        },
    )
)
def test_arbitrary_bodies_fail_only_with_request_errors(body: dict[str, Any]) -> None:
    """Whatever a client sends, the checks either pass or refuse with a 4xx Matrix error."""
    try:
        check_body_shape(body)
        requested = requested_keys(body)
        check_keys(requested, USER)
        check_signatures(requested, {}, USER)
    except RequestError as e:
        assert 400 <= e.status < 500
        assert e.errcode.startswith("M_")
