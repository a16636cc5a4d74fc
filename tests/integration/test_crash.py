"""A process killed mid-upload: on the worker deployment (PostgreSQL, Redis, main process and
a worker), many users replace their keys with UIA at once, and the process serving uploads is
killed with SIGKILL while their keys are being written, then started again. Every user's
stored identity must be whole (the self-signing and user-signing keys signed by the stored
master key, all three from one upload), every process must show what is stored, and the users
can go on uploading at once.

Each round prints how many uploads had been answered, and how many were in flight, when the
process was killed (`pytest -s` shows it).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

import pytest
import requests
import synapse
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64

from synapse_xsign_uia._synapse import parse_version
from tests.harness.client import (
    UPLOAD_PATH,
    CrossSigningKeys,
    User,
    cross_signing_keys_in,
    register_user,
)
from tests.harness.workers import SynapseProcess, WorkerDeployment
from tests.integration.test_atomic_write import Execute, postgres_of
from tests.integration.test_upload import assert_challenge

pytestmark = pytest.mark.synapse

SYNAPSE = parse_version(synapse.__version__)
USERS = 30
ROUNDS = 3
# Each key row takes this long to insert, so that the kill lands while rows are written.
INSERT_DELAY_S = 0.05
KILL_AFTER_S = 0.6


def uploader_of(deployment: WorkerDeployment) -> SynapseProcess:
    # Synapse serves this endpoint on workers from 1.135, on the main process before.
    return deployment.worker if SYNAPSE >= (1, 135, 0) else deployment.main


def at(user: User, base_url: str) -> User:
    return User(base_url, user.user_id, user.access_token, user.device_id, user.password)


def slow_inserts(execute: Execute, prefix: str) -> None:
    execute(
        "CREATE OR REPLACE FUNCTION xsign_slow() RETURNS trigger AS $$ BEGIN"
        f" IF NEW.user_id LIKE '{prefix}%' THEN PERFORM pg_sleep({INSERT_DELAY_S}); END IF;"
        " RETURN NEW; END $$ LANGUAGE plpgsql",
        (),
    )
    execute("DROP TRIGGER IF EXISTS xsign_slow ON e2e_cross_signing_keys", ())
    execute(
        "CREATE TRIGGER xsign_slow BEFORE INSERT ON e2e_cross_signing_keys"
        " FOR EACH ROW EXECUTE FUNCTION xsign_slow()",
        (),
    )


def stored_in_database(execute: Execute, user_id: str) -> dict[str, dict[str, Any]]:
    """The user's latest key of each type, as the database holds it."""
    rows = execute(
        "SELECT keytype, keydata FROM e2e_cross_signing_keys WHERE user_id = ? ORDER BY stream_id",
        (user_id,),
    )
    return {key_type: json.loads(keydata) for key_type, keydata in rows}


def public(key: dict[str, Any]) -> str:
    return str(next(iter(key["keys"].values())))


def signed_by(key: dict[str, Any], master: dict[str, Any], user_id: str) -> bool:
    key_id, value = next(iter(master["keys"].items()))
    verify_key = decode_verify_key_bytes(key_id, decode_base64(value))
    try:
        verify_signed_json(key, user_id, verify_key)
    except SignatureVerifyException:
        return False
    return True


def public_keys(keys: CrossSigningKeys) -> dict[str, str]:
    return {
        "master": keys.master.public,
        "self_signing": keys.self_signing.public,
        "user_signing": keys.user_signing.public,
    }


def replace_all_at_once(
    users: list[tuple[User, CrossSigningKeys]], sessions: list[str]
) -> tuple[dict[int, int], threading.Barrier, list[threading.Thread]]:
    """Start every user's password request at once; their statuses fill in as they come."""
    statuses: dict[int, int] = {}
    barrier = threading.Barrier(len(users) + 1)

    def send(index: int) -> None:
        user, keys = users[index]
        barrier.wait()
        try:
            body = {**keys.body(), "auth": user.password_auth(sessions[index])}
            response = user.request("POST", UPLOAD_PATH, body, timeout=30)
            statuses[index] = response.status_code
        except requests.RequestException:
            statuses[index] = 0

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(users))]
    for thread in threads:
        thread.start()
    return statuses, barrier, threads


@pytest.mark.parametrize("round_number", range(1, ROUNDS + 1))
def test_a_killed_process_leaves_every_identity_whole(
    deployment: WorkerDeployment, round_number: int
) -> None:
    process = uploader_of(deployment)
    execute = postgres_of(deployment)
    prefix = f"@crash{round_number}x"
    slow_inserts(execute, prefix)
    users: list[tuple[User, CrossSigningKeys]] = []
    old: dict[str, dict[str, str]] = {}
    for n in range(USERS):
        registered = register_user(
            deployment.main.base_url, deployment.shared_secret, localpart=f"crash{round_number}x{n}"
        )
        user = at(registered, process.base_url)
        first = user.keys()
        assert user.upload(first.body()).status_code == 200
        old[user.user_id] = public_keys(first)
        users.append((user, user.keys()))
    sessions = [str(assert_challenge(u.upload(k.body()))["session"]) for u, k in users]

    statuses, barrier, threads = replace_all_at_once(users, sessions)
    barrier.wait()
    time.sleep(KILL_AFTER_S)
    process.stop(signal.SIGKILL)
    answered = sum(1 for status in statuses.values() if status == 200)
    for thread in threads:
        thread.join(timeout=60)
    in_flight = USERS - answered
    execute("DROP TRIGGER xsign_slow ON e2e_cross_signing_keys", ())
    process.start()
    replaced = sum(
        1
        for user, keys in users
        if public(stored_in_database(execute, user.user_id)["master"]) == keys.master.public
    )
    print(
        f"\nround {round_number}: at the kill {answered} uploads answered, {in_flight} in "
        f"flight; after the restart {replaced} users hold their new keys, "
        f"{USERS - replaced} their old ones"
    )

    for index, (user, keys) in enumerate(users):
        stored = stored_in_database(execute, user.user_id)
        assert set(stored) == {"master", "self_signing", "user_signing"}, user.user_id
        for key_type in ("self_signing", "user_signing"):
            assert signed_by(stored[key_type], stored["master"], user.user_id), user.user_id
        found = {key_type: public(key) for key_type, key in stored.items()}
        # Whole: the keys of one upload, the old ones or the new ones.
        assert found in (old[user.user_id], public_keys(keys)), user.user_id
        if statuses.get(index) == 200:
            assert found == public_keys(keys)
        # Every process shows what is stored.
        for base_url in {deployment.main.base_url, deployment.worker.base_url}:
            shown = at(user, base_url).stored_keys()
            assert {t: public(k) for t, k in shown.items()} == found, (user.user_id, base_url)

    # The users can go on at once: the dead process's locks are gone within seconds.
    started = time.monotonic()
    user, _ = users[0]
    response = user.upload_with_uia(user.keys().body())
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 10


def test_caches_of_every_process_follow_a_write_after_a_restart(
    deployment: WorkerDeployment,
) -> None:
    """Each process's cache of a user's keys, filled before the kill, shows the keys stored
    by the killed process once it is back."""
    process = uploader_of(deployment)
    user = at(register_user(deployment.main.base_url, deployment.shared_secret), process.base_url)
    assert user.upload(user.keys().body()).status_code == 200
    new = user.keys()
    response = user.upload_with_uia(new.body())
    assert response.status_code == 200, response.text
    for base_url in {deployment.main.base_url, deployment.worker.base_url}:
        # Fill every cache, then kill right after the next write.
        at(user, base_url).stored_keys()
    newer = user.keys()
    assert user.upload_with_uia(newer.body()).status_code == 200
    process.stop(signal.SIGKILL)
    process.start()
    deadline = time.monotonic() + 10
    for base_url in {deployment.main.base_url, deployment.worker.base_url}:
        while True:
            shown = cross_signing_keys_in(
                at(user, base_url)
                .request(
                    "POST", "/_matrix/client/v3/keys/query", {"device_keys": {user.user_id: []}}
                )
                .json(),
                user.user_id,
            )
            if public(shown["master"]) == newer.master.public or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert public(shown["master"]) == newer.master.public, base_url
