"""The command-line tool against a real homeserver with the module, run as operators run
it: a separate process, configured by its environment variables."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from synapse_xsign_uia import cli
from tests.conftest import ServerFactory
from tests.harness.client import User, register_user
from tests.harness.federation import StaticFederationServer, device_list
from tests.harness.server import SynapseServer, free_port

pytestmark = pytest.mark.synapse

ROOT = Path(__file__).resolve().parents[2]
WINDOW = "/_synapse/admin/v1/users/{}/_allow_cross_signing_replacement_without_uia"
DEVICE_LISTS = "/_synapse/admin/v1/remote_device_lists"
RESYNC = "/_matrix/unstable/org.matrix.mscXXXX/user/{}/devices"
# The module's defaults.
REPLACEMENT_WINDOW_MS = 600_000
MAX_REPLACEMENT_WINDOW_MS = 86_400_000
# The homeserver and the tests share a clock; this absorbs the time a command takes.
SLACK_MS = 5000
UNTIL = re.compile(r" until (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC \(in (.+)\)\.$")
# Outbound federation to a static TLS server on loopback, as in test_resync_claims.py.
EXTRA_CONFIG = {
    "federation_verify_certificates": False,
    "ip_range_whitelist": ["127.0.0.0/8"],
}


@pytest.fixture(scope="module")
def server(synapse_server: ServerFactory) -> SynapseServer:
    return synapse_server({}, extra_config=EXTRA_CONFIG)


@pytest.fixture(scope="module")
def admin(server: SynapseServer) -> User:
    return register_user(server.base_url, server.shared_secret, admin=True)


@pytest.fixture
def user(server: SynapseServer) -> User:
    """A local user with cross-signing keys."""
    user = register_user(server.base_url, server.shared_secret)
    response = user.upload(user.keys().body())
    assert response.status_code == 200, response.text
    return user


@attrs.define
class Run:
    status: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run(
    server: SynapseServer | str, token: str, *argv: str, env: dict[str, str] | None = None
) -> Run:
    """`python -m synapse_xsign_uia.cli ARGV`, from the repository root so that it runs the
    code under test, with the homeserver and the token in the environment."""
    url = server if isinstance(server, str) else server.base_url
    environ = {
        **os.environ,
        cli.ENV_HOMESERVER: url,
        cli.ENV_TOKEN: token,
        **(env or {}),
    }
    done = subprocess.run(
        [sys.executable, "-m", "synapse_xsign_uia.cli", *argv],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = Run(done.returncode, done.stdout, done.stderr)
    assert token not in result.out + result.err
    return result


def now_ms() -> int:
    return int(time.time() * 1000)


def window(admin: User, user: User) -> dict[str, Any]:
    response = admin.request("GET", WINDOW.format(urllib.parse.quote(user.user_id, safe="")))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_open_for(body: dict[str, Any], duration_ms: int, started_ms: int) -> None:
    end = body["updatable_without_uia_before_ms"]
    assert started_ms + duration_ms <= end <= now_ms() + duration_ms + SLACK_MS, body


# --- Replacement window ------------------------------------------------------------------


def test_grant(server: SynapseServer, admin: User, user: User) -> None:
    started = now_ms()
    result = run(server, admin.access_token, "window", "grant", user.user_id)
    assert (result.status, result.err) == (0, "")
    line = result.out.rstrip("\n")
    assert line.startswith(f"{user.user_id} may replace their master key without UIA until ")
    match = UNTIL.search(line)
    assert match is not None, line
    assert match.group(2) == "10 minutes"
    assert_open_for(window(admin, user), REPLACEMENT_WINDOW_MS, started)
    assert window(admin, user)["replaceable_without_uia"] is True


@pytest.mark.parametrize(("duration", "ms"), [("30m", 1_800_000), ("120000", 120_000)])
def test_grant_with_duration(
    server: SynapseServer, admin: User, user: User, duration: str, ms: int
) -> None:
    started = now_ms()
    result = run(
        server, admin.access_token, "window", "grant", user.user_id, "--duration", duration
    )
    assert result.status == 0, result.err
    match = UNTIL.search(result.out.rstrip("\n"))
    assert match is not None, result.out
    assert match.group(2) == {1_800_000: "30 minutes", 120_000: "2 minutes"}[ms]
    assert_open_for(window(admin, user), ms, started)


def test_grant_json(server: SynapseServer, admin: User, user: User) -> None:
    started = now_ms()
    result = run(
        server,
        admin.access_token,
        "--json",
        "window",
        "grant",
        user.user_id,
        "--duration",
        "2h",
    )
    assert (result.status, result.err) == (0, "")
    body = result.json()
    assert list(body) == ["updatable_without_uia_before_ms"]
    assert_open_for(body, 7_200_000, started)
    assert body == {
        "updatable_without_uia_before_ms": window(admin, user)["updatable_without_uia_before_ms"]
    }


def test_status(server: SynapseServer, admin: User, user: User) -> None:
    none = run(server, admin.access_token, "window", "status", user.user_id)
    assert (none.status, none.out) == (
        0,
        f"{user.user_id} has no replacement window on their current master key: replacing it"
        " needs UIA.\n",
    )
    assert run(server, admin.access_token, "--json", "window", "status", user.user_id).json() == {
        "updatable_without_uia_before_ms": None,
        "replaceable_without_uia": False,
    }

    run(server, admin.access_token, "window", "grant", user.user_id)
    open_ = run(server, admin.access_token, "window", "status", user.user_id)
    assert open_.status == 0
    assert open_.out.startswith(f"{user.user_id} may replace their master key without UIA until")
    as_json = run(server, admin.access_token, "window", "status", user.user_id, "--json")
    assert as_json.json() == window(admin, user)
    assert as_json.json()["replaceable_without_uia"] is True


def test_status_of_an_ended_window(server: SynapseServer, admin: User, user: User) -> None:
    run(server, admin.access_token, "window", "grant", user.user_id, "--duration", "1s")
    time.sleep(1.5)
    result = run(server, admin.access_token, "window", "status", user.user_id)
    assert result.status == 0
    assert re.fullmatch(
        rf"The replacement window of {re.escape(user.user_id)} ended at \S+ \S+ UTC"
        r" \((now|\d+ seconds? ago)\): replacing their master key needs UIA\.\n",
        result.out,
    ), result.out


def test_revoke(server: SynapseServer, admin: User, user: User) -> None:
    run(server, admin.access_token, "window", "grant", user.user_id)
    result = run(server, admin.access_token, "window", "revoke", user.user_id)
    assert (result.status, result.out, result.err) == (
        0,
        f"The replacement window of {user.user_id} is closed: replacing their master key needs"
        " UIA again.\n",
        "",
    )
    assert window(admin, user) == {
        "updatable_without_uia_before_ms": None,
        "replaceable_without_uia": False,
    }
    # Closing when nothing is open is no error.
    again = run(server, admin.access_token, "--json", "window", "revoke", user.user_id)
    assert (again.status, again.json()) == (0, {})


def test_token_from_a_file_and_flags_win(
    server: SynapseServer, admin: User, user: User, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(admin.access_token + "\n")
    token_file.chmod(0o600)
    # The environment names a homeserver that is not there and a token that is not valid.
    env = {cli.ENV_HOMESERVER: f"http://127.0.0.1:{free_port()}"}
    result = run(
        "http://127.0.0.1:1",
        "not-a-token",
        "--homeserver",
        server.base_url,
        "--token-file",
        str(token_file),
        "window",
        "status",
        user.user_id,
        env=env,
    )
    assert result.status == 0, result.err
    assert "has no replacement window" in result.out
    verbose = run(
        server,
        "not-a-token",
        "-v",
        "--token",
        admin.access_token,
        "window",
        "status",
        user.user_id,
    )
    assert verbose.status == 0, verbose.err
    assert "> access token from --token\n" in verbose.err
    assert "< 200 OK" in verbose.err


# --- Errors ------------------------------------------------------------------------------


def test_not_an_admin(server: SynapseServer, user: User) -> None:
    for argv in (
        ("window", "grant", user.user_id),
        ("device-lists", "server", "remote.example"),
    ):
        result = run(server, user.access_token, *argv)
        assert (result.status, result.out) == (cli.EXIT_MATRIX_ERROR, "")
        assert result.err.startswith("M_FORBIDDEN: "), result.err
    as_json = run(server, user.access_token, "--json", "window", "status", user.user_id)
    assert as_json.status == cli.EXIT_MATRIX_ERROR
    assert as_json.json()["errcode"] == "M_FORBIDDEN"


def test_invalid_token(server: SynapseServer, user: User) -> None:
    token = "syt_invalid_" + "x" * 20
    for verbose in ([], ["-v"]):
        result = run(server, token, *verbose, "window", "status", user.user_id)
        assert (result.status, result.out) == (cli.EXIT_MATRIX_ERROR, "")
        assert result.err.splitlines()[-1].startswith("M_UNKNOWN_TOKEN: "), result.err


@pytest.mark.parametrize("user_id", ["@nobody-here:localhost", "@someone:example.org"])
def test_unknown_user(server: SynapseServer, admin: User, user_id: str) -> None:
    """A user this homeserver does not have, local or of another server."""
    for action in ("grant", "status", "revoke"):
        result = run(server, admin.access_token, "window", action, user_id)
        assert (result.status, result.out) == (cli.EXIT_MATRIX_ERROR, "")
        assert result.err.startswith("M_NOT_FOUND: "), result.err


def test_user_without_keys(server: SynapseServer, admin: User) -> None:
    keyless = register_user(server.base_url, server.shared_secret)
    result = run(server, admin.access_token, "window", "grant", keyless.user_id)
    assert result.status == cli.EXIT_MATRIX_ERROR
    assert result.err.startswith("M_NOT_FOUND: "), result.err


def test_duration_above_the_maximum(server: SynapseServer, admin: User, user: User) -> None:
    result = run(server, admin.access_token, "window", "grant", user.user_id, "--duration", "2d")
    assert result.status == cli.EXIT_MATRIX_ERROR
    assert result.err.startswith("M_INVALID_PARAM: "), result.err
    assert str(MAX_REPLACEMENT_WINDOW_MS) in result.err


@pytest.mark.parametrize("user_id", ["alice", "@alice", "@alice:bad_host!"])
def test_malformed_user_id_is_refused_locally(
    server: SynapseServer, admin: User, user_id: str
) -> None:
    for argv in (("window", "grant", user_id), ("device-lists", "user", user_id)):
        result = run(server, admin.access_token, *argv)
        assert (result.status, result.out) == (cli.EXIT_USAGE, "")
        assert "argument USER" in result.err
        assert "is not a user ID" in result.err


def test_malformed_server_name_is_refused_locally(server: SynapseServer, admin: User) -> None:
    result = run(server, admin.access_token, "device-lists", "repair", "bad name")
    assert (result.status, result.out) == (cli.EXIT_USAGE, "")
    assert "is not a server name" in result.err


def test_homeserver_unreachable(admin: User, user: User) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run(url, admin.access_token, "window", "status", user.user_id)
    assert (result.status, result.out) == (cli.EXIT_UNREACHABLE, "")
    assert result.err.startswith(f"synapse-xsign-uia: Cannot reach {url}: "), result.err


# --- Remote device lists -----------------------------------------------------------------


def test_unknown_remote_user_and_server(server: SynapseServer, admin: User) -> None:
    for argv in (
        ("device-lists", "user", "@nobody:unknown.example"),
        ("device-lists", "server", "unknown.example"),
        ("device-lists", "repair", "unknown.example:8448"),
    ):
        result = run(server, admin.access_token, *argv)
        assert (result.status, result.out) == (cli.EXIT_MATRIX_ERROR, ""), argv
        assert result.err.startswith("M_NOT_FOUND: "), result.err


def test_a_local_user_or_server_is_refused(server: SynapseServer, admin: User, user: User) -> None:
    for argv in (
        ("device-lists", "user", user.user_id),
        ("device-lists", "server", server.server_name),
    ):
        result = run(server, admin.access_token, *argv)
        assert result.status == cli.EXIT_MATRIX_ERROR, argv
        assert result.err.startswith("M_INVALID_PARAM: "), result.err


@pytest.fixture
def remote() -> Iterator[StaticFederationServer]:
    with StaticFederationServer(200) as remote:
        yield remote


def fetched(server: SynapseServer, admin: User, target: str) -> None:
    """Have the homeserver fetch `target`'s device list, which makes it track the user, and
    wait until the fetch is on record (it is recorded in the background)."""
    quoted = urllib.parse.quote(target, safe="")
    response = admin.request("GET", RESYNC.format(quoted), timeout=30)
    assert response.status_code == 202, response.text
    deadline = time.monotonic() + 10
    while True:
        status = admin.request("GET", f"{DEVICE_LISTS}/users/{quoted}")
        if status.status_code == 200 and status.json()["last_fetched_ts"] is not None:
            return
        assert time.monotonic() < deadline, status.text
        time.sleep(0.1)


def test_remote_device_lists(
    server: SynapseServer, admin: User, remote: StaticFederationServer
) -> None:
    target = f"@cli:{remote.server_name}"
    remote.body = device_list(target, "REMOTE")
    fetched(server, admin, target)

    user = run(server, admin.access_token, "device-lists", "user", target)
    assert (user.status, user.err) == (0, "")
    lines = user.out.splitlines()
    assert lines[0] == f"Device list of {target} on this homeserver:"
    rows = dict(re.split(r":\s+", line.strip(), maxsplit=1) for line in lines[1:])
    assert rows["tracked"] == "yes"
    assert rows["stale"] == "no"
    assert rows["devices"] == "1"
    assert rows["cross-signing keys"] == "none"
    assert rows["last failed fetch"] == "none"
    assert re.fullmatch(
        r"\S+ \S+ UTC \(\d+ seconds? ago\)|\S+ \S+ UTC \(now\)", rows["last fetched"]
    )
    assert rows["server"] == f"{remote.server_name}, reachable"
    user_json = run(server, admin.access_token, "--json", "device-lists", "user", target).json()
    assert (user_json["user_id"], user_json["tracked"], user_json["device_count"]) == (
        target,
        True,
        1,
    )

    status = run(server, admin.access_token, "device-lists", "server", remote.server_name)
    assert (status.status, status.err) == (0, "")
    assert status.out == (
        f"Device lists of the users of {remote.server_name}:\n"
        "  tracked users: 1\n"
        "  stale users:   0\n"
        "  last repair:   none\n"
        f"  server:        {remote.server_name}, reachable\n"
    )

    repaired = run(server, admin.access_token, "device-lists", "repair", remote.server_name)
    assert (repaired.status, repaired.err) == (0, "")
    assert repaired.out.startswith(
        f"Marked 1 device list of the users of {remote.server_name} stale. "
    )
    assert re.search(
        rf"  last repair:   \S+ \S+ UTC \([^)]+\) by {re.escape(admin.user_id)}, 1 marked stale\n",
        repaired.out,
    ), repaired.out
    again = run(server, admin.access_token, "device-lists", "repair", remote.server_name, "--json")
    assert again.status == 0
    body = again.json()
    assert (body["server_name"], body["tracked_users"], body["marked_stale"]) == (
        remote.server_name,
        1,
        1,
    )
    assert body["last_repair"]["requested_by"] == admin.user_id
    server_json = run(
        server, admin.access_token, "device-lists", "server", remote.server_name, "--json"
    ).json()
    assert server_json["last_repair"] == body["last_repair"]
