"""Start a real Synapse homeserver from the installed `matrix-synapse` package.

Each `SynapseServer` gets its own directory with a generated `homeserver.yaml`, a SQLite
database, a signing key and a log file, and listens on a free loopback port.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
import yaml
from signedjson.key import generate_signing_key, write_signing_keys

MODULE = "synapse_xsign_uia.CrossSigningUIAModule"

_LENIENT_RATE = {"per_second": 10000, "burst_count": 10000}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_log_config(path: Path, log_file: Path) -> Path:
    """A Python logging configuration that sends Synapse's INFO lines to `log_file`."""
    path.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "formatters": {
                    "precise": {
                        "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                        "%(request)s - %(message)s"
                    }
                },
                "filters": {"context": {"()": "synapse.logging.context.LoggingContextFilter"}},
                "handlers": {
                    "file": {
                        "class": "logging.FileHandler",
                        "formatter": "precise",
                        "filename": str(log_file),
                        "filters": ["context"],
                        "encoding": "utf8",
                    }
                },
                "loggers": {"synapse.storage.SQL": {"level": "WARNING"}},
                "root": {"level": "INFO", "handlers": ["file"]},
                "disable_existing_loggers": False,
            }
        )
    )
    return path


def base_config(directory: Path, port: int, server_name: str) -> dict[str, Any]:
    """A small homeserver: SQLite, one client listener on loopback, no rate limits that a
    test could trip, cheap password hashing."""
    log_config = write_log_config(directory / "log.yaml", directory / "homeserver.log")
    rate_limits = {
        name: _LENIENT_RATE
        for name in (
            "rc_message",
            "rc_registration",
            "rc_admin_redaction",
            "rc_key_requests",
            "rc_3pid_validation",
        )
    }
    return {
        "server_name": server_name,
        "public_baseurl": f"http://127.0.0.1:{port}/",
        "pid_file": str(directory / "homeserver.pid"),
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {
            "name": "sqlite3",
            "args": {"database": str(directory / "homeserver.db")},
        },
        "log_config": str(log_config),
        "media_store_path": str(directory / "media_store"),
        "signing_key_path": str(directory / "signing.key"),
        "registration_shared_secret": secrets.token_hex(16),
        "macaroon_secret_key": secrets.token_hex(16),
        "form_secret": secrets.token_hex(16),
        "report_stats": False,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "enable_metrics": False,
        "bcrypt_rounds": 4,
        "ui_auth": {"session_timeout": "5m"},
        "rc_login": {
            "address": _LENIENT_RATE,
            "account": _LENIENT_RATE,
            "failed_attempts": _LENIENT_RATE,
        },
        "rc_joins": {"local": _LENIENT_RATE, "remote": _LENIENT_RATE},
        "rc_invites": {"per_room": _LENIENT_RATE, "per_user": _LENIENT_RATE},
        **rate_limits,
    }


class SynapseServer:
    """One homeserver process. Use `start()` / `stop()`, or as a context manager."""

    def __init__(
        self,
        module_config: dict[str, Any] | None = None,
        *,
        with_module: bool = True,
        extra_config: dict[str, Any] | None = None,
        name: str = "synapse",
        directory: Path | None = None,
        port: int | None = None,
        python: str | Path | None = None,
    ) -> None:
        self.with_module = with_module
        self.module_config = module_config or {}
        self.extra_config = extra_config or {}
        self.name = name
        self._own_directory = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix=f"xsign-{name}-"))
        # A fixed port is for a long-running local server; the tests take a free one.
        self.port = port if port is not None else free_port()
        self.server_name = "localhost"
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.config: dict[str, Any] = {}
        self.process: subprocess.Popen[bytes] | None = None
        # The interpreter whose environment holds Synapse (and the module): the tests' own,
        # or another virtual environment's (the packaging checks install the built wheel).
        self.python = str(python or sys.executable)

    @property
    def log_path(self) -> Path:
        return self.directory / "homeserver.log"

    @property
    def shared_secret(self) -> str:
        return str(self.config["registration_shared_secret"])

    def write_config(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = base_config(self.directory, self.port, self.server_name)
        if self.with_module:
            config["modules"] = [{"module": MODULE, "config": self.module_config}]
        self.config = deep_merge(config, self.extra_config)
        key_path = Path(self.config["signing_key_path"])
        if not key_path.exists():
            with key_path.open("w") as f:
                write_signing_keys(f, [generate_signing_key("a_test")])
        path = self.directory / "homeserver.yaml"
        path.write_text(yaml.safe_dump(self.config))
        return path

    def start(self, timeout: float = 180.0) -> SynapseServer:
        config_path = self.write_config()
        self._stdout = (self.directory / "stdout.log").open("ab")
        self.process = subprocess.Popen(
            [self.python, "-m", "synapse.app.homeserver", "-c", str(config_path)],
            cwd=self.directory,
            stdout=self._stdout,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SYNAPSE_ASYNC_IO_REACTOR": "0"},
        )
        self.wait_until_ready(timeout)
        return self

    def wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"Synapse ({self.name}) exited with {self.process.returncode}:\n{self.tail()}"
                )
            try:
                if requests.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Synapse ({self.name}) did not start in {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        out = []
        for path in (self.directory / "stdout.log", self.log_path):
            if path.exists():
                out.append(f"--- {path.name}")
                out.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(out)

    def log_lines(self, needle: str) -> list[str]:
        if not self.log_path.exists():
            return []
        return [
            line
            for line in self.log_path.read_text(errors="replace").splitlines()
            if needle in line
        ]

    def stop(self, cleanup: bool = True) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if getattr(self, "_stdout", None) is not None:
            self._stdout.close()
        if cleanup and self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SynapseServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
