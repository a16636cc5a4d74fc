"""A stand-in for the Matrix Authentication Service, for homeservers with delegated auth.

Synapse asks the authentication service two things while serving a client: what an access
token stands for (OAuth 2.0 token introspection, RFC 7662) and, to build its answer to an
identity reset, where the user's account page is (the server metadata document). This
serves both, for the tokens a test hands out, over plain HTTP on loopback:

- `GET /.well-known/openid-configuration`: the issuer, `account_management_uri` and the
  introspection endpoint (Synapse 1.98's experimental MSC3861 support finds it there).
- `POST /oauth2/introspect`: `{"active": true, "username", "scope", "device_id"}` for a
  token from `issue_token` (with Synapse's admin scope for an admin's token), `{"active": false}` for any other. Synapse authenticates itself
  with the shared secret (`Authorization: Bearer`, current releases) or with the client
  secret in the form (`client_secret_post`, MSC3861); a request with neither gets 401.
"""

from __future__ import annotations

import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from tests.harness.server import free_port

CLIENT_ID = "synapse"
STABLE_API_SCOPE = "urn:matrix:client:api:*"
STABLE_DEVICE_SCOPE = "urn:matrix:client:device:"
SYNAPSE_ADMIN_SCOPE = "urn:synapse:admin:*"
# Synapse 1.98 knows only the unstable (MSC2967) names; MAS grants both.
UNSTABLE_API_SCOPE = "urn:matrix:org.matrix.msc2967.client:api:*"
UNSTABLE_DEVICE_SCOPE = "urn:matrix:org.matrix.msc2967.client:device:"


class FakeMas:
    """Run with `start()` / `stop()` or as a context manager."""

    def __init__(self) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}/"
        self.account_management_uri = f"{self.issuer}account/"
        self.secret = secrets.token_hex(16)
        self.client_secret = secrets.token_hex(16)
        # access token -> (localpart, device ID, admin)
        self._tokens: dict[str, tuple[str, str, bool]] = {}
        self.introspections = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def issue_token(self, localpart: str, device_id: str, *, admin: bool = False) -> str:
        """A token for the user on the device; with `admin`, it carries Synapse's admin
        scope, which is how a server admin is recognised under delegated auth."""
        token = f"mas_{secrets.token_urlsafe(24)}"
        self._tokens[token] = (localpart, device_id, admin)
        return token

    def metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "account_management_uri": self.account_management_uri,
            "introspection_endpoint": f"{self.issuer}oauth2/introspect",
            "authorization_endpoint": f"{self.issuer}authorize",
            "token_endpoint": f"{self.issuer}oauth2/token",
            "jwks_uri": f"{self.issuer}oauth2/keys.json",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
        }

    def introspect(self, token: str) -> dict[str, Any]:
        self.introspections += 1
        found = self._tokens.get(token)
        if found is None:
            return {"active": False}
        localpart, device_id, admin = found
        scope = " ".join(
            (
                "openid",
                STABLE_API_SCOPE,
                UNSTABLE_API_SCOPE,
                f"{STABLE_DEVICE_SCOPE}{device_id}",
                f"{UNSTABLE_DEVICE_SCOPE}{device_id}",
            )
        )
        return {
            "active": True,
            "token_type": "access_token",
            "client_id": CLIENT_ID,
            "sub": f"sub_{localpart}",
            "username": localpart,
            "device_id": device_id,
            "scope": f"{scope} {SYNAPSE_ADMIN_SCOPE}" if admin else scope,
        }

    def _authenticated(self, headers: Any, form: dict[str, list[str]]) -> bool:
        if headers.get("Authorization") == f"Bearer {self.secret}":
            return True
        return form.get("client_secret") == [self.client_secret]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        mas = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    self._answer(200, mas.metadata())
                else:
                    self._answer(404, {"error": "not_found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                if self.path != "/oauth2/introspect":
                    self._answer(404, {"error": "not_found"})
                elif not mas._authenticated(self.headers, form):
                    self._answer(401, {"error": "invalid_client"})
                else:
                    self._answer(200, mas.introspect((form.get("token") or [""])[0]))

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def start(self) -> FakeMas:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeMas:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
