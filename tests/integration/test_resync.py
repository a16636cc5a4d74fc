"""The device-list resync endpoint between two real homeservers federating over TLS.

The remote server (`send_federation=False`) answers federation requests but never sends
its users' device-list updates, so the local server's copy of a remote user's list goes
stale exactly as it does when updates are lost: every test starts from a remote contact who
has uploaded cross-signing keys that the local server does not know about.
"""

from __future__ import annotations

import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import requests

from tests.conftest import ServerFactory
from tests.harness.client import QUERY_PATH, User, register_user
from tests.harness.federation import (
    FederatingSynapse,
    Pair,
    StaticFederationServer,
    device_list,
    share_room,
    start_all,
    sync,
    wait_for_device_list_change,
)
from tests.harness.server import free_port
from tests.harness.workers import WorkerDeployment, skip_without_worker_requirements

pytestmark = pytest.mark.synapse

ROUTE = "/_matrix/unstable/org.matrix.mscXXXX/user/{}/devices"
REASON = "org.matrix.mscXXXX.reason"
TIMEOUT_S = 4
COOLDOWN_S = 4
RATE_PER_SECOND = 0.2
BURST = 5
LOCAL_MODULE_CONFIG = {
    "device_list_resync": {
        "timeout": f"{TIMEOUT_S}s",
        "per_user_cooldown": f"{COOLDOWN_S}s",
        "rate_per_second": RATE_PER_SECOND,
        "burst_count": BURST,
    }
}
# Synapse's retry loop for stale device lists runs every 30 s, on every supported version.
RETRY_LOOP_S = 30


@attrs.define
class Contact:
    """A local user who shares a room with a remote user whose list the local server holds
    stale: the remote user's master key is missing from it."""

    local_user: User
    remote_user: User
    room_id: str
    master_key: dict[str, Any]
    since: str


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    local = FederatingSynapse(LOCAL_MODULE_CONFIG, name="local", min_retry_interval="5s")
    remote = FederatingSynapse({}, name="remote", send_federation=False)
    start_all(local, remote)
    yield Pair(local, remote)
    local.stop()
    remote.stop()


def resync(user: User, target: str, *, quote: bool = True, **kwargs: Any) -> requests.Response:
    segment = urllib.parse.quote(target, safe="") if quote else target
    return user.request("GET", ROUTE.format(segment), **kwargs)


def master_keys_seen(user: User, target: str) -> dict[str, Any]:
    response = user.request("POST", QUERY_PATH, {"device_keys": {target: []}})
    response.raise_for_status()
    found: dict[str, Any] = response.json().get("master_keys", {})
    return found


def settled_queries(remote: FederatingSynapse, user_id: str, at_least: int) -> int:
    """The remote's count of device-list requests for `user_id`, once it has reached
    `at_least` and stopped moving (a request is logged as it finishes)."""
    deadline = time.monotonic() + 15
    while remote.device_list_queries(user_id) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    return remote.device_list_queries(user_id)


def stale_contact(pair: Pair) -> Contact:
    local_user, remote_user = pair.local_user(), pair.remote_user()
    room_id = share_room(remote_user, pair.remote, local_user)
    # The local server fetches and caches the list of a user it shares a room with.
    assert master_keys_seen(local_user, remote_user.user_id) == {}
    settled_queries(pair.remote, remote_user.user_id, 1)
    keys = remote_user.keys()
    assert remote_user.upload(keys.body()).status_code == 200
    assert master_keys_seen(local_user, remote_user.user_id) == {}, "the list is not stale"
    since = str(sync(local_user)["next_batch"])
    return Contact(local_user, remote_user, room_id, keys.master_key(), since)


def assert_error(response: requests.Response, status: int, errcode: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["errcode"] == errcode, body
    assert body["error"], body
    return body


def test_resync_fetches_the_list_and_sync_shows_the_change(pair: Pair) -> None:
    contact = stale_contact(pair)
    target = contact.remote_user.user_id
    before = pair.remote.device_list_queries(target)

    response = resync(contact.local_user, target)

    assert response.status_code == 202, response.text
    assert response.json() == {}
    changed, _ = wait_for_device_list_change(contact.local_user, contact.since, target, 20)
    assert changed, "device_lists.changed never named the remote user"
    seen = master_keys_seen(contact.local_user, target)[target]
    assert seen["keys"] == contact.master_key["keys"]
    assert settled_queries(pair.remote, target, before + 1) == before + 1


def test_user_id_need_not_be_percent_encoded(pair: Pair) -> None:
    contact = stale_contact(pair)
    response = resync(contact.local_user, contact.remote_user.user_id, quote=False)
    assert response.status_code == 202, response.text


def test_cooldown_answers_without_a_federation_request(pair: Pair) -> None:
    contact = stale_contact(pair)
    target = contact.remote_user.user_id
    before = pair.remote.device_list_queries(target)

    assert resync(contact.local_user, target).status_code == 202
    fetched_at = time.monotonic()
    assert settled_queries(pair.remote, target, before + 1) == before + 1
    assert resync(contact.local_user, target).status_code == 202
    assert time.monotonic() - fetched_at < COOLDOWN_S, "the test ran too slowly to check"
    assert settled_queries(pair.remote, target, before + 1) == before + 1

    time.sleep(max(0.0, COOLDOWN_S + 0.5 - (time.monotonic() - fetched_at)))
    assert resync(contact.local_user, target).status_code == 202
    assert settled_queries(pair.remote, target, before + 2) == before + 2


def test_concurrent_requests_share_one_federation_request(pair: Pair) -> None:
    contact = stale_contact(pair)
    target = contact.remote_user.user_id
    admin = pair.local_user(admin=True)
    before = pair.remote.device_list_queries(target)
    requesters = [admin] * 8 + [contact.local_user] * 2
    statuses: list[int] = []
    lock = threading.Lock()

    def request(user: User) -> None:
        status = resync(user, target, timeout=60).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=request, args=(user,)) for user in requesters]
    # While the remote is frozen the first request's fetch hangs, and the others join it.
    with pair.remote.paused():
        for thread in threads:
            thread.start()
        time.sleep(1.5)
    for thread in threads:
        thread.join()

    assert statuses == [202] * len(requesters)
    assert settled_queries(pair.remote, target, before + 1) == before + 1
    changed, _ = wait_for_device_list_change(contact.local_user, contact.since, target, 20)
    assert changed


def test_timeout_answers_502_and_the_fetch_goes_on(pair: Pair) -> None:
    contact = stale_contact(pair)
    target = contact.remote_user.user_id
    before = pair.remote.device_list_queries(target)

    with pair.remote.paused():
        started = time.monotonic()
        response = resync(contact.local_user, target)
        waited = time.monotonic() - started

    body = assert_error(response, 502, "M_UNKNOWN")
    assert body[REASON] == "timeout"
    assert TIMEOUT_S - 0.5 <= waited < TIMEOUT_S + 3
    # No new client call: the fetch that outlived the client's wait completes the resync,
    # well before Synapse's own retry loop would.
    changed, _ = wait_for_device_list_change(contact.local_user, contact.since, target, 20)
    assert changed
    assert settled_queries(pair.remote, target, before + 1) == before + 1
    seen = master_keys_seen(contact.local_user, target)[target]
    assert seen["keys"] == contact.master_key["keys"]


def test_rate_limit_per_requester(pair: Pair) -> None:
    contact = stale_contact(pair)
    target = contact.remote_user.user_id
    for _ in range(BURST):
        assert resync(contact.local_user, target).status_code == 202

    body = assert_error(resync(contact.local_user, target), 429, "M_LIMIT_EXCEEDED")
    assert 0 < body["retry_after_ms"] <= 1000 / RATE_PER_SECOND

    # Another requester has a bucket of its own; a server admin has none.
    other = pair.local_user()
    share_room(contact.remote_user, pair.remote, other)
    assert resync(other, target).status_code == 202
    admin = pair.local_user(admin=True)
    for _ in range(BURST + 3):
        assert resync(admin, target).status_code == 202


def test_requester_must_share_a_room(pair: Pair) -> None:
    contact = stale_contact(pair)
    target = contact.remote_user.user_id
    before = pair.remote.device_list_queries(target)
    stranger = pair.local_user()

    assert_error(resync(stranger, target), 403, "M_FORBIDDEN")
    assert settled_queries(pair.remote, target, before) == before

    # A server admin may repair anyone's list.
    admin = pair.local_user(admin=True)
    assert resync(admin, target).status_code == 202
    assert (
        master_keys_seen(contact.local_user, target)[target]["keys"] == (contact.master_key["keys"])
    )


def test_local_user_is_refused(pair: Pair) -> None:
    user = pair.local_user()
    other = pair.local_user()
    body = assert_error(resync(user, other.user_id), 400, "M_INVALID_PARAM")
    assert "never stale" in body["error"]
    assert_error(resync(user, user.user_id), 400, "M_INVALID_PARAM")


@pytest.mark.parametrize(
    "segment",
    [
        "alice",
        "%40alice",
        "@alice",
        "%40%3Alocalhost",
        "%40alice%3A",
        "%40al%20ice%3Alocalhost",
        "%40alice%3Abad_host%21",
        "%40alice%3Alocalhost%3A99999",
        "%40alice%3A%5B%3A%3A1",
        "%40%C3%A9%3Alocalhost",
        "%FF%FE",
        "%40" + "a" * 300 + "%3Alocalhost",
    ],
)
def test_malformed_user_id(pair: Pair, segment: str) -> None:
    user = pair.local_user()
    body = assert_error(resync(user, segment, quote=False), 400, "M_INVALID_PARAM")
    assert "user ID" in body["error"]


def test_access_token_is_required(pair: Pair) -> None:
    target = pair.remote_user().user_id
    path = pair.local.base_url + ROUTE.format(urllib.parse.quote(target, safe=""))
    assert_error(requests.get(path, timeout=30), 401, "M_MISSING_TOKEN")
    bad = {"Authorization": f"Bearer {secrets.token_hex(16)}"}
    assert_error(requests.get(path, headers=bad, timeout=30), 401, "M_UNKNOWN_TOKEN")
    # Authentication comes before the path's user ID is looked at.
    assert_error(
        requests.get(pair.local.base_url + ROUTE.format("nonsense"), timeout=30),
        401,
        "M_MISSING_TOKEN",
    )


def test_other_paths_and_methods_are_unrecognised(pair: Pair) -> None:
    user = pair.local_user()
    target = urllib.parse.quote(pair.remote_user().user_id, safe="")
    base = ROUTE.format(target)
    for path in (base + "/extra", base[: -len("/devices")], base + "/"):
        assert_error(user.request("GET", path), 404, "M_UNRECOGNIZED")
    assert_error(user.request("POST", base, {}), 405, "M_UNRECOGNIZED")


@pytest.mark.parametrize(("status", "errcode"), [(404, "M_UNRECOGNIZED"), (500, "M_UNKNOWN")])
def test_remote_error_is_relayed(pair: Pair, status: int, errcode: str) -> None:
    admin = pair.local_user(admin=True)
    with StaticFederationServer(status, {"errcode": errcode, "error": "no"}) as remote:
        target = f"@someone:{remote.server_name}"
        body = assert_error(resync(admin, target), 502, "M_UNKNOWN")
        assert remote.requests == 1
    assert body[REASON] == "remote_error"
    assert body["org.matrix.mscXXXX.remote_status"] == status
    assert f"HTTP {status}" in body["error"]
    assert remote.server_name in body["error"]
    if status >= 500:
        # Synapse backs off from a server that answers 5xx, and says until when.
        assert body["retry_after_ms"] > 0


def test_unreachable_remote_is_relayed(pair: Pair) -> None:
    admin = pair.local_user(admin=True)
    # Nothing listens on a port just handed out and released.
    closed = f"localhost:{free_port()}"
    body = assert_error(resync(admin, f"@someone:{closed}"), 502, "M_UNKNOWN")
    assert body[REASON] == "unreachable"
    assert closed in body["error"]


def test_disabled_endpoint_does_not_exist(synapse_server: ServerFactory) -> None:
    server = synapse_server({"device_list_resync": {"enabled": False}})
    user = register_user(server.base_url, server.shared_secret)
    response = resync(user, "@someone:example.org")
    assert_error(response, 404, "M_UNRECOGNIZED")


def test_remote_down_then_back_is_fetched_without_a_new_request(pair: Pair) -> None:
    # Last of the tests on `pair`: it restarts the remote server.
    contact = stale_contact(pair)
    target = contact.remote_user.user_id
    pair.remote.stop(cleanup=False)
    try:
        started = time.monotonic()
        response = resync(contact.local_user, target)
        assert time.monotonic() - started < TIMEOUT_S + 1
        first = assert_error(response, 502, "M_UNKNOWN")
        assert first[REASON] in ("unreachable", "backoff"), first

        # Synapse now backs off from the remote; the answer says for how long.
        time.sleep(0.5)
        backoff = assert_error(resync(contact.local_user, target), 502, "M_UNKNOWN")
        assert backoff[REASON] == "backoff", backoff
        assert 0 < backoff["retry_after_ms"] <= 5000 * 1.4 * 2
        assert "backs off" in backoff["error"]
    finally:
        pair.remote.start()

    # Synapse's own retry loop fetches the list still marked stale; no client call.
    changed, _ = wait_for_device_list_change(
        contact.local_user, contact.since, target, 2 * RETRY_LOOP_S + 15
    )
    assert changed, "the list was not fetched after the remote server came back"
    assert (
        master_keys_seen(contact.local_user, target)[target]["keys"] == (contact.master_key["keys"])
    )


# --- With workers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment() -> Iterator[WorkerDeployment]:
    skip_without_worker_requirements()
    # Outbound federation only: the remote servers here are static TLS servers.
    extra = {
        "federation_verify_certificates": False,
        "ip_range_whitelist": ["127.0.0.0/8"],
        "federation": {"destination_min_retry_interval": "5s"},
    }
    deployment = WorkerDeployment(LOCAL_MODULE_CONFIG, extra).start()
    yield deployment
    deployment.stop()


def test_on_a_worker_the_device_list_writer_fetches(deployment: WorkerDeployment) -> None:
    admin = register_user(deployment.main.base_url, deployment.shared_secret, admin=True)
    worker = User(
        deployment.worker.base_url,
        admin.user_id,
        admin.access_token,
        admin.device_id,
        admin.password,
    )

    with StaticFederationServer(200) as remote:
        target = f"@someone:{remote.server_name}"
        remote.body = device_list(target, "REMOTEDEVICE")
        assert resync(worker, target).status_code == 202
        assert remote.requests == 1
        # Within the cooldown the worker answers without a new fetch.
        assert resync(worker, target).status_code == 202
        assert remote.requests == 1
    # The worker asked the main process, which fetched.
    assert deployment.main.log_lines("/_synapse/replication/multi_user_device_resync")
    assert deployment.worker.log_lines(f"Fetched the device list of {target}")

    with StaticFederationServer(404) as remote:
        body = assert_error(resync(worker, f"@someone:{remote.server_name}"), 502, "M_UNKNOWN")
        assert body[REASON] == "remote_error"

    # The worker does not see the federation request fail, but Synapse's backoff tells.
    closed = f"localhost:{free_port()}"
    body = assert_error(resync(worker, f"@a:{closed}"), 502, "M_UNKNOWN")
    assert body[REASON] == "unreachable"
    assert body["retry_after_ms"] > 0
    time.sleep(0.5)
    body = assert_error(resync(worker, f"@b:{closed}"), 502, "M_UNKNOWN")
    assert body[REASON] == "backoff"
    assert body["retry_after_ms"] > 0


def test_on_a_worker_an_unreachable_main_process_is_a_clear_error(
    deployment: WorkerDeployment,
) -> None:
    """The fetch goes to the main process over replication: with main down, the client gets
    a 502 within the timeout instead of waiting on replication retries."""
    admin = register_user(deployment.main.base_url, deployment.shared_secret, admin=True)
    worker = User(
        deployment.worker.base_url,
        admin.user_id,
        admin.access_token,
        admin.device_id,
        admin.password,
    )
    deployment.main.stop()
    try:
        with StaticFederationServer(200) as remote:
            target = f"@someone:{remote.server_name}"
            remote.body = device_list(target, "REMOTEDEVICE")
            started = time.monotonic()
            response = resync(worker, target, timeout=TIMEOUT_S + 30)
            elapsed = time.monotonic() - started
            body = assert_error(response, 502, "M_UNKNOWN")
            assert body[REASON] in ("timeout", "error"), body
            assert elapsed < TIMEOUT_S + 5
            assert remote.requests == 0
    finally:
        deployment.main.start()
