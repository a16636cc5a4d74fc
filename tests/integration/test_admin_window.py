"""The replacement-window admin API against a real Synapse: grant, status and revoke, the
errors of every method, expiry, one replacement per grant, the audit log, and the difference
from native Synapse, which stores the grant but ignores it without delegated auth."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.conftest import ServerFactory
from tests.harness.client import CrossSigningKeys, User, register_user
from tests.harness.server import SynapseServer

pytestmark = pytest.mark.synapse

DEFAULT_WINDOW_MS = 10 * 60 * 1000
DEFAULT_MAX_MS = 24 * 60 * 60 * 1000
METHODS = ("POST", "GET", "DELETE")
# The homeserver and the tests share a clock; this only absorbs rounding and request time.
SLACK_MS = 2000


def window_path(user_id: str, *, encode: bool = True) -> str:
    segment = quote(user_id, safe="") if encode else user_id
    return f"/_synapse/admin/v1/users/{segment}/_allow_cross_signing_replacement_without_uia"


def now_ms() -> int:
    return int(time.time() * 1000)


def grant(admin: User, user_id: str, body: Any = None) -> requests.Response:
    return admin.request("POST", window_path(user_id), body)


def status(admin: User, user_id: str) -> dict[str, Any]:
    response = admin.request("GET", window_path(user_id))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def revoke(admin: User, user_id: str) -> requests.Response:
    return admin.request("DELETE", window_path(user_id))


def raw_post(admin: User, user_id: str, data: bytes) -> requests.Response:
    return admin.session.post(
        f"{admin.base_url}{window_path(user_id)}",
        data=data,
        headers={"Authorization": f"Bearer {admin.access_token}"},
        timeout=60,
    )


def assert_error(response: requests.Response, status: int, errcode: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["errcode"] == errcode, body
    assert isinstance(body.get("error"), str) and body["error"]
    return str(body["error"])


def assert_challenge(response: requests.Response) -> None:
    """Refused without UIA: a 401 that offers the password stage."""
    assert response.status_code == 401, response.text
    stages = [stage for flow in response.json()["flows"] for stage in flow["stages"]]
    assert "m.login.password" in stages


def with_keys(user: User) -> CrossSigningKeys:
    keys = user.keys()
    assert user.upload_with_uia(keys.body()).status_code == 200
    return keys


def assert_replaced_without_uia(user: User) -> CrossSigningKeys:
    keys = user.keys()
    response = user.upload(keys.body())
    assert (response.status_code, response.json()) == (200, {}), response.text
    assert user.stored_public_keys()["master"] == keys.master.public
    return keys


def assert_refused_without_uia(user: User, kept: CrossSigningKeys) -> None:
    assert_challenge(user.upload(user.keys().body()))
    assert user.stored_public_keys()["master"] == kept.master.public


def assert_expiry(response: requests.Response, before_ms: int, duration_ms: int) -> int:
    assert response.status_code == 200, response.text
    body = response.json()
    # Exactly Synapse's documented response: MAS and existing scripts read it.
    assert set(body) == {"updatable_without_uia_before_ms"}
    expires = body["updatable_without_uia_before_ms"]
    assert isinstance(expires, int) and not isinstance(expires, bool)
    assert before_ms + duration_ms - SLACK_MS <= expires <= now_ms() + duration_ms + SLACK_MS
    return expires


def log_lines(server: SynapseServer, needle: str, *fields: str) -> list[str]:
    return [line for line in server.log_lines(needle) if all(f in line for f in fields)]


# Grant, then replace.


def test_grant_then_replace_once_without_uia(
    server: SynapseServer, admin: User, user: User
) -> None:
    with_keys(user)
    before = now_ms()
    expires = assert_expiry(grant(admin, user.user_id, {}), before, DEFAULT_WINDOW_MS)
    assert status(admin, user.user_id) == {
        "updatable_without_uia_before_ms": expires,
        "replaceable_without_uia": True,
    }

    replacement = assert_replaced_without_uia(user)

    # The window belonged to the replaced key: the new one has none.
    assert status(admin, user.user_id) == {
        "updatable_without_uia_before_ms": None,
        "replaceable_without_uia": False,
    }
    assert_refused_without_uia(user, replacement)
    assert user.upload_with_uia(user.keys().body()).status_code == 200

    who = (f"admin={admin.user_id}", f"user={user.user_id}")
    assert len(log_lines(server, "replacement window granted", *who)) == 1
    assert len(log_lines(server, "replaced through an admin-granted window", *who)) == 1


def ui_auth_sessions(server: SynapseServer) -> int:
    with closing(sqlite3.connect(server.directory / "homeserver.db", timeout=30)) as db:
        return int(db.execute("SELECT COUNT(*) FROM ui_auth_sessions").fetchone()[0])


def test_a_window_opened_after_challenges_wins_over_the_challenge_they_forecast(
    server: SynapseServer, admin: User, user: User
) -> None:
    """Challenges fill Synapse's cache of the user's keys, from which the module forecasts
    the next challenge and has Synapse's UIA build it while the stored state is read. The
    cache holds no window: the stored state decides, and the upload is written without UIA."""
    with_keys(user)
    assert_challenge(user.upload(user.keys().body()))
    assert_challenge(user.upload(user.keys().body()))
    assert grant(admin, user.user_id, {}).status_code == 200
    sessions = ui_auth_sessions(server)
    assert_replaced_without_uia(user)
    # The forecast was made (a UIA session built for it), and its challenge not answered.
    assert ui_auth_sessions(server) == sessions + 1
    assert not server.log_lines("Unhandled error in Deferred")


def test_grant_with_no_body(admin: User, user: User) -> None:
    with_keys(user)
    before = now_ms()
    assert_expiry(admin.request("POST", window_path(user.user_id)), before, DEFAULT_WINDOW_MS)
    assert_replaced_without_uia(user)


def test_user_id_may_arrive_unencoded(admin: User, user: User) -> None:
    with_keys(user)
    response = admin.request("POST", window_path(user.user_id, encode=False), {})
    assert response.status_code == 200, response.text
    assert status(admin, user.user_id)["replaceable_without_uia"] is True


def test_replacing_the_key_with_uia_ends_the_window(admin: User, user: User) -> None:
    with_keys(user)
    assert grant(admin, user.user_id, {}).status_code == 200
    replacement = user.keys()
    assert user.upload_with_uia(replacement.body()).status_code == 200
    assert status(admin, user.user_id)["updatable_without_uia_before_ms"] is None
    assert_refused_without_uia(user, replacement)


def test_new_subkeys_do_not_use_the_window_up(
    server: SynapseServer, admin: User, user: User
) -> None:
    keys = with_keys(user)
    assert grant(admin, user.user_id, {}).status_code == 200
    subkeys = CrossSigningKeys(user.user_id, master=keys.master)
    response = user.upload(subkeys.body(master=False))
    assert (response.status_code, response.json()) == (200, {}), response.text
    assert user.stored_public_keys()["self_signing"] == subkeys.self_signing.public
    assert status(admin, user.user_id)["replaceable_without_uia"] is True

    assert_replaced_without_uia(user)
    lines = log_lines(
        server,
        "replaced through an admin-granted window",
        f"admin={admin.user_id}",
        f"user={user.user_id}",
    )
    assert [line.rsplit("keys=", 1)[1] for line in lines] == [
        "self_signing,user_signing",
        "master,self_signing,user_signing",
    ]


def test_a_new_grant_replaces_the_previous_one(admin: User, user: User) -> None:
    with_keys(user)
    assert grant(admin, user.user_id, {"duration_ms": DEFAULT_MAX_MS}).status_code == 200
    before = now_ms()
    expires = assert_expiry(grant(admin, user.user_id, {"duration_ms": 5000}), before, 5000)
    assert status(admin, user.user_id)["updatable_without_uia_before_ms"] == expires


# Duration.


def test_custom_duration(admin: User, user: User) -> None:
    with_keys(user)
    before = now_ms()
    expires = assert_expiry(grant(admin, user.user_id, {"duration_ms": 5000}), before, 5000)
    assert status(admin, user.user_id) == {
        "updatable_without_uia_before_ms": expires,
        "replaceable_without_uia": True,
    }
    assert_replaced_without_uia(user)


def test_duration_up_to_the_default_bound(admin: User, user: User) -> None:
    with_keys(user)
    before = now_ms()
    assert_expiry(
        grant(admin, user.user_id, {"duration_ms": DEFAULT_MAX_MS}), before, DEFAULT_MAX_MS
    )
    error = assert_error(
        grant(admin, user.user_id, {"duration_ms": DEFAULT_MAX_MS + 1}), 400, "M_INVALID_PARAM"
    )
    assert "duration_ms" in error and "max_replacement_window" in error
    assert str(DEFAULT_MAX_MS) in error


def test_configured_window_length_and_bound(synapse_server: ServerFactory) -> None:
    server = synapse_server({"replacement_window": "2m", "max_replacement_window": "1h"})
    admin = register_user(server.base_url, server.shared_secret, admin=True)
    user = register_user(server.base_url, server.shared_secret)
    with_keys(user)

    before = now_ms()
    assert_expiry(grant(admin, user.user_id, {}), before, 2 * 60 * 1000)
    before = now_ms()
    assert_expiry(grant(admin, user.user_id, {"duration_ms": 3_600_000}), before, 3_600_000)
    error = assert_error(
        grant(admin, user.user_id, {"duration_ms": 3_600_001}), 400, "M_INVALID_PARAM"
    )
    assert "duration_ms" in error and "3600000" in error


@pytest.mark.parametrize(
    "duration",
    [0, -1, 1000.0, 1.5, True, False, "1000", "10m", None, [1000], {"ms": 1000}],
    ids=repr,
)
def test_duration_must_be_a_positive_integer(admin: User, user: User, duration: Any) -> None:
    with_keys(user)
    error = assert_error(
        grant(admin, user.user_id, {"duration_ms": duration}), 400, "M_INVALID_PARAM"
    )
    assert "duration_ms" in error and "max_replacement_window" in error
    assert status(admin, user.user_id)["updatable_without_uia_before_ms"] is None


@pytest.mark.parametrize(
    ("data", "errcode"),
    [
        (b"{not json", "M_NOT_JSON"),
        (b"\xff\xfe", "M_NOT_JSON"),
        (b"[]", "M_BAD_JSON"),
        (b'"duration_ms"', "M_BAD_JSON"),
        (b"1000", "M_BAD_JSON"),
    ],
    ids=repr,
)
def test_malformed_body(admin: User, user: User, data: bytes, errcode: str) -> None:
    with_keys(user)
    assert_error(raw_post(admin, user.user_id, data), 400, errcode)
    assert status(admin, user.user_id)["updatable_without_uia_before_ms"] is None


def test_unknown_body_fields_are_ignored(admin: User, user: User) -> None:
    with_keys(user)
    before = now_ms()
    assert_expiry(grant(admin, user.user_id, {"reason": "lost device"}), before, DEFAULT_WINDOW_MS)


# Expiry.


def test_window_expires(admin: User, user: User) -> None:
    keys = with_keys(user)
    before = now_ms()
    expires = assert_expiry(grant(admin, user.user_id, {"duration_ms": 1000}), before, 1000)
    assert status(admin, user.user_id)["replaceable_without_uia"] is True
    time.sleep(max(0.0, (expires - now_ms()) / 1000) + 0.5)
    assert status(admin, user.user_id) == {
        "updatable_without_uia_before_ms": expires,
        "replaceable_without_uia": False,
    }
    assert_refused_without_uia(user, keys)


# Status and revoke.


def test_status_through_grant_and_revoke(server: SynapseServer, admin: User, user: User) -> None:
    with_keys(user)
    closed = {"updatable_without_uia_before_ms": None, "replaceable_without_uia": False}
    assert status(admin, user.user_id) == closed
    # Reading changes nothing.
    assert status(admin, user.user_id) == closed

    expires = grant(admin, user.user_id, {}).json()["updatable_without_uia_before_ms"]
    opened = {"updatable_without_uia_before_ms": expires, "replaceable_without_uia": True}
    assert status(admin, user.user_id) == opened
    assert status(admin, user.user_id) == opened

    response = revoke(admin, user.user_id)
    assert (response.status_code, response.json()) == (200, {})
    assert status(admin, user.user_id) == closed
    assert log_lines(
        server,
        "replacement window revoked",
        f"admin={admin.user_id}",
        f"user={user.user_id}",
        "was_open=True",
    )


def test_revoke_then_replace_is_refused(admin: User, user: User) -> None:
    keys = with_keys(user)
    assert grant(admin, user.user_id, {}).status_code == 200
    assert revoke(admin, user.user_id).status_code == 200
    assert_refused_without_uia(user, keys)
    # A fresh grant opens it again.
    assert grant(admin, user.user_id, {}).status_code == 200
    assert_replaced_without_uia(user)


def test_revoke_without_a_window(server: SynapseServer, admin: User, user: User) -> None:
    with_keys(user)
    for _ in range(2):
        response = revoke(admin, user.user_id)
        assert (response.status_code, response.json()) == (200, {})
    assert log_lines(server, "replacement window revoked", f"user={user.user_id}", "was_open=False")


def test_revoke_after_expiry_clears_the_timestamp(admin: User, user: User) -> None:
    with_keys(user)
    assert grant(admin, user.user_id, {"duration_ms": 1}).status_code == 200
    time.sleep(0.05)
    assert status(admin, user.user_id)["updatable_without_uia_before_ms"] is not None
    assert revoke(admin, user.user_id).status_code == 200
    assert status(admin, user.user_id)["updatable_without_uia_before_ms"] is None


# Errors, for every method.


@pytest.mark.parametrize("method", METHODS)
def test_requires_a_token(server: SynapseServer, user: User, method: str) -> None:
    with_keys(user)
    response = requests.request(method, f"{server.base_url}{window_path(user.user_id)}", timeout=60)
    assert_error(response, 401, "M_MISSING_TOKEN")


@pytest.mark.parametrize("method", METHODS)
def test_requires_an_admin(server: SynapseServer, user: User, method: str) -> None:
    keys = with_keys(user)
    other = register_user(server.base_url, server.shared_secret)
    for requester in (user, other):
        assert_error(requester.request(method, window_path(user.user_id), {}), 403, "M_FORBIDDEN")
    # A refused grant opened nothing.
    assert_refused_without_uia(user, keys)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_user(server: SynapseServer, admin: User, method: str) -> None:
    response = admin.request(method, window_path(f"@nobody-{time.time_ns()}:localhost"), {})
    assert_error(response, 404, "M_NOT_FOUND")


@pytest.mark.parametrize("method", METHODS)
def test_user_without_keys(admin: User, user: User, method: str) -> None:
    assert_error(admin.request(method, window_path(user.user_id), {}), 404, "M_NOT_FOUND")


@pytest.mark.parametrize("method", METHODS)
def test_remote_user_is_not_found(admin: User, method: str) -> None:
    error = assert_error(
        admin.request(method, window_path("@someone:example.org"), {}), 404, "M_NOT_FOUND"
    )
    assert "not a user of this homeserver" in error


def test_remote_user_is_not_found_as_in_native_synapse(synapse_server: ServerFactory) -> None:
    """Tools written against Synapse's documentation see the same answer."""
    native = synapse_server(with_module=False, extra_config={"ui_auth": {"session_timeout": 0}})
    admin = register_user(native.base_url, native.shared_secret, admin=True)
    assert_error(admin.request("POST", window_path("@someone:example.org"), {}), 404, "M_NOT_FOUND")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("user_id", ["alice", "@alice", "!room:localhost", ""], ids=repr)
def test_malformed_user_id(admin: User, method: str, user_id: str) -> None:
    assert_error(admin.request(method, window_path(user_id), {}), 400, "M_INVALID_PARAM")


def test_the_body_is_checked_before_the_keys(admin: User, user: User) -> None:
    assert_error(grant(admin, user.user_id, {"duration_ms": -1}), 400, "M_INVALID_PARAM")
    assert_error(grant(admin, user.user_id, {"duration_ms": 1000}), 404, "M_NOT_FOUND")


# Native Synapse, for comparison.


def test_native_synapse_ignores_the_grant_and_the_module_honours_it(
    synapse_server: ServerFactory, server: SynapseServer
) -> None:
    # Older releases (1.98 among them) let a fresh access token skip UIA for
    # `ui_auth.session_timeout`, grant or not: without it only the grant makes a difference.
    native_server = synapse_server(
        with_module=False, extra_config={"ui_auth": {"session_timeout": 0}}
    )
    outcomes: dict[str, int] = {}
    for name, homeserver in (("native", native_server), ("module", server)):
        admin = register_user(homeserver.base_url, homeserver.shared_secret, admin=True)
        user = register_user(homeserver.base_url, homeserver.shared_secret)
        with_keys(user)
        response = grant(admin, user.user_id, {})
        assert response.status_code == 200, (name, response.text)
        assert set(response.json()) == {"updatable_without_uia_before_ms"}
        outcomes[name] = user.upload(user.keys().body()).status_code
    assert outcomes == {"native": 401, "module": 200}


# The grant is in the database, with who made it.


def test_grant_survives_a_restart() -> None:
    homeserver = SynapseServer(name="restart").start()
    try:
        admin = register_user(homeserver.base_url, homeserver.shared_secret, admin=True)
        user = register_user(homeserver.base_url, homeserver.shared_secret)
        with_keys(user)
        assert grant(admin, user.user_id, {}).status_code == 200

        homeserver.stop(cleanup=False)
        homeserver.start()

        assert status(admin, user.user_id)["replaceable_without_uia"] is True
        assert_replaced_without_uia(user)
        assert log_lines(
            homeserver,
            "replaced through an admin-granted window",
            f"admin={admin.user_id}",
            f"user={user.user_id}",
        )
    finally:
        homeserver.stop()


def test_a_window_opened_outside_the_module(server: SynapseServer, admin: User, user: User) -> None:
    """As MAS's own endpoint does: Synapse's column written directly. Honoured, and logged
    without an admin, even when an admin's earlier grant for the same key is on record."""
    with_keys(user)
    assert grant(admin, user.user_id, {}).status_code == 200
    with closing(sqlite3.connect(server.directory / "homeserver.db", timeout=30)) as db, db:
        db.execute(
            "UPDATE e2e_cross_signing_keys SET updatable_without_uia_before_ms = ?"
            " WHERE user_id = ? AND keytype = 'master'",
            (now_ms() + 60_000, user.user_id),
        )
    assert_replaced_without_uia(user)
    lines = log_lines(server, "replaced through an admin-granted window", f"user={user.user_id}")
    assert len(lines) == 1
    assert "admin=unknown" in lines[0]
