"""An HTTP/1.1 client that sends exactly the method, path, headers and body bytes it is
given, over one kept-alive connection: `requests` would re-quote paths, refuse some headers
and add its own."""

from __future__ import annotations

import http.client
import json
from typing import Any

import attrs


@attrs.frozen
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def is_json_object(self) -> bool:
        try:
            return isinstance(self.json(), dict)
        except ValueError:
            return False


class ConnectionClosed(Exception):
    """The server closed the connection without answering (Synapse 1.98 does so when a
    body is larger than its request limit)."""


class RawClient:
    def __init__(self, host: str, port: int, timeout: float = 60) -> None:
        self._host = host
        self._port = port
        self._timeout = timeout
        self._connection: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            self._connection = http.client.HTTPConnection(
                self._host, self._port, timeout=self._timeout
            )
        return self._connection

    def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, bytes]] | None = None,
        body: bytes | None = None,
    ) -> RawResponse:
        """Send one request. A kept-alive connection that the server closed in the
        meantime is opened again once; a connection closed while the request is sent or
        answered is `ConnectionClosed`."""
        for attempt in (1, 2):
            connection = self._connect()
            fresh = connection.sock is None
            try:
                connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                connection.putheader("Host", f"{self._host}:{self._port}")
                for name, value in headers or []:
                    connection.putheader(name, value)
                if body is not None:
                    connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body)
                response = connection.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionError) as e:
                self.close()
                if fresh or attempt == 2:
                    raise ConnectionClosed(str(e)) from e
                continue
            except Exception:
                self.close()
                raise
            if response.getheader("Connection", "").lower() == "close" or response.will_close:
                self.close()
            return RawResponse(
                response.status, {k.lower(): v for k, v in response.getheaders()}, data
            )
        raise AssertionError("unreachable")
