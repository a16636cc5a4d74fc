"""Matrix user IDs and server names in the module's request paths: one grammar for every
endpoint."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse


class InvalidUserId(ValueError):
    """The path does not name a valid Matrix user ID; the message says why."""


class InvalidServerName(ValueError):
    """The path does not name a valid server name; the message says why."""


_MAX_USER_ID_BYTES = 255
_DNS_NAME = re.compile(r"^[A-Za-z0-9.-]{1,255}$")
_PORT = re.compile(r"^[0-9]{1,5}$")


def _valid_server_name(server_name: str) -> bool:
    """The spec's server-name grammar: a DNS name, an IPv4 address or a bracketed IPv6
    address, then an optional port."""
    host, port = server_name, None
    if server_name.startswith("["):
        close = server_name.find("]")
        if close == -1:
            return False
        host, rest = server_name[: close + 1], server_name[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                return False
            port = rest[1:]
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
    else:
        if ":" in server_name:
            host, port = server_name.split(":", 1)
        # A dotted quad is also a DNS name by the grammar's characters; nothing to add.
        if not _DNS_NAME.match(host):
            return False
    return port is None or (_PORT.match(port) is not None and 0 < int(port) <= 65535)


def check_server_name(server_name: str) -> None:
    """`InvalidServerName` unless `server_name` follows the spec's grammar."""
    if not _valid_server_name(server_name):
        raise InvalidServerName(
            f"{server_name!r} is not a server name: expected a DNS name, an IPv4 address or a"
            " bracketed IPv6 address, with an optional port"
        )


def parse_user_id(user_id: str) -> str:
    """The server name of a valid user ID, or `InvalidUserId`.

    Localparts are checked against the historical grammar (printable ASCII except ':'),
    which every server must still accept for existing users.
    """
    if not user_id.startswith("@"):
        raise InvalidUserId(f"{user_id!r} is not a user ID: it must start with '@'")
    if len(user_id.encode("utf-8")) > _MAX_USER_ID_BYTES:
        raise InvalidUserId(f"A user ID is at most {_MAX_USER_ID_BYTES} bytes long")
    localpart, sep, server_name = user_id[1:].partition(":")
    if not sep or not localpart or not server_name:
        raise InvalidUserId(f"{user_id!r} is not a user ID: expected '@localpart:server.name'")
    if any(not 0x21 <= ord(ch) <= 0x7E for ch in localpart):
        raise InvalidUserId(
            f"{user_id!r} is not a user ID: the localpart may only hold printable ASCII"
        )
    if not _valid_server_name(server_name):
        raise InvalidUserId(f"{user_id!r} is not a user ID: {server_name!r} is not a server name")
    return server_name


def decode_path_segment(segment: bytes) -> str:
    """Percent-decode a user ID path segment (Twisted splits the path before decoding, so an
    encoded '/' stays inside the segment)."""
    try:
        return urllib.parse.unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidUserId("The user ID in the path is not valid UTF-8") from e
