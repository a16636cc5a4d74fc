"""`synapse-xsign-uia`: the module's admin API from the command line.

Standard library only, and no Synapse: it runs in Synapse's own virtual environment with
nothing more installed, or on any machine that can reach the homeserver.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TextIO

from synapse_xsign_uia import __version__
from synapse_xsign_uia.user_ids import (
    InvalidServerName,
    InvalidUserId,
    check_server_name,
    parse_user_id,
)

PROG = "synapse-xsign-uia"
ENV_HOMESERVER = "SYNAPSE_XSIGN_UIA_HOMESERVER"
ENV_TOKEN = "SYNAPSE_XSIGN_UIA_TOKEN"
DEFAULT_TIMEOUT_S = 30.0

EXIT_OK = 0
EXIT_MATRIX_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

WINDOW_PATH = "/_synapse/admin/v1/users/{}/_allow_cross_signing_replacement_without_uia"
DEVICE_LISTS_PATH = "/_synapse/admin/v1/remote_device_lists"

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class UsageError(Exception):
    """The command line or the configuration is wrong; nothing was sent."""


class Unreachable(Exception):
    """No Matrix answer from the homeserver: it could not be reached, or something else
    (a proxy, another web server) answered."""


class MatrixError(Exception):
    """The homeserver answered with a Matrix error."""

    def __init__(self, status: int, errcode: str, error: str, body: dict[str, Any]) -> None:
        super().__init__(f"{errcode}: {error}")
        self.status = status
        self.errcode = errcode
        self.error = error
        self.body = body


# --- Input -------------------------------------------------------------------------------


def parse_duration(text: str) -> int:
    """Milliseconds from `1800000` or a number with a unit: `500ms`, `30s`, `30m`, `2h`, `1d`
    (the grammar of the module's configuration)."""
    value = text.strip()
    unit = "ms"
    for suffix in ("ms", "s", "m", "h", "d"):
        if value.endswith(suffix):
            value, unit = value[: -len(suffix)].strip(), suffix
            break
    if not value.isascii() or not value.isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: use milliseconds, or a whole number with one of the"
            " units ms, s, m, h, d, such as 30m"
        )
    ms = int(value) * _UNIT_MS[unit]
    if ms <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return ms


def user_id_argument(text: str) -> str:
    try:
        parse_user_id(text)
    except InvalidUserId as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def server_name_argument(text: str) -> str:
    try:
        check_server_name(text)
    except InvalidServerName as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def timeout_argument(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def homeserver_url(text: str) -> str:
    """The base URL, without a trailing slash, or `UsageError`."""
    url = text.strip().rstrip("/")
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # ValueError for a port that is not a number
    except ValueError as e:
        raise UsageError(f"{text!r} is not a homeserver URL: {e}") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"{text!r} is not a homeserver URL: expected http:// or https:// and a host name,"
            " such as https://matrix.example.org"
        )
    if parts.query or parts.fragment:
        # Not echoed: a query may carry an access token.
        raise UsageError("The homeserver URL must not have a query or a fragment")
    return url


def check_token(token: str, source: str) -> str:
    token = token.strip()
    if not token:
        raise UsageError(f"The access token from {source} is empty")
    # http.client would refuse it with an error that quotes the header, token and all.
    if not token.isascii() or not token.isprintable() or " " in token:
        raise UsageError(
            f"The access token from {source} holds characters that an access token cannot"
            " hold (spaces, line breaks or non-ASCII characters)"
        )
    return token


# --- Arguments ---------------------------------------------------------------------------


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: an option given before the subcommand is not overwritten by the subcommand
    # parser's default, so the options work in either place.
    parser.add_argument(
        "--homeserver",
        metavar="URL",
        default=argparse.SUPPRESS,
        help=f"the homeserver's client URL, such as https://matrix.example.org"
        f" (default: ${ENV_HOMESERVER})",
    )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        default=argparse.SUPPRESS,
        help=f"a server admin's access token (default: ${ENV_TOKEN}); it shows in the"
        " process list, prefer --token-file or the environment",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="read the access token from this file",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=timeout_argument,
        default=argparse.SUPPRESS,
        help=f"give up after this long (default: {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the homeserver's JSON answer instead of sentences",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the request and the answer's status on stderr (never the token)",
    )


LOCAL_USER_HELP = "a local user's ID, such as @alice:example.org"
SERVER_HELP = "a remote server's name, as in its users' IDs, such as example.org"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common)
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Call the synapse-xsign-uia admin API of a Synapse homeserver.",
        epilog=f"Exit statuses: {EXIT_OK} success, {EXIT_MATRIX_ERROR} the homeserver answered"
        f" with a Matrix error, {EXIT_USAGE} a usage error (nothing was sent),"
        f" {EXIT_UNREACHABLE} no Matrix answer (unreachable, timeout, not Synapse).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)

    window = commands.add_parser(
        "window",
        parents=[common],
        help="a local user's window to replace their master key without UIA",
        description="Open, show or close a local user's window to replace their master"
        " cross-signing key without user-interactive authentication.",
    )
    window_actions = window.add_subparsers(dest="action", metavar="ACTION", required=True)
    grant = window_actions.add_parser(
        "grant", parents=[common], help="open a window (replaces an open one)"
    )
    grant.add_argument("user_id", metavar="USER", type=user_id_argument, help=LOCAL_USER_HELP)
    grant.add_argument(
        "--duration",
        type=parse_duration,
        help="how long it stays open: milliseconds, or with a unit ms, s, m, h, d, such as"
        " 30m (default: the module's replacement_window)",
    )
    for action, help_text in (("status", "show the window"), ("revoke", "close the window")):
        sub = window_actions.add_parser(action, parents=[common], help=help_text)
        sub.add_argument("user_id", metavar="USER", type=user_id_argument, help=LOCAL_USER_HELP)

    lists = commands.add_parser(
        "device-lists",
        parents=[common],
        help="this homeserver's copy of remote users' device lists",
        description="Show and repair this homeserver's copy of remote users' device lists.",
    )
    list_actions = lists.add_subparsers(dest="action", metavar="ACTION", required=True)
    user = list_actions.add_parser(
        "user", parents=[common], help="the status of a remote user's device list"
    )
    user.add_argument("user_id", metavar="USER", type=user_id_argument, help="a remote user's ID")
    server = list_actions.add_parser(
        "server", parents=[common], help="the status of a remote server's users' device lists"
    )
    server.add_argument(
        "server_name", metavar="SERVER", type=server_name_argument, help=SERVER_HELP
    )
    repair = list_actions.add_parser(
        "repair",
        parents=[common],
        help="have Synapse fetch again the device lists of a remote server's users",
    )
    repair.add_argument(
        "server_name", metavar="SERVER", type=server_name_argument, help=SERVER_HELP
    )
    return parser


@dataclass(frozen=True)
class Settings:
    homeserver: str
    token: str
    token_source: str
    timeout: float
    json: bool
    verbose: bool


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Flags first, then the environment; `UsageError` for what is missing or wrong."""
    given = vars(args)
    homeserver = given.get("homeserver") or environ.get(ENV_HOMESERVER, "")
    if not homeserver:
        raise UsageError(f"No homeserver: give --homeserver URL or set ${ENV_HOMESERVER}")
    if "token" in given and "token_file" in given:
        raise UsageError("Give --token or --token-file, not both")
    if "token_file" in given:
        source = f"--token-file {given['token_file']}"
        try:
            with open(given["token_file"], encoding="utf-8") as f:
                token = f.read()
        except (OSError, UnicodeDecodeError) as e:
            # Only the reason: a UnicodeDecodeError would quote the file's bytes.
            reason = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text"
            raise UsageError(
                f"Cannot read the access token from {given['token_file']}: {reason}"
            ) from None
    elif "token" in given:
        source, token = "--token", given["token"]
    elif environ.get(ENV_TOKEN):
        source, token = f"${ENV_TOKEN}", environ[ENV_TOKEN]
    else:
        raise UsageError(
            f"No access token: give --token-file PATH or --token TOKEN, or set ${ENV_TOKEN}"
        )
    return Settings(
        homeserver=homeserver_url(homeserver),
        token=check_token(token, source),
        token_source=source,
        timeout=given.get("timeout", DEFAULT_TIMEOUT_S),
        json=given.get("json", False),
        verbose=given.get("verbose", False),
    )


# --- Requests ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: dict[str, Any] | None = None


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def call_for(args: argparse.Namespace) -> Call:
    """The admin API request a command makes."""
    command = (args.group, args.action)
    if command == ("window", "grant"):
        body = {} if args.duration is None else {"duration_ms": args.duration}
        return Call("POST", WINDOW_PATH.format(_quote(args.user_id)), body)
    if command == ("window", "status"):
        return Call("GET", WINDOW_PATH.format(_quote(args.user_id)))
    if command == ("window", "revoke"):
        return Call("DELETE", WINDOW_PATH.format(_quote(args.user_id)))
    if command == ("device-lists", "user"):
        return Call("GET", f"{DEVICE_LISTS_PATH}/users/{_quote(args.user_id)}")
    if command == ("device-lists", "server"):
        return Call("GET", f"{DEVICE_LISTS_PATH}/servers/{_quote(args.server_name)}")
    if command == ("device-lists", "repair"):
        return Call("POST", f"{DEVICE_LISTS_PATH}/servers/{_quote(args.server_name)}/repair", {})
    raise AssertionError(f"unknown command {command}")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # urllib would send the Authorization header on to wherever a redirect points.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def send(call: Call, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """The JSON object the homeserver answered with, or `MatrixError` / `Unreachable`."""
    url = settings.homeserver + call.path
    data = None if call.body is None else json.dumps(call.body).encode()
    request = urllib.request.Request(url, data=data, method=call.method)
    request.add_header("Authorization", f"Bearer {settings.token}")
    request.add_header("Accept", "application/json")
    request.add_header("User-Agent", f"{PROG}/{__version__}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    log(f"> {call.method} {url}" + ("" if data is None else f" {data.decode()}"))
    log(f"> access token from {settings.token_source}")
    opener = urllib.request.build_opener(_NoRedirects)
    started = time.monotonic()
    try:
        try:
            response = opener.open(request, timeout=settings.timeout)
        except urllib.error.HTTPError as e:
            # An answer all the same, whose body says what went wrong.
            response = e
        with response:
            status, reason = response.status, response.reason
            location, raw = response.headers.get("Location"), response.read()
    except urllib.error.URLError as e:
        raise Unreachable(f"Cannot reach {settings.homeserver}: {_reason(e.reason)}") from e
    except (OSError, http.client.HTTPException) as e:
        raise Unreachable(f"Cannot reach {settings.homeserver}: {_reason(e)}") from e
    log(f"< {status} {reason} ({time.monotonic() - started:.2f} s)")
    body = _json_object(raw)
    if 200 <= status < 300 and body is not None:
        return body
    if body is not None and isinstance(body.get("errcode"), str):
        raise MatrixError(status, body["errcode"], str(body.get("error", "")), body)
    if 300 <= status < 400:
        raise Unreachable(
            f"{settings.homeserver} answered with a redirect ({status}) to {location}, which"
            " is not followed so that the access token goes only to the homeserver URL given:"
            " give the URL the redirect leads to (https:// rather than http://, perhaps)"
        )
    raise Unreachable(
        f"{settings.homeserver} answered HTTP {status} {reason} without a Matrix answer to"
        f" {call.method} {call.path}: is it Synapse, and does it serve /_synapse/admin/?"
    )


def _reason(error: object) -> str:
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


# --- Answers -----------------------------------------------------------------------------


def format_time(ts_ms: int, now_ms: int) -> str:
    """`2026-12-06 17:30:00 UTC (in 30 minutes)`."""
    when = datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc)
    return f"{when:%Y-%m-%d %H:%M:%S} UTC ({relative(ts_ms - now_ms)})"


def relative(delta_ms: int) -> str:
    """`in 30 minutes`, `2 hours 5 minutes ago`, `now`."""
    seconds = abs(delta_ms) / 1000
    minutes = round(seconds / 60)
    if seconds < 1:
        text = ""
    elif seconds < 90:
        text = _count(round(seconds), "second")
    elif minutes < 60:
        text = _count(minutes, "minute")
    elif minutes < 48 * 60:
        hours, minutes = divmod(minutes, 60)
        text = _count(hours, "hour") + (f" {_count(minutes, 'minute')}" if minutes else "")
    else:
        text = _count(round(seconds / 86400), "day")
    if not text:
        return "now"
    return f"in {text}" if delta_ms > 0 else f"{text} ago"


def _count(count: int, unit: str) -> str:
    return f"{count} {unit}{'' if count == 1 else 's'}"


def format_window(action: str, user_id: str, answer: dict[str, Any], now_ms: int) -> str:
    if action == "revoke":
        return (
            f"The replacement window of {user_id} is closed: replacing their master key needs"
            " UIA again."
        )
    end = answer.get("updatable_without_uia_before_ms")
    # A grant answers with the end alone; the window is open, as the homeserver opened it.
    is_open = answer.get("replaceable_without_uia", action == "grant")
    if is_open and isinstance(end, int):
        return (
            f"{user_id} may replace their master key without UIA until {format_time(end, now_ms)}."
        )
    if not isinstance(end, int):
        return (
            f"{user_id} has no replacement window on their current master key: replacing it"
            " needs UIA."
        )
    return (
        f"The replacement window of {user_id} ended at {format_time(end, now_ms)}: replacing"
        " their master key needs UIA."
    )


def _lines(title: str, rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows) + 1
    return "\n".join([title, *(f"  {label + ':':<{width}} {value}" for label, value in rows)])


def _yes_no(value: object) -> str:
    return "yes" if value else "no"


def _when(ts: object, now_ms: int, none: str) -> str:
    return format_time(ts, now_ms) if isinstance(ts, int) else none


def _server_rows(server: Any, now_ms: int) -> list[tuple[str, str]]:
    if not isinstance(server, dict):
        return []
    if server.get("reachable", True):
        return [("server", f"{server.get('server_name')}, reachable")]
    rows = [
        (
            "server",
            f"{server.get('server_name')}, failing since"
            f" {_when(server.get('failing_since_ts'), now_ms, 'unknown')}",
        ),
        ("last failed attempt", _when(server.get("last_failed_attempt_ts"), now_ms, "unknown")),
    ]
    next_retry = server.get("next_retry_ts")
    if isinstance(next_retry, int):
        note = "" if next_retry > now_ms else ", the backoff has ended"
        rows.append(("next retry", f"{format_time(next_retry, now_ms)}{note}"))
    return rows


_KEY_LABELS = {"master": "master key", "self_signing": "self-signing key"}


def format_user_status(answer: dict[str, Any], now_ms: int) -> str:
    failure = answer.get("last_failed_fetch")
    if isinstance(failure, dict):
        failed = (
            f"{_when(failure.get('ts'), now_ms, 'unknown')}: {failure.get('reason')}"
            f" ({failure.get('error')})"
        )
    else:
        failed = "none"
    rows = [
        ("tracked", _yes_no(answer.get("tracked"))),
        ("shares a room", _yes_no(answer.get("shares_room"))),
        (
            "stale",
            f"yes, since {_when(answer.get('stale_since_ts'), now_ms, 'unknown')}"
            if answer.get("stale")
            else "no",
        ),
        ("last fetched", _when(answer.get("last_fetched_ts"), now_ms, "never recorded")),
        ("last failed fetch", failed),
        ("devices", str(answer.get("device_count"))),
    ]
    keys = answer.get("cross_signing_keys") or {}
    if keys:
        rows += [(_KEY_LABELS.get(kind, kind), str(key_id)) for kind, key_id in keys.items()]
    else:
        rows.append(("cross-signing keys", "none"))
    rows += _server_rows(answer.get("server"), now_ms)
    return _lines(f"Device list of {answer.get('user_id')} on this homeserver:", rows)


def format_server_status(answer: dict[str, Any], now_ms: int) -> str:
    stale = answer.get("stale_users")
    oldest = answer.get("oldest_stale_since_ts")
    repair = answer.get("last_repair")
    if isinstance(repair, dict):
        last_repair = (
            f"{_when(repair.get('requested_ts'), now_ms, 'unknown')} by"
            f" {repair.get('requested_by')}, {repair.get('users_marked')} marked stale"
        )
    else:
        last_repair = "none"
    rows = [
        ("tracked users", str(answer.get("tracked_users"))),
        (
            "stale users",
            f"{stale}, the oldest since {format_time(oldest, now_ms)}"
            if isinstance(oldest, int)
            else str(stale),
        ),
        ("last repair", last_repair),
        *_server_rows(answer.get("server"), now_ms),
    ]
    return _lines(f"Device lists of the users of {answer.get('server_name')}:", rows)


def format_repair(answer: dict[str, Any], now_ms: int) -> str:
    marked = answer.get("marked_stale")
    server_name = answer.get("server_name")
    lists = "device list" if marked == 1 else "device lists"
    return (
        f"Marked {marked} {lists} of the users of {server_name} stale. Synapse's retry loop"
        " fetches them again (every 30 seconds, unless it backs off from the server); the"
        " repair is complete when stale users is 0"
        f" ({PROG} device-lists server {server_name}).\n\n" + format_server_status(answer, now_ms)
    )


def format_answer(args: argparse.Namespace, answer: dict[str, Any], now_ms: int) -> str:
    if args.group == "window":
        return format_window(args.action, args.user_id, answer, now_ms)
    if args.action == "user":
        return format_user_status(answer, now_ms)
    if args.action == "server":
        return format_server_status(answer, now_ms)
    return format_repair(answer, now_ms)


# Synapse's answer to a path it does not serve says nothing of why.
_HINTS = {
    "M_UNRECOGNIZED": "is the synapse_xsign_uia module loaded on this homeserver, with the"
    " endpoint enabled, and does this URL reach its main process?",
}


# --- Main --------------------------------------------------------------------------------


def _print_json(body: dict[str, Any], out: TextIO) -> None:
    print(json.dumps(body, indent=2, ensure_ascii=False), file=out)


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one command; the exit status."""
    try:
        return _run(argv, environ, stdout, stderr)
    except KeyboardInterrupt:
        return 130


def _run(
    argv: Sequence[str] | None,
    environ: Mapping[str, str] | None,
    stdout: TextIO | None,
    stderr: TextIO | None,
) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        settings = settings_from(args, os.environ if environ is None else environ)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=err)
        return EXIT_USAGE

    def log(line: str) -> None:
        if settings.verbose:
            print(line, file=err)

    call = call_for(args)
    try:
        answer = send(call, settings, log)
    except MatrixError as e:
        if settings.json:
            _print_json(e.body, out)
        hint = _HINTS.get(e.errcode)
        print(f"{e.errcode}: {e.error}" + (f" ({hint})" if hint else ""), file=err)
        return EXIT_MATRIX_ERROR
    except Unreachable as e:
        print(f"{PROG}: {e}", file=err)
        return EXIT_UNREACHABLE
    if settings.json:
        _print_json(answer, out)
    else:
        print(format_answer(args, answer, int(time.time() * 1000)), file=out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
