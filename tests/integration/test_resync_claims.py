"""The homeserver-wide resync claim, seen from one process: another process's claim on a
remote user (written here into the database, as that process would) makes a request wait for
that process's fetch and answer with its outcome; a claim whose process died runs out; a fetch
recorded by another process starts the cooldown here.

The same protocol between real processes (main and two workers, on PostgreSQL) is tested in
test_resync_workers.py.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import ServerFactory
from tests.harness.client import User, register_user
from tests.harness.federation import StaticFederationServer, device_list
from tests.harness.server import SynapseServer

pytestmark = pytest.mark.synapse

ROUTE = "/_matrix/unstable/org.matrix.mscXXXX/user/{}/devices"
REASON = "org.matrix.mscXXXX.reason"
TABLE = "synapse_xsign_uia_resync_claims"
# As in the module: a claim this old belongs to a process that died.
CLAIM_LEASE_MS = 120_000
COOLDOWN_S = 30
MODULE_CONFIG = {"device_list_resync": {"timeout": "10s", "per_user_cooldown": f"{COOLDOWN_S}s"}}
# Outbound federation to static TLS servers on loopback.
EXTRA_CONFIG = {
    "federation_verify_certificates": False,
    "ip_range_whitelist": ["127.0.0.0/8"],
    "federation": {"destination_min_retry_interval": "5s"},
}


@pytest.fixture(scope="module")
def server(synapse_server: ServerFactory) -> SynapseServer:
    return synapse_server(MODULE_CONFIG, extra_config=EXTRA_CONFIG)


@pytest.fixture
def admin(server: SynapseServer) -> User:
    # Admins skip the per-requester rate limit and the shared-room check, not the claim.
    return register_user(server.base_url, server.shared_secret, admin=True)


@pytest.fixture
def remote() -> Iterator[StaticFederationServer]:
    with StaticFederationServer(200) as remote:
        yield remote


def resync(user: User, target: str) -> requests.Response:
    return user.request("GET", ROUTE.format(urllib.parse.quote(target, safe="")), timeout=30)


def now_ms() -> int:
    return int(time.time() * 1000)


def write(server: SynapseServer, sql: str, *args: Any) -> None:
    """As another process of the homeserver would, in the same database."""
    db = sqlite3.connect(server.directory / "homeserver.db", timeout=30)
    try:
        db.execute(sql, args)
        db.commit()
    finally:
        db.close()


def claim(server: SynapseServer, user_id: str, claimed_ms: int) -> None:
    write(
        server,
        f"INSERT INTO {TABLE} (user_id, claim, claimed_ms) VALUES (?, ?, ?)",
        user_id,
        "worker9:gone",
        claimed_ms,
    )


def in_background(request: Any) -> tuple[threading.Thread, list[requests.Response]]:
    answers: list[requests.Response] = []
    thread = threading.Thread(target=lambda: answers.append(request()))
    thread.start()
    return thread, answers


def test_another_process_fetching_is_waited_for(
    server: SynapseServer, admin: User, remote: StaticFederationServer
) -> None:
    target = f"@waited:{remote.server_name}"
    remote.body = device_list(target, "REMOTE")
    claim(server, target, now_ms())
    thread, answers = in_background(lambda: resync(admin, target))
    time.sleep(1.5)
    assert thread.is_alive(), "the request did not wait for the other process's fetch"
    write(
        server,
        f"UPDATE {TABLE} SET claim = NULL, claimed_ms = NULL, fetched_ms = ? WHERE user_id = ?",
        now_ms(),
        target,
    )
    thread.join(timeout=15)
    assert answers and answers[0].status_code == 202, answers and answers[0].text
    # The other process fetched; this one did not, and its cooldown now runs too.
    assert resync(admin, target).status_code == 202
    assert remote.requests == 0


def test_another_process_failing_is_relayed(
    server: SynapseServer, admin: User, remote: StaticFederationServer
) -> None:
    target = f"@relayed:{remote.server_name}"
    claim(server, target, now_ms())
    thread, answers = in_background(lambda: resync(admin, target))
    time.sleep(1)
    failure = {"reason": "remote_error", "detail": "it answered HTTP 404", "remote_status": 404}
    write(
        server,
        f"UPDATE {TABLE} SET claim = NULL, claimed_ms = NULL, failed_ms = ?, failure = ?"
        " WHERE user_id = ?",
        now_ms(),
        json.dumps(failure),
        target,
    )
    thread.join(timeout=15)
    assert answers, "no answer"
    body = answers[0].json()
    assert answers[0].status_code == 502, body
    assert body[REASON] == "remote_error"
    assert body["org.matrix.mscXXXX.remote_status"] == 404
    assert "404" in body["error"]
    assert remote.requests == 0
    # A failure starts no cooldown: the next request fetches itself.
    remote.body = device_list(target, "REMOTE")
    assert resync(admin, target).status_code == 202
    assert remote.requests == 1


def test_a_claim_left_by_a_dead_process_runs_out(
    server: SynapseServer, admin: User, remote: StaticFederationServer
) -> None:
    target = f"@orphaned:{remote.server_name}"
    remote.body = device_list(target, "REMOTE")
    claim(server, target, now_ms() - CLAIM_LEASE_MS + 2000)
    started = time.monotonic()
    response = resync(admin, target)
    assert response.status_code == 202, response.text
    assert time.monotonic() - started >= 1.5, "the live claim was not waited for"
    assert remote.requests == 1


def test_a_fetch_by_another_process_starts_the_cooldown_here(
    server: SynapseServer, admin: User, remote: StaticFederationServer
) -> None:
    target = f"@cooled:{remote.server_name}"
    remote.body = device_list(target, "REMOTE")
    write(
        server, f"INSERT INTO {TABLE} (user_id, fetched_ms) VALUES (?, ?)", target, now_ms() - 1000
    )
    for _ in range(3):
        assert resync(admin, target).status_code == 202
    assert remote.requests == 0


def test_a_fetch_older_than_the_cooldown_is_fetched_again(
    server: SynapseServer, admin: User, remote: StaticFederationServer
) -> None:
    target = f"@warm:{remote.server_name}"
    remote.body = device_list(target, "REMOTE")
    fetched_ms = now_ms() - COOLDOWN_S * 1000 - 1000
    write(server, f"INSERT INTO {TABLE} (user_id, fetched_ms) VALUES (?, ?)", target, fetched_ms)
    assert resync(admin, target).status_code == 202
    assert remote.requests == 1
