"""The command-line tool without Synapse: its arguments, what it sends, how it words the
answers, and its exit statuses, against stand-in HTTP servers. The same commands against a
real homeserver are in tests/integration/test_cli.py."""

from __future__ import annotations

import argparse
import http.server
import io
import json
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from synapse_xsign_uia import __version__, cli
from tests.harness.federation import write_self_signed_certificate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before Python 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "syt_c2VjcmV0_TOKENvalue_0xdeadbeef"
ALICE = "@alice:example.org"
# 2026-12-06 17:00:00 UTC
NOW_MS = 1796576400000


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == cli.EXIT_USAGE
    return capsys.readouterr().err


# --- Packaging ---------------------------------------------------------------------------


def test_console_script_is_main() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"synapse-xsign-uia": "synapse_xsign_uia.cli:main"}


def test_imports_nothing_outside_the_standard_library() -> None:
    """Operators may run it where Synapse, Twisted and the module's dependencies are not
    installed. `-S` leaves site-packages off the path, as on such a machine."""
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import synapse_xsign_uia.cli\n"
        "print('\\n'.join(sorted(set(sys.modules) - before)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    imported = {name.split(".")[0] for name in result.stdout.split()}
    assert "synapse_xsign_uia" in imported
    assert imported - {"synapse_xsign_uia"} <= set(sys.stdlib_module_names)


def test_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-S", "-m", "synapse_xsign_uia.cli", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"synapse-xsign-uia {__version__}"


# --- Arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("1800000", 1_800_000),
        ("500ms", 500),
        ("30s", 30_000),
        ("30m", 1_800_000),
        ("2h", 7_200_000),
        ("1d", 86_400_000),
        (" 30 m ", 1_800_000),
    ],
)
def test_duration(text: str, ms: int) -> None:
    assert cli.parse_duration(text) == ms


@pytest.mark.parametrize(
    "text", ["", "m", "0", "0m", "-5m", "1.5h", "1e3", "30 minutes", "30M", "5w", "\u0663m"]
)
def test_bad_duration(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_duration(text)


def test_bad_duration_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, "window", "grant", ALICE, "--duration", "half an hour")
    assert "'half an hour' is not a duration" in err


def test_window_commands() -> None:
    grant = parse("window", "grant", ALICE, "--duration", "30m")
    assert (grant.group, grant.action, grant.user_id, grant.duration) == (
        "window",
        "grant",
        ALICE,
        1_800_000,
    )
    assert parse("window", "grant", ALICE).duration is None
    assert parse("window", "status", ALICE).action == "status"
    assert parse("window", "revoke", ALICE).action == "revoke"


def test_device_list_commands() -> None:
    assert parse("device-lists", "user", "@bob:remote.example").user_id == "@bob:remote.example"
    assert parse("device-lists", "server", "remote.example:8448").server_name == (
        "remote.example:8448"
    )
    assert parse("device-lists", "repair", "[::1]:8448").server_name == "[::1]:8448"


def test_common_options_before_or_after_the_command() -> None:
    before = parse(
        "--json", "--timeout", "5", "--homeserver", "https://a", "window", "status", ALICE
    )
    after = parse(
        "window", "status", ALICE, "--json", "--timeout", "5", "--homeserver", "https://a"
    )
    for args in (before, after):
        assert (args.json, args.timeout, args.homeserver) == (True, 5.0, "https://a")
    # Unset options stay unset, so that the environment and the defaults apply.
    assert not hasattr(parse("window", "status", ALICE), "json")


@pytest.mark.parametrize(
    ("user_id", "message"),
    [
        ("alice", "it must start with '@'"),
        ("@alice", "expected '@localpart:server.name'"),
        ("@alice:bad_host!", "is not a server name"),
        ("@al ice:example.org", "printable ASCII"),
    ],
)
def test_malformed_user_id(capsys: pytest.CaptureFixture[str], user_id: str, message: str) -> None:
    for argv in (("window", "grant", user_id), ("device-lists", "user", user_id)):
        err = usage_error(capsys, *argv)
        assert "argument USER" in err
        assert message in err


@pytest.mark.parametrize("server_name", ["remote example", "[::1", "example.org:99999", "@x"])
def test_malformed_server_name(capsys: pytest.CaptureFixture[str], server_name: str) -> None:
    for action in ("server", "repair"):
        assert "is not a server name" in usage_error(capsys, "device-lists", action, server_name)


@pytest.mark.parametrize("timeout", ["0", "-1", "soon", "inf", "nan"])
def test_bad_timeout(capsys: pytest.CaptureFixture[str], timeout: str) -> None:
    assert "seconds" in usage_error(capsys, "--timeout", timeout, "window", "status", ALICE)


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    usage_error(capsys)
    usage_error(capsys, "window")
    usage_error(capsys, "window", "grant")


# --- Requests ----------------------------------------------------------------------------


WINDOW = (
    "/_synapse/admin/v1/users/%40alice%3Aexample.org/_allow_cross_signing_replacement_without_uia"
)
LISTS = "/_synapse/admin/v1/remote_device_lists"


@pytest.mark.parametrize(
    ("argv", "call"),
    [
        (["window", "grant", ALICE], cli.Call("POST", WINDOW, {})),
        (
            ["window", "grant", ALICE, "--duration", "2h"],
            cli.Call("POST", WINDOW, {"duration_ms": 7_200_000}),
        ),
        (["window", "status", ALICE], cli.Call("GET", WINDOW)),
        (["window", "revoke", ALICE], cli.Call("DELETE", WINDOW)),
        (
            ["device-lists", "user", "@bob:remote.example"],
            cli.Call("GET", f"{LISTS}/users/%40bob%3Aremote.example"),
        ),
        (
            ["device-lists", "server", "remote.example"],
            cli.Call("GET", f"{LISTS}/servers/remote.example"),
        ),
        (
            ["device-lists", "repair", "[::1]:8448"],
            cli.Call("POST", f"{LISTS}/servers/%5B%3A%3A1%5D%3A8448/repair", {}),
        ),
    ],
)
def test_request(argv: list[str], call: cli.Call) -> None:
    assert cli.call_for(parse(*argv)) == call


def test_path_characters_are_encoded() -> None:
    call = cli.call_for(parse("window", "status", "@a/b?c#d%e:example.org"))
    assert call.path.split("/")[5] == "%40a%2Fb%3Fc%23d%25e%3Aexample.org"


# --- Configuration -----------------------------------------------------------------------


def settings(*argv: str, environ: dict[str, str] | None = None) -> cli.Settings:
    return cli.settings_from(parse(*argv, "window", "status", ALICE), environ or {})


def test_settings_from_the_environment() -> None:
    got = settings(
        environ={cli.ENV_HOMESERVER: "https://matrix.example.org/", cli.ENV_TOKEN: TOKEN}
    )
    assert got == cli.Settings(
        homeserver="https://matrix.example.org",
        token=TOKEN,
        token_source="$SYNAPSE_XSIGN_UIA_TOKEN",
        timeout=cli.DEFAULT_TIMEOUT_S,
        json=False,
        verbose=False,
    )


def test_flags_win_over_the_environment(tmp_path: Path) -> None:
    environ = {cli.ENV_HOMESERVER: "https://env.example", cli.ENV_TOKEN: "from-env"}
    got = settings("--homeserver", "http://flag.example:8008", "--token", TOKEN, environ=environ)
    assert (got.homeserver, got.token, got.token_source) == (
        "http://flag.example:8008",
        TOKEN,
        "--token",
    )
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    got = settings("--token-file", str(token_file), environ=environ)
    assert (got.token, got.token_source) == (TOKEN, f"--token-file {token_file}")


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {cli.ENV_TOKEN: TOKEN}, "No homeserver"),
        (["--homeserver", "https://a.example"], {}, "No access token"),
        (["--homeserver", "https://a.example", "--token", " "], {}, "is empty"),
        (["--token", TOKEN, "--homeserver", "matrix.example.org"], {}, "not a homeserver URL"),
        (["--token", TOKEN, "--homeserver", "ftp://a.example"], {}, "not a homeserver URL"),
        (["--token", TOKEN, "--homeserver", "https://a.example:http"], {}, "not a homeserver URL"),
        (["--token", TOKEN, "--homeserver", "https://[::1"], {}, "not a homeserver URL"),
        (["--token", TOKEN, "--homeserver", "https://a.example/?access_token=x"], {}, "query"),
        (["--token", TOKEN, "--token-file", "/x", "--homeserver", "https://a"], {}, "not both"),
    ],
)
def test_bad_settings(argv: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(cli.UsageError, match=message):
        settings(*argv, environ=environ)


@pytest.mark.parametrize("content", [b"", b"  \n", f"{TOKEN} x".encode(), b"\xff" + TOKEN.encode()])
def test_unusable_token_file_is_not_quoted(tmp_path: Path, content: bytes) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(content)
    with pytest.raises(cli.UsageError) as error:
        settings("--homeserver", "https://a.example", "--token-file", str(token_file))
    assert str(token_file) in str(error.value)
    assert TOKEN not in str(error.value)


def test_missing_token_file(tmp_path: Path) -> None:
    with pytest.raises(cli.UsageError, match="No such file or directory"):
        settings("--homeserver", "https://a.example", "--token-file", str(tmp_path / "none"))


@pytest.mark.parametrize("bad", [f"{TOKEN}\nX-Injected: 1", f"{TOKEN}\u00e9", f"Bearer {TOKEN}"])
def test_token_that_cannot_be_sent_is_not_quoted(bad: str) -> None:
    with pytest.raises(cli.UsageError) as error:
        settings("--homeserver", "https://a.example", "--token", bad)
    assert TOKEN not in str(error.value)


# --- Answers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta_ms", "text"),
    [
        (0, "now"),
        (999, "now"),
        (1000, "in 1 second"),
        (-45_000, "45 seconds ago"),
        (1_800_000 - 150, "in 30 minutes"),
        (-60_000 * 59, "59 minutes ago"),
        (3_600_000 - 20_000, "in 1 hour"),
        (60_000 * 90, "in 1 hour 30 minutes"),
        (3_600_000 * 2, "in 2 hours"),
        (-3_600_000 * 47 - 60_000, "47 hours 1 minute ago"),
        (86_400_000 * 2, "in 2 days"),
        (86_400_000 * 3 + 3_600_000, "in 3 days"),
    ],
)
def test_relative(delta_ms: int, text: str) -> None:
    assert cli.relative(delta_ms) == text


def test_format_time() -> None:
    assert cli.format_time(NOW_MS + 1_800_000, NOW_MS) == "2026-12-06 17:30:00 UTC (in 30 minutes)"


def window(action: str, answer: dict[str, Any]) -> str:
    return cli.format_answer(parse("window", action, ALICE), answer, NOW_MS)


def test_window_granted() -> None:
    assert window("grant", {"updatable_without_uia_before_ms": NOW_MS + 1_800_000}) == (
        "@alice:example.org may replace their master key without UIA until"
        " 2026-12-06 17:30:00 UTC (in 30 minutes)."
    )


def test_window_status() -> None:
    end = NOW_MS + 600_000
    open_ = {"updatable_without_uia_before_ms": end, "replaceable_without_uia": True}
    assert window("status", open_) == (
        "@alice:example.org may replace their master key without UIA until"
        " 2026-12-06 17:10:00 UTC (in 10 minutes)."
    )
    none = {"updatable_without_uia_before_ms": None, "replaceable_without_uia": False}
    assert window("status", none) == (
        "@alice:example.org has no replacement window on their current master key:"
        " replacing it needs UIA."
    )
    ended = {
        "updatable_without_uia_before_ms": NOW_MS - 7_200_000,
        "replaceable_without_uia": False,
    }
    assert window("status", ended) == (
        "The replacement window of @alice:example.org ended at 2026-12-06 15:00:00 UTC"
        " (2 hours ago): replacing their master key needs UIA."
    )


def test_window_closed_by_the_homeserver_clock() -> None:
    """The homeserver's verdict stands, whatever this machine's clock says."""
    answer = {"updatable_without_uia_before_ms": NOW_MS + 5000, "replaceable_without_uia": False}
    assert window("status", answer).startswith("The replacement window of @alice:example.org ended")


def test_window_revoked() -> None:
    assert window("revoke", {}) == (
        "The replacement window of @alice:example.org is closed: replacing their master key"
        " needs UIA again."
    )


# The examples of docs/admin_api.md, at NOW_MS.
SERVER_REACHABLE = {
    "server_name": "remote.example",
    "reachable": True,
    "failing_since_ts": None,
    "last_failed_attempt_ts": None,
    "retry_interval_ms": 0,
    "next_retry_ts": None,
}
USER_STATUS = {
    "user_id": "@alice:remote.example",
    "tracked": True,
    "shares_room": True,
    "stale": True,
    "stale_since_ts": NOW_MS - 3_600_000,
    "last_fetched_ts": NOW_MS - 86_400_000,
    "last_failed_fetch": {
        "ts": NOW_MS - 3_570_000,
        "reason": "unreachable",
        "error": "Connection refused",
    },
    "device_count": 2,
    "cross_signing_keys": {
        "master": "ed25519:nqOvzeuGWT/sRx3h7+MHoInYj0zlSgZ6Hd6J/5WeKhA",
        "self_signing": "ed25519:Kq1hOmS2V5cYPmX6+2rF4nqCmNrs0NwUbc6iTcdUkmQ",
    },
    "server": {
        "server_name": "remote.example",
        "reachable": False,
        "failing_since_ts": NOW_MS - 3_570_000,
        "last_failed_attempt_ts": NOW_MS - 3_570_000,
        "retry_interval_ms": 600_000,
        "next_retry_ts": NOW_MS - 2_970_000,
    },
}
SERVER_STATUS = {
    "server_name": "remote.example",
    "tracked_users": 3,
    "stale_users": 1,
    "oldest_stale_since_ts": NOW_MS - 3_600_000,
    "last_repair": {
        "requested_ts": NOW_MS - 3_600_000,
        "requested_by": "@admin:example.com",
        "users_marked": 3,
    },
    "server": SERVER_REACHABLE,
}


def test_user_status() -> None:
    assert cli.format_user_status(USER_STATUS, NOW_MS) == (
        "Device list of @alice:remote.example on this homeserver:\n"
        "  tracked:             yes\n"
        "  shares a room:       yes\n"
        "  stale:               yes, since 2026-12-06 16:00:00 UTC (1 hour ago)\n"
        "  last fetched:        2026-12-05 17:00:00 UTC (24 hours ago)\n"
        "  last failed fetch:   2026-12-06 16:00:30 UTC (1 hour ago): unreachable"
        " (Connection refused)\n"
        "  devices:             2\n"
        "  master key:          ed25519:nqOvzeuGWT/sRx3h7+MHoInYj0zlSgZ6Hd6J/5WeKhA\n"
        "  self-signing key:    ed25519:Kq1hOmS2V5cYPmX6+2rF4nqCmNrs0NwUbc6iTcdUkmQ\n"
        "  server:              remote.example, failing since 2026-12-06 16:00:30 UTC"
        " (1 hour ago)\n"
        "  last failed attempt: 2026-12-06 16:00:30 UTC (1 hour ago)\n"
        "  next retry:          2026-12-06 16:10:30 UTC (50 minutes ago), the backoff has ended"
    )


def test_user_status_of_a_fresh_list() -> None:
    fresh = {
        **USER_STATUS,
        "stale": False,
        "stale_since_ts": None,
        "last_fetched_ts": None,
        "last_failed_fetch": None,
        "cross_signing_keys": {},
        "server": SERVER_REACHABLE,
    }
    text = cli.format_user_status(fresh, NOW_MS)
    assert "  stale:              no\n" in text
    assert "  last fetched:       never recorded\n" in text
    assert "  last failed fetch:  none\n" in text
    assert "  cross-signing keys: none\n" in text
    assert text.endswith("  server:             remote.example, reachable")


def test_server_status() -> None:
    assert cli.format_server_status(SERVER_STATUS, NOW_MS) == (
        "Device lists of the users of remote.example:\n"
        "  tracked users: 3\n"
        "  stale users:   1, the oldest since 2026-12-06 16:00:00 UTC (1 hour ago)\n"
        "  last repair:   2026-12-06 16:00:00 UTC (1 hour ago) by @admin:example.com,"
        " 3 marked stale\n"
        "  server:        remote.example, reachable"
    )
    clean = {**SERVER_STATUS, "stale_users": 0, "oldest_stale_since_ts": None, "last_repair": None}
    text = cli.format_server_status(clean, NOW_MS)
    assert "  stale users:   0\n" in text
    assert "  last repair:   none\n" in text


def test_repair() -> None:
    answer = {**SERVER_STATUS, "stale_users": 3, "marked_stale": 3}
    text = cli.format_answer(parse("device-lists", "repair", "remote.example"), answer, NOW_MS)
    first, rest = text.split("\n\n")
    assert first.startswith("Marked 3 device lists of the users of remote.example stale.")
    assert "synapse-xsign-uia device-lists server remote.example" in first
    assert rest == cli.format_server_status(answer, NOW_MS)
    one = cli.format_repair({**answer, "marked_stale": 1}, NOW_MS)
    assert one.startswith("Marked 1 device list of")


# --- Against stand-in servers ------------------------------------------------------------


@attrs.define
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class StandIn:
    """An HTTP(S) server on loopback that answers every request with `status`, `headers`
    and `body` after `delay` seconds, and records what it received."""

    def __init__(self, certificate: tuple[Path, Path] | None = None) -> None:
        self.status = 200
        self.headers: dict[str, str] = {"Content-Type": "application/json"}
        self.body = b"{}"
        self.delay = 0.0
        self.seen: list[Seen] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                outer.seen.append(
                    Seen(self.command, self.path, dict(self.headers), self.rfile.read(length))
                )
                time.sleep(outer.delay)
                self.send_response(outer.status)
                for name, value in outer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if certificate is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*certificate)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
            scheme = "https"
        host = "localhost" if certificate else "127.0.0.1"
        self.url = f"{scheme}://{host}:{self._httpd.server_address[1]}"
        # A short poll interval: close() waits for it.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def answer(self, status: int, body: Any, **headers: str) -> None:
        self.status = status
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.headers = {"Content-Type": "application/json", **headers}

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    server = StandIn()
    yield server
    server.close()


@attrs.define
class Run:
    status: int
    out: str
    err: str


def run(url: str, *argv: str, environ: dict[str, str] | None = None) -> Run:
    out, err = io.StringIO(), io.StringIO()
    environ = {cli.ENV_HOMESERVER: url, cli.ENV_TOKEN: TOKEN, **(environ or {})}
    status = cli.main(list(argv), environ=environ, stdout=out, stderr=err)
    result = Run(status, out.getvalue(), err.getvalue())
    assert TOKEN not in result.out + result.err
    return result


def test_sends_the_request(stand_in: StandIn) -> None:
    stand_in.answer(200, {"updatable_without_uia_before_ms": int(time.time() * 1000) + 1_800_000})
    result = run(stand_in.url, "window", "grant", ALICE, "--duration", "30m")
    assert result.status == cli.EXIT_OK
    assert "(in 30 minutes)" in result.out
    (seen,) = stand_in.seen
    assert (seen.method, seen.path) == ("POST", WINDOW)
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["Content-Type"] == "application/json"
    assert json.loads(seen.body) == {"duration_ms": 1_800_000}


def test_json_prints_the_answer(stand_in: StandIn) -> None:
    stand_in.answer(200, SERVER_STATUS)
    result = run(stand_in.url, "device-lists", "server", "remote.example", "--json")
    assert (result.status, json.loads(result.out), result.err) == (0, SERVER_STATUS, "")
    assert stand_in.seen[0].body == b""


def test_verbose_never_shows_the_token(stand_in: StandIn) -> None:
    result = run(stand_in.url, "-v", "window", "revoke", ALICE)
    assert result.status == cli.EXIT_OK
    assert f"> DELETE {stand_in.url}{WINDOW}\n" in result.err
    assert "> access token from $SYNAPSE_XSIGN_UIA_TOKEN\n" in result.err
    assert "< 200 OK" in result.err


def test_matrix_error(stand_in: StandIn) -> None:
    error = {"errcode": "M_FORBIDDEN", "error": "You are not a server admin"}
    stand_in.answer(403, error)
    result = run(stand_in.url, "-v", "window", "status", ALICE)
    assert (result.status, result.out) == (cli.EXIT_MATRIX_ERROR, "")
    assert "< 403 Forbidden (" in result.err
    assert result.err.endswith(" s)\nM_FORBIDDEN: You are not a server admin\n")
    result = run(stand_in.url, "--json", "window", "status", ALICE)
    assert (result.status, json.loads(result.out)) == (cli.EXIT_MATRIX_ERROR, error)
    assert result.err == "M_FORBIDDEN: You are not a server admin\n"


def test_unrecognized_gets_a_hint(stand_in: StandIn) -> None:
    stand_in.answer(404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})
    result = run(stand_in.url, "device-lists", "user", "@bob:remote.example")
    assert result.status == cli.EXIT_MATRIX_ERROR
    assert result.err.startswith("M_UNRECOGNIZED: Unrecognized request (is the synapse_xsign_uia")


@pytest.mark.parametrize(
    ("status", "body"),
    [(502, b"<html>Bad Gateway</html>"), (404, b"Not Found"), (200, b"[]"), (200, b"")],
)
def test_not_a_matrix_answer(stand_in: StandIn, status: int, body: bytes) -> None:
    stand_in.answer(status, body, **{"Content-Type": "text/html"})
    result = run(stand_in.url, "window", "status", ALICE)
    assert result.status == cli.EXIT_UNREACHABLE
    assert f"answered HTTP {status}" in result.err
    assert "without a Matrix answer" in result.err


def test_redirects_are_not_followed(stand_in: StandIn) -> None:
    """The token goes to the homeserver named, not wherever a redirect points."""
    target = StandIn()
    try:
        stand_in.answer(302, b"", Location=f"{target.url}/elsewhere")
        result = run(stand_in.url, "window", "status", ALICE)
        assert result.status == cli.EXIT_UNREACHABLE
        assert f"redirect (302) to {target.url}/elsewhere" in result.err
        assert target.seen == []
    finally:
        target.close()


def test_timeout(stand_in: StandIn) -> None:
    stand_in.delay = 2
    started = time.monotonic()
    result = run(stand_in.url, "--timeout", "0.3", "window", "status", ALICE)
    assert time.monotonic() - started < 1.5
    assert (result.status, result.err) == (
        cli.EXIT_UNREACHABLE,
        f"synapse-xsign-uia: Cannot reach {stand_in.url}: timed out\n",
    )


def test_connection_refused(stand_in: StandIn) -> None:
    url = stand_in.url
    stand_in.close()
    result = run(url, "window", "status", ALICE)
    assert result.status == cli.EXIT_UNREACHABLE
    assert result.err.startswith(f"synapse-xsign-uia: Cannot reach {url}: ")


def test_usage_errors_send_nothing(stand_in: StandIn) -> None:
    result = run(stand_in.url, "window", "status", ALICE, environ={cli.ENV_TOKEN: "a b"})
    assert result.status == cli.EXIT_USAGE
    assert result.err.startswith("synapse-xsign-uia: error: The access token from")
    assert stand_in.seen == []


def test_https(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    certificate = write_self_signed_certificate(tmp_path)
    server = StandIn(certificate)
    try:
        server.answer(
            200, {"updatable_without_uia_before_ms": None, "replaceable_without_uia": False}
        )
        # A certificate that nothing vouches for is refused...
        refused = run(server.url, "window", "status", ALICE)
        assert refused.status == cli.EXIT_UNREACHABLE
        assert "CERTIFICATE_VERIFY_FAILED" in refused.err
        assert server.seen == []
        # ... and accepted once trusted, as a certificate from a public authority would be.
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
        accepted = run(server.url, "window", "status", ALICE)
        assert accepted.status == cli.EXIT_OK, accepted.err
        assert "has no replacement window" in accepted.out
    finally:
        server.close()
