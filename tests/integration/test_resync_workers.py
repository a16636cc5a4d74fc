"""The device-list resync endpoint on a homeserver with a main process and two generic
workers: the cooldown and the single flight hold for the homeserver as a whole, so a remote
server sees at most one device-list request per user per cooldown, whichever processes the
requests land on.

The requester is a server admin: admins skip the per-requester rate limit (which is per
process anyway) and the shared-room check, but not the cooldown. The same access token works
on every process.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence

import pytest
import requests

from tests.harness.client import User, register_user
from tests.harness.federation import StaticFederationServer, device_list
from tests.harness.workers import SynapseProcess, WorkerDeployment, skip_without_worker_requirements
from tests.integration.test_resync import REASON, assert_error, resync

pytestmark = pytest.mark.synapse

COOLDOWN_S = 10
TIMEOUT_S = 10
MODULE_CONFIG = {
    "device_list_resync": {"per_user_cooldown": f"{COOLDOWN_S}s", "timeout": f"{TIMEOUT_S}s"}
}
FLOOD = 30
# Long enough that the whole flood arrives while the first fetch is still in flight.
FETCH_DELAY_S = 1.5
# Synapse's own loop that refetches device lists marked stale; it runs on the main process.
RETRY_LOOP = "_maybe_retry_device_resync"


@pytest.fixture(scope="module")
def deployment() -> Iterator[WorkerDeployment]:
    skip_without_worker_requirements()
    # Outbound federation only: the remote servers here are static TLS servers.
    extra = {
        "federation_verify_certificates": False,
        "ip_range_whitelist": ["127.0.0.0/8"],
        "federation": {"destination_min_retry_interval": "5s"},
    }
    deployment = WorkerDeployment(MODULE_CONFIG, extra, workers=2).start()
    yield deployment
    deployment.stop()


def admin_on_each(deployment: WorkerDeployment) -> list[User]:
    """A new server admin, as seen by main, worker1 and worker2 in that order."""
    admin = register_user(deployment.main.base_url, deployment.shared_secret, admin=True)
    return [on(admin, process) for process in deployment.processes]


def on(user: User, process: SynapseProcess) -> User:
    """The same user and access token, talking to `process` with a session of its own."""
    return User(process.base_url, user.user_id, user.access_token, user.device_id, user.password)


def fetches(deployment: WorkerDeployment, remote: StaticFederationServer) -> int:
    """The device-list requests `remote` received because of the resync endpoint.

    A list that a failed fetch leaves marked stale is fetched again by Synapse's retry loop
    whenever its 30-second timer fires; those requests are Synapse's, not the endpoint's, and
    the main process logs them under the loop's name.
    """
    time.sleep(0.5)  # a fetch still on its way after the last answer
    by_loop = [
        line
        for line in deployment.main.log_lines(RETRY_LOOP)
        if f"[{remote.server_name}]" in line
        and ("Completed request" in line or "Got response headers" in line)
    ]
    return remote.requests - len(by_loop)


def flood_concurrently(
    requesters: Sequence[User], target: str, count: int
) -> list[requests.Response]:
    """`count` requests for `target` at once, spread round-robin over `requesters`."""
    responses: list[requests.Response | None] = [None] * count
    barrier = threading.Barrier(count)

    def send(index: int) -> None:
        user = requesters[index % len(requesters)]
        # A session per thread: requests' sessions are not thread-safe.
        mine = User(user.base_url, user.user_id, user.access_token, user.device_id, user.password)
        barrier.wait()
        responses[index] = resync(mine, target, timeout=TIMEOUT_S + 30)

    threads = [threading.Thread(target=send, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(response is not None for response in responses)
    return [response for response in responses if response is not None]


def statuses(responses: Sequence[requests.Response]) -> list[int]:
    return [response.status_code for response in responses]


def test_sequential_flood_over_all_processes_makes_one_fetch(
    deployment: WorkerDeployment,
) -> None:
    admins = admin_on_each(deployment)
    with StaticFederationServer(200) as remote:
        target = f"@sequential:{remote.server_name}"
        remote.body = device_list(target, "SEQUENTIAL")
        started = time.monotonic()
        answers = [resync(admins[i % len(admins)], target) for i in range(FLOOD)]
        assert time.monotonic() - started < COOLDOWN_S, "the test ran too slowly to check"

        assert statuses(answers) == [202] * FLOOD, [r.text for r in answers if r.status_code != 202]
        assert fetches(deployment, remote) == 1


def test_concurrent_flood_over_all_processes_makes_one_fetch(
    deployment: WorkerDeployment,
) -> None:
    admins = admin_on_each(deployment)
    with StaticFederationServer(200, delay=FETCH_DELAY_S) as remote:
        target = f"@concurrent:{remote.server_name}"
        remote.body = device_list(target, "CONCURRENT")

        answers = flood_concurrently(admins, target, FLOOD)

        assert statuses(answers) == [202] * FLOOD, [r.text for r in answers if r.status_code != 202]
        assert fetches(deployment, remote) == 1


def test_cooldown_ends_for_every_process(deployment: WorkerDeployment) -> None:
    main, worker1, worker2 = admin_on_each(deployment)
    with StaticFederationServer(200) as remote:
        target = f"@cooldown:{remote.server_name}"
        remote.body = device_list(target, "COOLDOWN")

        assert resync(main, target).status_code == 202
        fetched_at = time.monotonic()
        assert fetches(deployment, remote) == 1
        # The fetch made through main starts the cooldown on the workers too.
        assert resync(worker1, target).status_code == 202
        assert resync(worker2, target).status_code == 202
        assert fetches(deployment, remote) == 1
        assert time.monotonic() - fetched_at < COOLDOWN_S, "the test ran too slowly to check"

        time.sleep(max(0.0, COOLDOWN_S + 0.5 - (time.monotonic() - fetched_at)))
        assert resync(worker2, target).status_code == 202
        refetched_at = time.monotonic()
        assert fetches(deployment, remote) == 2
        # The fetch made through worker2 starts a new cooldown everywhere, including on
        # the processes that remember the previous one.
        assert resync(main, target).status_code == 202
        assert resync(worker1, target).status_code == 202
        assert fetches(deployment, remote) == 2
        assert time.monotonic() - refetched_at < COOLDOWN_S, "the test ran too slowly to check"


def test_failed_fetch_starts_no_cooldown_and_is_shared_while_in_flight(
    deployment: WorkerDeployment,
) -> None:
    main, worker1, worker2 = admin_on_each(deployment)
    with StaticFederationServer(404) as remote:
        target = f"@failing:{remote.server_name}"

        body = assert_error(resync(main, target), 502, "M_UNKNOWN")
        assert body[REASON] == "remote_error", body
        assert fetches(deployment, remote) == 1
        # No cooldown after a failure: another process asks the remote server again.
        body = assert_error(resync(worker1, target), 502, "M_UNKNOWN")
        assert body[REASON] == "remote_error", body
        assert fetches(deployment, remote) == 2

        # Requests on the other processes while worker1's fetch is in flight wait for its
        # outcome instead of fetching themselves.
        remote.delay = FETCH_DELAY_S
        received = remote.requests
        first: list[requests.Response] = []
        fetching = threading.Thread(target=lambda: first.append(resync(worker1, target)))
        fetching.start()
        deadline = time.monotonic() + FETCH_DELAY_S
        while remote.requests == received and time.monotonic() < deadline:
            time.sleep(0.02)
        assert remote.requests == received + 1, "worker1's fetch never reached the remote"
        others = flood_concurrently([main, worker2], target, 10)
        fetching.join()

        for response in [*first, *others]:
            body = assert_error(response, 502, "M_UNKNOWN")
            assert body[REASON] == "remote_error", body
        assert fetches(deployment, remote) == 3


def test_the_main_process_records_and_shows_a_fetch_a_worker_asked_for(
    deployment: WorkerDeployment,
) -> None:
    """The fetch runs on the main process, which records it; the admin status is served there
    (with Synapse's admin API), not by the workers."""
    main, worker1, _ = admin_on_each(deployment)
    with StaticFederationServer(200) as remote:
        target = f"@status:{remote.server_name}"
        remote.body = device_list(target, "STATUS")
        asked_ms = int(time.time() * 1000)
        assert resync(worker1, target).status_code == 202
        path = f"/_synapse/admin/v1/remote_device_lists/users/{urllib.parse.quote(target)}"
        deadline = time.monotonic() + 10
        while True:
            response = main.request("GET", path)
            assert response.status_code == 200, response.text
            status = response.json()
            # Recorded in the background, after the fetch.
            if status["last_fetched_ts"] is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status["last_fetched_ts"] >= asked_ms - 1000, status
        assert status["tracked"] is True, status
        assert status["device_count"] == 1, status
        assert status["stale"] is False, status
        assert status["server"]["reachable"] is True, status
        assert worker1.request("GET", path).status_code == 404
