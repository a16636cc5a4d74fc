"""Configuration parsing: every key, its default, and every error naming its key."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from synapse.module_api.errors import ConfigError

from synapse_xsign_uia import CrossSigningUIAModule
from synapse_xsign_uia.config import (
    DEFAULT_NOTICE_MESSAGE,
    Config,
    NoticeConfig,
    RepairConfig,
    ResyncConfig,
    parse_config,
    parse_duration,
)


def error_for(config: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(config)
    return str(info.value)


def test_defaults() -> None:
    assert parse_config({}) == Config(
        first_upload_without_uia=True,
        identical_reupload_without_uia=True,
        replacement_window_ms=600_000,
        max_replacement_window_ms=86_400_000,
        appservice_without_uia=True,
        strict_uia_sessions=True,
        device_list_resync=ResyncConfig(
            enabled=True,
            timeout_ms=10_000,
            per_user_cooldown_ms=30_000,
            rate_per_second=0.2,
            burst_count=5,
        ),
        device_list_repair=RepairConfig(enabled=True),
        notify_on_reset=NoticeConfig(enabled=False, email=False, message=DEFAULT_NOTICE_MESSAGE),
    )


def test_empty_config_block_is_allowed() -> None:
    # `config:` with nothing under it reaches the module as None.
    assert parse_config(None) == Config()


def test_entry_point_parses() -> None:
    assert CrossSigningUIAModule.parse_config({"appservice_without_uia": False}) == Config(
        appservice_without_uia=False
    )


def test_every_key() -> None:
    config = parse_config(
        {
            "first_upload_without_uia": False,
            "identical_reupload_without_uia": False,
            "replacement_window": "30s",
            "max_replacement_window": "2h",
            "appservice_without_uia": False,
            "strict_uia_sessions": False,
            "device_list_resync": {
                "enabled": False,
                "timeout": 2500,
                "per_user_cooldown": "1m",
                "rate_per_second": 3,
                "burst_count": 7,
            },
            "device_list_repair": {"enabled": False},
            "notify_on_reset": {"enabled": True, "email": True, "message": "Reset at {time}."},
        }
    )
    assert config == Config(
        first_upload_without_uia=False,
        identical_reupload_without_uia=False,
        replacement_window_ms=30_000,
        max_replacement_window_ms=7_200_000,
        appservice_without_uia=False,
        strict_uia_sessions=False,
        device_list_resync=ResyncConfig(
            enabled=False,
            timeout_ms=2500,
            per_user_cooldown_ms=60_000,
            rate_per_second=3.0,
            burst_count=7,
        ),
        device_list_repair=RepairConfig(enabled=False),
        notify_on_reset=NoticeConfig(enabled=True, email=True, message="Reset at {time}."),
    )


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        (1, 1),
        (1500, 1500),
        ("500ms", 500),
        ("30s", 30_000),
        ("10m", 600_000),
        ("2h", 7_200_000),
        ("1d", 86_400_000),
        (" 7 s ", 7000),
        ("365d", 365 * 86_400_000),
    ],
)
def test_durations(text: Any, ms: int) -> None:
    assert parse_duration(text, ["x"]) == ms


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_duration_units_multiply(amount: int, unit: str) -> None:
    factor = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}[unit]
    text = f"{amount}{unit}"
    if amount * factor > 365 * 86_400_000:
        with pytest.raises(ConfigError, match="'x' must be at most 365d"):
            parse_duration(text, ["x"])
    else:
        assert parse_duration(text, ["x"]) == amount * factor


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "'replacement_window' must be a positive duration"),
        (-5, "'replacement_window' must be a positive duration"),
        ("0s", "'replacement_window' must be a positive duration"),
        ("10 minutes", "'replacement_window' is not a duration"),
        ("1.5h", "'replacement_window' is not a duration"),
        ("", "'replacement_window' is not a duration"),
        (1.5, "'replacement_window' must be a duration"),
        (True, "'replacement_window' must be a duration"),
        ([1], "'replacement_window' must be a duration"),
        ("366d", "'replacement_window' must be at most 365d"),
    ],
)
def test_bad_durations(value: Any, message: str) -> None:
    assert message in error_for({"replacement_window": value, "max_replacement_window": "365d"})


@pytest.mark.parametrize(
    "key",
    [
        "first_upload_without_uia",
        "identical_reupload_without_uia",
        "appservice_without_uia",
        "strict_uia_sessions",
    ],
)
@pytest.mark.parametrize("value", ["true", 1, 0, None, "yes"])
def test_flags_must_be_booleans(key: str, value: Any) -> None:
    assert f"'{key}' must be true or false" in error_for({key: value})


def test_unknown_key_is_named() -> None:
    message = error_for({"first_upload_without_uai": True})
    assert "'first_upload_without_uai' is not a known option" in message
    assert "first_upload_without_uia" in message  # the known keys are listed


def test_unknown_nested_key_is_named() -> None:
    assert "'device_list_resync.timout' is not a known option" in error_for(
        {"device_list_resync": {"timout": "5s"}}
    )


def test_config_must_be_a_mapping() -> None:
    assert "must be a mapping" in error_for(["first_upload_without_uia"])
    assert "'device_list_resync' must be a mapping" in error_for({"device_list_resync": True})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"enabled": "yes"}, "'device_list_repair.enabled' must be true or false"),
        ({"enable": True}, "'device_list_repair.enable' is not a known option"),
        ([True], "'device_list_repair' must be a mapping"),
    ],
)
def test_bad_repair_section_is_named(value: Any, message: str) -> None:
    assert message in error_for({"device_list_repair": value})


def test_window_longer_than_maximum() -> None:
    message = error_for({"replacement_window": "2d"})
    assert "'replacement_window'" in message
    assert "'max_replacement_window'" in message


def test_window_equal_to_maximum_is_allowed() -> None:
    config = parse_config({"replacement_window": "1h", "max_replacement_window": "60m"})
    assert config.replacement_window_ms == config.max_replacement_window_ms == 3_600_000


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"enabled": "no"}, "'device_list_resync.enabled' must be true or false"),
        ({"timeout": "soon"}, "'device_list_resync.timeout' is not a duration"),
        ({"timeout": 0}, "'device_list_resync.timeout' must be a positive duration"),
        ({"per_user_cooldown": -1}, "'device_list_resync.per_user_cooldown' must be a positive"),
        ({"rate_per_second": 0}, "'device_list_resync.rate_per_second' must be a positive"),
        ({"rate_per_second": "1"}, "'device_list_resync.rate_per_second' must be a positive"),
        ({"rate_per_second": float("nan")}, "'device_list_resync.rate_per_second' must be a"),
        ({"rate_per_second": float("inf")}, "'device_list_resync.rate_per_second' must be a"),
        ({"rate_per_second": True}, "'device_list_resync.rate_per_second' must be a positive"),
        ({"burst_count": 0}, "'device_list_resync.burst_count' must be a positive integer"),
        ({"burst_count": 2.5}, "'device_list_resync.burst_count' must be a positive integer"),
        ({"burst_count": False}, "'device_list_resync.burst_count' must be a positive integer"),
    ],
)
def test_resync_errors(section: dict[str, Any], message: str) -> None:
    assert message in error_for({"device_list_resync": section})


def test_error_carries_the_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"device_list_resync": {"burst_count": 0}})
    assert list(info.value.path or []) == ["device_list_resync", "burst_count"]


def test_config_is_frozen() -> None:
    config = parse_config({})
    with pytest.raises(AttributeError):
        config.first_upload_without_uia = False  # type: ignore[misc]


def test_notice_message_with_every_placeholder() -> None:
    message = "{user_id} on {server_name}: {time}, {method}. {{Braces}} are literal."
    config = parse_config({"notify_on_reset": {"message": message}})
    assert config.notify_on_reset == NoticeConfig(enabled=False, message=message)


def test_default_notice_message_uses_known_placeholders() -> None:
    parse_config({"notify_on_reset": {"message": DEFAULT_NOTICE_MESSAGE}})
    for placeholder in ("{time}", "{method}", "{user_id}", "{server_name}"):
        assert placeholder in DEFAULT_NOTICE_MESSAGE


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"enabled": "yes"}, "'notify_on_reset.enabled' must be true or false"),
        ({"enabled": None}, "'notify_on_reset.enabled' must be true or false"),
        ({"email": "yes"}, "'notify_on_reset.email' must be true or false"),
        ({"email": 1}, "'notify_on_reset.email' must be true or false"),
        ({"message": ""}, "'notify_on_reset.message' must not be empty"),
        ({"message": " \n"}, "'notify_on_reset.message' must not be empty"),
        ({"message": None}, "'notify_on_reset.message' must be a string"),
        ({"message": ["a"]}, "'notify_on_reset.message' must be a string"),
        ({"message": "x" * 10_001}, "'notify_on_reset.message' must be at most 10000 characters"),
        ({"message": "at {when}"}, "'notify_on_reset.message' has an unknown placeholder {when}"),
        ({"message": "at {}"}, "'notify_on_reset.message' has an unknown placeholder {}"),
        ({"message": "at {0}"}, "'notify_on_reset.message' has an unknown placeholder {0}"),
        ({"message": "{user_id.x}"}, "'notify_on_reset.message' has an unknown placeholder"),
        ({"message": "{time:%Y}"}, "'notify_on_reset.message' placeholder {time} takes no"),
        ({"message": "{time!r}"}, "'notify_on_reset.message' placeholder {time} takes no"),
        ({"message": "a { b"}, "'notify_on_reset.message' is not a valid template"),
        ({"message": "a } b"}, "'notify_on_reset.message' is not a valid template"),
        ({"mesage": "x"}, "'notify_on_reset.mesage' is not a known option"),
    ],
)
def test_notice_errors(section: dict[str, Any], message: str) -> None:
    assert message in error_for({"notify_on_reset": section})


def test_unknown_placeholder_error_lists_the_known_ones() -> None:
    message = error_for({"notify_on_reset": {"message": "{when}"}})
    assert "{time}, {user_id}, {server_name}, {method}" in message


def test_notice_must_be_a_mapping() -> None:
    assert "'notify_on_reset' must be a mapping" in error_for({"notify_on_reset": True})
    assert parse_config({"notify_on_reset": None}).notify_on_reset == NoticeConfig()


def test_notice_error_carries_the_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"notify_on_reset": {"message": "{when}"}})
    assert list(info.value.path or []) == ["notify_on_reset", "message"]
