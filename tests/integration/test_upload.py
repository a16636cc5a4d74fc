"""The upload endpoint against a real Synapse: every row of the decision table in
docs/how-it-works.md, and what the module does where native Synapse fails or writes part of a
request (validation, key IDs in use, unchanged keys, refused requests, the log line), with
real signed keys and the password UIA stage."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import requests

from tests.conftest import ServerFactory
from tests.harness.client import CrossSigningKeys, SigningKeyPair, User, register_user
from tests.harness.server import SynapseServer

pytestmark = pytest.mark.synapse


def assert_challenge(response: requests.Response) -> dict[str, Any]:
    """A UIA challenge: 401 with the flows the server offers and a session."""
    assert response.status_code == 401, response.text
    body = response.json()
    assert isinstance(body.get("session"), str) and body["session"]
    stages = [stage for flow in body["flows"] for stage in flow["stages"]]
    assert "m.login.password" in stages
    return body  # type: ignore[no-any-return]


def assert_error(response: requests.Response, status: int, errcode: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["errcode"] == errcode, body
    assert isinstance(body.get("error"), str) and body["error"]
    return body  # type: ignore[no-any-return]


def with_keys(user: User) -> CrossSigningKeys:
    keys = user.keys()
    assert user.upload(keys.body()).status_code == 200
    return keys


def decisions(server: SynapseServer, user: User) -> list[str]:
    needle = f"cross-signing upload decision: user={user.user_id} "
    return [line.split(needle)[1] for line in server.log_lines(needle)]


# Row 1: no keys.


def test_no_keys_answers_200_and_writes_nothing(user: User) -> None:
    assert user.upload({}).json() == {}
    assert user.stored_keys() == {}
    keys = with_keys(user)
    response = user.upload({"auth": {"type": "m.login.dummy"}, "master_key": None})
    assert (response.status_code, response.json()) == (200, {})
    assert user.stored_public_keys()["master"] == keys.master.public


# Row 2: identical re-upload.


def test_identical_reupload_needs_no_uia(user: User) -> None:
    keys = with_keys(user)
    for body in (keys.body(), keys.body(ssk=False, usk=False), keys.body(master=False)):
        response = user.upload(body)
        assert (response.status_code, response.json()) == (200, {})


def test_identical_keys_plus_a_new_one_is_not_identical(user: User) -> None:
    keys = user.keys()
    assert user.upload(keys.body(usk=False)).status_code == 200
    # The user-signing key is new, but a master key is stored: replacing needs UIA.
    assert_challenge(user.upload(keys.body()))
    assert user.upload_with_uia(keys.body()).status_code == 200
    assert user.stored_public_keys()["user_signing"] == keys.user_signing.public


# Row 3: first upload (MSC3967).


def test_first_upload_needs_no_uia(server: SynapseServer, user: User) -> None:
    keys = user.keys()
    response = user.upload(keys.body())
    assert (response.status_code, response.json()) == (200, {})
    assert user.stored_public_keys() == {
        "master": keys.master.public,
        "self_signing": keys.self_signing.public,
        "user_signing": keys.user_signing.public,
    }
    assert "rule=first_upload outcome=uploaded" in decisions(server, user)


def test_first_upload_of_the_master_key_alone(user: User) -> None:
    keys = user.keys()
    assert user.upload(keys.body(ssk=False, usk=False)).status_code == 200
    # Adding the sub-keys later replaces nothing, but a master key now exists.
    assert_challenge(user.upload(keys.body(master=False)))


# Row 7: UIA, with Synapse's own handler.


def test_replacement_requires_uia(server: SynapseServer, user: User) -> None:
    old = with_keys(user)
    new = user.keys()
    challenge = assert_challenge(user.upload(new.body()))
    assert user.stored_public_keys()["master"] == old.master.public
    response = user.upload({**new.body(), "auth": user.password_auth(challenge["session"])})
    assert (response.status_code, response.json()) == (200, {})
    assert user.stored_public_keys()["master"] == new.master.public
    assert decisions(server, user)[-2:] == [
        "rule=uia outcome=uia_challenge",
        "rule=uia outcome=uploaded",
    ]


def test_wrong_password_is_refused(user: User) -> None:
    old = with_keys(user)
    new = user.keys()
    challenge = assert_challenge(user.upload(new.body()))
    auth = {**user.password_auth(challenge["session"]), "password": "not the password"}
    response = user.upload({**new.body(), "auth": auth})
    assert response.status_code in (401, 403), response.text
    assert response.json()["errcode"] == "M_FORBIDDEN"
    assert user.stored_public_keys()["master"] == old.master.public


def test_no_grace_period_after_a_recent_uia(user: User) -> None:
    """Synapse's `ui_auth.session_timeout` (set in the test config) does not skip UIA here."""
    with_keys(user)
    assert user.upload_with_uia(user.keys().body()).status_code == 200
    assert_challenge(user.upload(user.keys().body()))


# Toggles: the module, not Synapse, is in control.


def test_first_upload_toggle_off(synapse_server: ServerFactory) -> None:
    server = synapse_server({"first_upload_without_uia": False})
    user = register_user(server.base_url, server.shared_secret)
    keys = user.keys()
    assert_challenge(user.upload(keys.body()))
    assert user.stored_keys() == {}
    assert user.upload_with_uia(keys.body()).status_code == 200
    assert user.stored_public_keys()["master"] == keys.master.public


def test_identical_reupload_toggle_off(synapse_server: ServerFactory) -> None:
    server = synapse_server({"identical_reupload_without_uia": False})
    user = register_user(server.base_url, server.shared_secret)
    keys = with_keys(user)
    assert_challenge(user.upload(keys.body()))
    response = user.upload_with_uia(keys.body())
    assert (response.status_code, response.json()) == (200, {})
    assert user.stored_public_keys()["master"] == keys.master.public


# Validation happens before anything is written, never a 500.


@pytest.mark.parametrize("value", ["x", 5, ["master"], True])
def test_key_that_is_not_an_object(
    server: SynapseServer, native_server: SynapseServer, value: Any
) -> None:
    user = register_user(server.base_url, server.shared_secret)
    assert_error(user.upload({"master_key": value}), 400, "M_BAD_JSON")
    assert user.stored_keys() == {}
    native = register_user(native_server.base_url, native_server.shared_secret)
    assert native.upload({"master_key": value}).status_code == 500


@pytest.mark.parametrize(
    ("change", "errcode"),
    [
        (lambda k: k.update(user_id="@someone_else:localhost"), "M_INVALID_PARAM"),
        (lambda k: k.update(usage=["user_signing"]), "M_INVALID_PARAM"),
        (lambda k: k.update(keys={}), "M_INVALID_PARAM"),
        (lambda k: k.update(keys={"ed25519:abc": "abd"}), "M_INVALID_PARAM"),
        (lambda k: k.update(keys="abc"), "M_BAD_JSON"),
    ],
)
def test_malformed_master_key(user: User, change: Any, errcode: str) -> None:
    body = user.keys().body()
    change(body["master_key"])
    assert_error(user.upload(body), 400, errcode)
    assert user.stored_keys() == {}


def test_bad_signature(user: User) -> None:
    keys = user.keys()
    body = keys.body()
    body["self_signing_key"] = keys.self_signing_key(signer=SigningKeyPair())
    assert_error(user.upload(body), 400, "M_INVALID_SIGNATURE")
    assert user.stored_keys() == {}


def test_subkey_without_a_master_key(user: User) -> None:
    assert_error(user.upload(user.keys().body(master=False)), 400, "M_MISSING_PARAM")
    assert user.stored_keys() == {}


def test_auth_that_is_not_an_object(user: User) -> None:
    with_keys(user)
    assert_error(user.upload({**user.keys().body(), "auth": "password"}), 400, "M_BAD_JSON")


def test_body_that_is_not_json(user: User) -> None:
    response = user.session.post(
        f"{user.base_url}/_matrix/client/v3/keys/device_signing/upload",
        data=b"{not json",
        headers={"Authorization": f"Bearer {user.access_token}"},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_NOT_JSON"


def test_no_token(server: SynapseServer) -> None:
    response = requests.post(
        f"{server.base_url}/_matrix/client/v3/keys/device_signing/upload", json={}, timeout=30
    )
    assert_error(response, 401, "M_MISSING_TOKEN")


# A key whose ID is in use (a device's, or a key the user had before) is refused with a
# 403, never a 500, and nothing is stored; the stored key sent again with other content is
# refused with a pointer to /keys/signatures/upload.


def login_with_device(server: SynapseServer, user: User, device_id: str) -> User:
    response = requests.post(
        f"{server.base_url}/_matrix/client/v3/login",
        json={
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user.user_id},
            "password": user.password,
            "device_id": device_id,
        },
        timeout=30,
    )
    response.raise_for_status()
    return User(
        server.base_url, user.user_id, response.json()["access_token"], device_id, user.password
    )


def test_a_refusal_after_a_forecast_challenge_waits_for_it_and_logs_no_error(
    server: SynapseServer,
) -> None:
    """Challenges fill Synapse's cache, from which the next one is forecast and built beside
    the read; the read then finds the new key's ID taken by a device: 403, and the challenge
    built meanwhile is dropped within the request."""
    user = register_user(server.base_url, server.shared_secret)
    assert user.upload_with_uia(user.keys().body()).status_code == 200
    assert user.upload(user.keys().body()).status_code == 401
    assert user.upload(user.keys().body()).status_code == 401
    keys = user.keys()
    login_with_device(server, user, keys.master.public)
    assert assert_error(user.upload(keys.body()), 403, "M_FORBIDDEN")["error"] == "Key ID in use"
    assert not server.log_lines("Unhandled error in Deferred")
    assert not server.log_lines("finished log context")


def test_key_id_in_use_by_a_device(server: SynapseServer, native_server: SynapseServer) -> None:
    user = register_user(server.base_url, server.shared_secret)
    keys = user.keys()
    login_with_device(server, user, keys.master.public)
    assert assert_error(user.upload(keys.body()), 403, "M_FORBIDDEN")["error"] == "Key ID in use"
    assert user.stored_keys() == {}

    native = register_user(native_server.base_url, native_server.shared_secret)
    native_keys = native.keys()
    login_with_device(native_server, native, native_keys.master.public)
    assert native.upload(native_keys.body()).status_code == 500


def test_key_id_of_a_former_key(user: User) -> None:
    """Every cross-signing key a user had keeps its device ID: reusing one is refused."""
    old = with_keys(user)
    new = user.keys()
    assert user.upload_with_uia(new.body()).status_code == 200
    back = CrossSigningKeys(user.user_id, master=old.master)
    response = user.upload_with_uia(back.body())
    assert_error(response, 403, "M_FORBIDDEN")
    assert user.stored_public_keys()["master"] == new.master.public


def test_resigned_master_key_points_to_signatures_upload(user: User) -> None:
    keys = with_keys(user)
    resigned = copy.deepcopy(keys.master_key())
    resigned["signatures"] = {user.user_id: {f"ed25519:{user.device_id}": "c2lnbmF0dXJl"}}
    body = assert_error(user.upload({"master_key": resigned}), 400, "M_INVALID_PARAM")
    assert "/keys/signatures/upload" in body["error"]


# Keys sent unchanged beside a new one are not written again.


def test_rotate_self_signing_key_while_resending_master(
    server: SynapseServer, native_server: SynapseServer
) -> None:
    user = register_user(server.base_url, server.shared_secret)
    keys = with_keys(user)
    keys.self_signing = SigningKeyPair()
    response = user.upload_with_uia(keys.body(usk=False))
    assert (response.status_code, response.json()) == (200, {})
    assert user.stored_public_keys()["self_signing"] == keys.self_signing.public
    assert user.stored_public_keys()["master"] == keys.master.public

    native = register_user(native_server.base_url, native_server.shared_secret)
    native_keys = with_keys(native)
    native_keys.self_signing = SigningKeyPair()
    assert native.upload_with_uia(native_keys.body(usk=False)).status_code == 500


# A refused request writes no key, not even part of the upload.


def test_refused_request_changes_no_key(
    server: SynapseServer, native_server: SynapseServer
) -> None:
    """A new master key with a self-signing key whose ID is taken: nothing is stored."""
    user = register_user(server.base_url, server.shared_secret)
    old = with_keys(user)
    new = user.keys()
    login_with_device(server, user, new.self_signing.public)
    assert_error(user.upload_with_uia(new.body()), 403, "M_FORBIDDEN")
    assert user.stored_public_keys() == {
        "master": old.master.public,
        "self_signing": old.self_signing.public,
        "user_signing": old.user_signing.public,
    }

    native = register_user(native_server.base_url, native_server.shared_secret)
    native_old = with_keys(native)
    native_new = native.keys()
    login_with_device(native_server, native, native_new.self_signing.public)
    assert native.upload_with_uia(native_new.body()).status_code == 500
    # Native Synapse stored the new master key although the request failed.
    assert native.stored_public_keys()["master"] != native_old.master.public


def test_bad_signature_with_a_new_master_key_changes_nothing(user: User) -> None:
    old = with_keys(user)
    new = user.keys()
    body = new.body()
    body["user_signing_key"] = new.user_signing_key(signer=old.master)
    # UIA first, as in native Synapse; the signature is checked before anything is written.
    assert user.upload(body).status_code == 401
    assert_error(user.upload_with_uia(body), 400, "M_INVALID_SIGNATURE")
    assert user.stored_public_keys()["master"] == old.master.public


# Every decision is logged in one line.


def test_one_log_line_per_decision(server: SynapseServer, user: User) -> None:
    keys = user.keys()
    user.upload({})
    user.upload(keys.body())
    user.upload(keys.body())
    user.upload(user.keys().body())
    user.upload({"master_key": "x"})
    assert decisions(server, user) == [
        "rule=no_keys outcome=nothing_written",
        "rule=first_upload outcome=uploaded",
        "rule=identical_reupload outcome=nothing_written",
        "rule=uia outcome=uia_challenge",
        "rule=validation outcome=refused:M_BAD_JSON",
    ]


def test_new_master_key_with_the_stored_self_signing_key_is_refused(user: User) -> None:
    """The stored self-signing key is not sent to Synapse (it is unchanged), but it must be
    signed by the new master key all the same."""
    old = with_keys(user)
    new = user.keys()
    body = {**new.body(ssk=False, usk=False), "self_signing_key": old.self_signing_key()}
    assert_error(user.upload_with_uia(body), 400, "M_INVALID_SIGNATURE")
    assert user.stored_public_keys()["master"] == old.master.public
