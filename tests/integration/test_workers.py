"""The module on a scaled-out homeserver: PostgreSQL, Redis, a main process and a
`generic_worker` serving the client API, all started by the tests."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import pytest
import requests
import synapse

import synapse_xsign_uia
from synapse_xsign_uia._synapse import parse_version
from tests.harness.client import UPLOAD_PATH, CrossSigningKeys, User, register_user
from tests.harness.workers import WorkerDeployment

pytestmark = pytest.mark.synapse

SYNAPSE = parse_version(synapse.__version__)
# Before 1.135 Synapse serves the upload endpoint on the main process only, and a reverse
# proxy sends it there.
WORKERS_SERVE_UPLOAD = SYNAPSE >= (1, 135, 0)
ROUNDS = 20


def on(user: User, base_url: str) -> User:
    """The same user and access token, talking to another process."""
    return User(base_url, user.user_id, user.access_token, user.device_id, user.password)


def upload_url(deployment: WorkerDeployment) -> str:
    return deployment.worker.base_url if WORKERS_SERVE_UPLOAD else deployment.main.base_url


def test_module_loads_in_every_process(deployment: WorkerDeployment) -> None:
    for process in (deployment.main, deployment.worker):
        loaded = f"synapse_xsign_uia {synapse_xsign_uia.__version__} loaded (with workers)"
        assert process.log_lines(loaded), process.name
        assert process.log_lines("synapse_xsign_uia self-check passed"), process.name


@pytest.mark.skipif(
    not WORKERS_SERVE_UPLOAD, reason="Synapse < 1.135 serves this endpoint on main only"
)
def test_worker_serves_the_upload_override(deployment: WorkerDeployment) -> None:
    user = register_user(deployment.main.base_url, deployment.shared_secret)
    assert on(user, deployment.worker.base_url).upload(user.keys().body()).status_code == 200
    assert deployment.worker.log_lines(f"user={user.user_id} rule=first_upload outcome=uploaded")


@pytest.mark.parametrize("process", ["main", "worker"])
def test_every_rule_behaves_the_same_on_each_process(
    deployment: WorkerDeployment, process: str
) -> None:
    if process == "worker" and not WORKERS_SERVE_UPLOAD:
        pytest.skip("Synapse < 1.135 serves this endpoint on main only")
    base_url = deployment.worker.base_url if process == "worker" else deployment.main.base_url
    user = on(register_user(deployment.main.base_url, deployment.shared_secret), base_url)
    keys = user.keys()
    assert user.upload({}).status_code == 200
    bad = keys.body()
    bad["master_key"]["user_id"] = "@someone:localhost"
    assert user.upload(bad).json()["errcode"] == "M_INVALID_PARAM"
    assert user.upload(keys.body()).status_code == 200
    assert user.upload(keys.body()).status_code == 200
    new = user.keys()
    challenge = user.upload(new.body())
    assert challenge.status_code == 401
    response = user.upload({**new.body(), "auth": user.password_auth(challenge.json()["session"])})
    assert response.status_code == 200
    # Every process sees the new keys at once: the other one, and a fresh read through main.
    assert on(user, deployment.main.base_url).stored_public_keys()["master"] == new.master.public
    assert on(user, deployment.worker.base_url).stored_public_keys()["master"] == new.master.public


def race_main_and_worker(deployment: WorkerDeployment) -> tuple[list[int], bool]:
    user = register_user(deployment.main.base_url, deployment.shared_secret)
    contenders = [on(user, deployment.main.base_url), on(user, upload_url(deployment))]
    keys = [user.keys(), user.keys()]
    barrier = threading.Barrier(2)

    def send(index: int) -> requests.Response:
        contenders[index].request("GET", "/_matrix/client/versions")
        barrier.wait()
        return contenders[index].upload(keys[index].body())

    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(send, range(2)))
    stored = on(user, deployment.main.base_url).stored_public_keys()["master"]
    winners = [
        k.master.public for k, r in zip(keys, responses, strict=True) if r.status_code == 200
    ]
    return [r.status_code for r in responses], stored in winners


def test_concurrent_first_uploads_on_main_and_worker(deployment: WorkerDeployment) -> None:
    """The lock is cross-process: one request on main, one on the worker, same instant."""
    for _ in range(ROUNDS):
        statuses, stored_is_winner = race_main_and_worker(deployment)
        assert sorted(statuses) == [200, 401], statuses
        assert stored_is_winner


def test_restarting_the_worker_loses_nothing_and_holds_no_lock(
    deployment: WorkerDeployment,
) -> None:
    """Uploads run against the worker while it restarts: every answered upload is stored as
    answered, and afterwards every user can upload again at once (no lock left behind)."""
    users = [register_user(deployment.main.base_url, deployment.shared_secret) for _ in range(30)]
    sent: dict[str, tuple[CrossSigningKeys, int | None]] = {}
    stop = threading.Event()

    def upload_all() -> None:
        for user in users:
            if stop.is_set():
                break
            keys = user.keys()
            try:
                status: int | None = (
                    on(user, upload_url(deployment)).upload(keys.body()).status_code
                )
            except requests.RequestException:
                status = None  # the worker went away mid-request
            sent[user.user_id] = (keys, status)
            time.sleep(0.05)

    uploader = threading.Thread(target=upload_all)
    uploader.start()
    time.sleep(0.3)
    deployment.worker.stop()
    deployment.worker.start()
    uploader.join(timeout=120)
    stop.set()

    answered = 0
    for user in users:
        if user.user_id not in sent:
            continue
        keys, status = sent[user.user_id]
        stored = on(user, deployment.main.base_url).stored_public_keys().get("master")
        if status == 200:
            answered += 1
            assert stored == keys.master.public
        elif status is None:
            assert stored in (None, keys.master.public)
        else:
            # Refused while the worker restarted (e.g. a 502 from a closing listener).
            assert stored is None
    assert answered > 0

    # No lock was left behind: every user uploads again promptly, through main.
    for user in users:
        started = time.monotonic()
        response = on(user, deployment.main.base_url).upload_with_uia(user.keys().body())
        assert response.status_code == 200, response.text
        assert time.monotonic() - started < 10


def hold_lock(deployment: WorkerDeployment, user: User, lease_s: float) -> Any:
    """Take the user's lock as another process would, for `lease_s` seconds, and never renew
    it (as a process that died); returns the connection, to release it early."""
    conn = deployment.postgres.connect("synapse")
    with conn.cursor() as cursor:
        # Over the lease of the user's last upload, if its release, which follows the
        # response, has not happened yet.
        cursor.execute(
            "INSERT INTO synapse_xsign_uia_user_locks (user_id, holder, token, expires_ms)"
            " VALUES (%s, 'elsewhere', 'held-by-test', %s) ON CONFLICT (user_id) DO UPDATE"
            " SET holder = excluded.holder, token = excluded.token,"
            " expires_ms = excluded.expires_ms",
            (user.user_id, int((time.time() + lease_s) * 1000)),
        )
    return conn


def lease_rows(deployment: WorkerDeployment, user: User) -> int:
    conn = deployment.postgres.connect("synapse")
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM synapse_xsign_uia_user_locks WHERE user_id = %s",
                (user.user_id,),
            )
            return int(cursor.fetchone()[0])
    finally:
        conn.close()


def wait_for_lease_rows(deployment: WorkerDeployment, user: User, rows: int) -> int:
    """Wait (up to 30 s) until the user has `rows` lease rows; how many it has then."""
    deadline = time.monotonic() + 30
    while lease_rows(deployment, user) != rows and time.monotonic() < deadline:
        time.sleep(0.01)
    return lease_rows(deployment, user)


def wait_for_no_lease(deployment: WorkerDeployment, user: User) -> None:
    assert wait_for_lease_rows(deployment, user, 0) == 0, "the lease was left behind"


def test_the_lease_is_given_up_whether_the_request_wrote_or_not(
    deployment: WorkerDeployment,
) -> None:
    """An upload that writes ends its lease in the write's transaction; one that took the
    lock and wrote nothing (the answer to a challenge with a wrong password) gives it up
    once its response is on its way. Neither leaves it to end by itself, and the user's
    next writes, on the same process, take the lock again."""
    user = on(
        register_user(deployment.main.base_url, deployment.shared_secret), upload_url(deployment)
    )
    assert user.upload(user.keys().body()).status_code == 200
    assert lease_rows(deployment, user) == 0, "the write left its lease behind"

    replacement = user.keys().body()
    challenge = user.upload(replacement)
    assert challenge.status_code == 401, challenge.text
    wrong = {**user.password_auth(challenge.json()["session"]), "password": "not the password"}
    refused = user.upload({**replacement, "auth": wrong})
    assert refused.status_code == 401, refused.text
    wait_for_no_lease(deployment, user)

    for _ in range(3):
        response = user.upload_with_uia(user.keys().body())
        assert response.status_code == 200, response.text
        wait_for_no_lease(deployment, user)


def test_a_write_whose_lease_was_taken_over_writes_nothing(deployment: WorkerDeployment) -> None:
    """A process that stalls for longer than its lease, while another process takes the
    user's lock, must not write: its write's transaction finds the lease gone and is undone,
    and the client, told so, may send the same request again. The stall is made in
    PostgreSQL: a lock on Synapse's table of cross-signing keys holds the upload's read of
    the stored state, which follows the lease in the same trip, while the lease is handed to
    another holder."""
    user = on(
        register_user(deployment.main.base_url, deployment.shared_secret), upload_url(deployment)
    )
    assert user.upload(user.keys().body()).status_code == 200
    before = user.stored_public_keys()
    replacement = user.keys().body()
    challenge = user.upload(replacement)
    assert challenge.status_code == 401, challenge.text
    answer = {**replacement, "auth": user.password_auth(challenge.json()["session"])}

    stall = deployment.postgres.connect("synapse")
    stall.autocommit = False
    result: dict[str, Any] = {}
    try:
        with stall.cursor() as cursor:
            cursor.execute("LOCK TABLE e2e_cross_signing_keys IN ACCESS EXCLUSIVE MODE")

        def send() -> None:
            result["response"] = user.request("POST", UPLOAD_PATH, answer)

        thread = threading.Thread(target=send)
        thread.start()
        assert wait_for_lease_rows(deployment, user, 1) == 1, "the upload never took the lock"
        # Another process takes the lock, as it may once the lease has run out.
        takeover = hold_lock(deployment, user, 60)
    finally:
        stall.rollback()
        stall.close()
    thread.join(timeout=60)

    response = result["response"]
    assert response.status_code == 503, response.text
    assert response.json()["errcode"] == "M_UNKNOWN"
    assert "nothing was stored" in response.json()["error"]
    serving = deployment.worker if WORKERS_SERVE_UPLOAD else deployment.main
    decided = serving.log_lines("cross-signing upload decision")
    assert decided[-1].endswith(f"user={user.user_id} rule=uia outcome=lock_lost"), decided[-1]
    assert user.stored_public_keys() == before, "a write went through without the lock"
    # The lock is still the other process's: the stalled one did not release it.
    assert lease_rows(deployment, user) == 1
    with takeover.cursor() as cursor:
        cursor.execute(
            "DELETE FROM synapse_xsign_uia_user_locks WHERE user_id = %s AND token = %s",
            (user.user_id, "held-by-test"),
        )
        assert cursor.rowcount == 1, "the other process's lease was released by the stalled one"
    takeover.close()

    # The client sends the same request again: its UIA session authorised nothing yet.
    retried = user.request("POST", UPLOAD_PATH, answer)
    assert retried.status_code == 200, retried.text
    assert user.stored_public_keys()["master"] == next(
        iter(replacement["master_key"]["keys"].values())
    )


def upload_in_background(user: User, result: dict[str, Any]) -> threading.Thread:
    def upload() -> None:
        result["response"] = user.upload(user.keys().body())
        result["at"] = time.monotonic()

    thread = threading.Thread(target=upload)
    thread.start()
    return thread


def test_uploads_wait_for_the_cross_worker_lock(deployment: WorkerDeployment) -> None:
    """With workers, while another process holds the user's lock, an upload waits, and it
    goes through once the lock is released."""
    user = register_user(deployment.main.base_url, deployment.shared_secret)
    conn = hold_lock(deployment, user, 60)
    result: dict[str, Any] = {}
    thread = upload_in_background(on(user, upload_url(deployment)), result)
    time.sleep(2)
    assert "response" not in result, "the upload did not wait for the lock"
    released = time.monotonic()
    with conn.cursor() as cursor:
        cursor.execute("DELETE FROM synapse_xsign_uia_user_locks WHERE token = 'held-by-test'")
    conn.close()
    thread.join(timeout=60)
    assert result["response"].status_code == 200
    assert result["at"] - released < 2


def test_answers_that_write_nothing_do_not_wait_for_the_lock(deployment: WorkerDeployment) -> None:
    """An identical re-upload and a UIA challenge write nothing, so they are answered while
    another process holds the user's lock; the retry that authenticates writes, so it waits."""
    user = on(
        register_user(deployment.main.base_url, deployment.shared_secret), upload_url(deployment)
    )
    stored = user.keys()
    assert user.upload(stored.body()).status_code == 200
    conn = hold_lock(deployment, user, 60)
    result: dict[str, Any] = {}
    try:
        started = time.monotonic()
        assert user.upload(stored.body()).status_code == 200
        replacement = user.keys().body()
        challenge = user.upload(replacement)
        assert challenge.status_code == 401, challenge.text
        assert challenge.json()["session"]
        assert time.monotonic() - started < 2, "an answer that writes nothing waited"

        def authenticated_retry() -> None:
            result["response"] = user.request(
                "POST",
                UPLOAD_PATH,
                {**replacement, "auth": user.password_auth(challenge.json()["session"])},
            )
            result["at"] = time.monotonic()

        thread = threading.Thread(target=authenticated_retry)
        thread.start()
        time.sleep(2)
        assert "response" not in result, "the write did not wait for the lock"
    finally:
        released = time.monotonic()
        with conn.cursor() as cursor:
            cursor.execute("DELETE FROM synapse_xsign_uia_user_locks WHERE token = 'held-by-test'")
        conn.close()
    thread.join(timeout=60)
    assert result["response"].status_code == 200, result["response"].text
    assert result["at"] - released < 2
    assert user.stored_public_keys()["master"] == next(
        iter(replacement["master_key"]["keys"].values())
    )


def test_a_lock_whose_holder_died_is_taken_over_within_seconds(
    deployment: WorkerDeployment,
) -> None:
    """A lease that is not renewed (its process died mid-upload) ends by itself: the user's
    next upload, and an admin's grant, wait only for its end, not Synapse's two minutes."""
    admin = register_user(deployment.main.base_url, deployment.shared_secret, admin=True)
    user = register_user(deployment.main.base_url, deployment.shared_secret)
    assert on(user, upload_url(deployment)).upload(user.keys().body()).status_code == 200
    started = time.monotonic()
    hold_lock(deployment, user, 3).close()
    result: dict[str, Any] = {}
    thread = upload_in_background(on(user, upload_url(deployment)), result)
    granted = admin.request("POST", WINDOW_PATH.format(quote(user.user_id)), {})
    assert granted.status_code == 200, granted.text
    assert 2.5 < time.monotonic() - started < 8
    thread.join(timeout=60)
    # A replacement without UIA: refused with a challenge, or through the window the admin
    # just opened; either way answered within seconds.
    assert result["response"].status_code in (200, 401)
    assert result["at"] - started < 8


WINDOW_PATH = "/_synapse/admin/v1/users/{}/_allow_cross_signing_replacement_without_uia"


def test_admin_window_granted_on_main_is_honoured_where_uploads_run(
    deployment: WorkerDeployment,
) -> None:
    admin = register_user(deployment.main.base_url, deployment.shared_secret, admin=True)
    user = register_user(deployment.main.base_url, deployment.shared_secret)
    uploader = on(user, upload_url(deployment))
    assert uploader.upload(user.keys().body()).status_code == 200
    path = WINDOW_PATH.format(quote(user.user_id))

    granted = admin.request("POST", path, {})
    assert granted.status_code == 200, granted.text
    new = user.keys()
    assert uploader.upload(new.body()).status_code == 200
    assert on(user, deployment.main.base_url).stored_public_keys()["master"] == new.master.public
    # Used once: the new master key has no window.
    assert uploader.upload(user.keys().body()).status_code == 401

    assert admin.request("POST", path, {}).status_code == 200
    assert admin.request("DELETE", path).status_code == 200
    assert uploader.upload(user.keys().body()).status_code == 401
    assert on(user, deployment.main.base_url).stored_public_keys()["master"] == new.master.public
