"""Checks of an upload request that need no database: shape, ownership, key IDs and
signatures. Everything here runs before any key is written, so a refused request changes
nothing. Pure code over plain data; errors carry the Matrix errcode to answer with."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64

from synapse_xsign_uia.policy import KEY_FIELDS, JsonKey

_FIELD_OF = {key_type: field for field, key_type in KEY_FIELDS.items()}

M_BAD_JSON = "M_BAD_JSON"
M_INVALID_PARAM = "M_INVALID_PARAM"
M_INVALID_SIGNATURE = "M_INVALID_SIGNATURE"
M_MISSING_PARAM = "M_MISSING_PARAM"
M_FORBIDDEN = "M_FORBIDDEN"

_ED25519_PUBLIC_KEY_BYTES = 32


class RequestError(Exception):
    """A client mistake, answered with `status` and a Matrix error body."""

    def __init__(self, status: int, errcode: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.errcode = errcode
        self.message = message


def _bad_json(message: str) -> RequestError:
    return RequestError(400, M_BAD_JSON, message)


def _invalid(message: str) -> RequestError:
    return RequestError(400, M_INVALID_PARAM, message)


def check_body_shape(body: Mapping[str, Any]) -> None:
    """Type checks of the fields the endpoint reads, before anything else looks at them."""
    for field in KEY_FIELDS:
        value = body.get(field)
        if value is not None and not isinstance(value, dict):
            raise _bad_json(f"'{field}' must be a JSON object")
    auth = body.get("auth")
    if auth is not None and not isinstance(auth, dict):
        raise _bad_json("'auth' must be a JSON object")


def public_key(key: JsonKey) -> str:
    """The unpadded-base64 public key of a key that passed `check_key`."""
    return str(next(iter(key["keys"].values())))


def check_key(key: JsonKey, key_type: str, user_id: str) -> None:
    """A cross-signing key must belong to the user, say what it is for, and hold exactly one
    ed25519 public key whose key ID names it."""
    field = _FIELD_OF[key_type]
    if key.get("user_id") != user_id:
        raise _invalid(f"'{field}.user_id' must be the user uploading the key ({user_id})")
    usage = key.get("usage")
    if not isinstance(usage, list) or not all(isinstance(u, str) for u in usage):
        raise _bad_json(f"'{field}.usage' must be a list of strings")
    if key_type not in usage:
        raise _invalid(f"'{field}.usage' must contain '{key_type}'")
    keys = key.get("keys")
    if not isinstance(keys, dict):
        raise _bad_json(f"'{field}.keys' must be a JSON object")
    if len(keys) != 1:
        raise _invalid(f"'{field}.keys' must hold exactly one key, not {len(keys)}")
    ((key_id, value),) = keys.items()
    if not isinstance(value, str):
        raise _bad_json(f"'{field}.keys' values must be strings")
    algorithm, _, version = key_id.partition(":")
    if algorithm != "ed25519":
        raise _invalid(f"'{field}' must be an ed25519 key, not {algorithm!r}")
    if version != value:
        raise _invalid(f"'{field}' key ID {key_id!r} does not match its public key")
    if not _is_ed25519_public_key(value):
        raise _invalid(f"'{field}' is not a valid ed25519 public key")
    signatures = key.get("signatures")
    # Present but null is refused too: the signature check would fail on it with a 500.
    if "signatures" in key and not (
        isinstance(signatures, dict)
        and all(
            isinstance(by_key, dict) and all(isinstance(sig, str) for sig in by_key.values())
            for by_key in signatures.values()
        )
    ):
        raise _bad_json(f"'{field}.signatures' must map user IDs to key IDs to signatures")


def _is_ed25519_public_key(value: str) -> bool:
    """Whether `value` decodes as Synapse decodes it (`signedjson`'s ed25519 verify key from
    unpadded base64) to a key: 32 bytes. Checked without building the key, which costs a
    call into libsodium per key on every request; signatures are checked with real keys."""
    try:
        return len(decode_base64(value)) == _ED25519_PUBLIC_KEY_BYTES
    except ValueError:  # not ASCII, or not base64
        return False


def _verify_key(key: JsonKey) -> Any:
    key_id, value = next(iter(key["keys"].items()))
    return decode_verify_key_bytes(key_id, decode_base64(value))


def check_keys(requested: Mapping[str, JsonKey], user_id: str) -> None:
    """Each key on its own, then no two keys of one request may share a public key (each
    takes the public key as a device ID)."""
    for key_type, key in requested.items():
        check_key(key, key_type, user_id)
    seen: dict[str, str] = {}
    for key_type, key in requested.items():
        pub = public_key(key)
        if pub in seen:
            raise _invalid(
                f"'{_FIELD_OF[key_type]}' and '{_FIELD_OF[seen[pub]]}' use the same public key"
            )
        seen[pub] = key_type


def check_signatures(
    requested: Mapping[str, JsonKey], stored: Mapping[str, JsonKey], user_id: str
) -> None:
    """The self-signing and user-signing keys must be signed by the master key of the request,
    or by the stored one when the request carries none."""
    master = requested.get("master") or stored.get("master")
    for key_type in ("self_signing", "user_signing"):
        if key_type not in requested:
            continue
        if master is None:
            raise RequestError(400, M_MISSING_PARAM, "No master key available")
        try:
            verify_signed_json(dict(requested[key_type]), user_id, _verify_key(master))
        except SignatureVerifyException as e:
            raise RequestError(
                400,
                M_INVALID_SIGNATURE,
                f"Invalid signature on '{_FIELD_OF[key_type]}': it must be signed by the master key",
            ) from e


def check_replacements(
    changed: Mapping[str, JsonKey], stored: Mapping[str, JsonKey], taken_ids: Collection[str]
) -> None:
    """Keys about to be written must not reuse a public key the user already has.

    A stored key cannot be rewritten with other signatures (new signatures go through
    /keys/signatures/upload), and a new key's public key must not be one of the user's
    device IDs, which include every cross-signing key they ever had.
    """
    for key_type, key in changed.items():
        pub = public_key(key)
        old = stored.get(key_type)
        if old is not None and public_key(old) == pub:
            raise _invalid(
                f"'{_FIELD_OF[key_type]}' has the public key of the stored {key_type} key but "
                "differs from it; upload new signatures with /keys/signatures/upload"
            )
        if pub in taken_ids:
            raise RequestError(403, M_FORBIDDEN, "Key ID in use")


WINDOW_DURATION_FIELD = "duration_ms"


def window_duration_ms(body: Mapping[str, Any], default_ms: int, max_ms: int) -> int:
    """The window length an admin's grant asks for: `duration_ms`, a positive integer of
    milliseconds up to `max_ms`, or `default_ms` when absent."""
    if WINDOW_DURATION_FIELD not in body:
        return default_ms
    value = body[WINDOW_DURATION_FIELD]
    # JSON `true` is a Python bool, which is an int; `1000.0` is a float, however whole.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= max_ms:
        raise _invalid(
            f"'{WINDOW_DURATION_FIELD}' must be a positive integer number of milliseconds, at "
            f"most max_replacement_window ({max_ms} ms); got {value!r}"
        )
    return value


# Fields of a UIA `auth` object that Synapse's UIA handler (1.98 to 1.163) uses as strings, or
# as objects of strings, without checking their type: anything else there is a `500`.
_AUTH_STRINGS = ("type", "session", "user", "medium", "address", "password", "response", "token")
_AUTH_OBJECTS_OF_STRINGS = ("identifier", "threepid_creds")


def check_uia_auth(auth: Any) -> None:
    """Checks of the `auth` object, made only when UIA is about to run: other rows ignore it."""
    if not isinstance(auth, dict):
        return
    for field in _AUTH_STRINGS:
        if field in auth and not isinstance(auth[field], str):
            raise _bad_json(f"'auth.{field}' must be a string")
    for field in _AUTH_OBJECTS_OF_STRINGS:
        value = auth.get(field)
        if value is not None and not (
            isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        ):
            raise _bad_json(f"'auth.{field}' must be a JSON object of strings")
    identifier = auth.get("identifier")
    if (
        isinstance(identifier, dict)
        and identifier.get("type") == "m.id.phone"
        and "number" not in identifier
    ):
        # Synapse reads `number` even when the spec's `phone` is there.
        raise _invalid("'auth.identifier' of type 'm.id.phone' must give the number in 'number'")
