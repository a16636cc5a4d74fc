"""Hostile input against a running Synapse with the module.

A generated-input run sends more than 10,000 requests with generated bodies, headers and
path values to the upload, admin, resync and remote device-list admin endpoints. No answer may be a 5xx; every answer
to a documented operation must be one that `docs/openapi.yaml` lists, with the documented
body; the server stays healthy; and a refused request changes no stored key and no admin
window. The named hostile inputs (oversized bodies, deep nesting, huge key maps, non-UTF-8,
duplicate JSON keys, ...) follow as tests of their own, and the last test
produces every answer the documentation lists, for real.

Why checking stored keys this way is sound: the run uses users whose keys it knows. A user
without keys may legitimately get their first keys, so theirs are read after every case, and
a 200 must have stored exactly the keys sent. A user with keys can have them changed only
through UIA, which the run cannot pass (it never sends a password), an admin window (never
opened for them) or as an application service (none): no case may change them, so a change
would still show at the next check, made after every 200, every 25 cases and at the end.
The user the admin cases open and close windows for has their window read after every
refused `POST` or `DELETE`.

The run is reproducible (Hypothesis derandomised, key pairs derived from fixed seeds).
`XSIGN_HOSTILE_SCALE=3` multiplies the number of cases for a deeper local run.
"""

from __future__ import annotations

import functools
import json
import os
import re
import string
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import attrs
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from unpaddedbase64 import encode_base64

from synapse_xsign_uia.body import MAX_BODY_BYTES, MAX_DEPTH
from synapse_xsign_uia.policy import KEY_FIELDS as FIELDS
from tests.conftest import ServerFactory
from tests.harness import openapi
from tests.harness.client import (
    QUERY_PATH,
    UPLOAD_PATH,
    CrossSigningKeys,
    SigningKeyPair,
    User,
    cross_signing_keys_in,
    register_user,
)
from tests.harness.federation import StaticFederationServer
from tests.harness.raw_http import ConnectionClosed, RawClient, RawResponse
from tests.harness.server import SynapseServer, free_port

pytestmark = pytest.mark.synapse

SCALE = float(os.environ.get("XSIGN_HOSTILE_SCALE", "1"))
CASES = {
    endpoint: max(1, round(count * SCALE))
    for endpoint, count in {
        "upload": 5200,
        "admin": 2600,
        "resync": 2600,
        "device_lists": 1300,
    }.items()
}
MINIMUM_TOTAL = round(10_000 * min(SCALE, 1.0))
# Stored keys of a user with keys are compared after every 200 and every this many cases.
CHECK_EVERY = 25
HEALTH_EVERY = 250

ADMIN_PREFIX = "/_synapse/admin/v1/users/"
ADMIN_SUFFIX = "/_allow_cross_signing_replacement_without_uia"
RESYNC_PREFIX = "/_matrix/unstable/org.matrix.mscXXXX/user/"
DEVICE_LISTS_PREFIX = "/_synapse/admin/v1/remote_device_lists/"
DEVICE_LIST_TEMPLATES = (
    openapi.DEVICE_LIST_USER,
    openapi.DEVICE_LIST_SERVER,
    openapi.DEVICE_LIST_REPAIR,
)
# Synapse serves the upload servlet under these prefixes.
UPLOAD_ROUTE = re.compile(r"^/_matrix/client/(v3|unstable)/keys/device_signing/upload$")
# FIELDS is the module's table, body field -> key type, under the name the generated tests
# use: Hypothesis derives a derandomised test's seed from its source text.
USAGES = tuple(FIELDS.values())
UPLOAD_PATH_VARIANTS = [
    "/_matrix/client/unstable/keys/device_signing/upload",
    "/_matrix/client/r0/keys/device_signing/upload",
    UPLOAD_PATH + "/",
    "/_matrix/client/v3/keys/device_signing/uploa%64",
]


# --- Key pairs from fixed seeds ---------------------------------------------------------

PAIRS = [SigningKeyPair(seed=f"xsign-hostile-{i}") for i in range(40)]
PAIR_BY_PUBLIC = {pair.public: pair for pair in PAIRS}


def fixed_keys(user_id: str, first: int) -> CrossSigningKeys:
    """Keys of `PAIRS[first]` (master), `PAIRS[first + 1]` and `PAIRS[first + 2]`."""
    return CrossSigningKeys(user_id, *PAIRS[first : first + 3])


# --- The deployment ---------------------------------------------------------------------

DEVICE_LIST = {"user_id": "@someone:remote", "stream_id": 1, "devices": []}
RESYNC_BURST = 50
RESYNC_CONFIG = {"rate_per_second": 1, "burst_count": RESYNC_BURST, "timeout": "5s"}


@attrs.define
class Principal:
    """A user whose stored keys the run knows: `stored` as `/keys/query` shows them."""

    user: User
    stored: dict[str, Any]


@attrs.define
class Deployment:
    server: SynapseServer
    client: RawClient
    admin: User
    plain: User
    guest_token: str
    window_user: User
    keyless_user: User
    device_list_remote: str
    failing_remote: str
    closed_remote: str
    keyed: list[Principal] = attrs.Factory(list)
    fresh: list[Principal] = attrs.Factory(list)
    window_ms: int | None = None
    window_user_keys: dict[str, Any] = attrs.Factory(dict)
    # UIA sessions from recent challenges, for `auth` objects that name a real one.
    sessions: list[str] = attrs.Factory(list)

    def register(self, *, admin: bool = False) -> User:
        return register_user(self.server.base_url, self.server.shared_secret, admin=admin)


def auth_header(token: str) -> tuple[str, bytes]:
    return ("Authorization", f"Bearer {token}".encode())


def send(
    dep: Deployment,
    method: str,
    target: str,
    token: str | None = None,
    body: bytes | Any = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> RawResponse:
    """One request; a body that is not bytes is sent as JSON."""
    all_headers = list(headers or [])
    if token is not None:
        all_headers.append(auth_header(token))
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
        all_headers.append(("Content-Type", b"application/json"))
    return dep.client.request(method, target, all_headers, body)


def stored_keys(dep: Deployment, user: User) -> dict[str, Any]:
    response = send(dep, "POST", QUERY_PATH, user.access_token, {"device_keys": {user.user_id: []}})
    assert response.status == 200, response.body
    return cross_signing_keys_in(response.json(), user.user_id)


def admin_path(user_id: str) -> str:
    return ADMIN_PREFIX + urllib.parse.quote(user_id, safe="") + ADMIN_SUFFIX


def resync_path(user_id: str) -> str:
    return RESYNC_PREFIX + urllib.parse.quote(user_id, safe="") + "/devices"


def window_of(dep: Deployment, user: User) -> int | None:
    response = send(dep, "GET", admin_path(user.user_id), dep.admin.access_token)
    assert response.status == 200, response.body
    value: int | None = response.json()["updatable_without_uia_before_ms"]
    return value


def assert_healthy(dep: Deployment) -> None:
    assert dep.server.process is not None and dep.server.process.poll() is None, (
        f"Synapse exited:\n{dep.server.tail()}"
    )
    response = dep.client.request("GET", "/health")
    assert (response.status, response.body) == (200, b"OK"), response


def guest_token(server: SynapseServer) -> str:
    response = requests.post(
        f"{server.base_url}/_matrix/client/v3/register",
        params={"kind": "guest"},
        json={},
        timeout=30,
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


def new_fresh(dep: Deployment) -> Principal:
    return Principal(dep.register(), {})


# The deployment the strategies below generate requests for, set by the `dep` fixture. They
# draw the same way whatever it holds (an index modulo a list's length, not an element of
# it): Hypothesis replays choices and requires that.
LIVE: list[Deployment] = []


@pytest.fixture(scope="module")
def dep(synapse_server: ServerFactory) -> Iterator[Deployment]:
    with (
        StaticFederationServer(200, DEVICE_LIST) as device_list_remote,
        StaticFederationServer(404) as failing_remote,
    ):
        closed_remote = f"localhost:{free_port()}"
        server = synapse_server(
            {"device_list_resync": RESYNC_CONFIG},
            extra_config={
                "allow_guest_access": True,
                # Only these servers may be asked for a device list: generated user IDs
                # must not make Synapse look names up on the network.
                "federation_domain_whitelist": [
                    device_list_remote.server_name,
                    failing_remote.server_name,
                    closed_remote,
                ],
                "ip_range_whitelist": ["127.0.0.0/8"],
                "federation_verify_certificates": False,
                # Synapse's own request limit becomes 200 * 64 KiB (about 13 MB).
                "max_upload_size": "1M",
            },
        )
        client = RawClient("127.0.0.1", server.port)
        deployment = Deployment(
            server=server,
            client=client,
            admin=register_user(server.base_url, server.shared_secret, admin=True),
            plain=register_user(server.base_url, server.shared_secret),
            guest_token=guest_token(server),
            window_user=register_user(server.base_url, server.shared_secret),
            keyless_user=register_user(server.base_url, server.shared_secret),
            device_list_remote=device_list_remote.server_name,
            failing_remote=failing_remote.server_name,
            closed_remote=closed_remote,
        )
        window_user = deployment.window_user
        window_keys = fixed_keys(window_user.user_id, 0).body()
        assert (
            send(deployment, "POST", UPLOAD_PATH, window_user.access_token, window_keys).status
            == 200
        )
        deployment.window_user_keys = stored_keys(deployment, window_user)
        # Users with keys: full sets, a master key alone, a master and self-signing key.
        for index, fields in enumerate(
            [FIELDS, FIELDS, FIELDS, FIELDS, ["master_key"], ["master_key", "self_signing_key"]]
        ):
            user = deployment.register()
            keys = fixed_keys(user.user_id, 3 * index + 3).body()
            body = {field: keys[field] for field in fields}
            assert send(deployment, "POST", UPLOAD_PATH, user.access_token, body).status == 200
            deployment.keyed.append(Principal(user, stored_keys(deployment, user)))
        deployment.fresh = [new_fresh(deployment) for _ in range(3)]
        LIVE[:] = [deployment]
        yield deployment
        LIVE.clear()
        client.close()


@attrs.define
class Tally:
    cases: Counter[str] = attrs.Factory(Counter)
    answers: Counter[tuple[str, int, str | None]] = attrs.Factory(Counter)
    started: dict[str, float] = attrs.Factory(dict)
    stopped: dict[str, float] = attrs.Factory(dict)

    def start(self, endpoint: str) -> None:
        self.started.setdefault(endpoint, time.monotonic())

    def stop(self, endpoint: str) -> None:
        self.stopped[endpoint] = time.monotonic()

    def seconds(self, endpoint: str) -> float:
        return self.stopped.get(endpoint, 0.0) - self.started.get(endpoint, 0.0)


@pytest.fixture(scope="module")
def tally() -> Tally:
    return Tally()


# --- Generated values -------------------------------------------------------------------

ODD_STRINGS = [
    "",
    " ",
    "\x00",
    "\u202e",
    "\ufeff",
    "\U0001f600",
    "a\u0301",
    "\uffff",
    "\U0010ffff",
    "@",
    ":",
    "ed25519:",
    "ed25519",
    "\\",
    '"',
    "%00",
    "%",
    "\n",
    "İ",
    "ß",
    "\ud800",
    "x\udfffy",
    "a" * 300,
]
# Lone surrogates ("\ud800") come from ODD_STRINGS only: they make a body fail early.
odd_text = st.one_of(st.sampled_from(ODD_STRINGS), st.text(st.characters(), max_size=12))
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    odd_text,
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(odd_text, children, max_size=4)
    ),
    max_leaves=8,
)

BOOLEANS = st.booleans()
T = TypeVar("T")


@functools.cache
def ints(low: int, high: int) -> st.SearchStrategy[int]:
    # Built once per range: Hypothesis validates every new strategy, which costs more
    # than the draw.
    return st.integers(low, high)


def position(draw: Draw, length: int) -> int:
    """A position in a text whose length depends on the users' stored keys: drawn as a
    fraction, so that the draw itself does not."""
    fraction: int = draw(ints(0, 9999))
    return fraction * length // 10000


def choose(draw: Draw, options: Sequence[T]) -> T:
    """One of `options`, by index: they need not be hashable, and the same draw picks
    the same position whatever the options are."""
    return options[draw(ints(0, len(options) - 1))]


# Text that json.dumps cannot produce, put in place of a sentinel string after encoding.
RAW_TEXT = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "1e-999",
    "1" + "0" * 5000,
    "123456789012345678901234567890",
    "-0",
    "1.5e300",
    '"\\ud800"',
    '"\\udc00\\ud800"',
    '"\\u0000"',
]
DEPTHS = [2, 10, MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, 100, 900, 1000, 5000, 30000]


@attrs.define
class Body:
    """A request body being built: a JSON value with sentinels for raw text."""

    value: Any
    raw: list[str] = attrs.Factory(list)

    def raw_value(self, text: str) -> str:
        self.raw.append(text)
        return f"\x00raw{len(self.raw) - 1}\x00"


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


Draw = Callable[[st.SearchStrategy[Any]], Any]
SIGNERS = ["valid"] * 4 + ["new", "stored", "self", "none"]
odd_usages = st.one_of(
    st.sampled_from(
        [[], ["master", "self_signing"], ["user_signing"], ["master", 1], "master", [None], USAGES]
    ),
    st.lists(odd_text, max_size=3),
)
field_lists = st.lists(st.sampled_from(list(FIELDS)), unique=True, max_size=3)


def key_objects(body: Body) -> list[dict[str, Any]]:
    if not isinstance(body.value, dict):
        return []
    return [
        value for field, value in body.value.items() if field in FIELDS and isinstance(value, dict)
    ]


def mutate(draw: Draw, body: Body, user_id: str, other_user_id: str) -> None:
    """One change to a body of real keys, chosen by `draw`."""
    objects = key_objects(body)
    top = body.value if isinstance(body.value, dict) else None
    operation = choose(
        draw,
        [
            "drop",
            "retype",
            "user_id",
            "usage",
            "keys",
            "signatures",
            "extra",
            "swap",
            "null",
            "top_extra",
            "huge",
            "deep",
            "raw_number",
        ],
    )
    if not objects or top is None:
        if top is not None:
            top[draw(odd_text)] = draw(json_values)
        return
    obj = choose(draw, objects)
    field = choose(draw, ["user_id", "usage", "keys", "signatures"])
    if operation == "drop":
        obj.pop(field, None)
    elif operation == "retype":
        obj[field] = draw(json_values)
    elif operation == "user_id":
        near = [other_user_id, user_id.upper(), user_id + " ", "", "\uff20" + user_id[1:]]
        obj["user_id"] = choose(draw, near) if draw(BOOLEANS) else draw(odd_text)
    elif operation == "usage":
        obj["usage"] = draw(odd_usages)
    elif operation == "keys":
        keys = obj.get("keys")
        pair = choose(draw, PAIRS)
        variant = draw(ints(0, 7))
        if variant == 0:
            obj["keys"] = {}
        elif variant == 1 and isinstance(keys, dict):
            keys[pair.key_id] = pair.public
        elif variant == 2:
            obj["keys"] = {f"curve25519:{pair.public}": pair.public}
        elif variant == 3:
            obj["keys"] = {pair.key_id: PAIRS[0].public}
        elif variant == 4:
            obj["keys"] = {"ed25519:!!!": "!!!"}
        elif variant == 5:
            short = encode_base64(b"\x01" * 31)
            obj["keys"] = {f"ed25519:{short}": short}
        elif variant == 6:
            obj["keys"] = {pair.key_id: draw(json_values)}
        else:
            obj["keys"] = {draw(odd_text): draw(odd_text)}
    elif operation == "signatures":
        variant = draw(ints(0, 5))
        signatures = obj.get("signatures")
        if variant == 0:
            obj.pop("signatures", None)
        elif variant == 1 and isinstance(signatures, dict):
            for by_key in signatures.values():
                for key_id, signature in by_key.items() if isinstance(by_key, dict) else ():
                    if isinstance(signature, str):
                        by_key[key_id] = signature[:-2] + "AA"
        elif variant == 2:
            signer = choose(draw, PAIRS)
            try:
                signed = signer.sign(user_id, {k: v for k, v in obj.items() if k != "signatures"})
            except (UnicodeEncodeError, ValueError):
                # Canonical JSON cannot encode what an earlier change put there.
                signed = {"signatures": {user_id: {signer.key_id: "A" * 86}}}
            obj["signatures"] = signed["signatures"]
        elif variant == 3:
            obj["signatures"] = {user_id: draw(json_values)}
        elif variant == 4:
            obj["signatures"] = draw(json_values)
        else:
            obj["signatures"] = {other_user_id: {"ed25519:x": "y"}}
    elif operation == "extra":
        obj[draw(odd_text)] = draw(json_values)
    elif operation == "swap":
        fields = [f for f in FIELDS if f in top]
        if len(fields) >= 2:
            first = fields.pop(draw(ints(0, len(fields) - 1)))
            second = choose(draw, fields)
            top[first], top[second] = top[second], top[first]
        else:
            top[choose(draw, list(FIELDS))] = obj
    elif operation == "null":
        top[choose(draw, list(FIELDS))] = None
    elif operation == "top_extra":
        top[draw(odd_text)] = draw(json_values)
    elif operation == "huge":
        size = choose(draw, [2, 10, 300, 1000, 3000])
        where = choose(draw, ["keys", "signatures", "top"])
        entries = {f"ed25519:{i:06d}": f"{i:06d}" for i in range(size)}
        if where == "keys":
            obj["keys"] = entries
        elif where == "signatures":
            obj["signatures"] = {f"@u{i}:localhost": {"ed25519:a": "b"} for i in range(size)}
        else:
            top.update(entries)
    elif operation == "deep":
        obj[choose(draw, ["x", field])] = body.raw_value(deep(choose(draw, DEPTHS)))
    else:
        obj[choose(draw, ["x", field])] = body.raw_value(choose(draw, RAW_TEXT))


def real_keys(draw: Draw, principal: Principal, other_user_id: str) -> Body:
    """Real keys for the principal: new ones, the stored ones, or a mix, then mutations."""
    user_id = principal.user.user_id
    stored_master = principal.stored.get("master")
    stored_pair = (
        PAIR_BY_PUBLIC.get(next(iter(stored_master["keys"].values()))) if stored_master else None
    )
    fields = draw(field_lists)
    # Every draw is made whatever the stored keys, for all three types: Hypothesis needs
    # the same choices to draw the same way, and a user's keys change during the run.
    use_stored = {key_type: draw(BOOLEANS) for key_type in USAGES}
    pairs = {key_type: choose(draw, PAIRS) for key_type in USAGES}
    signers = {key_type: choose(draw, SIGNERS) for key_type in USAGES}
    value: dict[str, Any] = {}
    for field in sorted(fields, key=lambda f: f != "master_key"):
        key_type = FIELDS[field]
        if use_stored[key_type] and key_type in principal.stored:
            value[field] = json.loads(json.dumps(principal.stored[key_type]))
            continue
        pair = pairs[key_type]
        key = pair.key_json(user_id, key_type)
        if key_type != "master":
            # The master key that makes the signature valid: the request's, else the stored.
            if "master_key" in value:
                master_public = next(iter(value["master_key"]["keys"].values()))
                valid = PAIR_BY_PUBLIC.get(master_public)
            else:
                valid = stored_pair
            signer = {
                "valid": valid,
                "new": pairs["master"],
                "stored": stored_pair,
                "self": pair,
                "none": None,
            }[signers[key_type]]
            if signer is not None:
                key = signer.sign(user_id, key)
        value[field] = key
    body = Body(value)
    for _ in range(choose(draw, [0, 0, 0, 1, 1, 2, 3])):
        mutate(draw, body, user_id, other_user_id)
    return body


key_like = st.fixed_dictionaries(
    {},
    optional={
        "user_id": odd_text | json_values,
        "usage": st.lists(st.sampled_from(USAGES) | odd_text, max_size=3) | json_values,
        "keys": st.dictionaries(odd_text, odd_text, max_size=3) | json_values,
        "signatures": st.dictionaries(
            odd_text, st.dictionaries(odd_text, odd_text, max_size=2), max_size=2
        )
        | json_values,
    },
)
key_like_bodies = st.dictionaries(
    st.sampled_from(list(FIELDS)) | odd_text, key_like | json_values, max_size=3
)
uia_auth = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(
                [
                    "m.login.password",
                    "m.login.dummy",
                    "m.login.sso",
                    "m.login.terms",
                    "m.login.email.identity",
                ]
            )
            | json_values,
            "session": odd_text | json_values,
            "identifier": st.fixed_dictionaries(
                {},
                optional={
                    "type": st.sampled_from(["m.id.user", "m.id.thirdparty", "m.id.phone"])
                    | json_values,
                    "user": odd_text | json_values,
                    "medium": st.sampled_from(["email", "msisdn"]) | json_values,
                    "address": odd_text,
                    "country": st.sampled_from(["GB", "US", "ZZ"]) | json_values,
                    "phone": odd_text | json_values,
                    "number": odd_text,
                },
            )
            | json_values,
            "password": odd_text | json_values,
            "user": odd_text | json_values,
            "threepid_creds": json_values,
        },
    ),
)

RAW_BODIES = [
    b"",
    b" ",
    b"{",
    b"}",
    b"{}",
    b"[]",
    b"null",
    b"0",
    b'"x"',
    b"\xff\xfe{}",
    b"\xef\xbb\xbf{}",
    b'{"master_key": {}, "master_key": 1}',
    b'{"a": NaN}',
    b'{"a": Infinity}',
    b'{"a": 1e999}',
    b'{"a": "\\ud800"}',
    b'{"a": "\xed\xa0\x80"}',
    b'{"a": "\xc3\x28"}',
    b"\x00",
    b'{"a":1}garbage',
    b"{'a': 1}",
    b'{"a": 01}',
    b'{"a": 1,}',
    b"\x1f\x8b\x08\x00",
    "{}".encode("utf-16"),
]


def serialize(draw: Draw, body: Body) -> bytes:
    """Encode a body, sometimes the way no careful client would."""
    ensure_ascii = draw(BOOLEANS)
    text = json.dumps(
        body.value,
        ensure_ascii=ensure_ascii,
        sort_keys=draw(BOOLEANS),
        indent=choose(draw, [None, None, 0, 2]),
    )
    for index, raw in enumerate(body.raw):
        text = text.replace(json.dumps(f"\x00raw{index}\x00"), raw)
    edit = choose(
        draw, ["none"] * 24 + ["duplicate", "nested_duplicate", "truncate", "append", "wrap", "bom"]
    )
    if edit == "duplicate" and text.startswith("{") and isinstance(body.value, dict) and body.value:
        name = choose(draw, sorted(body.value))
        text = "{" + json.dumps(name) + ": " + json.dumps(draw(json_scalars)) + ", " + text[1:]
    elif edit == "nested_duplicate" and '"user_id": ' in text:
        text = text.replace('"user_id": ', '"user_id": "@dup:localhost", "user_id": ', 1)
    elif edit == "truncate" and text:
        text = text[: position(draw, len(text))]
    elif edit == "append":
        text += choose(draw, ["x", ",", "}", " ", "\x00", "{}"])
    elif edit == "wrap":
        text = "[" + text + "]"
    elif edit == "bom":
        text = "\ufeff" + text
    encoding = choose(draw, ["utf-8"] * 30 + ["utf-16", "latin-1", "bad_byte"])
    if encoding == "utf-16":
        return text.encode("utf-16", errors="surrogatepass")
    if encoding == "latin-1":
        return text.encode("latin-1", errors="replace")
    data = text.encode("utf-8", errors="surrogatepass")
    if encoding == "bad_byte" and data:
        at = position(draw, len(data))
        data = data[:at] + b"\xff" + data[at + 1 :]
    return data


def upload_body(draw: Draw, principal: Principal | None, other_user_id: str) -> bytes:
    kind = choose(draw, ["keys"] * 6 + ["key_like"] * 2 + ["json", "raw"])
    if kind == "raw":
        return choose(draw, RAW_BODIES)
    if kind == "json":
        body = Body(draw(json_values))
    elif kind == "key_like":
        body = Body(draw(key_like_bodies))
    else:
        target = principal or Principal(User("", "@nobody:localhost", "", "", ""), {})
        body = real_keys(draw, target, other_user_id)
    if isinstance(body.value, dict) and draw(ints(0, 3)) == 0:
        auth = draw(uia_auth)
        reuse, index = draw(BOOLEANS), draw(ints(0, 99))
        sessions = LIVE[0].sessions
        if reuse and sessions and isinstance(auth, dict):
            auth["session"] = sessions[index % len(sessions)]
        body.value["auth"] = auth
    return serialize(draw, body)


CONTENT_TYPES = [
    b"application/json",
    b"application/json; charset=utf-8",
    b"application/json; charset=latin-1",
    b"text/plain",
    b"application/x-www-form-urlencoded",
    b"multipart/form-data; boundary=x",
    b"",
    b"\xff\xfe",
]
CONTENT_TYPE_CHOICES: list[bytes | None] = [None] * 6 + [b"application/json"] * 6
CONTENT_TYPE_CHOICES += CONTENT_TYPES
HEADER_NAMES = [
    "X-Junk",
    "Accept",
    "Accept-Encoding",
    "User-Agent",
    "X-Forwarded-For",
    "Origin",
    "Cookie",
]
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60
)


@attrs.frozen
class Request:
    method: str
    target: str
    headers: list[tuple[str, bytes]]
    body: bytes | None


def request_parts(draw: Draw, token: str | None) -> tuple[list[tuple[str, bytes]], str]:
    """Headers and a query string for a request on behalf of `token`'s user (or nobody):
    the token in every place and shape a client might put it, or none."""
    headers: list[tuple[str, bytes]] = []
    query = ""
    modes = ["none", "garbage", "huge", "basic", "empty"]
    if token is not None:
        modes = ["bearer"] * 30 + ["query", "both", "lower", "extra", "two_headers", *modes]
    mode = choose(draw, modes)
    if mode == "bearer" and token is not None:
        headers.append(auth_header(token))
    elif mode == "query" and token is not None:
        query = "access_token=" + urllib.parse.quote(token)
    elif mode == "both" and token is not None:
        headers.append(auth_header(token))
        query = "access_token=" + urllib.parse.quote(token)
    elif mode == "lower" and token is not None:
        headers.append(("Authorization", f"bearer {token}".encode()))
    elif mode == "extra" and token is not None:
        headers.append(("Authorization", f"Bearer {token} extra".encode()))
    elif mode == "two_headers" and token is not None:
        headers.extend([auth_header(token), auth_header(token)])
    elif mode == "garbage":
        headers.append(("Authorization", b"Bearer " + draw(header_text).encode("latin-1")))
    elif mode == "huge":
        headers.append(("Authorization", b"Bearer " + b"x" * choose(draw, [1000, 8000, 15000])))
    elif mode == "basic":
        headers.append(("Authorization", b"Basic dXNlcjpwYXNz"))
    elif mode == "empty":
        headers.append(("Authorization", b""))
    content_type = choose(draw, CONTENT_TYPE_CHOICES)
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    for _ in range(draw(ints(0, 2))):
        headers.append((choose(draw, HEADER_NAMES), draw(header_text).encode("latin-1")))
    if draw(ints(0, 20)) == 0:
        headers.append(("X-Filler", b"y" * choose(draw, [4000, 12000])))
    if draw(ints(0, 10)) == 0:
        junk = choose(draw, ["x=1", "x=%ff", "%zz", "a=b&a=c", "access_token=", "user_id=@a:b"])
        query = f"{query}&{junk}" if query else junk
    return headers, query


def with_query(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


def token_of(dep: Deployment, requester: str) -> str | None:
    """The access token of the admin, the plain user or a guest; none for "nobody"."""
    return {
        "admin": dep.admin.access_token,
        "plain": dep.plain.access_token,
        "guest": dep.guest_token,
    }.get(requester)


def drawn_request(
    draw: Draw, method: str, path: str, token: str | None, body: bytes | None
) -> Request:
    """A request to `path` with headers and a query string drawn for `token`'s user."""
    headers, query = request_parts(draw, token)
    return Request(method, with_query(path, query), headers, body)


# --- Path values ------------------------------------------------------------------------


def encode_segment(draw: Draw, value: str) -> str:
    """A path segment for `value`: percent-encoded in one of the ways clients do it, or
    not at all where HTTP allows. A lone surrogate goes out as the bytes UTF-8 would give
    it, which are not UTF-8."""
    mode = choose(draw, ["all", "all", "keep_at_colon", "raw", "double", "upper"])
    data = (value.upper() if mode == "upper" else value).encode("utf-8", "surrogatepass")
    if mode in ("all", "upper"):
        return urllib.parse.quote(data, safe="")
    if mode == "keep_at_colon":
        return urllib.parse.quote(data, safe="@:")
    if mode == "double":
        return urllib.parse.quote(urllib.parse.quote(data, safe=""), safe="")
    # Unencoded where legal in a path: keeps '/', which splits the segment.
    return urllib.parse.quote(data, safe="@:/!$&'()*+,;=~")


odd_user_ids = st.one_of(
    odd_text,
    st.builds("@{}:{}".format, odd_text, odd_text),
    st.sampled_from(
        [
            "alice",
            "@alice",
            "@:localhost",
            "@alice:",
            "@a:b:c",
            "@a:[::1",
            "@a:[::1]",
            "@a:1.2.3.4:99999",
            "@a:example.org",
            "@a:localhost/x",
            "@a\x00:localhost",
            "@" + "a" * 300 + ":localhost",
            "@" + "a" * 3000 + ":example.org",
            "..",
            "%",
            "%zz",
        ]
    ),
)


def encoded_bytes_segment(draw: Draw) -> str:
    """A percent-encoded segment that does not decode to UTF-8, or decodes to controls."""
    return str(
        choose(draw, ["%ff", "%ED%A0%80", "%40a%ff%3Alocalhost", "%00", "%40%00%3Ax", "%C0%80"])
    )


# --- Checking an answer -----------------------------------------------------------------


def check_answer(
    server: SynapseServer,
    tally: Tally,
    endpoint: str,
    template: str | None,
    request: Request,
    response: RawResponse,
) -> None:
    """No 5xx; an answer to a documented operation is documented, body and all."""
    described = (
        f"{request.method} {request.target[:300]!r} -> {response.status} {response.body[:300]!r}"
    )
    if response.status >= 500:
        # The traceback, while the server's directory is still there.
        raise AssertionError(f"{described}\n{server.tail(80)}")
    errcode = None
    if response.is_json_object():
        errcode = response.json().get("errcode")
    tally.cases[endpoint] += 1
    tally.answers[(endpoint, response.status, errcode)] += 1
    # HEAD answers have no body, nor have Synapse's answers to CORS preflight OPTIONS.
    if not response.is_json_object() and request.method not in ("HEAD", "OPTIONS"):
        # Twisted, Synapse's HTTP server, answers some requests itself before Synapse sees
        # them: a request line or headers over its 16 KiB limits (400), and a
        # multipart/form-data body, which it parses (415 on recent releases, 400 before).
        head = len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers)
        multipart = any(
            name == "Content-Type" and value.startswith(b"multipart/form-data")
            for name, value in request.headers
        )
        assert response.status in (400, 415) and (multipart or head > 15000), described
        return
    method = request.method.lower()
    if template is None or method not in openapi.load_spec()["paths"][template]:
        return
    errors = openapi.answer_errors(template, method, response.status, response.json())
    assert not errors, f"{described}: {errors}"


def run(dep: Deployment, request: Request) -> RawResponse:
    try:
        return dep.client.request(request.method, request.target, request.headers, request.body)
    except ConnectionClosed as e:
        raise AssertionError(
            f"{request.method} {request.target[:300]!r}: connection closed ({e})\n{dep.server.tail()}"
        ) from e


def periodic_health(dep: Deployment, tally: Tally, endpoint: str) -> None:
    if tally.cases[endpoint] % HEALTH_EVERY == 0:
        assert_healthy(dep)


SETTINGS = settings(
    # Shrinking replays cases against the live server; XSIGN_HOSTILE_SHRINK=0 reports the
    # first failure as found, sooner.
    phases=[Phase.explicit, Phase.generate]
    if os.environ.get("XSIGN_HOSTILE_SHRINK") == "0"
    else list(Phase),
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)


# --- The generated-input run ------------------------------------------------------------


@attrs.frozen
class UploadCase:
    principal: Principal | None
    request: Request
    path: str


@st.composite
def upload_cases(draw: Draw) -> UploadCase:
    dep = LIVE[0]
    who = choose(draw, ["keyed"] * 12 + ["fresh"] * 6 + ["nobody"])
    principal: Principal | None = None
    if who == "keyed":
        principal = dep.keyed[draw(ints(0, 999)) % len(dep.keyed)]
    elif who == "fresh":
        principal = dep.fresh[draw(ints(0, 999)) % len(dep.fresh)]
    others = [p.user.user_id for p in dep.keyed if p is not principal]
    body = upload_body(draw, principal, others[draw(ints(0, 999)) % len(others)])
    headers, query = request_parts(draw, principal.user.access_token if principal else None)
    path = choose(draw, [UPLOAD_PATH] * 24 + UPLOAD_PATH_VARIANTS)
    return UploadCase(principal, Request("POST", with_query(path, query), headers, body), path)


@settings(SETTINGS, max_examples=CASES["upload"])
@given(case=upload_cases())
def test_generated_upload_requests(dep: Deployment, tally: Tally, case: UploadCase) -> None:
    tally.start("upload")
    principal, request = case.principal, case.request
    response = run(dep, request)
    check_answer(
        dep.server,
        tally,
        "upload",
        openapi.UPLOAD if UPLOAD_ROUTE.match(case.path) else None,
        request,
        response,
    )
    if response.status == 401 and response.is_json_object() and "session" in response.json():
        dep.sessions = [*dep.sessions[-19:], response.json()["session"]]
    if principal is not None and principal in dep.fresh:
        actual = stored_keys(dep, principal.user)
        if actual:
            assert response.status == 200, f"refused, yet keys were stored: {actual}"
            assert request.body is not None
            sent = json.loads(request.body)
            expected = {
                key_type: sent[field]
                for field, key_type in FIELDS.items()
                if isinstance(sent.get(field), dict)
            }
            assert actual == expected
            # From now on its keys can change only through UIA, which the run cannot pass.
            dep.fresh.remove(principal)
            dep.keyed.append(Principal(principal.user, actual))
            dep.fresh.append(new_fresh(dep))
    elif principal is not None and (
        response.status == 200 or tally.cases["upload"] % CHECK_EVERY == 0
    ):
        assert stored_keys(dep, principal.user) == principal.stored, request
    periodic_health(dep, tally, "upload")
    tally.stop("upload")


DURATIONS = [
    0,
    1,
    -1,
    600000,
    86400000,
    86400001,
    2**53,
    2**64,
    1.5,
    1000.0,
    "1000",
    True,
    None,
    [],
    {},
]
durations = st.sampled_from(DURATIONS) | json_scalars
lowercase_words = st.text(string.ascii_lowercase, max_size=8)


def admin_user_segment(draw: Draw, dep: Deployment) -> tuple[str, bool]:
    """The `user_id` path value, and whether it names the user with the window."""
    choice = choose(
        draw,
        ["window"] * 4 + ["keyless", "admin", "plain", "missing", "remote", "odd", "odd", "bytes"],
    )
    if choice == "window":
        return encode_segment(draw, dep.window_user.user_id), True
    if choice == "keyless":
        return encode_segment(draw, dep.keyless_user.user_id), False
    if choice == "admin":
        return encode_segment(draw, dep.admin.user_id), False
    if choice == "plain":
        return encode_segment(draw, dep.plain.user_id), False
    if choice == "missing":
        return encode_segment(draw, "@nobody-" + draw(lowercase_words) + ":localhost"), False
    if choice == "remote":
        return encode_segment(
            draw, dep.window_user.user_id.replace("localhost", "example.org")
        ), False
    if choice == "bytes":
        return encoded_bytes_segment(draw), False
    return encode_segment(draw, draw(odd_user_ids)), False


@st.composite
def admin_requests(draw: Draw) -> Request:
    dep = LIVE[0]
    method = choose(
        draw, ["POST"] * 3 + ["GET"] * 2 + ["DELETE"] * 2 + ["PUT", "PATCH", "HEAD", "OPTIONS"]
    )
    token = token_of(dep, choose(draw, ["admin"] * 6 + ["plain", "guest", "nobody"]))
    segment, _ = admin_user_segment(draw, dep)
    shape = choose(draw, ["documented"] * 10 + ["trailing_slash", "extra", "empty"])
    if shape == "trailing_slash":
        path = ADMIN_PREFIX + segment + ADMIN_SUFFIX + "/"
    elif shape == "extra":
        path = ADMIN_PREFIX + segment + ADMIN_SUFFIX + "/x"
    elif shape == "empty":
        path = ADMIN_PREFIX + ADMIN_SUFFIX
    else:
        path = ADMIN_PREFIX + segment + ADMIN_SUFFIX
    body_kind = choose(draw, ["none", "empty", "object", "duration", "duration", "json", "keys"])
    body: bytes | None
    if body_kind == "none":
        body = None
    elif body_kind == "empty":
        body = b""
    elif body_kind == "object":
        body = b"{}"
    elif body_kind == "duration":
        value = draw(durations)
        extra = Body({"duration_ms": value})
        if draw(BOOLEANS):
            extra.value[draw(odd_text)] = draw(json_values)
        body = serialize(draw, extra)
    elif body_kind == "json":
        body = serialize(draw, Body(draw(json_values)))
    else:
        body = upload_body(draw, None, dep.plain.user_id)
    return drawn_request(draw, method, path, token, body)


@settings(SETTINGS, max_examples=CASES["admin"])
@given(request=admin_requests())
def test_generated_admin_requests(dep: Deployment, tally: Tally, request: Request) -> None:
    tally.start("admin")
    method = request.method
    path = request.target.split("?", 1)[0]
    response = run(dep, request)
    documented = openapi.template_regex(openapi.ADMIN_WINDOW).match(path) is not None
    check_answer(
        dep.server, tally, "admin", openapi.ADMIN_WINDOW if documented else None, request, response
    )
    if response.status == 200 and method == "POST" and documented:
        # Only the user with the window has a master key among the users named here.
        dep.window_ms = response.json()["updatable_without_uia_before_ms"]
    elif response.status == 200 and method == "DELETE" and documented:
        dep.window_ms = None
    elif method in ("POST", "DELETE", "PUT", "PATCH"):
        assert window_of(dep, dep.window_user) == dep.window_ms, request
    periodic_health(dep, tally, "admin")
    tally.stop("admin")


localparts = st.text(string.ascii_letters + string.digits + "._=-/+", min_size=1, max_size=10)


def resync_segment(draw: Draw, dep: Deployment) -> str:
    choice = choose(draw, ["listed"] * 3 + ["unlisted"] * 3 + ["local", "odd", "odd", "bytes"])
    local = draw(localparts)
    if choice == "listed":
        return encode_segment(draw, f"@{local}:{dep.device_list_remote}")
    if choice == "unlisted":
        server = choose(
            draw,
            [
                "example.org",
                "1.2.3.4:8448",
                "[::1]",
                "[2001:db8::1]:443",
                "a-b.c",
                "localhost:1",
                "xn--bcher-kva.example",
            ],
        )
        return encode_segment(draw, f"@{local}:{server}")
    if choice == "local":
        return encode_segment(draw, f"@{local}:localhost")
    if choice == "bytes":
        return encoded_bytes_segment(draw)
    return encode_segment(draw, draw(odd_user_ids))


@st.composite
def resync_requests(draw: Draw) -> Request:
    dep = LIVE[0]
    method = choose(draw, ["GET"] * 12 + ["HEAD", "POST", "PUT", "DELETE"])
    token = token_of(dep, choose(draw, ["admin"] * 4 + ["plain"] * 4 + ["guest", "nobody"]))
    segment = resync_segment(draw, dep)
    shape = choose(draw, ["documented"] * 10 + ["no_devices", "extra", "empty", "other"])
    path = {
        "documented": f"{RESYNC_PREFIX}{segment}/devices",
        "no_devices": f"{RESYNC_PREFIX}{segment}",
        "extra": f"{RESYNC_PREFIX}{segment}/devices/x",
        "empty": f"{RESYNC_PREFIX}/devices",
        "other": f"{RESYNC_PREFIX}{segment}/Devices",
    }[shape]
    body = None if draw(ints(0, 5)) else upload_body(draw, None, dep.plain.user_id)
    return drawn_request(draw, method, path, token, body)


@settings(SETTINGS, max_examples=CASES["resync"])
@given(request=resync_requests())
def test_generated_resync_requests(dep: Deployment, tally: Tally, request: Request) -> None:
    tally.start("resync")
    path = request.target.split("?", 1)[0]
    response = run(dep, request)
    documented = (
        openapi.template_regex(openapi.RESYNC).match(path) is not None and request.method == "GET"
    )
    check_answer(
        dep.server, tally, "resync", openapi.RESYNC if documented else None, request, response
    )
    periodic_health(dep, tally, "resync")
    tally.stop("resync")


def device_list_server_segment(draw: Draw, dep: Deployment) -> str:
    choice = choose(draw, ["tracked"] * 3 + ["failing", "unknown", "own", "odd", "odd", "bytes"])
    if choice == "bytes":
        return encoded_bytes_segment(draw)
    server = {
        "tracked": dep.device_list_remote,
        "failing": dep.failing_remote,
        "own": "localhost",
    }.get(choice)
    if server is None and choice == "unknown":
        server = choose(draw, ["example.org", "1.2.3.4:8448", "[::1]", "a-b.c", "localhost:1"])
    if server is None:
        server = draw(odd_text)
    return encode_segment(draw, server)


@st.composite
def device_list_admin_requests(draw: Draw) -> Request:
    dep = LIVE[0]
    kind = choose(draw, ["user", "server", "repair"])
    documented_method = "POST" if kind == "repair" else "GET"
    method = (
        documented_method
        if draw(ints(0, 3))
        else choose(draw, ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    )
    token = token_of(dep, choose(draw, ["admin"] * 6 + ["plain", "guest", "nobody"]))
    if kind == "user":
        documented = f"{DEVICE_LISTS_PREFIX}users/{resync_segment(draw, dep)}"
    else:
        documented = f"{DEVICE_LISTS_PREFIX}servers/{device_list_server_segment(draw, dep)}"
        if kind == "repair":
            documented += "/repair"
    shape = choose(draw, ["documented"] * 10 + ["trailing_slash", "extra", "empty"])
    path = {
        "documented": documented,
        "trailing_slash": documented + "/",
        "extra": documented + "/x",
        "empty": f"{DEVICE_LISTS_PREFIX}{kind}s/",
    }[shape]
    body_kind = choose(draw, ["none"] * 3 + ["empty", "object", "json", "keys"])
    body: bytes | None
    if body_kind == "none":
        body = None
    elif body_kind == "empty":
        body = b""
    elif body_kind == "object":
        body = b"{}"
    elif body_kind == "json":
        body = serialize(draw, Body(draw(json_values)))
    else:
        body = upload_body(draw, None, dep.plain.user_id)
    return drawn_request(draw, method, path, token, body)


@settings(SETTINGS, max_examples=CASES["device_lists"])
@given(request=device_list_admin_requests())
def test_generated_device_list_admin_requests(
    dep: Deployment, tally: Tally, request: Request
) -> None:
    tally.start("device_lists")
    path = request.target.split("?", 1)[0]
    response = run(dep, request)
    template = next(
        (t for t in DEVICE_LIST_TEMPLATES if openapi.template_regex(t).match(path)), None
    )
    check_answer(dep.server, tally, "device_lists", template, request, response)
    periodic_health(dep, tally, "device_lists")
    tally.stop("device_lists")


def test_generated_run_summary(
    dep: Deployment,
    tally: Tally,
    capsys: pytest.CaptureFixture[str],
    record_property: Callable[[str, object], None],
) -> None:
    """After the run: every user's keys as they were, the window as last set, the server
    healthy; then the number of cases, printed past pytest's capture."""
    if not tally.stopped:
        pytest.skip("the generated-input tests did not run")
    for principal in dep.keyed:
        assert stored_keys(dep, principal.user) == principal.stored, principal.user.user_id
    for principal in dep.fresh:
        assert stored_keys(dep, principal.user) == {}, principal.user.user_id
    for user in (dep.admin, dep.plain, dep.keyless_user):
        assert stored_keys(dep, user) == {}, user.user_id
    assert stored_keys(dep, dep.window_user) == dep.window_user_keys
    assert window_of(dep, dep.window_user) == dep.window_ms
    assert_healthy(dep)
    total = sum(tally.cases.values())
    lines = [
        f"hostile input: {total} generated cases tried "
        + ", ".join(
            f"{endpoint} {tally.cases[endpoint]} ({tally.seconds(endpoint):.0f}s)"
            for endpoint in CASES
        )
    ]
    for endpoint in CASES:
        answers = sorted(
            (
                (status, errcode or "-", count)
                for (e, status, errcode), count in tally.answers.items()
                if e == endpoint
            ),
        )
        lines.append(f"  {endpoint}: " + ", ".join(f"{s} {c}: {n}" for s, c, n in answers))
    report = "\n".join(lines)
    for endpoint in CASES:
        record_property(f"hostile_cases_{endpoint}", tally.cases[endpoint])
    with capsys.disabled():
        print(f"\n{report}")
    assert total >= MINIMUM_TOTAL, report
    assert all(tally.cases[e] >= CASES[e] for e in tally.stopped), report


# --- Named hostile inputs ---------------------------------------------------------------


@attrs.define
class Subjects:
    """A user without keys and one with keys, for checking that a refusal changes neither."""

    fresh: User
    keyed: User
    keyed_stored: dict[str, Any]


@pytest.fixture
def subjects(dep: Deployment) -> Subjects:
    fresh = dep.register()
    keyed = dep.register()
    keys = fixed_keys(keyed.user_id, 36).body()
    assert send(dep, "POST", UPLOAD_PATH, keyed.access_token, keys).status == 200
    return Subjects(fresh, keyed, stored_keys(dep, keyed))


JSON = [("Content-Type", b"application/json")]


def assert_refused(
    response: RawResponse,
    status: int,
    errcode: str,
    contains: str = "",
    template: str = openapi.UPLOAD,
    method: str = "post",
) -> None:
    assert response.status == status, response
    body = response.json()
    assert body["errcode"] == errcode, body
    assert contains in body["error"], body
    assert not openapi.answer_errors(template, method, status, body)


def refused_for_both(
    dep: Deployment,
    subjects: Subjects,
    make_body: Callable[[User], bytes],
    status: int,
    errcode: str,
    contains: str = "",
) -> None:
    """The upload is refused for a user without keys (where valid keys would be stored at
    once) and for one with keys, and neither's keys change."""
    for user, before in ((subjects.fresh, {}), (subjects.keyed, subjects.keyed_stored)):
        response = send(dep, "POST", UPLOAD_PATH, user.access_token, make_body(user), JSON)
        assert_refused(response, status, errcode, contains)
        assert stored_keys(dep, user) == before
    assert_healthy(dep)


def window_refused(
    dep: Deployment, subjects: Subjects, body: bytes, status: int, errcode: str, contains: str = ""
) -> None:
    """Opening a window for the user with keys with this body is refused, and their window
    stays as it was."""
    window = window_of(dep, subjects.keyed)
    response = send(dep, "POST", admin_path(subjects.keyed.user_id), dep.admin.access_token, body)
    assert_refused(response, status, errcode, contains, openapi.ADMIN_WINDOW)
    assert window_of(dep, subjects.keyed) == window


def new_keys(user: User) -> dict[str, Any]:
    return fixed_keys(user.user_id, 33).body()


def keys_with(user: User, field: str, extra: str, value_text: str) -> bytes:
    """New keys for `user`, with `extra` in the key `field` holding `value_text` as is."""
    body = new_keys(user)
    body[field][extra] = "\x00placeholder\x00"
    return json.dumps(body).replace(json.dumps("\x00placeholder\x00"), value_text).encode()


def test_body_larger_than_the_module_accepts_is_413(dep: Deployment, subjects: Subjects) -> None:
    def padded(user: User) -> bytes:
        return json.dumps({**new_keys(user), "padding": "x" * MAX_BODY_BYTES}).encode()

    refused_for_both(dep, subjects, padded, 413, "M_TOO_LARGE", str(MAX_BODY_BYTES))
    padded_window = json.dumps({"duration_ms": 1000, "padding": "x" * MAX_BODY_BYTES})
    window_refused(dep, subjects, padded_window.encode(), 413, "M_TOO_LARGE")


def test_body_larger_than_synapse_accepts_is_refused(dep: Deployment, subjects: Subjects) -> None:
    """Above Synapse's own request limit (about 13 MB with this server's configuration),
    Synapse stops reading before any resource, the module's included, sees the request:
    it resets the connection while the body arrives, or answers 413 when the whole body
    came in one piece (releases from late 2025). No key changes either way."""
    body = b'{"padding": "' + b"x" * (14 * 1024 * 1024) + b'"}'
    for user, before in ((subjects.fresh, {}), (subjects.keyed, subjects.keyed_stored)):
        client = RawClient("127.0.0.1", dep.server.port)
        try:
            response = client.request("POST", UPLOAD_PATH, [auth_header(user.access_token)], body)
        except ConnectionClosed:
            pass
        else:
            assert_refused(response, 413, "M_TOO_LARGE")
        finally:
            client.close()
        assert stored_keys(dep, user) == before
    assert_healthy(dep)


@pytest.mark.parametrize(
    ("body", "status", "errcode"),
    [
        # 200,000 bytes: over the size limit before anything parses it.
        (deep(100_000).encode(), 413, "M_TOO_LARGE"),
        # 60,000 bytes: Python's JSON decoder gives up (RecursionError) well before the end.
        (deep(30_000).encode(), 400, "M_BAD_JSON"),
        (deep(MAX_DEPTH + 1).encode(), 400, "M_BAD_JSON"),
    ],
    ids=["100k-nested-arrays", "30k-nested-arrays", "just-too-deep"],
)
def test_deeply_nested_body_is_refused(
    dep: Deployment, subjects: Subjects, body: bytes, status: int, errcode: str
) -> None:
    refused_for_both(dep, subjects, lambda user: body, status, errcode)
    response = send(dep, "POST", admin_path(subjects.keyed.user_id), dep.admin.access_token, body)
    assert_refused(response, status, errcode, template=openapi.ADMIN_WINDOW)


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, 900])
def test_deep_nesting_inside_a_key_is_refused(
    dep: Deployment, subjects: Subjects, depth: int
) -> None:
    """The body and the key are two levels, so MAX_DEPTH - 1 arrays inside are one too
    many. Before the strict reader, a key nested 900 deep was stored and served to every
    client that asked for the user's keys."""
    refused_for_both(
        dep,
        subjects,
        lambda user: keys_with(user, "master_key", "x", deep(depth)),
        400,
        "M_BAD_JSON",
        f"more than {MAX_DEPTH} deep",
    )


def test_nesting_up_to_the_limit_is_read(dep: Deployment, subjects: Subjects) -> None:
    """MAX_DEPTH levels are allowed: the admin API ignores unknown fields, so the answer is
    200."""
    path = admin_path(subjects.keyed.user_id)
    token = dep.admin.access_token
    inside = (
        json.dumps({"duration_ms": 60000, "x": None}).replace("null", deep(MAX_DEPTH - 1)).encode()
    )
    assert send(dep, "POST", path, token, inside, JSON).status == 200
    over = json.dumps({"duration_ms": 60000, "x": None}).replace("null", deep(MAX_DEPTH)).encode()
    assert_refused(
        send(dep, "POST", path, token, over, JSON), 400, "M_BAD_JSON", template=openapi.ADMIN_WINDOW
    )


@pytest.mark.parametrize(
    ("where", "size", "status", "errcode"),
    [
        ("keys", 50_000, 413, "M_TOO_LARGE"),
        ("signatures", 50_000, 413, "M_TOO_LARGE"),
        ("body", 50_000, 413, "M_TOO_LARGE"),
        ("keys", 1_000, 400, "M_INVALID_PARAM"),
    ],
)
def test_huge_key_maps_are_refused(
    dep: Deployment, subjects: Subjects, where: str, size: int, status: int, errcode: str
) -> None:
    def body(user: User) -> bytes:
        value = new_keys(user)
        if where == "keys":
            value["master_key"]["keys"] = {f"ed25519:{i:06d}": f"{i:06d}" for i in range(size)}
        elif where == "signatures":
            value["self_signing_key"]["signatures"] = {
                f"@u{i}:localhost": {"ed25519:a": "b"} for i in range(size)
            }
        else:
            value.update({f"field{i}": i for i in range(size)})
        return json.dumps(value).encode()

    refused_for_both(dep, subjects, body, status, errcode)


@pytest.mark.parametrize(
    "encode",
    [
        lambda text: text.replace('"master"]', '"master\xff"]').encode("latin-1"),
        lambda text: text.encode("utf-16"),
        lambda text: text.replace('"master"]', '"master\ud800"]').encode("utf-8", "surrogatepass"),
        lambda text: text.replace('"master"]', '"master"]\xc0\xaf').encode("latin-1"),
    ],
    ids=["latin-1", "utf-16", "cesu-surrogate", "overlong"],
)
def test_body_that_is_not_utf8_is_refused(
    dep: Deployment, subjects: Subjects, encode: Callable[[str], bytes]
) -> None:
    refused_for_both(
        dep,
        subjects,
        lambda user: encode(json.dumps(new_keys(user), ensure_ascii=False)),
        400,
        "M_NOT_JSON",
        "UTF-8",
    )


@pytest.mark.parametrize(
    ("duplicate", "name"),
    [
        (lambda text: '{"master_key": {}, ' + text[1:], "master_key"),
        # The same key twice, same value: still two meanings for a strict reader.
        (
            lambda text: text.replace('{"master_key": ', '{"master_key": 0, "master_key": ', 1),
            "master_key",
        ),
        (
            lambda text: text.replace('"user_id": ', '"user_id": "@x:localhost", "user_id": ', 1),
            "user_id",
        ),
        (lambda text: text.replace('"usage": ', '"usage": ["master"], "usage": ', 1), "usage"),
    ],
    ids=["master_key-twice", "master_key-twice-first-0", "user_id-twice", "usage-twice"],
)
def test_duplicate_json_keys_are_refused(
    dep: Deployment, subjects: Subjects, duplicate: Callable[[str], str], name: str
) -> None:
    refused_for_both(
        dep,
        subjects,
        lambda user: duplicate(json.dumps(new_keys(user))).encode(),
        400,
        "M_BAD_JSON",
        f"'{name}' twice",
    )
    twice = b'{"duration_ms": 1000, "duration_ms": 2000}'
    window_refused(dep, subjects, twice, 400, "M_BAD_JSON", "'duration_ms' twice")


@pytest.mark.parametrize(
    ("field", "literal", "errcode", "contains"),
    [
        ("master_key", "NaN", "M_NOT_JSON", "NaN"),
        ("master_key", "Infinity", "M_NOT_JSON", "Infinity"),
        ("master_key", "-Infinity", "M_NOT_JSON", "Infinity"),
        # A valid master key and a self-signing key holding 1e999: Synapse stored the master
        # key, then failed on the other with a 500, leaving half of the upload behind.
        ("self_signing_key", "1e999", "M_BAD_JSON", "out of range"),
        ("master_key", "-1e999", "M_BAD_JSON", "out of range"),
        ("master_key", "1" + "0" * 5000, "M_BAD_JSON", "digits"),
        ("master_key", '"\\ud800"', "M_BAD_JSON", "surrogate"),
        ("user_signing_key", '"a\\udfffb"', "M_BAD_JSON", "surrogate"),
    ],
)
def test_numbers_and_strings_json_cannot_carry_are_refused(
    dep: Deployment, subjects: Subjects, field: str, literal: str, errcode: str, contains: str
) -> None:
    refused_for_both(
        dep, subjects, lambda user: keys_with(user, field, "x", literal), 400, errcode, contains
    )


@pytest.mark.parametrize("body", [b"[]", b'"keys"', b"1", b"null", b"true", b"[{}]"])
def test_body_that_is_not_an_object_is_refused(
    dep: Deployment, subjects: Subjects, body: bytes
) -> None:
    refused_for_both(dep, subjects, lambda user: body, 400, "M_BAD_JSON", "must be a JSON object")
    response = send(dep, "POST", admin_path(subjects.keyed.user_id), dep.admin.access_token, body)
    assert_refused(response, 400, "M_BAD_JSON", template=openapi.ADMIN_WINDOW)


def test_empty_body(dep: Deployment, subjects: Subjects) -> None:
    """Not JSON for the upload; the admin API's body is optional, as in Synapse."""
    refused_for_both(dep, subjects, lambda user: b"", 400, "M_NOT_JSON", "empty")
    response = send(dep, "POST", admin_path(subjects.keyed.user_id), dep.admin.access_token, b"")
    assert response.status == 200, response


def test_null_signatures_are_refused(dep: Deployment, subjects: Subjects) -> None:
    """`"signatures": null` on a self-signing key made the signature check fail with a 500."""

    def body(user: User) -> bytes:
        value = new_keys(user)
        value["self_signing_key"]["signatures"] = None
        return json.dumps(value).encode()

    refused_for_both(dep, subjects, body, 400, "M_BAD_JSON", "self_signing_key.signatures")


@pytest.mark.parametrize(
    ("auth", "errcode"),
    [
        ({"identifier": {"type": "m.id.user", "user": 5}}, "M_BAD_JSON"),
        ({"identifier": ["type"]}, "M_BAD_JSON"),
        (
            {"identifier": {"type": "m.id.phone", "country": "GB", "phone": "7700900123"}},
            "M_INVALID_PARAM",
        ),
        (
            {"identifier": {"type": "m.id.thirdparty", "medium": ["email"], "address": "a@b"}},
            "M_BAD_JSON",
        ),
        ({"user": {"localpart": "a"}}, "M_BAD_JSON"),
        ({"session": {"id": "x"}}, "M_BAD_JSON"),
        ({"password": None}, "M_BAD_JSON"),
        ({"threepid_creds": "sid"}, "M_BAD_JSON"),
    ],
    ids=[
        "user-int",
        "identifier-list",
        "phone-without-number",
        "medium-list",
        "user-object",
        "session-object",
        "password-null",
        "threepid-creds-string",
    ],
)
def test_malformed_uia_auth_is_400_not_500(
    dep: Deployment, subjects: Subjects, auth: dict[str, Any], errcode: str
) -> None:
    """Synapse's own UIA handler fails with a 500 on each of these (1.98 to 1.163.2)."""
    user = subjects.keyed
    full_auth = {"type": "m.login.password", "password": "wrong", **auth}
    body = {**new_keys(user), "auth": full_auth}
    response = send(dep, "POST", UPLOAD_PATH, user.access_token, body)
    assert_refused(response, 400, errcode, "auth")
    assert stored_keys(dep, user) == subjects.keyed_stored


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ([("Authorization", b"Bearer \xe4\xf6")], ""),
        ([], "access_token=%ff%fe"),
        # Not a token Synapse knows, so it tries it as a guest macaroon, which fails with
        # struct.error, IndexError or a plain Exception that Synapse does not catch.
        ([("Authorization", b"Bearer MDAx")], ""),
        ([("Authorization", b"Bearer @")], ""),
        ([], "access_token=Aj2aoZA%3D"),
    ],
    ids=[
        "header-latin-1",
        "query-not-utf8",
        "macaroon-struct-error",
        "macaroon-index-error",
        "macaroon-exception",
    ],
)
def test_access_token_synapse_cannot_parse_is_401(
    dep: Deployment, headers: list[tuple[str, bytes]], query: str
) -> None:
    targets = [
        ("POST", UPLOAD_PATH, openapi.UPLOAD, "post"),
        ("GET", admin_path(dep.window_user.user_id), openapi.ADMIN_WINDOW, "get"),
        ("GET", resync_path(f"@a:{dep.device_list_remote}"), openapi.RESYNC, "get"),
    ]
    for method, path, template, documented_method in targets:
        response = dep.client.request(method, with_query(path, query), [*headers, *JSON], b"{}")
        assert_refused(
            response, 401, "M_UNKNOWN_TOKEN", template=template, method=documented_method
        )
    assert_healthy(dep)


# --- Every documented answer, for real --------------------------------------------------


def uia_session(dep: Deployment, user: User, path: str = UPLOAD_PATH) -> str:
    response = send(dep, "POST", path, user.access_token, new_keys(user))
    assert response.status == 401, response
    return str(response.json()["session"])


def keyed_user(dep: Deployment, first_pair: int = 0) -> User:
    user = dep.register()
    keys = fixed_keys(user.user_id, first_pair).body()
    assert send(dep, "POST", UPLOAD_PATH, user.access_token, keys).status == 200
    return user


def key_id_in_use(dep: Deployment) -> RawResponse:
    """A user who replaced their keys sends the old ones again: the old master key is one
    of their device IDs."""
    user = keyed_user(dep, 0)
    old = fixed_keys(user.user_id, 0).body()
    replacement = fixed_keys(user.user_id, 3).body()
    session = uia_session(dep, user)
    replacement["auth"] = user.password_auth(session)
    assert send(dep, "POST", UPLOAD_PATH, user.access_token, replacement).status == 200
    return send(dep, "POST", UPLOAD_PATH, user.access_token, old)


def session_for_another_path(dep: Deployment) -> RawResponse:
    user = keyed_user(dep)
    session = uia_session(dep, user, "/_matrix/client/unstable/keys/device_signing/upload")
    body = {**new_keys(user), "auth": user.password_auth(session)}
    return send(dep, "POST", UPLOAD_PATH, user.access_token, body)


def rate_limited(dep: Deployment) -> RawResponse:
    user = dep.register()
    for _ in range(RESYNC_BURST + 5):
        response = send(dep, "GET", resync_path(f"@b:{dep.device_list_remote}"), user.access_token)
        if response.status == 429:
            return response
    raise AssertionError("no 429 after the burst")


def fresh_token(dep: Deployment) -> str:
    return dep.register().access_token


def recipes(dep: Deployment) -> dict[openapi.Answer, Callable[[], RawResponse]]:
    """How to make the server give each documented answer."""
    up, adm, rs = openapi.UPLOAD, openapi.ADMIN_WINDOW, openapi.RESYNC

    def upload(body: Any, token: str | None = None, *, user: User | None = None) -> RawResponse:
        if token is None:
            user = user or dep.register()
            token = user.access_token
        return send(
            dep, "POST", UPLOAD_PATH, token, body, JSON if isinstance(body, bytes) else None
        )

    def fresh_upload(make: Callable[[User], Any]) -> Callable[[], RawResponse]:
        def run() -> RawResponse:
            user = dep.register()
            return upload(make(user), user=user)

        return run

    def keyed_upload(make: Callable[[User], Any]) -> Callable[[], RawResponse]:
        def run() -> RawResponse:
            user = keyed_user(dep)
            return upload(make(user), user=user)

        return run

    def wrong_user(user: User) -> dict[str, Any]:
        body = new_keys(user)
        body["master_key"]["user_id"] = "@someone-else:localhost"
        return body

    def bad_signature(user: User) -> dict[str, Any]:
        body = new_keys(user)
        body["self_signing_key"] = fixed_keys(user.user_id, 33).self_signing_key(PAIRS[39])
        return body

    def unknown_session(user: User) -> dict[str, Any]:
        return {**new_keys(user), "auth": {**user.password_auth("no-such-session")}}

    recipes: dict[openapi.Answer, Callable[[], RawResponse]] = {
        (up, "post", 200, None): fresh_upload(new_keys),
        (up, "post", 400, "M_NOT_JSON"): lambda: upload(b"{"),
        (up, "post", 400, "M_BAD_JSON"): lambda: upload(b"[]"),
        (up, "post", 400, "M_INVALID_PARAM"): fresh_upload(wrong_user),
        (up, "post", 400, "M_INVALID_SIGNATURE"): fresh_upload(bad_signature),
        (up, "post", 400, "M_MISSING_PARAM"): fresh_upload(
            lambda user: {"self_signing_key": new_keys(user)["self_signing_key"]}
        ),
        (up, "post", 400, "M_UNKNOWN"): keyed_upload(unknown_session),
        (up, "post", 401, None): keyed_upload(new_keys),
        (up, "post", 401, "M_MISSING_TOKEN"): lambda: dep.client.request(
            "POST", UPLOAD_PATH, JSON, b"{}"
        ),
        (up, "post", 401, "M_UNKNOWN_TOKEN"): lambda: upload({}, "not-a-token"),
        (up, "post", 403, "M_FORBIDDEN"): lambda: key_id_in_use(dep),
        (up, "post", 403, "M_GUEST_ACCESS_FORBIDDEN"): lambda: upload({}, dep.guest_token),
        (up, "post", 403, "M_UNKNOWN"): lambda: session_for_another_path(dep),
        (up, "post", 413, "M_TOO_LARGE"): lambda: upload(
            b'{"x": "' + b"x" * MAX_BODY_BYTES + b'"}'
        ),
        (rs, "get", 202, None): lambda: send(
            dep, "GET", resync_path(f"@c:{dep.device_list_remote}"), dep.admin.access_token
        ),
        (rs, "get", 400, "M_INVALID_PARAM"): lambda: send(
            dep, "GET", resync_path("@c:localhost"), dep.admin.access_token
        ),
        (rs, "get", 401, "M_MISSING_TOKEN"): lambda: send(
            dep, "GET", resync_path(f"@c:{dep.device_list_remote}")
        ),
        (rs, "get", 401, "M_UNKNOWN_TOKEN"): lambda: send(
            dep, "GET", resync_path(f"@c:{dep.device_list_remote}"), "not-a-token"
        ),
        (rs, "get", 403, "M_FORBIDDEN"): lambda: send(
            dep, "GET", resync_path(f"@c:{dep.device_list_remote}"), fresh_token(dep)
        ),
        (rs, "get", 403, "M_GUEST_ACCESS_FORBIDDEN"): lambda: send(
            dep, "GET", resync_path(f"@c:{dep.device_list_remote}"), dep.guest_token
        ),
        (rs, "get", 429, "M_LIMIT_EXCEEDED"): lambda: rate_limited(dep),
        (rs, "get", 502, "M_UNKNOWN"): lambda: send(
            dep, "GET", resync_path(f"@c:{dep.failing_remote}"), dep.admin.access_token
        ),
    }

    recipes.update(device_list_recipes(dep))

    def admin_call(
        verb: str, user_id: Callable[[], str], token: str | None
    ) -> Callable[[], RawResponse]:
        return lambda: send(dep, verb, admin_path(user_id()), token)

    window_user = dep.window_user.user_id
    for method in ("post", "get", "delete"):
        verb = method.upper()
        recipes.update(
            {
                (adm, method, 200, None): admin_call(
                    verb, lambda: keyed_user(dep).user_id, dep.admin.access_token
                ),
                (adm, method, 400, "M_INVALID_PARAM"): admin_call(
                    verb, lambda: "alice", dep.admin.access_token
                ),
                (adm, method, 401, "M_MISSING_TOKEN"): admin_call(verb, lambda: window_user, None),
                (adm, method, 401, "M_UNKNOWN_TOKEN"): admin_call(
                    verb, lambda: window_user, "not-a-token"
                ),
                (adm, method, 403, "M_FORBIDDEN"): admin_call(
                    verb, lambda: window_user, dep.plain.access_token
                ),
                (adm, method, 403, "M_GUEST_ACCESS_FORBIDDEN"): admin_call(
                    verb, lambda: window_user, dep.guest_token
                ),
                (adm, method, 404, "M_NOT_FOUND"): admin_call(
                    verb, lambda: "@nobody-at-all:localhost", dep.admin.access_token
                ),
            }
        )
    recipes.update(
        {
            (adm, "post", 400, "M_NOT_JSON"): lambda: send(
                dep, "POST", admin_path(dep.keyless_user.user_id), dep.admin.access_token, b"{"
            ),
            (adm, "post", 400, "M_BAD_JSON"): lambda: send(
                dep, "POST", admin_path(dep.keyless_user.user_id), dep.admin.access_token, b"[]"
            ),
            (adm, "post", 413, "M_TOO_LARGE"): lambda: send(
                dep,
                "POST",
                admin_path(dep.keyless_user.user_id),
                dep.admin.access_token,
                b'{"x": "' + b"x" * MAX_BODY_BYTES + b'"}',
            ),
        }
    )
    return recipes


def device_list_recipes(dep: Deployment) -> dict[openapi.Answer, Callable[[], RawResponse]]:
    """The remote device-list admin endpoints' answers. A remote user is tracked once the
    admin's resync has fetched their list."""
    user_t, server_t, repair_t = (
        openapi.DEVICE_LIST_USER,
        openapi.DEVICE_LIST_SERVER,
        openapi.DEVICE_LIST_REPAIR,
    )
    tracked = f"@tracked:{dep.device_list_remote}"
    quote = functools.partial(urllib.parse.quote, safe="")

    def fetched(then: Callable[[], RawResponse]) -> Callable[[], RawResponse]:
        def run() -> RawResponse:
            assert send(dep, "GET", resync_path(tracked), dep.admin.access_token).status == 202
            return then()

        return run

    def call(template: str, value: str, token: str | None, body: Any = None) -> RawResponse:
        name = "{userId}" if template == user_t else "{serverName}"
        method = "POST" if template == repair_t else "GET"
        return send(dep, method, template.replace(name, quote(value)), token, body)

    recipes: dict[openapi.Answer, Callable[[], RawResponse]] = {
        (user_t, "get", 200, None): fetched(lambda: call(user_t, tracked, dep.admin.access_token)),
        (user_t, "get", 404, "M_NOT_FOUND"): lambda: call(
            user_t, "@nobody:example.org", dep.admin.access_token
        ),
        (user_t, "get", 400, "M_INVALID_PARAM"): lambda: call(
            user_t, "alice", dep.admin.access_token
        ),
        (server_t, "get", 200, None): fetched(
            lambda: call(server_t, dep.device_list_remote, dep.admin.access_token)
        ),
        (repair_t, "post", 200, None): fetched(
            lambda: call(repair_t, dep.device_list_remote, dep.admin.access_token, {})
        ),
        (repair_t, "post", 400, "M_NOT_JSON"): lambda: call(
            repair_t, dep.device_list_remote, dep.admin.access_token, b"{"
        ),
        (repair_t, "post", 400, "M_BAD_JSON"): lambda: call(
            repair_t, dep.device_list_remote, dep.admin.access_token, b"[]"
        ),
        (repair_t, "post", 413, "M_TOO_LARGE"): lambda: call(
            repair_t,
            dep.device_list_remote,
            dep.admin.access_token,
            b'{"x": "' + b"x" * MAX_BODY_BYTES + b'"}',
        ),
    }
    for template, method in ((server_t, "get"), (repair_t, "post")):
        recipes.update(
            {
                (template, method, 400, "M_INVALID_PARAM"): functools.partial(
                    call, template, "bad server", dep.admin.access_token
                ),
                (template, method, 404, "M_NOT_FOUND"): functools.partial(
                    call, template, "example.org", dep.admin.access_token
                ),
            }
        )
    for template, method in ((user_t, "get"), (server_t, "get"), (repair_t, "post")):
        value = tracked if template == user_t else dep.device_list_remote
        recipes.update(
            {
                (template, method, 401, "M_MISSING_TOKEN"): functools.partial(
                    call, template, value, None
                ),
                (template, method, 401, "M_UNKNOWN_TOKEN"): functools.partial(
                    call, template, value, "not-a-token"
                ),
                (template, method, 403, "M_FORBIDDEN"): functools.partial(
                    call, template, value, dep.plain.access_token
                ),
                (template, method, 403, "M_GUEST_ACCESS_FORBIDDEN"): functools.partial(
                    call, template, value, dep.guest_token
                ),
            }
        )
    return recipes


def test_every_documented_answer_is_given(dep: Deployment) -> None:
    """docs/openapi.yaml lists exactly the answers these requests produce, and each real
    answer matches its documented schema. With the generated run, which checks every
    answer it gets against the same document, this keeps the two in sync both ways."""
    documented = openapi.documented_answers()
    recipe_book = recipes(dep)
    assert set(recipe_book) == documented, (
        f"documented, no recipe: {sorted(documented - set(recipe_book), key=str)}; "
        f"recipe, not documented: {sorted(set(recipe_book) - documented, key=str)}"
    )
    for (template, method, status, errcode), produce in sorted(recipe_book.items(), key=str):
        response = produce()
        described = f"{method.upper()} {template} {status} {errcode}: got {response}"
        assert response.status == status, described
        body = response.json()
        assert body.get("errcode") == errcode, described
        assert not openapi.answer_errors(template, method, status, body), described


def test_failed_fetch_reasons_are_documented(dep: Deployment) -> None:
    """The 502's reasons, from a server that answers 404 and from one that is down."""
    remote_error = send(dep, "GET", resync_path(f"@d:{dep.failing_remote}"), dep.admin.access_token)
    assert remote_error.status == 502, remote_error
    assert remote_error.json()["org.matrix.mscXXXX.reason"] == "remote_error"
    assert remote_error.json()["org.matrix.mscXXXX.remote_status"] == 404
    unreachable = send(dep, "GET", resync_path(f"@d:{dep.closed_remote}"), dep.admin.access_token)
    assert unreachable.status == 502, unreachable
    assert unreachable.json()["org.matrix.mscXXXX.reason"] in ("unreachable", "backoff")
    for response in (remote_error, unreachable):
        assert not openapi.answer_errors(openapi.RESYNC, "get", 502, response.json())
