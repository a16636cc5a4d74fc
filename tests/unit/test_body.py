"""The strict reader of request bodies, and the checks of a UIA `auth` object."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_xsign_uia.body import MAX_BODY_BYTES, MAX_DEPTH, parse_json_object, read_json_object
from synapse_xsign_uia.validation import RequestError, check_uia_auth


def refusal(content: bytes, *, allow_empty_body: bool = False) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_json_object(content, allow_empty_body=allow_empty_body)
    return caught.value


def nested(depth: int) -> Any:
    """An object `depth` levels deep, counting itself: {"a": [[...]]}."""
    value: Any = []
    for _ in range(depth - 2):
        value = [value]
    return {"a": value}


def test_reads_an_object() -> None:
    assert parse_json_object(b' {"a": [1, 2.5, "\\u00e9", null, true]} ') == {
        "a": [1, 2.5, "é", None, True]
    }


def test_empty_body() -> None:
    assert parse_json_object(b"", allow_empty_body=True) == {}
    error = refusal(b"")
    assert (error.status, error.errcode) == (400, "M_NOT_JSON")
    # Only a body with no bytes at all counts as empty, as with Synapse's reader.
    assert refusal(b" ", allow_empty_body=True).errcode == "M_NOT_JSON"


def test_size_limit() -> None:
    padding = MAX_BODY_BYTES - len(b'{"a": ""}')
    assert parse_json_object(b'{"a": "' + b"x" * padding + b'"}')
    error = refusal(b'{"a": "' + b"x" * (padding + 1) + b'"}')
    assert (error.status, error.errcode) == (413, "M_TOO_LARGE")
    assert str(MAX_BODY_BYTES) in error.message


def test_reading_stops_after_the_limit() -> None:
    content = io.BytesIO(b"x" * (10 * MAX_BODY_BYTES))
    with pytest.raises(RequestError) as caught:
        read_json_object(content)
    assert caught.value.status == 413
    assert content.tell() == MAX_BODY_BYTES + 1


@pytest.mark.parametrize(
    "content",
    [b'{"a": "\xff"}', b'{"a": "\xc0\xaf"}', b'{"a": "\xed\xa0\x80"}', '{"a": 1}'.encode("utf-16")],
    ids=["invalid-byte", "overlong", "encoded-surrogate", "utf-16"],
)
def test_not_utf8(content: bytes) -> None:
    error = refusal(content)
    assert (error.status, error.errcode) == (400, "M_NOT_JSON")
    assert "UTF-8" in error.message


@pytest.mark.parametrize(
    "content", [b"{", b'{"a": 1,}', b"{'a': 1}", b'{"a": 01}', b"\xef\xbb\xbf{}", b'{"a":1}x']
)
def test_not_json(content: bytes) -> None:
    error = refusal(content)
    assert (error.status, error.errcode) == (400, "M_NOT_JSON")
    assert "not valid JSON" in error.message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_numbers_are_not_json(literal: str) -> None:
    error = refusal(f'{{"a": {literal}}}'.encode())
    assert (error.status, error.errcode) == (400, "M_NOT_JSON")
    assert literal.lstrip("-") in error.message


@pytest.mark.parametrize("number", ["1e999", "-1e999", "1.5e400"])
def test_numbers_out_of_range(number: str) -> None:
    error = refusal(f'{{"a": {number}}}'.encode())
    assert (error.status, error.errcode) == (400, "M_BAD_JSON")
    assert "out of range" in error.message


def test_numbers_in_range() -> None:
    assert parse_json_object(b'{"a": 1e308, "b": 1e-999, "c": -0, "d": 123456789012345678901}') == {
        "a": 1e308,
        "b": 0.0,
        "c": 0,
        "d": 123456789012345678901,
    }


def test_integer_with_too_many_digits() -> None:
    error = refusal(b'{"a": 1' + b"0" * 5000 + b"}")
    assert (error.status, error.errcode) == (400, "M_BAD_JSON")


@pytest.mark.parametrize(
    ("content", "key"),
    [
        (b'{"a": 1, "a": 1}', "a"),
        (b'{"a": {"b": 1, "c": 2, "b": 3}}', "b"),
        (b'{"a": [{"x": 1}, {"y": 1, "y": 2}]}', "y"),
        (b'{"\\u0061": 1, "a": 2}', "a"),
    ],
)
def test_duplicate_keys(content: bytes, key: str) -> None:
    error = refusal(content)
    assert (error.status, error.errcode) == (400, "M_BAD_JSON")
    assert f"{key!r} twice" in error.message


def test_equal_keys_in_different_objects_are_fine() -> None:
    assert parse_json_object(b'{"a": {"a": {"a": 1}}, "b": [{"a": 1}, {"a": 2}]}')


def test_nesting_up_to_the_limit() -> None:
    assert parse_json_object(json.dumps(nested(MAX_DEPTH)).encode())
    for content in (
        json.dumps(nested(MAX_DEPTH + 1)).encode(),
        # Deep enough for Python's decoder to give up with a RecursionError.
        b'{"a": ' + b"[" * 20000 + b"]" * 20000 + b"}",
    ):
        error = refusal(content)
        assert (error.status, error.errcode) == (400, "M_BAD_JSON")
        assert f"more than {MAX_DEPTH} deep" in error.message


@pytest.mark.parametrize(
    "escaped", ["\\ud800", "\\udfff", "x\\udc00\\ud800y", "\\ud83d", "\\uDBFF"]
)
def test_lone_surrogates(escaped: str) -> None:
    for content in (f'{{"a": "{escaped}"}}', f'{{"{escaped}": 1}}', f'{{"a": [["{escaped}"]]}}'):
        error = refusal(content.encode())
        assert (error.status, error.errcode) == (400, "M_BAD_JSON")
        assert "surrogate" in error.message


def test_surrogate_pairs_and_escaped_backslashes_are_fine() -> None:
    assert parse_json_object(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}
    # A backslash, then the letters "ud800": no escape at all.
    assert parse_json_object(b'{"a": "\\\\ud800"}') == {"a": "\\ud800"}


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"[]", "an array"),
        (b'"a"', "a string"),
        (b"1", "a number"),
        (b"null", "null"),
        (b"true", "a boolean"),
    ],
)
def test_not_an_object(content: bytes, kind: str) -> None:
    error = refusal(content)
    assert (error.status, error.errcode) == (400, "M_BAD_JSON")
    assert error.message.endswith(kind)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(), json_values, max_size=5))
def test_any_plain_object_reads_back(value: dict[str, Any]) -> None:
    assert parse_json_object(json.dumps(value).encode()) == value
    assert parse_json_object(json.dumps(value, ensure_ascii=False).encode()) == value


@settings(max_examples=1000, deadline=None)
@given(
    st.binary(max_size=200)
    | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass"))
)
def test_any_bytes_give_an_object_or_a_4xx(content: bytes) -> None:
    try:
        assert isinstance(parse_json_object(content), dict)
    except RequestError as e:
        assert 400 <= e.status < 500
        assert e.errcode in ("M_NOT_JSON", "M_BAD_JSON", "M_TOO_LARGE")


# --- The `auth` object, before Synapse's UIA --------------------------------------------


@pytest.mark.parametrize(
    "auth",
    [
        None,
        {},
        {
            "type": "m.login.password",
            "session": "abc",
            "password": "p",
            "identifier": {"type": "m.id.user", "user": "@a:b"},
        },
        {"type": "m.login.password", "user": "a", "password": "p"},
        {"type": "m.login.email.identity", "threepid_creds": {"sid": "1", "client_secret": "s"}},
        {
            "type": "m.login.password",
            "identifier": {"type": "m.id.phone", "country": "GB", "number": "1"},
        },
        {"session": "abc", "unknown": {"deep": [1]}},
    ],
)
def test_auth_objects_synapse_can_read(auth: Any) -> None:
    check_uia_auth(auth)


@pytest.mark.parametrize(
    ("auth", "errcode", "field"),
    [
        ({"type": 5}, "M_BAD_JSON", "auth.type"),
        ({"session": {"a": 1}}, "M_BAD_JSON", "auth.session"),
        ({"password": None}, "M_BAD_JSON", "auth.password"),
        ({"user": ["a"]}, "M_BAD_JSON", "auth.user"),
        ({"medium": 1, "address": "a@b"}, "M_BAD_JSON", "auth.medium"),
        ({"identifier": ["type"]}, "M_BAD_JSON", "auth.identifier"),
        ({"identifier": {"type": "m.id.user", "user": 5}}, "M_BAD_JSON", "auth.identifier"),
        ({"threepid_creds": "x"}, "M_BAD_JSON", "auth.threepid_creds"),
        (
            {"identifier": {"type": "m.id.phone", "country": "GB", "phone": "1"}},
            "M_INVALID_PARAM",
            "number",
        ),
    ],
)
def test_auth_objects_that_would_crash_synapse(auth: Any, errcode: str, field: str) -> None:
    with pytest.raises(RequestError) as caught:
        check_uia_auth(auth)
    assert (caught.value.status, caught.value.errcode) == (400, errcode)
    assert field in caught.value.message
