"""All or nothing: the keys of one upload are stored in one database transaction.

A database trigger makes the insert of one key type fail for one user, as a full disk, a lost
connection or a deadlock would. Native Synapse stores each key type in a transaction of its
own, so the failure leaves half an identity (a new master key beside the old sub-keys, or a
master key alone); with the module the stored keys are what they were, nobody is notified,
and the retry is answered as it would have been the first time: a failed first upload still
needs no UIA, and a failed write in an admin window leaves the window open.

On SQLite (single process) and on PostgreSQL (main process and a worker, Redis).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any
from urllib.parse import quote

import pytest
import requests
import synapse

from synapse_xsign_uia._synapse import parse_version
from tests.conftest import ServerFactory
from tests.harness.client import CrossSigningKeys, User, register_user
from tests.harness.server import SynapseServer
from tests.harness.workers import WorkerDeployment
from tests.integration.test_upload import assert_challenge

pytestmark = pytest.mark.synapse

SYNAPSE = parse_version(synapse.__version__)
KEY_TYPES = ("master", "self_signing", "user_signing")
NO_GRACE_PERIOD: dict[str, Any] = {"ui_auth": {"session_timeout": 0}}

Execute = Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]


def sqlite_of(server: SynapseServer) -> Execute:
    def execute(sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(server.directory / "homeserver.db") as db:
            return list(db.execute(sql, args))

    return execute


@contextmanager
def failing_sqlite_insert(server: SynapseServer, user: User, key_type: str) -> Iterator[None]:
    """Every insert of `key_type` keys for `user` fails while this is open."""
    execute = sqlite_of(server)
    name = f"xsign_fail_{key_type}"
    execute(
        f"CREATE TRIGGER {name} BEFORE INSERT ON e2e_cross_signing_keys"
        f" WHEN NEW.user_id = '{user.user_id}' AND NEW.keytype = '{key_type}'"
        " BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        (),
    )
    try:
        yield
    finally:
        execute(f"DROP TRIGGER {name}", ())


def stored_rows(execute: Execute, user: User) -> list[tuple[Any, ...]]:
    """Every cross-signing key row and device-list change of the user, in the database."""
    keys = execute(
        "SELECT keytype, keydata, stream_id FROM e2e_cross_signing_keys WHERE user_id = ?"
        " ORDER BY stream_id",
        (user.user_id,),
    )
    changes = execute(
        "SELECT stream_id, device_id FROM device_lists_stream WHERE user_id = ? ORDER BY stream_id",
        (user.user_id,),
    )
    return [*keys, ("device list changes", len(changes))]


def public_keys(user: User) -> dict[str, str]:
    return user.stored_public_keys()


def of(keys: CrossSigningKeys) -> dict[str, str]:
    return {
        "master": keys.master.public,
        "self_signing": keys.self_signing.public,
        "user_signing": keys.user_signing.public,
    }


def with_keys(user: User) -> CrossSigningKeys:
    keys = user.keys()
    response = user.upload_with_uia(keys.body())
    assert response.status_code == 200, response.text
    return keys


def replace_with_uia(user: User, keys: CrossSigningKeys) -> requests.Response:
    session = assert_challenge(user.upload(keys.body()))["session"]
    return user.upload({**keys.body(), "auth": user.password_auth(session)})


def assert_server_error(response: requests.Response) -> None:
    assert response.status_code == 500, response.text
    assert response.json()["errcode"] == "M_UNKNOWN"


def assert_nothing_changes(
    user: User, execute: Execute, failing: Callable[[], AbstractContextManager[None]]
) -> None:
    """A replacement with UIA whose write fails (inside `failing()`) leaves every row as it
    was; the retry goes through as the first attempt would have."""
    old = with_keys(user)
    new = user.keys()
    before = stored_rows(execute, user)
    with failing():
        assert_server_error(replace_with_uia(user, new))
    assert stored_rows(execute, user) == before
    assert public_keys(user) == of(old)
    response = replace_with_uia(user, new)
    assert (response.status_code, response.json()) == (200, {}), response.text
    assert public_keys(user) == of(new)


@pytest.fixture(scope="module")
def native(synapse_server: ServerFactory) -> SynapseServer:
    return synapse_server(with_module=False, extra_config=NO_GRACE_PERIOD)


# A replacement with UIA.


@pytest.mark.parametrize("failing", KEY_TYPES)
def test_a_failed_replacement_changes_nothing(
    server: SynapseServer, native: SynapseServer, failing: str
) -> None:
    user = register_user(native.base_url, native.shared_secret)
    old = with_keys(user)
    new = user.keys()
    with failing_sqlite_insert(native, user, failing):
        assert_server_error(replace_with_uia(user, new))
    # Native Synapse: the key types written before the failing one are the new ones.
    written = KEY_TYPES[: KEY_TYPES.index(failing)]
    expected = {t: (of(new) if t in written else of(old))[t] for t in KEY_TYPES}
    assert public_keys(user) == expected

    user = register_user(server.base_url, server.shared_secret)
    assert_nothing_changes(
        user, sqlite_of(server), lambda: failing_sqlite_insert(server, user, failing)
    )


# A first upload.


@pytest.mark.parametrize("failing", ["self_signing", "user_signing"])
def test_a_failed_first_upload_leaves_no_master_key(
    server: SynapseServer, native: SynapseServer, failing: str
) -> None:
    user = register_user(native.base_url, native.shared_secret)
    keys = user.keys()
    with failing_sqlite_insert(native, user, failing):
        assert_server_error(user.upload_with_uia(keys.body()))
    # Native Synapse keeps the master key, so the retry needs UIA, which a user who signs
    # in with single sign-on only may be unable to do.
    assert "master" in public_keys(user)
    assert_challenge(user.upload(keys.body()))

    user = register_user(server.base_url, server.shared_secret)
    keys = user.keys()
    execute = sqlite_of(server)
    before = stored_rows(execute, user)
    with failing_sqlite_insert(server, user, failing):
        assert_server_error(user.upload(keys.body()))
    assert stored_rows(execute, user) == before
    assert public_keys(user) == {}
    response = user.upload(keys.body())
    assert (response.status_code, response.json()) == (200, {}), response.text
    assert public_keys(user) == of(keys)


# A replacement in an admin window.


def grant(server: SynapseServer, user: User) -> None:
    admin = register_user(server.base_url, server.shared_secret, admin=True)
    path = (
        f"/_synapse/admin/v1/users/{quote(user.user_id, safe='')}"
        "/_allow_cross_signing_replacement_without_uia"
    )
    response = admin.request("POST", path, {})
    assert response.status_code == 200, response.text


def window_open(server: SynapseServer, user: User) -> bool:
    admin = register_user(server.base_url, server.shared_secret, admin=True)
    path = (
        f"/_synapse/admin/v1/users/{quote(user.user_id, safe='')}"
        "/_allow_cross_signing_replacement_without_uia"
    )
    response = admin.request("GET", path)
    assert response.status_code == 200, response.text
    return bool(response.json()["replaceable_without_uia"])


@pytest.mark.parametrize("failing", KEY_TYPES)
def test_a_failed_write_in_an_admin_window_leaves_it_open(
    server: SynapseServer, failing: str
) -> None:
    user = register_user(server.base_url, server.shared_secret)
    old = with_keys(user)
    grant(server, user)
    new = user.keys()
    with failing_sqlite_insert(server, user, failing):
        assert_server_error(user.upload(new.body()))
    assert public_keys(user) == of(old)
    assert window_open(server, user)
    response = user.upload(new.body())
    assert (response.status_code, response.json()) == (200, {}), response.text
    assert public_keys(user) == of(new)
    assert not window_open(server, user)


# PostgreSQL, with workers.


def postgres_of(deployment: WorkerDeployment) -> Execute:
    import psycopg2

    def execute(sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        connection = psycopg2.connect(
            host="127.0.0.1", port=deployment.postgres.port, user="postgres", dbname="synapse"
        )
        try:
            with connection, connection.cursor() as cursor:
                # Without arguments psycopg2 takes the statement as it is (`%` included).
                cursor.execute(sql.replace("?", "%s") if args else sql, args or None)
                return list(cursor.fetchall()) if cursor.description else []
        finally:
            connection.close()

    return execute


@contextmanager
def failing_postgres_insert(execute: Execute, user: User, key_type: str) -> Iterator[None]:
    execute(
        "CREATE OR REPLACE FUNCTION xsign_fail() RETURNS trigger AS $$ BEGIN"
        f" IF NEW.user_id = '{user.user_id}' AND NEW.keytype = '{key_type}' THEN"
        " RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
        (),
    )
    execute(
        "CREATE TRIGGER xsign_fail BEFORE INSERT ON e2e_cross_signing_keys"
        " FOR EACH ROW EXECUTE FUNCTION xsign_fail()",
        (),
    )
    try:
        yield
    finally:
        execute("DROP TRIGGER xsign_fail ON e2e_cross_signing_keys", ())


@pytest.mark.parametrize("failing", KEY_TYPES)
def test_a_failed_replacement_changes_nothing_on_postgres(
    deployment: WorkerDeployment, failing: str
) -> None:
    # Synapse serves this endpoint on workers from 1.135.
    url = deployment.worker.base_url if SYNAPSE >= (1, 135, 0) else deployment.main.base_url
    registered = register_user(deployment.main.base_url, deployment.shared_secret)
    user = User(
        url, registered.user_id, registered.access_token, registered.device_id, registered.password
    )
    execute = postgres_of(deployment)
    assert_nothing_changes(user, execute, lambda: failing_postgres_insert(execute, user, failing))


# What follows a write: as Synapse does it, and only for keys that were stored.


def share_a_room(alice: User, bob: User) -> None:
    response = alice.request("POST", "/_matrix/client/v3/createRoom", {"invite": [bob.user_id]})
    assert response.status_code == 200, response.text
    room_id = response.json()["room_id"]
    response = bob.request("POST", f"/_matrix/client/v3/join/{quote(room_id, safe='')}", {})
    assert response.status_code == 200, response.text


def sync_token(user: User) -> str:
    response = user.request("GET", "/_matrix/client/v3/sync?timeout=0")
    assert response.status_code == 200, response.text
    return str(response.json()["next_batch"])


def changed_since(user: User, since: str, wait_ms: int) -> list[str]:
    """Whose device lists changed since `since`, as an incremental `/sync` tells."""
    response = user.request(
        "GET", f"/_matrix/client/v3/sync?since={quote(since, safe='')}&timeout={wait_ms}"
    )
    assert response.status_code == 200, response.text
    return list(response.json().get("device_lists", {}).get("changed", []))


def test_a_stored_replacement_is_announced_and_a_failed_one_is_not(server: SynapseServer) -> None:
    alice = register_user(server.base_url, server.shared_secret)
    bob = register_user(server.base_url, server.shared_secret)
    old = with_keys(alice)
    share_a_room(alice, bob)
    since = sync_token(bob)
    own_since = sync_token(alice)

    with failing_sqlite_insert(server, alice, "user_signing"):
        assert_server_error(replace_with_uia(alice, alice.keys()))
    assert public_keys(alice) == of(old)
    assert alice.user_id not in changed_since(bob, since, 1000)
    assert alice.user_id not in changed_since(alice, own_since, 0)

    new = alice.keys()
    response = replace_with_uia(alice, new)
    assert (response.status_code, response.json()) == (200, {}), response.text
    # A new master key reaches everyone who shares a room; a new user-signing key reaches
    # the user's own devices.
    assert alice.user_id in changed_since(bob, since, 10_000)
    assert alice.user_id in changed_since(alice, own_since, 10_000)
    query = bob.request(
        "POST", "/_matrix/client/v3/keys/query", {"device_keys": {alice.user_id: []}}
    )
    assert query.json()["master_keys"][alice.user_id]["keys"] == new.master_key()["keys"]
