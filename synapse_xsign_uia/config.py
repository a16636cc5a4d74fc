"""The module's configuration: a frozen attrs class built from the `config:` block of
`homeserver.yaml`, with every mistake reported as a `ConfigError` that names the key."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping
from typing import Any

import attrs
from synapse.module_api.errors import ConfigError

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")

# A window longer than this cannot be meant; it also keeps timestamps far inside int64.
_LONGEST_DURATION_MS = 365 * _UNIT_MS["d"]


@attrs.frozen
class ResyncConfig:
    """Settings of the client-requested device-list resync endpoint."""

    enabled: bool = True
    timeout_ms: int = 10_000
    per_user_cooldown_ms: int = 30_000
    rate_per_second: float = 0.2
    burst_count: int = 5


@attrs.frozen
class RepairConfig:
    """Settings of the admin endpoints for remote device lists (status and repair)."""

    enabled: bool = True


# The placeholders `notify_on_reset.message` may use, filled in when the notice is sent.
NOTICE_PLACEHOLDERS = ("time", "user_id", "server_name", "method", "device", "ip_address")

DEFAULT_NOTICE_MESSAGE = (
    "The cross-signing identity (master key) of your account {user_id} was replaced at "
    "{time}, {method}, from the device {device} at the IP address {ip_address}. Your other "
    "sessions and the people you talk to will see that your identity changed.\n\n"
    "If you did this, there is nothing more to do. If you did not, someone else may have "
    "access to your account: change your password, contact the administrator of "
    "{server_name}, and verify your devices again."
)

# Server notices are events, which Synapse caps at 64 KiB of JSON.
_LONGEST_NOTICE_MESSAGE = 10_000


@attrs.frozen
class NoticeConfig:
    """Telling a user whose master key was replaced: by server notice (`enabled`), by email
    to their verified addresses (`email`), or both; `message` is the text of either."""

    enabled: bool = False
    email: bool = False
    message: str = DEFAULT_NOTICE_MESSAGE


@attrs.frozen
class Config:
    first_upload_without_uia: bool = True
    identical_reupload_without_uia: bool = True
    replacement_window_ms: int = 10 * _UNIT_MS["m"]
    max_replacement_window_ms: int = _UNIT_MS["d"]
    appservice_without_uia: bool = True
    strict_uia_sessions: bool = True
    device_list_resync: ResyncConfig = ResyncConfig()
    device_list_repair: RepairConfig = RepairConfig()
    notify_on_reset: NoticeConfig = NoticeConfig()


def _fail(path: list[str], message: str) -> ConfigError:
    return ConfigError(f"synapse_xsign_uia: '{'.'.join(path)}' {message}", path=path)


def parse_duration(value: object, path: list[str]) -> int:
    """Milliseconds from an integer of milliseconds or a string such as `30s` or `10m`."""
    if isinstance(value, bool):
        raise _fail(
            path, "must be a duration (milliseconds, or a string such as '10m'), not a boolean"
        )
    if isinstance(value, int):
        ms = value
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise _fail(
                path,
                f"is not a duration: {value!r} (use milliseconds, or a number with one of "
                "the units ms, s, m, h, d, such as '10m')",
            )
        ms = int(match.group(1)) * _UNIT_MS[match.group(2)]
    else:
        raise _fail(
            path,
            f"must be a duration (milliseconds, or a string such as '10m'), not {type(value).__name__}",
        )
    if ms <= 0:
        raise _fail(path, f"must be a positive duration, got {value!r}")
    if ms > _LONGEST_DURATION_MS:
        raise _fail(path, f"must be at most 365d, got {value!r}")
    return ms


def _parse_bool(value: object, path: list[str]) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"must be true or false, not {value!r}")
    return value


def _parse_positive_int(value: object, path: list[str]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"must be a positive integer, not {value!r}")
    if value <= 0:
        raise _fail(path, f"must be a positive integer, got {value}")
    return value


def _parse_positive_number(value: object, path: list[str]) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(path, f"must be a positive number, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise _fail(path, f"must be a positive finite number, got {value}")
    return float(value)


def _mapping(value: object, path: list[str], known: set[str]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(path, f"must be a mapping, not {type(value).__name__}")
    for key in value:
        if key not in known:
            raise _fail(
                [*path, str(key)],
                f"is not a known option (known: {', '.join(sorted(known))})",
            )
    return value


def _parse_resync(value: object) -> ResyncConfig:
    path = ["device_list_resync"]
    keys = {"enabled", "timeout", "per_user_cooldown", "rate_per_second", "burst_count"}
    raw = _mapping(value, path, keys)
    default = ResyncConfig()
    return ResyncConfig(
        enabled=_parse_bool(raw.get("enabled", default.enabled), [*path, "enabled"]),
        timeout_ms=parse_duration(raw.get("timeout", default.timeout_ms), [*path, "timeout"]),
        per_user_cooldown_ms=parse_duration(
            raw.get("per_user_cooldown", default.per_user_cooldown_ms),
            [*path, "per_user_cooldown"],
        ),
        rate_per_second=_parse_positive_number(
            raw.get("rate_per_second", default.rate_per_second), [*path, "rate_per_second"]
        ),
        burst_count=_parse_positive_int(
            raw.get("burst_count", default.burst_count), [*path, "burst_count"]
        ),
    )


def _parse_repair(value: object) -> RepairConfig:
    path = ["device_list_repair"]
    raw = _mapping(value, path, {"enabled"})
    default = RepairConfig()
    return RepairConfig(
        enabled=_parse_bool(raw.get("enabled", default.enabled), [*path, "enabled"])
    )


def _parse_notice_message(value: object, path: list[str]) -> str:
    """A `str.format` template whose only fields are the known placeholders, so that
    formatting it when a notice is due cannot fail."""
    known = ", ".join("{" + name + "}" for name in NOTICE_PLACEHOLDERS)
    if not isinstance(value, str):
        raise _fail(path, f"must be a string, not {type(value).__name__}")
    if not value.strip():
        raise _fail(path, "must not be empty")
    if len(value) > _LONGEST_NOTICE_MESSAGE:
        raise _fail(path, f"must be at most {_LONGEST_NOTICE_MESSAGE} characters, got {len(value)}")
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(value)
            if name is not None
        ]
    except ValueError as e:
        raise _fail(
            path, f"is not a valid template ({e}); write a literal brace as '{{{{' or '}}}}'"
        ) from e
    for name, spec, conversion in fields:
        if name not in NOTICE_PLACEHOLDERS:
            raise _fail(path, f"has an unknown placeholder {{{name}}} (known: {known})")
        if spec or conversion:
            raise _fail(path, f"placeholder {{{name}}} takes no format or conversion")
    return value


def _parse_notice(value: object) -> NoticeConfig:
    path = ["notify_on_reset"]
    raw = _mapping(value, path, {"enabled", "email", "message"})
    default = NoticeConfig()
    return NoticeConfig(
        enabled=_parse_bool(raw.get("enabled", default.enabled), [*path, "enabled"]),
        email=_parse_bool(raw.get("email", default.email), [*path, "email"]),
        message=_parse_notice_message(raw.get("message", default.message), [*path, "message"]),
    )


def parse_config(value: object) -> Config:
    keys = {
        "first_upload_without_uia",
        "identical_reupload_without_uia",
        "replacement_window",
        "max_replacement_window",
        "appservice_without_uia",
        "strict_uia_sessions",
        "device_list_resync",
        "device_list_repair",
        "notify_on_reset",
    }
    raw = _mapping(value, [], keys)
    default = Config()

    def flag(name: str, fallback: bool) -> bool:
        return _parse_bool(raw.get(name, fallback), [name])

    window = parse_duration(
        raw.get("replacement_window", default.replacement_window_ms), ["replacement_window"]
    )
    max_window = parse_duration(
        raw.get("max_replacement_window", default.max_replacement_window_ms),
        ["max_replacement_window"],
    )
    if window > max_window:
        raise _fail(
            ["replacement_window"],
            f"({window} ms) must not be longer than 'max_replacement_window' ({max_window} ms)",
        )
    return Config(
        first_upload_without_uia=flag("first_upload_without_uia", default.first_upload_without_uia),
        identical_reupload_without_uia=flag(
            "identical_reupload_without_uia", default.identical_reupload_without_uia
        ),
        replacement_window_ms=window,
        max_replacement_window_ms=max_window,
        appservice_without_uia=flag("appservice_without_uia", default.appservice_without_uia),
        strict_uia_sessions=flag("strict_uia_sessions", default.strict_uia_sessions),
        device_list_resync=_parse_resync(raw.get("device_list_resync")),
        device_list_repair=_parse_repair(raw.get("device_list_repair")),
        notify_on_reset=_parse_notice(raw.get("notify_on_reset")),
    )
