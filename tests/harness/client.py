"""A small Matrix client for the tests: users registered with the shared-secret admin API,
real cross-signing keys signed with `signedjson`, and the password UIA stage."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

import attrs
import requests
from signedjson.key import decode_signing_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from unpaddedbase64 import encode_base64

UPLOAD_PATH = "/_matrix/client/v3/keys/device_signing/upload"
QUERY_PATH = "/_matrix/client/v3/keys/query"


class SigningKeyPair:
    """An ed25519 key pair whose public key is its key ID, as cross-signing keys are.

    A new random pair, or with `seed` the pair derived from it (its SHA-256 is the ed25519
    seed): the same seed gives the same pair on every run, for reproducible tests.
    """

    def __init__(self, seed: str | None = None) -> None:
        if seed is None:
            self.signing_key = generate_signing_key("tmp")
        else:
            secret = encode_base64(hashlib.sha256(seed.encode()).digest())
            self.signing_key = decode_signing_key_base64("ed25519", "tmp", secret)
        self.public = encode_base64(get_verify_key(self.signing_key).encode())
        # signedjson names signatures "ed25519:<version>": the version is the public key.
        self.signing_key.version = self.public
        self.key_id = f"ed25519:{self.public}"

    def key_json(self, user_id: str, usage: str) -> dict[str, Any]:
        return {"user_id": user_id, "usage": [usage], "keys": {self.key_id: self.public}}

    def sign(self, user_id: str, obj: dict[str, Any]) -> dict[str, Any]:
        return sign_json(obj, user_id, self.signing_key)  # type: ignore[no-any-return]


@attrs.define
class CrossSigningKeys:
    """A master key and the self-signing and user-signing keys it signs."""

    user_id: str
    master: SigningKeyPair = attrs.field(factory=SigningKeyPair)
    self_signing: SigningKeyPair = attrs.field(factory=SigningKeyPair)
    user_signing: SigningKeyPair = attrs.field(factory=SigningKeyPair)

    def master_key(self) -> dict[str, Any]:
        return self.master.key_json(self.user_id, "master")

    def self_signing_key(self, signer: SigningKeyPair | None = None) -> dict[str, Any]:
        return (signer or self.master).sign(
            self.user_id, self.self_signing.key_json(self.user_id, "self_signing")
        )

    def user_signing_key(self, signer: SigningKeyPair | None = None) -> dict[str, Any]:
        return (signer or self.master).sign(
            self.user_id, self.user_signing.key_json(self.user_id, "user_signing")
        )

    def body(self, *, master: bool = True, ssk: bool = True, usk: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if master:
            body["master_key"] = self.master_key()
        if ssk:
            body["self_signing_key"] = self.self_signing_key()
        if usk:
            body["user_signing_key"] = self.user_signing_key()
        return body


def cross_signing_keys_in(query_result: dict[str, Any], user_id: str) -> dict[str, Any]:
    """A user's cross-signing keys in a `/keys/query` answer, by key type."""
    found: dict[str, Any] = {}
    for field, key_type in (
        ("master_keys", "master"),
        ("self_signing_keys", "self_signing"),
        ("user_signing_keys", "user_signing"),
    ):
        key = query_result.get(field, {}).get(user_id)
        if key is not None:
            found[key_type] = key
    return found


@attrs.define
class User:
    base_url: str
    user_id: str
    access_token: str
    device_id: str
    password: str
    session: requests.Session = attrs.field(factory=requests.Session, repr=False)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}

    def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        return self.session.request(
            method,
            f"{self.base_url}{path}",
            json=body,
            headers=self._headers(),
            timeout=kwargs.pop("timeout", 60),
            **kwargs,
        )

    def keys(self) -> CrossSigningKeys:
        return CrossSigningKeys(self.user_id)

    def upload(self, body: dict[str, Any]) -> requests.Response:
        return self.request("POST", UPLOAD_PATH, body)

    def password_auth(self, session: str | None) -> dict[str, Any]:
        auth: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": self.user_id},
            "password": self.password,
        }
        if session is not None:
            auth["session"] = session
        return auth

    def upload_with_uia(self, body: dict[str, Any]) -> requests.Response:
        """Upload; if challenged, complete the password stage in the offered session."""
        first = self.upload(body)
        if first.status_code != 401:
            return first
        session = first.json()["session"]
        return self.upload({**body, "auth": self.password_auth(session)})

    def stored_keys(self) -> dict[str, Any]:
        """The user's cross-signing keys as `/keys/query` returns them, by key type."""
        response = self.request("POST", QUERY_PATH, {"device_keys": {self.user_id: []}})
        response.raise_for_status()
        return cross_signing_keys_in(response.json(), self.user_id)

    def stored_public_keys(self) -> dict[str, str]:
        return {
            key_type: next(iter(key["keys"].values()))
            for key_type, key in self.stored_keys().items()
        }


def register_user(
    base_url: str,
    shared_secret: str,
    *,
    admin: bool = False,
    localpart: str | None = None,
    password: str | None = None,
) -> User:
    """Register through `/_synapse/admin/v1/register` with the shared secret."""
    localpart = localpart or f"u{secrets.token_hex(6)}"
    password = password or secrets.token_urlsafe(12)
    url = f"{base_url}/_synapse/admin/v1/register"
    nonce = requests.get(url, timeout=30).json()["nonce"]
    mac = hmac.new(shared_secret.encode(), digestmod=hashlib.sha1)
    mac.update(b"\x00".join(p.encode() for p in (nonce, localpart, password)))
    mac.update(b"\x00admin" if admin else b"\x00notadmin")
    response = requests.post(
        url,
        json={
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        },
        timeout=30,
    )
    response.raise_for_status()
    data = response.json()
    return User(
        base_url=base_url,
        user_id=data["user_id"],
        access_token=data["access_token"],
        device_id=data["device_id"],
        password=password,
    )
