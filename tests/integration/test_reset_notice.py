"""The identity-reset notice: a server notice to a user whose master key was replaced, seen
through `/sync` as a real client sees it; none for a first upload, an identical re-upload,
new sub-keys or with the notice off; and the start-up error without `server_notices`."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest
import synapse
from synapse.module_api.errors import ConfigError

from synapse_xsign_uia._synapse import Caller, parse_version
from synapse_xsign_uia.config import DEFAULT_NOTICE_MESSAGE, parse_config
from synapse_xsign_uia.notice import (
    DRAIN_INTERVAL_MS,
    MAX_ATTEMPTS,
    METHODS,
    Reset,
    ResetNotifier,
    check_notice_config,
    format_time,
    notice_text,
)
from synapse_xsign_uia.policy import Rule
from synapse_xsign_uia.store import Store
from tests.conftest import ServerFactory
from tests.harness.client import CrossSigningKeys, User, register_user
from tests.harness.server import SynapseServer
from tests.harness.workers import WorkerDeployment, skip_without_worker_requirements
from tests.integration.test_appservice_and_startup import AppService

synapse_test = pytest.mark.synapse

NOTICES_LOCALPART = "notices"
NOTICES_MXID = f"@{NOTICES_LOCALPART}:localhost"
SERVER_NOTICES = {
    "server_notices": {
        "system_mxid_localpart": NOTICES_LOCALPART,
        "system_mxid_display_name": "Server Notices",
        "room_name": "Server Notices",
    }
}
ENABLED = {"notify_on_reset": {"enabled": True}}
ISO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
# Long enough for a notice sent in the background, or queued by a worker and picked up by
# the main process (every 5 s).
WAIT_S = 30.0
# How long a test waits before concluding that no notice is coming.
QUIET_S = 3.0
SENT = "Identity-reset notice sent: user={user_id} rule="

SYNC_FILTER = json.dumps({"room": {"timeline": {"limit": 100}}})


# The notice's text, without a server.


def test_default_message_fills_every_placeholder() -> None:
    reset = Reset(
        "@alice:example.org", Rule.UIA, 1_714_566_896_789, "PHONE", "Alice's phone", "192.0.2.7"
    )
    body = notice_text(DEFAULT_NOTICE_MESSAGE, reset, "example.org")
    assert "@alice:example.org" in body
    assert "2024-05-01T12:34:56Z" in body
    assert METHODS[Rule.UIA] in body
    assert "example.org" in body
    assert "PHONE (Alice's phone)" in body
    assert "192.0.2.7" in body
    assert "{" not in body and "}" not in body


def test_custom_message() -> None:
    template = parse_config(
        {
            "notify_on_reset": {
                "message": "{user_id} on {server_name}: {time} ({method}) {device} {ip_address} {{ok}}"
            }
        }
    ).notify_on_reset.message
    reset = Reset("@a:hs", Rule.APPSERVICE, 0, None, None, "::1")
    assert notice_text(template, reset, "hs") == (
        f"@a:hs on hs: 1970-01-01T00:00:00Z ({METHODS[Rule.APPSERVICE]}) "
        "none (an application service's own access token) ::1 {ok}"
    )
    # A device without a display name is named by its ID.
    unnamed = Reset("@a:hs", Rule.UIA, 0, "DEV", None, "::1")
    assert "DEV ::1" in notice_text(template, unnamed, "hs")


def test_only_replacing_rules_have_a_method() -> None:
    assert set(METHODS) == {Rule.UIA, Rule.REPLACEMENT_WINDOW, Rule.APPSERVICE}


def test_time_is_utc() -> None:
    assert format_time(86_399_999) == "1970-01-01T23:59:59Z"


def test_enabled_without_server_notices_is_refused_by_the_check() -> None:
    enabled = parse_config(ENABLED).notify_on_reset

    def homeserver(mxid: str | None, *, main: bool = True) -> Any:
        return SimpleNamespace(is_main_process=main, notices=SimpleNamespace(sender=lambda: mxid))

    with pytest.raises(ConfigError) as info:
        check_notice_config(enabled, homeserver(None))
    assert "'notify_on_reset.enabled'" in str(info.value)
    assert "server_notices" in str(info.value)
    check_notice_config(enabled, homeserver("@notices:hs"))
    # A worker only queues: the main process, which sends, is the one that needs it.
    check_notice_config(enabled, homeserver(None, main=False))
    check_notice_config(parse_config({}).notify_on_reset, homeserver(None))


# Delivery, with stand-ins for the homeserver and an SQLite database for the queue.


class FakeNotices:
    """Synapse's server notices."""

    def __init__(self, failing: bool = False) -> None:
        self.failing = failing
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def send(self, user_id: str, content: dict[str, Any]) -> None:
        if self.failing:
            raise RuntimeError("the event persister is away")
        self.sent.append((user_id, content))


class FakeSynapse:
    """The parts of `Synapse` the notifier and the store use. Transactions run on one SQLite
    connection shared by every "process"; what is started in the background is collected
    as coroutines, for the test to run."""

    server_name = "hs"
    with_workers = True

    def __init__(
        self, db: sqlite3.Connection, notices: FakeNotices, background: list[Any], *, worker: bool
    ) -> None:
        self.db = db
        self.notices = notices
        self.is_main_process = not worker
        self.background = background
        self.periodic: list[tuple[Any, float]] = []
        self._clock = itertools.count(1_714_566_896_789)

    def now_ms(self) -> int:
        return next(self._clock)

    async def device_display_name(self, user_id: str, device_id: str) -> str | None:
        return "Alice's phone"

    def run_in_background(self, desc: str, func: Any, *args: Any) -> None:
        self.background.append(func(*args))

    def run_periodically(self, desc: str, func: Any, ms: int) -> None:
        self.periodic.append((func, ms))

    async def run_db_interaction(self, desc: str, func: Any, *args: Any) -> Any:
        cursor = self.db.cursor()
        try:
            result = func(cursor, *args)
            self.db.commit()
            return result
        except BaseException:
            self.db.rollback()
            raise

    run_db_statement = run_db_interaction


@pytest.fixture
def background() -> list[Any]:
    """What the notifier starts in the background, as coroutines to run."""
    return []


def notifier(process: FakeSynapse, module_config: Any = ENABLED) -> ResetNotifier:
    config = parse_config(module_config).notify_on_reset
    stand_in: Any = process
    return ResetNotifier(config, stand_in, Store(stand_in))


def process(
    db: sqlite3.Connection,
    background: list[Any],
    notices: FakeNotices | None = None,
    *,
    worker: bool = False,
) -> FakeSynapse:
    return FakeSynapse(db, notices or FakeNotices(), background, worker=worker)


def caller(user_id: str) -> Caller:
    return Caller(user_id, "PHONE", "192.0.2.7", False, True, None)


def queued(db: sqlite3.Connection) -> list[tuple[str, int]]:
    return list(db.execute("SELECT user_id, attempts FROM synapse_xsign_uia_reset_notices"))


def test_notified_rules(background: list[Any]) -> None:
    notices = FakeNotices()
    with closing(sqlite3.connect(":memory:")) as db:
        for rule in Rule:
            notifier(process(db, background, notices)).master_replaced(
                caller(f"@{rule.value}:hs"), rule
            )
        notifier(process(db, background, notices), {}).master_replaced(caller("@off:hs"), Rule.UIA)
        for coroutine in background:
            asyncio.run(coroutine)
    assert [user_id for user_id, _ in notices.sent] == [
        f"@{rule.value}:hs" for rule in Rule if rule in METHODS
    ]


def test_a_failing_notice_is_logged_not_raised(
    background: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    with closing(sqlite3.connect(":memory:")) as db:
        failing = process(db, background, FakeNotices(failing=True))
        notifier(failing).master_replaced(caller("@a:hs"), Rule.UIA)
        asyncio.run(background.pop())
    assert "Could not send the identity-reset notice to @a:hs (rule=uia)" in caplog.text


def test_a_worker_queues_and_the_main_process_sends(background: list[Any]) -> None:
    main_notices = FakeNotices()
    with closing(sqlite3.connect(":memory:")) as db:
        worker = process(db, background, worker=True)
        main = process(db, background, main_notices)
        on_worker = notifier(worker)
        on_main = notifier(main)
        # Only the main process looks for queued notices.
        assert worker.periodic == []
        assert [ms for _, ms in main.periodic] == [DRAIN_INTERVAL_MS]

        on_worker.master_replaced(caller("@first:hs"), Rule.UIA)
        on_worker.master_replaced(caller("@second:hs"), Rule.REPLACEMENT_WINDOW)
        for coroutine in background:
            asyncio.run(coroutine)
        assert queued(db) == [("@first:hs", 0), ("@second:hs", 0)]

        asyncio.run(on_main.send_queued())
        assert queued(db) == []
    assert [user_id for user_id, _ in main_notices.sent] == ["@first:hs", "@second:hs"]
    assert METHODS[Rule.REPLACEMENT_WINDOW] in main_notices.sent[1][1]["body"]


def test_a_queued_notice_is_retried_then_dropped(
    background: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    with closing(sqlite3.connect(":memory:")) as db:
        notifier(process(db, background, worker=True)).master_replaced(caller("@a:hs"), Rule.UIA)
        asyncio.run(background.pop())
        on_main = notifier(process(db, background, FakeNotices(failing=True)))
        for attempt in range(1, MAX_ATTEMPTS):
            asyncio.run(on_main.send_queued())
            assert queued(db) == [("@a:hs", attempt)]
        asyncio.run(on_main.send_queued())
        assert queued(db) == []
    assert f"giving up after {MAX_ATTEMPTS} attempts" in caplog.text


# A client's view.


class NoticeRoom:
    """A client's view of a user's server-notices room, through incremental `/sync`: it
    joins the room when the notices user invites it, and collects the notices."""

    def __init__(self, user: User) -> None:
        self.user = user
        self.since: str | None = None
        self.room_ids: set[str] = set()
        self.tags: dict[str, dict[str, Any]] = {}
        self.notices: dict[str, dict[str, Any]] = {}

    def sync(self) -> dict[str, Any]:
        path = f"/_matrix/client/v3/sync?timeout=0&filter={quote(SYNC_FILTER, safe='')}"
        if self.since is not None:
            path += f"&since={quote(self.since, safe='')}"
        response = self.user.request("GET", path)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        self.since = body["next_batch"]
        return body

    def poll(self) -> list[dict[str, Any]]:
        body = self.sync()
        for room_id in notice_room_invites(body, self.user.user_id):
            response = self.user.request(
                "POST", f"/_matrix/client/v3/join/{quote(room_id, safe='')}", {}
            )
            assert response.status_code == 200, response.text
            self.room_ids.add(room_id)
        for room_id, room in body.get("rooms", {}).get("join", {}).items():
            if room_id not in self.room_ids:
                continue
            for event in room.get("account_data", {}).get("events", []):
                if event.get("type") == "m.tag":
                    self.tags[room_id] = event["content"].get("tags", {})
            for event in room.get("timeline", {}).get("events", []):
                if event.get("sender") == NOTICES_MXID and event.get("type") == "m.room.message":
                    # By event ID, as a client keeps them: a timeline may repeat an event.
                    self.notices[event["event_id"]] = event
        return list(self.notices.values())

    def wait_for(self, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + WAIT_S
        while len(self.poll()) < count and time.monotonic() < deadline:
            time.sleep(0.3)
        # Synapse tags the room it made for server notices.
        for room_id in self.room_ids:
            assert "m.server_notice" in self.tags.get(room_id, {}), self.tags
        return list(self.notices.values())

    def assert_none(self) -> None:
        time.sleep(QUIET_S)
        assert self.poll() == []
        assert self.room_ids == set()


def notice_room_invites(body: dict[str, Any], user_id: str) -> list[str]:
    """Rooms the notices user invited `user_id` to."""
    rooms = []
    for room_id, room in body.get("rooms", {}).get("invite", {}).items():
        for event in room.get("invite_state", {}).get("events", []):
            if (
                event.get("type") == "m.room.member"
                and event.get("state_key") == user_id
                and event.get("sender") == NOTICES_MXID
                and event.get("content", {}).get("membership") == "invite"
            ):
                rooms.append(room_id)
    return rooms


def assert_notice(notice: dict[str, Any], user: User, rule: Rule, before: float) -> None:
    content = notice["content"]
    assert content["msgtype"] == "m.text"
    body = content["body"]
    assert user.user_id in body
    assert METHODS[rule] in body
    assert "change your password" in body
    match = ISO_TIME.search(body)
    assert match is not None, body
    sent = datetime.strptime(match.group(0), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    # The homeserver and the tests share a clock; the body is to the second.
    assert int(before) - 1 <= sent.timestamp() <= time.time() + 1


def with_keys(user: User) -> CrossSigningKeys:
    keys = user.keys()
    response = user.upload(keys.body())
    assert (response.status_code, response.json()) == (200, {}), response.text
    return keys


# Against a real Synapse.


@pytest.fixture(scope="module")
def notice_appservice() -> Iterator[AppService]:
    """A homeserver with the notice enabled, server notices configured and an application
    service."""
    server = SynapseServer(ENABLED, extra_config=SERVER_NOTICES, name="notice")
    appservice = AppService(server)
    server.start()
    yield appservice
    server.stop()


@pytest.fixture(scope="module")
def notice_server(notice_appservice: AppService) -> SynapseServer:
    return notice_appservice.server


@pytest.fixture
def notice_user(notice_server: SynapseServer) -> User:
    return register_user(notice_server.base_url, notice_server.shared_secret)


@synapse_test
def test_replacement_after_uia_sends_one_notice(
    notice_server: SynapseServer, notice_user: User
) -> None:
    user = notice_user
    keys = with_keys(user)
    # An identical re-upload and new sub-keys replace no identity.
    assert user.upload(keys.body()).status_code == 200
    subkeys = CrossSigningKeys(user.user_id, master=keys.master)
    assert user.upload_with_uia(subkeys.body(master=False)).status_code == 200

    before = time.time()
    replacement = user.keys()
    challenge = user.upload(replacement.body())
    assert challenge.status_code == 401, challenge.text
    response = user.upload(
        {**replacement.body(), "auth": user.password_auth(challenge.json()["session"])}
    )
    assert response.status_code == 200, response.text

    found = NoticeRoom(user).wait_for(1)
    assert len(found) == 1, found
    assert_notice(found[0], user, Rule.UIA, before)
    assert len(notice_server.log_lines(SENT.format(user_id=user.user_id))) == 1


@synapse_test
def test_first_upload_sends_no_notice(notice_user: User) -> None:
    keys = with_keys(notice_user)
    assert notice_user.upload(keys.body()).status_code == 200
    NoticeRoom(notice_user).assert_none()


@synapse_test
def test_replacement_through_an_admin_window_sends_a_notice(
    notice_server: SynapseServer, notice_user: User
) -> None:
    admin = register_user(notice_server.base_url, notice_server.shared_secret, admin=True)
    with_keys(notice_user)
    path = (
        f"/_synapse/admin/v1/users/{quote(notice_user.user_id, safe='')}"
        "/_allow_cross_signing_replacement_without_uia"
    )
    assert admin.request("POST", path, {}).status_code == 200
    before = time.time()
    with_keys(notice_user)

    found = NoticeRoom(notice_user).wait_for(1)
    assert len(found) == 1, found
    assert_notice(found[0], notice_user, Rule.REPLACEMENT_WINDOW, before)
    assert "administrator" in found[0]["content"]["body"]
    sent = notice_server.log_lines(SENT.format(user_id=notice_user.user_id))
    assert len(sent) == 1, sent
    assert sent[0].endswith("rule=replacement_window")


@synapse_test
def test_replacement_by_an_application_service_sends_a_notice(
    notice_appservice: AppService,
) -> None:
    user = notice_appservice.register()
    with_keys(user)
    before = time.time()
    with_keys(user)

    found = NoticeRoom(user).wait_for(1)
    assert len(found) == 1, found
    assert_notice(found[0], user, Rule.APPSERVICE, before)
    sent = notice_appservice.server.log_lines(SENT.format(user_id=user.user_id))
    assert len(sent) == 1, sent
    assert sent[0].endswith("rule=appservice")


@synapse_test
def test_a_notice_per_replacement(notice_user: User) -> None:
    with_keys(notice_user)
    for _ in range(2):
        assert notice_user.upload_with_uia(notice_user.keys().body()).status_code == 200
    assert len(NoticeRoom(notice_user).wait_for(2)) == 2


@synapse_test
def test_first_upload_through_uia_sends_no_notice(synapse_server: ServerFactory) -> None:
    """With `first_upload_without_uia: false` a first upload goes through UIA too, but it
    replaces nothing."""
    server = synapse_server(
        {**ENABLED, "first_upload_without_uia": False}, extra_config=SERVER_NOTICES
    )
    user = register_user(server.base_url, server.shared_secret)
    assert user.upload(user.keys().body()).status_code == 401
    assert user.upload_with_uia(user.keys().body()).status_code == 200
    assert server.log_lines(f"user={user.user_id} rule=uia outcome=uploaded")
    NoticeRoom(user).assert_none()

    assert user.upload_with_uia(user.keys().body()).status_code == 200
    assert len(NoticeRoom(user).wait_for(1)) == 1
    assert len(server.log_lines(SENT.format(user_id=user.user_id))) == 1


@synapse_test
def test_off_by_default(synapse_server: ServerFactory) -> None:
    server = synapse_server({}, extra_config=SERVER_NOTICES)
    user = register_user(server.base_url, server.shared_secret)
    with_keys(user)
    assert user.upload_with_uia(user.keys().body()).status_code == 200
    assert server.log_lines(f"user={user.user_id} rule=uia outcome=uploaded")
    NoticeRoom(user).assert_none()
    assert not server.log_lines(SENT.format(user_id=user.user_id))


@synapse_test
def test_enabled_without_server_notices_stops_synapse() -> None:
    server = SynapseServer(ENABLED, name="noticeconfig")
    try:
        with pytest.raises(RuntimeError, match="exited") as info:
            server.start(timeout=120)
        message = str(info.value)
        assert "'notify_on_reset.enabled' needs Synapse's server notices" in message
        assert "server_notices" in message
    finally:
        server.stop()


# With workers.

WORKERS_SERVE_UPLOAD = parse_version(synapse.__version__) >= (1, 135, 0)


@pytest.fixture(scope="module")
def deployment() -> Iterator[WorkerDeployment]:
    skip_without_worker_requirements()
    deployment = WorkerDeployment(ENABLED, SERVER_NOTICES).start()
    yield deployment
    deployment.stop()


@synapse_test
@pytest.mark.parametrize("process", ["main", "worker"])
def test_replacement_with_workers_is_notified_by_the_main_process(
    deployment: WorkerDeployment, process: str
) -> None:
    """Synapse sends server notices from the main process only: an upload served by a
    worker queues its notice, and the main process sends it."""
    if process == "worker" and not WORKERS_SERVE_UPLOAD:
        pytest.skip("Synapse < 1.135 serves the upload endpoint on the main process only")
    served_by = deployment.worker if process == "worker" else deployment.main
    registered = register_user(deployment.main.base_url, deployment.shared_secret)
    user = User(
        served_by.base_url,
        registered.user_id,
        registered.access_token,
        registered.device_id,
        registered.password,
    )
    with_keys(user)
    before = time.time()
    assert user.upload_with_uia(user.keys().body()).status_code == 200

    found = NoticeRoom(registered).wait_for(1)
    assert len(found) == 1, found
    assert_notice(found[0], registered, Rule.UIA, before)
    queued = f"Identity-reset notice queued for the main process: user={user.user_id} rule=uia"
    assert bool(deployment.worker.log_lines(queued)) == (process == "worker")
    assert not deployment.main.log_lines(queued)
    assert len(deployment.main.log_lines(f"{SENT.format(user_id=user.user_id)}uia")) == 1
