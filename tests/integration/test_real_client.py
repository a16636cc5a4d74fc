"""matrix-js-sdk, the client library of Element Web, with its Rust crypto, against Synapse
with the module. The SDK's own `bootstrapCrossSigning` sets up cross-signing on a fresh
account without UIA, is challenged when it resets the identity and gets through with the
password, and gets through without UIA inside an admin-granted window.

The client runs in Node.js (`tests/e2e/js/driver.mjs`, one process per scenario), installed
from the npm registry by `npm ci` once per checkout and lockfile. See docs/real-client.md."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

import attrs
import pytest

from tests.harness.client import UPLOAD_PATH, User, register_user
from tests.harness.server import SynapseServer

pytestmark = pytest.mark.synapse

JS_DIR = Path(__file__).resolve().parents[1] / "e2e" / "js"
DRIVER = JS_DIR / "driver.mjs"
MANIFESTS = (JS_DIR / "package.json", JS_DIR / "package-lock.json")
# Written after a successful `npm ci`: `npm ci` always starts by deleting node_modules,
# so a matching stamp means the installed tree is exactly what the manifests pin.
STAMP = JS_DIR / "node_modules" / ".xsign-installed-sha256"
CRYPTO_PACKAGE = "@matrix-org/matrix-sdk-crypto-wasm"
REQUIRE_ENV = "XSIGN_REQUIRE_REAL_CLIENT"
# The pinned matrix-js-sdk declares `engines: {node: ">=20"}`, and means it: on Node 18 it
# fails at once for want of the global Web Crypto API.
MIN_NODE_MAJOR = 20
INSTALL_HINT = (
    f"install Node.js {MIN_NODE_MAJOR} or later and npm (a distribution's own package may be "
    "older: Debian 12 ships Node.js 18); see docs/real-client.md"
)
NPM_CI_TIMEOUT = 600
DRIVER_TIMEOUT = 120


def unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{REQUIRE_ENV} is set but the real-client tests cannot run: {reason}")
    pytest.skip(reason)


def node_major(node: str) -> int | None:
    try:
        version = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.fullmatch(r"v(\d+)\..*", version)
    return int(match.group(1)) if match else None


@contextlib.contextmanager
def install_lock() -> Iterator[None]:
    """Serialises `npm ci` between test runs sharing this checkout (tox run in parallel).
    The lock file stays in the checkout (ignored by git), not in the machine's temp dir."""
    path = JS_DIR / ".npm-ci.lock"
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_installed(npm: str) -> None:
    wanted = hashlib.sha256(b"".join(path.read_bytes() for path in MANIFESTS)).hexdigest()
    with install_lock():
        if STAMP.exists() and STAMP.read_text().strip() == wanted:
            return
        try:
            result = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=JS_DIR,
                capture_output=True,
                text=True,
                timeout=NPM_CI_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            unavailable(f"`npm ci` in {JS_DIR} failed: {e}")
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            unavailable(f"`npm ci` in {JS_DIR} exited with {result.returncode}:\n{output}")
        STAMP.write_text(wanted + "\n")


@attrs.frozen
class RealClient:
    node: str

    def run(self, server: SynapseServer, user: User, scenario: str) -> dict[str, Any]:
        """One driver scenario for `user`, on a new device; the driver's JSON result."""
        env = {
            **os.environ,
            "XSIGN_HOMESERVER_URL": server.base_url,
            "XSIGN_USER_ID": user.user_id,
            "XSIGN_PASSWORD": user.password,
        }
        result = subprocess.run(
            [self.node, str(DRIVER), scenario],
            cwd=JS_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=DRIVER_TIMEOUT,
            check=False,
        )
        if result.returncode != 0 or not result.stdout.strip():
            stderr = "\n".join(result.stderr.splitlines()[-40:])
            pytest.fail(f"driver {scenario} exited with {result.returncode}:\n{stderr}")
        output: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        return output


@pytest.fixture(scope="module")
def real_client() -> RealClient:
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        missing = [name for name, path in (("node", node), ("npm", npm)) if path is None]
        unavailable(f"{' and '.join(missing)} not found on PATH; {INSTALL_HINT}")
    major = node_major(node)
    if major is None or major < MIN_NODE_MAJOR:
        found = "an unknown version" if major is None else f"Node.js {major}"
        unavailable(f"{node} is {found}; {INSTALL_HINT}")
    ensure_installed(npm)
    return RealClient(node)


def uploads(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The cross-signing uploads the SDK made, in order, as it sent and received them."""
    return [entry for entry in result["http"] if entry["path"] == UPLOAD_PATH]


def bootstrapped(real_client: RealClient, server: SynapseServer, user: User) -> str:
    """Sets up cross-signing with the SDK, as a fresh account does; the master key."""
    result = real_client.run(server, user, "bootstrap")
    assert result["bootstrap"]["ok"] is True, result
    master: str = user.stored_public_keys()["master"]
    assert master == result["cross_signing"]["local_master_key"]
    return master


def window_path(user: User) -> str:
    return (
        f"/_synapse/admin/v1/users/{quote(user.user_id, safe='')}"
        "/_allow_cross_signing_replacement_without_uia"
    )


def open_window(server: SynapseServer, user: User) -> None:
    admin = register_user(server.base_url, server.shared_secret, admin=True)
    response = admin.request("POST", window_path(user), {})
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["updatable_without_uia_before_ms"], int)


def window_is_open(server: SynapseServer, user: User) -> bool:
    admin = register_user(server.base_url, server.shared_secret, admin=True)
    response = admin.request("GET", window_path(user))
    assert response.status_code == 200, response.text
    return bool(response.json()["replaceable_without_uia"])


def assert_challenge(attempt: dict[str, Any]) -> str:
    """`makeRequest(null)` was refused with a UIA challenge offering the password; its
    session."""
    assert attempt["auth"] is None, attempt
    assert attempt["outcome"] == "error", attempt
    error = attempt["error"]
    assert error["http_status"] == 401, error
    stages = [stage for flow in error["flows"] for stage in flow["stages"]]
    assert "m.login.password" in stages, error
    session = error["session"]
    assert isinstance(session, str) and session, error
    return session


def test_fresh_account_bootstraps_without_uia(
    real_client: RealClient, server: SynapseServer
) -> None:
    user = register_user(server.base_url, server.shared_secret)
    assert user.stored_keys() == {}

    result = real_client.run(server, user, "bootstrap")

    pinned = json.loads((JS_DIR / "package.json").read_text())["dependencies"]
    assert result["sdk"]["matrix-js-sdk"] == pinned["matrix-js-sdk"]
    assert result["sdk"]["@matrix-org/matrix-sdk-crypto-wasm"] == pinned[CRYPTO_PACKAGE]
    assert result["bootstrap"]["ok"], result
    # The SDK asked for its UIA callback once, and the request without auth went through.
    assert result["callback_calls"] == 1
    assert result["attempts"] == [{"auth": None, "outcome": "ok", "response": {}}]
    [upload] = uploads(result)
    assert upload["status"] == 200
    assert upload["sent"]["auth"] is None
    assert set(upload["sent"]["keys"]) == {"master", "self_signing", "user_signing"}
    # The server holds exactly what the SDK generated, and the SDK trusts it.
    assert user.stored_public_keys() == upload["sent"]["keys"]
    assert result["cross_signing"]["local_master_key"] == upload["sent"]["keys"]["master"]
    assert result["cross_signing"]["server_has_keys"] is True
    assert result["cross_signing"]["ready"] is True
    assert result["cross_signing"]["device_cross_signed"] is True
    assert server.log_lines(f"user={user.user_id} rule=first_upload outcome=uploaded")


def test_reset_asks_for_uia_and_succeeds_with_the_password(
    real_client: RealClient, server: SynapseServer
) -> None:
    user = register_user(server.base_url, server.shared_secret)
    old_master = bootstrapped(real_client, server, user)

    result = real_client.run(server, user, "reset")

    assert result["bootstrap"]["ok"], result
    # One callback: the request without auth is challenged, the same callback answers the
    # challenge with the password in the session the server offered.
    assert result["callback_calls"] == 1
    challenged, answered = result["attempts"]
    session = assert_challenge(challenged)
    assert answered["outcome"] == "ok", answered
    assert answered["auth"] == {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user.user_id},
        "password": "<redacted>",
        "session": session,
    }
    first, second = uploads(result)
    assert (first["status"], second["status"]) == (401, 200)
    assert first["sent"]["auth"] is None
    assert first["received"]["session"] == session
    assert second["sent"]["auth"]["session"] == session
    assert first["sent"]["keys"] == second["sent"]["keys"]

    new_keys = second["sent"]["keys"]
    assert new_keys["master"] != old_master
    assert user.stored_public_keys() == new_keys
    assert result["cross_signing"]["local_master_key"] == new_keys["master"]
    assert result["cross_signing"]["ready"] is True
    assert server.log_lines(f"user={user.user_id} rule=uia outcome=uia_challenge")
    assert server.log_lines(f"user={user.user_id} rule=uia outcome=uploaded")


def test_admin_window_lets_the_reset_through_without_uia(
    real_client: RealClient, server: SynapseServer
) -> None:
    user = register_user(server.base_url, server.shared_secret)
    old_master = bootstrapped(real_client, server, user)

    # Without a window, a reset that cannot answer UIA is refused and changes nothing.
    refused = real_client.run(server, user, "reset-no-password")
    assert refused["bootstrap"]["ok"] is False, refused
    assert refused["callback_calls"] == 1
    [challenged] = refused["attempts"]
    assert_challenge(challenged)
    assert refused["bootstrap"]["error"]["http_status"] == 401
    assert user.stored_public_keys()["master"] == old_master

    open_window(server, user)
    result = real_client.run(server, user, "reset-no-password")

    assert result["bootstrap"]["ok"], result
    assert result["callback_calls"] == 1
    assert result["attempts"] == [{"auth": None, "outcome": "ok", "response": {}}]
    [upload] = uploads(result)
    assert upload["status"] == 200
    assert upload["sent"]["auth"] is None
    new_keys = upload["sent"]["keys"]
    assert new_keys["master"] != old_master
    assert user.stored_public_keys() == new_keys
    assert result["cross_signing"]["local_master_key"] == new_keys["master"]
    assert result["cross_signing"]["ready"] is True
    assert server.log_lines(f"user={user.user_id} rule=replacement_window outcome=uploaded")
    # The window belonged to the replaced key: the next reset needs UIA again.
    assert window_is_open(server, user) is False
