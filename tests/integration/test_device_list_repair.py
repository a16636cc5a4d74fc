"""The remote device-list admin API between two real homeservers federating over TLS.

The remote server (`send_federation=False`) answers federation requests but never sends its
users' device-list updates: once the local server has cached a remote user's list, a device
that user adds is lost to it, and the local server holds an outdated list without knowing.
That is the situation the per-user status cannot reveal and the repair of a whole server
mends, through Synapse's own retry loop for stale device lists.
"""

from __future__ import annotations

import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
import pytest
import requests
from signedjson.key import generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from unpaddedbase64 import encode_base64

from tests.conftest import ServerFactory
from tests.harness.client import (
    QUERY_PATH,
    CrossSigningKeys,
    User,
    cross_signing_keys_in,
    register_user,
)
from tests.harness.federation import (
    CLIENT,
    FederatingSynapse,
    Pair,
    join_room,
    start_all,
    wait_for_member,
)

pytestmark = pytest.mark.synapse

ADMIN = "/_synapse/admin/v1/remote_device_lists"
# Synapse's retry loop for stale device lists runs every 30 s, on every supported version.
RETRY_LOOP_S = 30
# The local server tries a server that failed again after 5 s at first (then longer).
MIN_RETRY_INTERVAL_S = 5
# The homeserver and the tests share a clock; this only absorbs rounding and request time.
SLACK_MS = 2000

T = TypeVar("T")


@attrs.define
class Contacts:
    """Remote users in a room with a local user, whose lists the local server fetched and
    cached between `fetched_from_ms` and `fetched_until_ms`."""

    local_user: User
    remote_users: list[User]
    fetched_from_ms: int
    fetched_until_ms: int

    @property
    def remote_user_ids(self) -> list[str]:
        return [user.user_id for user in self.remote_users]


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    # The module's default configuration serves the admin API.
    local = FederatingSynapse({}, name="local", min_retry_interval=f"{MIN_RETRY_INTERVAL_S}s")
    remote = FederatingSynapse({}, name="remote", send_federation=False)
    start_all(local, remote)
    yield Pair(local, remote)
    local.stop()
    remote.stop()


@pytest.fixture(scope="module")
def admin(pair: Pair) -> User:
    return pair.local_user(admin=True)


def now_ms() -> int:
    return int(time.time() * 1000)


def quoted(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def user_path(user_id: str) -> str:
    return f"{ADMIN}/users/{quoted(user_id)}"


def server_path(server_name: str) -> str:
    return f"{ADMIN}/servers/{quoted(server_name)}"


def repair_path(server_name: str) -> str:
    return f"{server_path(server_name)}/repair"


def user_status(admin: User, user_id: str) -> dict[str, Any]:
    response = admin.request("GET", user_path(user_id))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def server_status(admin: User, server_name: str) -> dict[str, Any]:
    response = admin.request("GET", server_path(server_name))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def repair(admin: User, server_name: str) -> dict[str, Any]:
    response = admin.request("POST", repair_path(server_name), {})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def call(user: User, method: str, path: str) -> requests.Response:
    # A repair takes no body, or an empty one.
    return user.request(method, path, {} if method == "POST" else None)


def assert_error(response: requests.Response, status: int, errcode: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["errcode"] == errcode, body
    assert isinstance(body.get("error"), str) and body["error"], body
    return body


def wait_until(probe: Callable[[], T], done: Callable[[T], bool], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s; last seen: {value}")
        time.sleep(0.5)


def upload_device_keys(user: User) -> None:
    """Keys for the user's current device, signed by it as a client would, so that the
    device shows in `/keys/query`."""
    signing_key = generate_signing_key(user.device_id)
    device_keys = {
        "user_id": user.user_id,
        "device_id": user.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            f"ed25519:{user.device_id}": encode_base64(get_verify_key(signing_key).encode()),
            f"curve25519:{user.device_id}": encode_base64(secrets.token_bytes(32)),
        },
    }
    signed = sign_json(device_keys, user.user_id, signing_key)
    response = user.request("POST", f"{CLIENT}/keys/upload", {"device_keys": signed})
    assert response.status_code == 200, response.text


def log_in_new_device(user: User) -> User:
    """The same user on a new device with its keys uploaded."""
    response = requests.post(
        f"{user.base_url}{CLIENT}/login",
        json={
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user.user_id},
            "password": user.password,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    device = User(
        user.base_url, user.user_id, body["access_token"], body["device_id"], user.password
    )
    upload_device_keys(device)
    return device


def devices_seen(user: User, targets: list[str]) -> dict[str, set[str]]:
    """The device IDs that `user`'s `/keys/query` returns for each of `targets`."""
    response = user.request("POST", QUERY_PATH, {"device_keys": {t: [] for t in targets}})
    response.raise_for_status()
    found = response.json().get("device_keys", {})
    return {target: set(found.get(target, {})) for target in targets}


def settled_queries(remote: FederatingSynapse, user_id: str, at_least: int) -> int:
    """The remote's count of device-list requests for `user_id`, once it has reached
    `at_least` and stopped moving (a request is logged as it finishes)."""
    deadline = time.monotonic() + 15
    while remote.device_list_queries(user_id) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    return remote.device_list_queries(user_id)


def contacts(
    pair: Pair, count: int, before_fetch: Callable[[User], None] | None = None
) -> Contacts:
    """`count` remote users, each with one device with keys, in a room with a new local
    user, whose `/keys/query` makes the local server fetch and cache their lists."""
    remote_users = [pair.remote_user() for _ in range(count)]
    for remote_user in remote_users:
        upload_device_keys(remote_user)
        if before_fetch is not None:
            before_fetch(remote_user)
    host = remote_users[0]
    response = host.request("POST", f"{CLIENT}/createRoom", {"preset": "public_chat"})
    response.raise_for_status()
    room_id = str(response.json()["room_id"])
    # The remote sends no events: everyone joins before the local user, whose join then
    # brings their memberships along.
    for remote_user in remote_users[1:]:
        joined = remote_user.request("POST", f"{CLIENT}/join/{quoted(room_id)}", {})
        assert joined.status_code == 200, joined.text
    local_user = pair.local_user()
    join_room(local_user, room_id, pair.remote, host.user_id)
    for remote_user in remote_users[1:]:
        wait_for_member(local_user, room_id, remote_user.user_id)

    targets = [user.user_id for user in remote_users]
    fetched_from = now_ms()
    seen = devices_seen(local_user, targets)
    assert seen == {user.user_id: {user.device_id} for user in remote_users}
    for target in targets:
        assert settled_queries(pair.remote, target, 1) == 1
    return Contacts(local_user, remote_users, fetched_from, now_ms())


def outdate(contacts: Contacts, remote_user: User) -> str:
    """The remote user logs in on a new device, which the local server never hears of.
    Returns the new device's ID."""
    new_device = log_in_new_device(remote_user).device_id
    seen = devices_seen(contacts.local_user, [remote_user.user_id])[remote_user.user_id]
    assert seen == {remote_user.device_id}, "the update was not lost"
    return new_device


def assert_reachable(server: dict[str, Any], server_name: str) -> None:
    assert server["server_name"] == server_name, server
    assert server["reachable"] is True, server
    assert server["failing_since_ts"] is None, server
    assert server["next_retry_ts"] is None, server


# --- Disabled ---------------------------------------------------------------------------


def test_disabled_endpoints_do_not_exist(synapse_server: ServerFactory) -> None:
    server = synapse_server({"device_list_repair": {"enabled": False}})
    admin = register_user(server.base_url, server.shared_secret, admin=True)
    for method, path in (
        ("GET", user_path("@someone:example.org")),
        ("GET", server_path("example.org")),
        ("POST", repair_path("example.org")),
    ):
        assert_error(call(admin, method, path), 404, "M_UNRECOGNIZED")


# --- Outdated lists and their repair ----------------------------------------------------


def test_status_cannot_tell_a_lost_update_and_repair_fetches_every_tracked_user(
    pair: Pair, admin: User
) -> None:
    # First of the tests on `pair`: the remote's tracked users are exactly these three.
    contacts_ = contacts(pair, 3)
    remote_name = pair.remote.server_name
    new_devices = {user.user_id: outdate(contacts_, user) for user in contacts_.remote_users}

    first_fetches: dict[str, int] = {}
    for target in contacts_.remote_user_ids:
        status = user_status(admin, target)
        assert status["user_id"] == target
        assert status["tracked"] is True, status
        assert status["shares_room"] is True, status
        # The local server does not know that the list is outdated.
        assert status["stale"] is False, status
        assert status["stale_since_ts"] is None, status
        assert status["device_count"] == 1, status
        assert status["cross_signing_keys"] == {}, status
        assert status["last_failed_fetch"] is None, status
        fetched = status["last_fetched_ts"]
        assert isinstance(fetched, int), status
        assert (
            contacts_.fetched_from_ms - SLACK_MS <= fetched <= contacts_.fetched_until_ms + SLACK_MS
        ), status
        first_fetches[target] = fetched
        assert_reachable(status["server"], remote_name)

    before = server_status(admin, remote_name)
    assert before["server_name"] == remote_name
    assert before["tracked_users"] == 3, before
    assert before["stale_users"] == 0, before
    assert before["oldest_stale_since_ts"] is None, before
    assert before["last_repair"] is None, before
    assert_reachable(before["server"], remote_name)

    requested_from = now_ms()
    repaired = repair(admin, remote_name)
    requested_until = now_ms()
    assert repaired["server_name"] == remote_name
    assert repaired["marked_stale"] == 3, repaired
    assert repaired["tracked_users"] == 3, repaired
    # Marked just now; Synapse's loop may already have fetched some.
    assert 0 <= repaired["stale_users"] <= 3, repaired
    last_repair = repaired["last_repair"]
    assert last_repair["requested_by"] == admin.user_id, repaired
    assert last_repair["users_marked"] == 3, repaired
    assert requested_from - SLACK_MS <= last_repair["requested_ts"] <= requested_until + SLACK_MS
    assert_reachable(repaired["server"], remote_name)

    # Who asked is in the log, beyond the access log's line for the request.
    asked = [
        line
        for line in pair.local.log_lines(admin.user_id)
        if remote_name in line and "Processed request" not in line
    ]
    assert asked, "the repair was not logged with who asked"

    after = wait_until(
        lambda: server_status(admin, remote_name),
        lambda status: status["stale_users"] == 0,
        2 * RETRY_LOOP_S + 15,
        "Synapse's retry loop did not fetch the lists marked stale",
    )
    assert after["tracked_users"] == 3, after
    assert after["oldest_stale_since_ts"] is None, after
    assert after["last_repair"]["requested_by"] == admin.user_id, after

    seen = devices_seen(contacts_.local_user, contacts_.remote_user_ids)
    for user in contacts_.remote_users:
        assert seen[user.user_id] == {user.device_id, new_devices[user.user_id]}, seen
        assert settled_queries(pair.remote, user.user_id, 2) >= 2
        status = user_status(admin, user.user_id)
        assert status["device_count"] == 2, status
        assert status["stale"] is False, status
        assert status["stale_since_ts"] is None, status
        assert status["last_fetched_ts"] > first_fetches[user.user_id], status
        assert status["last_fetched_ts"] >= requested_from - SLACK_MS, status
        assert_reachable(status["server"], remote_name)

    # Asking again, with every list current, marks and fetches them all again, no more.
    again = repair(admin, remote_name)
    assert again["marked_stale"] == 3, again
    assert again["tracked_users"] == 3, again
    assert again["last_repair"]["users_marked"] == 3, again
    assert again["last_repair"]["requested_by"] == admin.user_id, again
    assert again["last_repair"]["requested_ts"] >= last_repair["requested_ts"], again
    wait_until(
        lambda: server_status(admin, remote_name),
        lambda status: status["stale_users"] == 0,
        2 * RETRY_LOOP_S + 15,
        "Synapse's retry loop did not fetch the lists marked stale again",
    )
    assert devices_seen(contacts_.local_user, contacts_.remote_user_ids) == seen


def test_status_shows_the_cached_cross_signing_keys(pair: Pair, admin: User) -> None:
    uploaded: dict[str, CrossSigningKeys] = {}

    def upload_cross_signing_keys(remote_user: User) -> None:
        keys = remote_user.keys()
        assert remote_user.upload(keys.body()).status_code == 200
        uploaded[remote_user.user_id] = keys

    contacts_ = contacts(pair, 1, before_fetch=upload_cross_signing_keys)
    target = contacts_.remote_user_ids[0]
    keys = uploaded[target]
    response = contacts_.local_user.request("POST", QUERY_PATH, {"device_keys": {target: []}})
    response.raise_for_status()
    cached = cross_signing_keys_in(response.json(), target)
    assert set(cached) == {"master", "self_signing"}, "the local server did not cache the keys"

    status = user_status(admin, target)

    # A user-signing key never leaves its user's homeserver.
    assert status["cross_signing_keys"] == {
        "master": keys.master.key_id,
        "self_signing": keys.self_signing.key_id,
    }, status
    assert status["tracked"] is True, status
    assert status["device_count"] == 1, status


# --- Access and arguments ---------------------------------------------------------------


def endpoints(pair: Pair, remote_user_id: str) -> list[tuple[str, str]]:
    """Each endpoint with a valid argument, by method and path."""
    return [
        ("GET", user_path(remote_user_id)),
        ("GET", server_path(pair.remote.server_name)),
        ("POST", repair_path(pair.remote.server_name)),
    ]


def test_every_endpoint_requires_an_access_token(pair: Pair) -> None:
    target = pair.remote_user().user_id
    bad = {"Authorization": f"Bearer {secrets.token_hex(16)}"}
    for method, path in endpoints(pair, target):
        url = pair.local.base_url + path
        assert_error(requests.request(method, url, timeout=30), 401, "M_MISSING_TOKEN")
        assert_error(requests.request(method, url, headers=bad, timeout=30), 401, "M_UNKNOWN_TOKEN")


def test_every_endpoint_requires_a_server_admin(pair: Pair) -> None:
    contacts_ = contacts(pair, 1)
    # Sharing a room with the user gives no access either.
    for method, path in endpoints(pair, contacts_.remote_user_ids[0]):
        assert_error(call(contacts_.local_user, method, path), 403, "M_FORBIDDEN")


@pytest.mark.parametrize(
    "user_id", ["alice", "@alice", "@:x", "@alice:", "@al ice:example.org", "@alice:bad host"]
)
def test_malformed_user_id_is_refused(admin: User, user_id: str) -> None:
    assert_error(admin.request("GET", user_path(user_id)), 400, "M_INVALID_PARAM")


def test_local_user_is_refused(admin: User) -> None:
    assert_error(admin.request("GET", user_path(admin.user_id)), 400, "M_INVALID_PARAM")


def test_unknown_remote_user_is_not_found(pair: Pair, admin: User) -> None:
    for user_id in (f"@nobody:{pair.remote.server_name}", "@nobody:localhost:1"):
        assert_error(admin.request("GET", user_path(user_id)), 404, "M_NOT_FOUND")


@pytest.mark.parametrize("server_name", ["bad server", "-/x", "a..b:99999", "example.org:"])
def test_malformed_server_name_is_refused(admin: User, server_name: str) -> None:
    assert_error(admin.request("GET", server_path(server_name)), 400, "M_INVALID_PARAM")
    assert_error(admin.request("POST", repair_path(server_name), {}), 400, "M_INVALID_PARAM")


def test_own_server_name_is_refused(pair: Pair, admin: User) -> None:
    own = pair.local.server_name
    assert_error(admin.request("GET", server_path(own)), 400, "M_INVALID_PARAM")
    assert_error(admin.request("POST", repair_path(own), {}), 400, "M_INVALID_PARAM")


def test_server_without_tracked_users_is_not_found(admin: User) -> None:
    # Two names, so that the refused repair of one cannot count as a record for the other.
    assert_error(admin.request("GET", server_path("localhost:1")), 404, "M_NOT_FOUND")
    assert_error(admin.request("POST", repair_path("localhost:2"), {}), 404, "M_NOT_FOUND")
    assert_error(admin.request("POST", repair_path("localhost:2")), 404, "M_NOT_FOUND")


# --- Remote down ------------------------------------------------------------------------


def test_repair_while_the_remote_is_down_completes_when_it_is_back(pair: Pair, admin: User) -> None:
    # Last of the tests on `pair`: it restarts the remote server.
    contacts_ = contacts(pair, 1)
    remote_user = contacts_.remote_users[0]
    target = remote_user.user_id
    remote_name = pair.remote.server_name
    new_device = outdate(contacts_, remote_user)

    pair.remote.stop(cleanup=False)
    try:
        repaired = repair(admin, remote_name)
        assert repaired["marked_stale"] >= 1, repaired
        assert repaired["tracked_users"] == repaired["marked_stale"], repaired
        assert repaired["last_repair"]["requested_by"] == admin.user_id, repaired

        # The repair has Synapse's loop run at once: it fails, and Synapse backs off.
        down = wait_until(
            lambda: user_status(admin, target),
            lambda status: (
                status["server"]["reachable"] is False
                and status["server"]["next_retry_ts"] is not None
                and status["last_failed_fetch"] is not None
            ),
            45,
            "Synapse never recorded the remote as unreachable",
        )
        assert down["stale"] is True, down
        assert isinstance(down["stale_since_ts"], int), down
        server = down["server"]
        assert server["server_name"] == remote_name, server
        assert isinstance(server["failing_since_ts"], int), server
        assert isinstance(server["last_failed_attempt_ts"], int), server
        assert server["retry_interval_ms"] > 0, server
        assert server["next_retry_ts"] == (
            server["last_failed_attempt_ts"] + server["retry_interval_ms"]
        ), server
        # A failed fetch is recorded whoever made it, here Synapse's loop.
        failure = down["last_failed_fetch"]
        assert isinstance(failure["ts"], int), failure
        assert failure["reason"] in ("unreachable", "backoff"), failure
        assert isinstance(failure["error"], str) and failure["error"], failure

        stale = server_status(admin, remote_name)
        assert stale["stale_users"] >= 1, stale
        assert isinstance(stale["oldest_stale_since_ts"], int), stale
        assert stale["server"]["reachable"] is False, stale
    finally:
        pair.remote.start()

    # No further request: Synapse's loop fetches the lists once its backoff has passed.
    wait_until(
        lambda: server_status(admin, remote_name),
        lambda status: status["stale_users"] == 0,
        # Synapse's backoff, then up to two periods of its loop.
        100,
        "the lists were not fetched after the remote server came back",
    )
    seen = devices_seen(contacts_.local_user, [target])[target]
    assert seen == {remote_user.device_id, new_device}, seen
    back = user_status(admin, target)
    assert back["stale"] is False, back
    assert back["device_count"] == 2, back
    assert back["last_fetched_ts"] > failure["ts"], back
    assert back["server"]["reachable"] is True, back
    assert back["server"]["next_retry_ts"] is None, back
