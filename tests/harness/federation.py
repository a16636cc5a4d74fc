"""Two Synapse homeservers on loopback that federate with each other over TLS.

What two loopback Synapses need to federate (the same on Synapse 1.98 and 1.163):

- Server names with an explicit port, `localhost:PORT`. A server name with a port is
  contacted on that port directly: no `.well-known` and no SRV look-up.
- A TLS listener serving the `federation` resource, which also serves the key API
  (`/_matrix/key/v2/server`), with a self-signed certificate for `localhost` and 127.0.0.1
  (`tls_certificate_path`, `tls_private_key_path`).
- `federation_verify_certificates: false`, since nothing signed those certificates.
- `ip_range_whitelist: [127.0.0.0/8]`: the default `ip_range_blacklist` covers loopback,
  and Synapse applies it to federation too; the whitelist takes precedence.
- `trusted_key_servers: []` (already in the base configuration): each server fetches the
  other's signing keys from the other itself instead of asking matrix.org.
- A short `federation.destination_min_retry_interval`, so that a server that was down is
  tried again within a test rather than after Synapse's default ten minutes.
- Presence off, so that servers exchange only what a test causes.

`send_federation=False` gives a server that answers federation requests but sends nothing
on its own (`federation_sender_instances: []`, no worker to take that role): its users'
device-list updates never reach the other server, which is how a stale remote device list
comes about in these tests.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import os
import shutil
import signal
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.harness.client import User, register_user
from tests.harness.parallel import run_parallel
from tests.harness.server import SynapseServer, free_port

CLIENT = "/_matrix/client/v3"
FEDERATION_DEVICES_PATH = "/_matrix/federation/v1/user/devices/"


def write_self_signed_certificate(
    directory: Path, hostname: str = "localhost"
) -> tuple[Path, Path]:
    """A certificate and key (PEM) for `hostname` and 127.0.0.1, valid from yesterday."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / "tls.crt"
    key_path = directory / "tls.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class FederatingSynapse(SynapseServer):
    """A homeserver named `localhost:FEDERATION_PORT` with a TLS federation listener next
    to the plain-HTTP client listener of `SynapseServer`.

    `restart()` brings it back on the same ports, directory and configuration.
    """

    def __init__(
        self,
        module_config: dict[str, Any] | None = None,
        *,
        with_module: bool = True,
        extra_config: dict[str, Any] | None = None,
        name: str = "synapse",
        send_federation: bool = True,
        min_retry_interval: str = "2s",
    ) -> None:
        super().__init__(
            module_config, with_module=with_module, extra_config=extra_config, name=name
        )
        self.federation_port = free_port()
        self.server_name = f"localhost:{self.federation_port}"
        self.send_federation = send_federation
        self.min_retry_interval = min_retry_interval
        self._config_path: Path | None = None
        self._paused = False

    def _federation_config(self, cert_path: Path, key_path: Path) -> dict[str, Any]:
        config: dict[str, Any] = {
            "tls_certificate_path": str(cert_path),
            "tls_private_key_path": str(key_path),
            "federation_verify_certificates": False,
            "ip_range_whitelist": ["127.0.0.0/8"],
            "federation": {"destination_min_retry_interval": self.min_retry_interval},
            "presence": {"enabled": False},
        }
        if not self.send_federation:
            config["federation_sender_instances"] = []
        return config

    def write_config(self) -> Path:
        if self._config_path is not None:
            # A restart: keep the secrets, certificate and everything else as they were.
            return self._config_path
        cert_path, key_path = write_self_signed_certificate(self.directory)
        self.extra_config = {**self._federation_config(cert_path, key_path), **self.extra_config}
        path = super().write_config()
        self.config["listeners"].append(
            {
                "port": self.federation_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": True,
                "x_forwarded": False,
                "resources": [{"names": ["federation"], "compress": False}],
            }
        )
        path.write_text(yaml.safe_dump(self.config))
        self._config_path = path
        return path

    def restart(self) -> None:
        self.stop(cleanup=False)
        self.start()

    def stop(self, cleanup: bool = True) -> None:
        # A stopped (SIGSTOP) process would not act on SIGTERM.
        self.resume()
        super().stop(cleanup=cleanup)

    def pause(self) -> None:
        """Freeze the process: the kernel still accepts connections, nothing answers."""
        if self.process is not None and not self._paused:
            os.kill(self.process.pid, signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self.process is not None and self._paused:
            os.kill(self.process.pid, signal.SIGCONT)
        self._paused = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def count_requests(self, *fragments: str) -> int:
        """How many requests this server finished whose access-log line holds every one of
        `fragments`."""
        return len(
            [
                line
                for line in self.log_lines("Processed request")
                if all(fragment in line for fragment in fragments)
            ]
        )

    def device_list_queries(self, user_id: str) -> int:
        """Federation requests this server answered for `user_id`'s device list."""
        quoted = urllib.parse.quote(user_id, safe="")
        return self.count_requests(f"GET {FEDERATION_DEVICES_PATH}{quoted}")


@attrs.define
class Pair:
    """A homeserver with the module and a remote one it federates with."""

    local: FederatingSynapse
    remote: FederatingSynapse

    def local_user(self, *, admin: bool = False) -> User:
        return register_user(self.local.base_url, self.local.shared_secret, admin=admin)

    def remote_user(self) -> User:
        return register_user(self.remote.base_url, self.remote.shared_secret)


def start_all(*servers: SynapseServer) -> None:
    """Start the servers side by side (each takes a few seconds)."""
    try:
        run_parallel([server.start for server in servers])
    except BaseException:
        for server in servers:
            server.stop()
        raise


def share_room(host_user: User, host: SynapseServer, *guests: User, timeout: float = 60) -> str:
    """`host_user` creates a public room on `host`; each guest, on another server, joins it
    over federation. Returns once each guest's server sees `host_user` in the room."""
    response = host_user.request("POST", f"{CLIENT}/createRoom", {"preset": "public_chat"})
    response.raise_for_status()
    room_id = str(response.json()["room_id"])
    for guest in guests:
        join_room(guest, room_id, host, host_user.user_id, timeout)
    return room_id


def join_room(
    guest: User, room_id: str, host: SynapseServer, host_user_id: str, timeout: float = 60
) -> None:
    """`guest` joins a public room on `host` over federation."""
    join = guest.request(
        "POST",
        f"{CLIENT}/join/{urllib.parse.quote(room_id)}",
        {},
        params={"server_name": host.server_name},
    )
    join.raise_for_status()
    wait_for_member(guest, room_id, host_user_id, timeout)


def wait_for_member(user: User, room_id: str, member: str, timeout: float = 60) -> None:
    """Wait until `user`'s server lists `member` among the room's joined members (a join
    over federation may start with partial state)."""
    deadline = time.monotonic() + timeout
    path = f"{CLIENT}/rooms/{urllib.parse.quote(room_id)}/joined_members"
    while True:
        response = user.request("GET", path, timeout=timeout)
        if response.status_code == 200 and member in response.json().get("joined", {}):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{member} never appeared in {room_id}: {response.text}")
        time.sleep(0.2)


def sync(user: User, since: str | None = None, timeout_ms: int = 0) -> dict[str, Any]:
    params: dict[str, Any] = {"timeout": timeout_ms}
    if since is not None:
        params["since"] = since
    response = user.request("GET", f"{CLIENT}/sync", params=params, timeout=timeout_ms / 1000 + 30)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def wait_for_device_list_change(
    user: User, since: str, changed_user: str, timeout: float
) -> tuple[bool, str]:
    """Long-poll `/sync` from `since` until `device_lists.changed` holds `changed_user`.
    Returns whether it did within `timeout`, and the latest sync token."""
    deadline = time.monotonic() + timeout
    token = since
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, token
        body = sync(user, token, timeout_ms=int(min(remaining, 10) * 1000))
        token = str(body["next_batch"])
        if changed_user in body.get("device_lists", {}).get("changed", []):
            return True, token


def device_list(user_id: str, device_id: str) -> dict[str, Any]:
    """A remote server's answer to `GET /_matrix/federation/v1/user/devices/{userId}`."""
    keys = {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {f"ed25519:{device_id}": "x" * 43, f"curve25519:{device_id}": "y" * 43},
        "signatures": {},
    }
    return {
        "user_id": user_id,
        "stream_id": 7,
        "devices": [{"device_id": device_id, "keys": keys}],
    }


class StaticFederationServer:
    """A TLS server that answers every GET with the same status and JSON body: a remote
    homeserver that is up but will not send a device list, or one that always sends the
    same list. `requests` counts the GETs it received, each as it arrives.

    With a `delay` (seconds) it waits that long before answering each GET, so that requests
    made meanwhile meet a fetch still in flight.
    """

    def __init__(
        self, status: int, body: dict[str, Any] | None = None, *, delay: float = 0
    ) -> None:
        self.status = status
        self.body = body if body is not None else {"errcode": "M_UNRECOGNIZED", "error": "test"}
        self.delay = delay
        self._requests = 0
        # One handler thread per connection: concurrent fetches must not lose a count.
        self._lock = threading.Lock()
        self._directory = Path(tempfile.mkdtemp(prefix="xsign-static-"))
        cert_path, key_path = write_self_signed_certificate(self._directory)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer._lock:
                    outer._requests += 1
                if outer.delay > 0:
                    time.sleep(outer.delay)
                body = json.dumps(outer.body).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.server_name = f"localhost:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    def __enter__(self) -> StaticFederationServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        shutil.rmtree(self._directory, ignore_errors=True)
