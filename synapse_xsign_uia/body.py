"""Reading the JSON body of a request to one of the module's endpoints.

Stricter than Synapse's own reader, which keeps the last of two equal keys, turns `1e999`
into infinity and `"\\ud800"` into a string that is not Unicode (either fails with a `500`
when Synapse later encodes it: storing a key, checking a password), and accepts any nesting
that Python's recursion limit allows. A body the module acts on must mean one thing and be
storable, so each of these is refused with a `4xx` naming the problem, before anything
reads the body. Pure code over bytes: Synapse's errcodes, no Synapse import.
"""

from __future__ import annotations

import json
import math
import re
from typing import IO, Any, NoReturn

from synapse_xsign_uia.validation import M_BAD_JSON, RequestError

M_NOT_JSON = "M_NOT_JSON"
M_TOO_LARGE = "M_TOO_LARGE"

# A cross-signing upload with its UIA dict is a few kilobytes, and an admin request a few
# bytes: this leaves room for keys with hundreds of signatures. Matrix's largest event
# (a PDU) has the same limit.
MAX_BODY_BYTES = 65536
# Cross-signing keys nest four levels deep (body, key, signatures, user); far below the
# depth at which Python's recursion limit makes decoding or storing a body fail.
MAX_DEPTH = 32


class _Refused(Exception):
    """Carries a refusal out of the JSON decoder's hooks."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(error.message)
        self.error = error


def _bad_json(message: str) -> _Refused:
    return _Refused(RequestError(400, M_BAD_JSON, message))


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _bad_json(
                    f"The request body has the key {_shorten(key)!r} twice in one JSON "
                    "object; each key may appear once"
                )
            seen.add(key)
    return obj


def _constant(name: str) -> NoReturn:
    # Synapse's answer to these literals, with the reason.
    raise _Refused(
        RequestError(400, M_NOT_JSON, f"The request body is not valid JSON: {name} is not a number")
    )


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _bad_json(f"The number {_shorten(text)} in the request body is out of range")
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant, parse_float=_float)


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _too_deep() -> RequestError:
    return RequestError(
        400,
        M_BAD_JSON,
        f"The request body nests JSON arrays and objects more than {MAX_DEPTH} deep",
    )


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` deep (the body itself is level
    1). Iterative: a deep value must not exhaust the stack here either."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


# Only a `\\uD8xx`-`\\uDFxx` escape can put a surrogate into a string decoded from UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string, or object key, holds a surrogate that no pair made a character."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def parse_json_object(content: bytes, *, allow_empty_body: bool = False) -> dict[str, Any]:
    """The JSON object in `content`, or a `RequestError` saying why there is none.

    An empty body is `{}` when `allow_empty_body`, as with Synapse's reader.
    """
    if len(content) > MAX_BODY_BYTES:
        raise RequestError(
            413,
            M_TOO_LARGE,
            f"The request body is larger than the {MAX_BODY_BYTES} bytes this endpoint accepts",
        )
    if not content and allow_empty_body:
        return {}
    if not content:
        raise RequestError(400, M_NOT_JSON, "The request body is empty; expected a JSON object")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(
            400, M_NOT_JSON, f"The request body is not valid UTF-8 (byte {e.start})"
        ) from e
    try:
        value = _DECODER.decode(text)
    except _Refused as e:
        raise e.error from None
    except RecursionError:
        raise _too_deep() from None
    except json.JSONDecodeError as e:
        raise RequestError(400, M_NOT_JSON, f"The request body is not valid JSON: {e}") from None
    except ValueError:
        # Python refuses to read integers of more than 4300 digits.
        raise RequestError(
            400, M_BAD_JSON, "The request body holds a number with too many digits"
        ) from None
    if not isinstance(value, dict):
        raise RequestError(
            400, M_BAD_JSON, f"The request body must be a JSON object, not {_json_type(value)}"
        )
    # Nesting deeper than MAX_DEPTH needs more brackets than that: most bodies skip the walk.
    if text.count("{") + text.count("[") > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
        raise _too_deep()
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise RequestError(
            400,
            M_BAD_JSON,
            "The request body has a string with an unpaired UTF-16 surrogate escape "
            "(\\ud800 to \\udfff), which is not Unicode text",
        )
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def read_json_object(
    content: IO[bytes] | None, *, allow_empty_body: bool = False
) -> dict[str, Any]:
    """Read and parse a request body (Twisted's `request.content`) without loading more
    of an oversized one than the limit."""
    data = content.read(MAX_BODY_BYTES + 1) if content is not None else b""
    return parse_json_object(data, allow_empty_body=allow_empty_body)
