"""One authentication, one identity change: with `strict_uia_sessions` (the default), a UIA
session authorises one write of keys, from the device that received its challenge, of the
keys it was challenged for. Each replay is shown against native Synapse too, which lets a
completed session through again, from any device, with any keys.

A refused replay gets a fresh UIA challenge (a new session, the usual flows), so a client
simply asks the user again; nothing is written.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any, cast

import pytest
import requests
import synapse

from synapse_xsign_uia._synapse import parse_version
from tests.conftest import ServerFactory
from tests.harness.client import CrossSigningKeys, User, register_user
from tests.harness.server import SynapseServer
from tests.harness.workers import WorkerDeployment
from tests.integration.test_upload import assert_challenge, assert_error, login_with_device

pytestmark = pytest.mark.synapse

SYNAPSE = parse_version(synapse.__version__)
# Native Synapse 1.98 skips UIA within `ui_auth.session_timeout` of the last one, which the
# harness sets: the native comparisons run without it, so that what lets a replay through
# is the completed session, not the grace period.
NO_GRACE_PERIOD: dict[str, Any] = {"ui_auth": {"session_timeout": 0}}
# Synapse's lifetime of a UIA session.
SESSION_LIFETIME_MS = 48 * 60 * 60 * 1000


@pytest.fixture(scope="module")
def native(synapse_server: ServerFactory) -> SynapseServer:
    return synapse_server(with_module=False, extra_config=NO_GRACE_PERIOD)


def set_up(server: SynapseServer) -> tuple[User, CrossSigningKeys]:
    """A user with cross-signing keys (through UIA where the server asks for it)."""
    user = register_user(server.base_url, server.shared_secret)
    keys = user.keys()
    response = user.upload_with_uia(keys.body())
    assert response.status_code == 200, response.text
    return user, keys


def challenge(user: User, keys: CrossSigningKeys) -> str:
    """Ask to store `keys`; the session of the UIA challenge that answers."""
    return str(assert_challenge(user.upload(keys.body()))["session"])


def with_password(user: User, keys: CrossSigningKeys, session: str) -> requests.Response:
    return user.upload({**keys.body(), "auth": user.password_auth(session)})


def with_session(user: User, keys: CrossSigningKeys, session: str) -> requests.Response:
    """The request a client sends once a session is complete: no credentials of its own."""
    return user.upload({**keys.body(), "auth": {"session": session}})


def replace(user: User, keys: CrossSigningKeys) -> str:
    """Replace the user's keys with `keys`, through a challenge and the password."""
    session = challenge(user, keys)
    response = with_password(user, keys, session)
    assert (response.status_code, response.json()) == (200, {}), response.text
    return session


def assert_fresh_challenge(response: requests.Response, replayed: str) -> str:
    body = assert_challenge(response)
    assert body["session"] != replayed
    assert "completed" not in body or body["completed"] == []
    return str(body["session"])


def broken_signature(user: User, keys: CrossSigningKeys) -> dict[str, Any]:
    """`keys`' upload body with a self-signing key whose signature does not verify."""
    body = keys.body()
    body["self_signing_key"]["signatures"] = {user.user_id: {keys.master.key_id: "AAAA"}}
    return body


def stored_master(user: User) -> str:
    return user.stored_public_keys()["master"]


def decisions(server: SynapseServer, user: User) -> list[str]:
    needle = f"cross-signing upload decision: user={user.user_id} "
    return [line.split(needle)[1] for line in server.log_lines(needle)]


# Single use.


def test_a_completed_session_authorises_one_write(
    server: SynapseServer, native: SynapseServer
) -> None:
    # Native Synapse: the completed session replaces the identity again, without a password.
    user, _ = set_up(native)
    session = replace(user, user.keys())
    other = user.keys()
    response = with_session(user, other, session)
    assert (response.status_code, response.json()) == (200, {}), response.text
    assert stored_master(user) == other.master.public

    # With the module: a fresh challenge, and nothing written.
    user, _ = set_up(server)
    replaced = user.keys()
    session = replace(user, replaced)
    other = user.keys()
    fresh = assert_fresh_challenge(with_session(user, other, session), session)
    assert stored_master(user) == replaced.master.public
    # Even with the password: the session is spent.
    assert_fresh_challenge(with_password(user, other, session), session)
    assert stored_master(user) == replaced.master.public
    # The fresh session works as any other.
    response = with_password(user, other, fresh)
    assert (response.status_code, response.json()) == (200, {}), response.text
    assert stored_master(user) == other.master.public
    assert decisions(server, user)[-3:] == [
        "rule=uia outcome=uia_session_refused:spent",
        "rule=uia outcome=uia_session_refused:spent",
        "rule=uia outcome=uploaded",
    ]


def test_a_refused_replay_is_logged_with_its_reason(server: SynapseServer) -> None:
    user, _ = set_up(server)
    session = replace(user, user.keys())
    assert_fresh_challenge(with_session(user, user.keys(), session), session)
    assert decisions(server, user)[-1] == "rule=uia outcome=uia_session_refused:spent"
    assert server.log_lines(
        f"UIA session refused: user={user.user_id} device={user.device_id} session={session} "
        "reason=spent"
    )


# Bound to the device.


def test_a_session_writes_only_from_the_device_it_was_offered_to(
    server: SynapseServer, native: SynapseServer
) -> None:
    # Native Synapse: another device of the user completes the session and writes.
    user, _ = set_up(native)
    laptop = login_with_device(native, user, "LAPTOP")
    keys = user.keys()
    session = challenge(user, keys)
    response = with_password(laptop, keys, session)
    assert (response.status_code, response.json()) == (200, {}), response.text
    assert stored_master(user) == keys.master.public

    user, original = set_up(server)
    laptop = login_with_device(server, user, "LAPTOP")
    keys = user.keys()
    session = challenge(user, keys)
    assert_fresh_challenge(with_password(laptop, keys, session), session)
    assert stored_master(user) == original.master.public
    assert decisions(server, user)[-1] == "rule=uia outcome=uia_session_refused:other_device"
    # The device that was challenged still can: the password went to its session.
    response = with_session(user, keys, session)
    assert (response.status_code, response.json()) == (200, {}), response.text
    assert stored_master(user) == keys.master.public


def test_a_completed_session_is_not_replayed_from_another_device(
    server: SynapseServer, native: SynapseServer
) -> None:
    user, _ = set_up(native)
    session = replace(user, user.keys())
    other = user.keys()
    laptop = login_with_device(native, user, "LAPTOP")
    assert with_session(laptop, other, session).status_code == 200
    assert stored_master(user) == other.master.public

    user, _ = set_up(server)
    replaced = user.keys()
    session = replace(user, replaced)
    laptop = login_with_device(server, user, "LAPTOP")
    assert_fresh_challenge(with_session(laptop, user.keys(), session), session)
    assert stored_master(user) == replaced.master.public


# Bound to the keys.


def test_a_session_writes_only_the_keys_it_was_offered_for(
    server: SynapseServer, native: SynapseServer
) -> None:
    # Native Synapse: UIA completes on a request refused for its signature, then the session
    # alone stores other keys.
    user, _ = set_up(native)
    asked = user.keys()
    session = challenge(user, asked)
    response = user.upload({**broken_signature(user, asked), "auth": user.password_auth(session)})
    assert response.status_code == 400, response.text
    other = user.keys()
    response = with_session(user, other, session)
    assert (response.status_code, response.json()) == (200, {}), response.text
    assert stored_master(user) == other.master.public

    user, original = set_up(server)
    asked = user.keys()
    session = challenge(user, asked)
    response = user.upload({**broken_signature(user, asked), "auth": user.password_auth(session)})
    assert_error(response, 400, "M_INVALID_SIGNATURE")
    # Nothing was written, so nothing was used up; but other keys are another change.
    assert_fresh_challenge(with_session(user, user.keys(), session), session)
    assert stored_master(user) == original.master.public
    assert decisions(server, user)[-1] == "rule=uia outcome=uia_session_refused:other_keys"
    # The keys the session was offered for go through, once (as after single sign-on
    # completed out of band, through Synapse's fallback page).
    response = with_session(user, asked, session)
    assert (response.status_code, response.json()) == (200, {}), response.text
    assert stored_master(user) == asked.master.public
    assert_fresh_challenge(with_session(user, user.keys(), session), session)
    assert stored_master(user) == asked.master.public


def test_a_request_with_its_own_password_may_change_the_keys(server: SynapseServer) -> None:
    """The password authenticates the request itself: the keys it carries are the change
    the user authenticated."""
    user, _ = set_up(server)
    session = challenge(user, user.keys())
    other = user.keys()
    response = with_password(user, other, session)
    assert (response.status_code, response.json()) == (200, {}), response.text
    assert stored_master(user) == other.master.public


# The legitimate flows.


def test_a_wrong_password_then_the_right_one(server: SynapseServer) -> None:
    user, original = set_up(server)
    keys = user.keys()
    session = challenge(user, keys)
    wrong = {**user.password_auth(session), "password": "not the password"}
    response = user.upload({**keys.body(), "auth": wrong})
    assert response.status_code == 401, response.text
    assert response.json()["session"] == session
    assert stored_master(user) == original.master.public
    response = with_password(user, keys, session)
    assert (response.status_code, response.json()) == (200, {}), response.text
    assert stored_master(user) == keys.master.public


def test_first_uploads_and_identical_reuploads_are_untouched(server: SynapseServer) -> None:
    user, keys = set_up(server)
    assert user.upload(keys.body()).status_code == 200
    assert decisions(server, user) == [
        "rule=first_upload outcome=uploaded",
        "rule=identical_reupload outcome=nothing_written",
    ]


def test_without_strict_sessions_synapse_decides(synapse_server: ServerFactory) -> None:
    server = synapse_server({"strict_uia_sessions": False}, extra_config=NO_GRACE_PERIOD)
    user, _ = set_up(server)
    session = replace(user, user.keys())
    other = user.keys()
    response = with_session(user, other, session)
    assert (response.status_code, response.json()) == (200, {}), response.text
    assert stored_master(user) == other.master.public


# The bookkeeping.


def sessions_table(server: SynapseServer) -> list[tuple[Any, ...]]:
    with sqlite3.connect(server.directory / "homeserver.db") as db:
        return list(
            db.execute(
                "SELECT session_id, user_id, device_id, used_at_ms FROM synapse_xsign_uia_uia_sessions"
            )
        )


def test_old_bookkeeping_is_deleted_in_the_background() -> None:
    with SynapseServer({}, name="sessions") as server:
        user, _ = set_up(server)
        session = replace(user, user.keys())
        now_ms = int(time.time() * 1000)
        with sqlite3.connect(server.directory / "homeserver.db") as db:
            db.execute(
                "INSERT INTO synapse_xsign_uia_uia_sessions"
                " (session_id, user_id, device_id, keys_hash, created_at_ms, used_at_ms)"
                " VALUES ('old', ?, 'D', 'h', ?, NULL)",
                (user.user_id, now_ms - SESSION_LIFETIME_MS - 60_000),
            )
        assert {row[0] for row in sessions_table(server)} == {session, "old"}
        # The clean-up runs at start-up, then periodically.
        server.stop(cleanup=False)
        server.start()
        deadline = time.monotonic() + 30
        while "old" in {row[0] for row in sessions_table(server)} and time.monotonic() < deadline:
            time.sleep(0.5)
        assert {row[0] for row in sessions_table(server)} == {session}
        assert server.log_lines("Deleted 1 expired UIA session record")


# Across processes.


@pytest.mark.skipif(
    SYNAPSE < (1, 135, 0), reason="Synapse < 1.135 serves this endpoint on main only"
)
def test_a_challenge_from_one_process_is_bound_on_another(deployment: WorkerDeployment) -> None:
    main_url, worker_url = deployment.main.base_url, deployment.worker.base_url
    user = register_user(main_url, deployment.shared_secret)
    on_worker = User(worker_url, user.user_id, user.access_token, user.device_id, user.password)
    assert user.upload(user.keys().body()).status_code == 200
    # Challenged on main, completed on the worker.
    keys = user.keys()
    session = challenge(user, keys)
    response = with_password(on_worker, keys, session)
    assert (response.status_code, response.json()) == (200, {}), response.text
    # Replayed on main: spent.
    assert_fresh_challenge(with_session(user, user.keys(), session), session)
    assert stored_master(user) == keys.master.public
    # Challenged on the worker for some keys, completed on main by a request refused for
    # its signature; the session alone with other keys, on the worker.
    asked = user.keys()
    session = challenge(on_worker, asked)
    response = user.upload({**broken_signature(user, asked), "auth": user.password_auth(session)})
    assert_error(response, 400, "M_INVALID_SIGNATURE")
    assert_fresh_challenge(with_session(on_worker, user.keys(), session), session)
    assert stored_master(user) == keys.master.public
    # From another device, on the worker: refused too.
    on_main = login_with_device(cast(Any, deployment.main), user, "LAPTOP")
    laptop = User(worker_url, user.user_id, on_main.access_token, "LAPTOP", user.password)
    assert_fresh_challenge(with_session(laptop, asked, session), session)
    assert stored_master(user) == keys.master.public
    # The session alone, with the keys it was offered for, on main, which did not offer it:
    # main knows what the worker offered only from the worker's record of it.
    response = with_session(user, asked, session)
    assert (response.status_code, response.json()) == (200, {}), response.text
    assert stored_master(user) == asked.master.public
