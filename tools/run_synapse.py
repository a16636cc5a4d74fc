#!/usr/bin/env python3
"""Start a local Synapse with the module loaded: `python3 tools/run_synapse.py`.

Needs nothing but Python 3.10 or later. The first run creates `.venv/synapse` with Synapse
and this project (installed editable, so changes to the module's code take effect at the
next start), then runs itself inside that environment. The homeserver lives in
`.local/synapse/` (configuration, SQLite database, signing key, log, and the admin's
credentials in `credentials.json`); a later start reuses all of it. `--reset` starts
from scratch.

It listens on http://127.0.0.1:8008 (`--port` to change), registers an admin user `admin`
on the first start, prints its credentials, and runs until Ctrl-C or SIGTERM, then stops
Synapse cleanly. The module's decisions are logged:

    grep "cross-signing upload decision" .local/synapse/homeserver.log

`homeserver.yaml` is generated on the first start and then left as you edit it: a later
start changes only what this tool owns, the client listener's port (`--port`), the metrics
listener's port (`--metrics-port`) and, with `--module-config FILE` (a YAML file holding the
module's `config:` block), the module's configuration; it rewrites the file only when one of
them changes. Synapse's metrics (docs/metrics.md) are served on
http://127.0.0.1:9000/_synapse/metrics (`--metrics-port 0`: none).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import venv
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SYNAPSE_VENV = ROOT / ".venv" / "synapse"
LOCAL_DIR = ROOT / ".local" / "synapse"
CREDENTIALS = LOCAL_DIR / "credentials.json"
SYNAPSE_REQUIREMENT = "matrix-synapse==1.163.2"
# Synapse brings PyYAML, signedjson and attrs, which the test harness also uses; not requests.
EXTRA_REQUIREMENTS = ("requests>=2.25",)
STAMP = SYNAPSE_VENV / ".xsign-installed"
ADMIN_LOCALPART = "admin"
REEXEC_MARK = "XSIGN_RUN_SYNAPSE_REEXEC"
# The entry point named under `modules:` in homeserver.yaml.
MODULE = "synapse_xsign_uia.CrossSigningUIAModule"


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def venv_python(directory: Path) -> Path:
    if os.name == "nt":
        return directory / "Scripts" / "python.exe"
    return directory / "bin" / "python"


def in_synapse_venv() -> bool:
    return Path(sys.prefix).resolve() == SYNAPSE_VENV.resolve()


def install_stamp() -> str:
    """Changes when the requirements or the project's metadata change."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    digest.update(repr((SYNAPSE_REQUIREMENT, EXTRA_REQUIREMENTS)).encode())
    return digest.hexdigest()


def ensure_venv() -> Path:
    """`.venv/synapse` with Synapse and the project installed; created or updated if needed."""
    python = venv_python(SYNAPSE_VENV)
    stamp = install_stamp()
    if python.exists() and STAMP.exists() and STAMP.read_text().strip() == stamp:
        return python
    if not python.exists():
        say(f"Creating {rel(SYNAPSE_VENV)} with {sys.executable}")
        try:
            venv.EnvBuilder(with_pip=True, clear=True).create(SYNAPSE_VENV)
        except (OSError, subprocess.CalledProcessError) as e:
            sys.exit(
                f"Could not create {SYNAPSE_VENV}: {e}\n"
                "Python's venv and ensurepip modules are needed; on Debian and Ubuntu "
                "install them with `apt-get install python3-venv`."
            )
    command = [
        str(python),
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "-e",
        str(ROOT),
        SYNAPSE_REQUIREMENT,
        *EXTRA_REQUIREMENTS,
    ]
    say(f"Installing the project and {SYNAPSE_REQUIREMENT} into {rel(SYNAPSE_VENV)}")
    if subprocess.run(command, check=False).returncode != 0:
        sys.exit(f"Installing into {SYNAPSE_VENV} failed")
    STAMP.write_text(stamp + "\n")
    return python


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run a local Synapse with synapse_xsign_uia loaded.", allow_abbrev=False
    )
    parser.add_argument("--port", type=int, default=8008, help="port on 127.0.0.1 (default: 8008)")
    parser.add_argument(
        "--reset",
        action="store_true",
        help=f"delete {rel(LOCAL_DIR)} first: new database, new admin user",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9000,
        help="port on 127.0.0.1 of the metrics listener (default: 9000; 0: no metrics)",
    )
    parser.add_argument(
        "--module-config",
        type=Path,
        metavar="FILE",
        help="YAML file with the module's `config:` block (default: the module's defaults)",
    )
    return parser.parse_args(argv)


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Stop(Exception):
    """Raised by the SIGINT and SIGTERM handlers."""


def on_signal(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def _metrics_listener(port: int) -> dict[str, Any]:
    return {"type": "metrics", "port": port, "bind_addresses": ["127.0.0.1"]}


def owned_settings(
    config: dict[str, Any], port: int, metrics_port: int, module_config: dict[str, Any] | None
) -> bool:
    """Set what this tool owns in `config` (the listeners' ports, and the module's `config:`
    block when one was given); whether anything changed."""
    before = repr(config)
    listeners = [
        listener
        for listener in config.get("listeners") or []
        if not (listener.get("type") == "metrics" and metrics_port == 0)
    ]
    for listener in listeners:
        if listener.get("type") == "metrics":
            listener["port"] = metrics_port
        elif any("client" in r.get("names", []) for r in listener.get("resources") or []):
            listener["port"] = port
    if metrics_port and not any(listener.get("type") == "metrics" for listener in listeners):
        listeners.append(_metrics_listener(metrics_port))
    config["listeners"] = listeners
    config["enable_metrics"] = bool(metrics_port) or bool(config.get("enable_metrics"))
    config["public_baseurl"] = f"http://127.0.0.1:{port}/"
    if module_config is not None:
        for entry in config.get("modules") or []:
            if entry.get("module") == MODULE:
                entry["config"] = module_config
    return repr(config) != before


def load_module_config(path: Path | None) -> dict[str, Any] | None:
    import yaml

    if path is None:
        return None
    config = yaml.safe_load(path.read_text())
    if config is None:
        return {}
    if not isinstance(config, dict):
        sys.exit(f"{path} must hold a mapping: the module's `config:` block")
    return config


def admin_credentials(base_url: str, shared_secret: str) -> dict[str, Any]:
    """The admin's saved credentials, still valid; or a newly registered admin's."""
    import requests

    from tests.harness.client import register_user

    if CREDENTIALS.exists():
        credentials: dict[str, Any] = json.loads(CREDENTIALS.read_text())
        whoami = requests.get(
            f"{base_url}/_matrix/client/v3/account/whoami",
            headers={"Authorization": f"Bearer {credentials['access_token']}"},
            timeout=30,
        )
        if whoami.status_code == 200:
            say(f"Reusing the admin user saved in {rel(CREDENTIALS)}")
        else:
            say("The saved access token is no longer valid; logging in again")
            login = requests.post(
                f"{base_url}/_matrix/client/v3/login",
                json={
                    "type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": credentials["user_id"]},
                    "password": credentials["password"],
                    "initial_device_display_name": "tools/run_synapse.py",
                },
                timeout=30,
            )
            if login.status_code != 200:
                raise SystemExit(
                    f"Could not log in as {credentials['user_id']} with the password saved "
                    f"in {rel(CREDENTIALS)}: {login.status_code} {login.text}\n"
                    "Start from scratch with --reset."
                )
            data = login.json()
            credentials.update(access_token=data["access_token"], device_id=data["device_id"])
    else:
        say(f"Registering the admin user '{ADMIN_LOCALPART}'")
        try:
            user = register_user(base_url, shared_secret, admin=True, localpart=ADMIN_LOCALPART)
        except requests.HTTPError as e:
            raise SystemExit(
                f"Could not register '{ADMIN_LOCALPART}': {e}: {e.response.text}\n"
                f"(If it exists already, {rel(CREDENTIALS)} was lost.) "
                "Start from scratch with --reset."
            ) from e
        credentials = {
            "user_id": user.user_id,
            "password": user.password,
            "access_token": user.access_token,
            "device_id": user.device_id,
        }
    credentials["base_url"] = base_url
    CREDENTIALS.write_text(json.dumps(credentials, indent=2) + "\n")
    CREDENTIALS.chmod(0o600)
    return credentials


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from importlib.metadata import version

    from tests.harness.server import SynapseServer

    if args.reset and LOCAL_DIR.exists():
        say(f"Deleting {rel(LOCAL_DIR)}")
        shutil.rmtree(LOCAL_DIR)
    module_config = load_module_config(args.module_config)
    if not port_is_free(args.port):
        sys.exit(
            f"127.0.0.1:{args.port} is in use (is another Synapse running?). "
            "Stop it, or choose another port with --port."
        )

    if args.metrics_port and not port_is_free(args.metrics_port):
        sys.exit(
            f"127.0.0.1:{args.metrics_port} is in use. Choose another port for the metrics "
            "listener with --metrics-port, or --metrics-port 0 for none."
        )

    class LocalSynapse(SynapseServer):
        """The test harness's server, with a configuration generated once and then kept."""

        def write_config(self) -> Path:
            import yaml

            path = self.directory / "homeserver.yaml"
            if path.exists():
                self.config = yaml.safe_load(path.read_text()) or {}
                self.server_name = str(self.config.get("server_name", self.server_name))
            else:
                super().write_config()
            changed = owned_settings(self.config, args.port, args.metrics_port, module_config)
            if changed or not path.exists():
                if path.exists():
                    say(f"Updating the port or module settings in {rel(path)}")
                path.write_text(yaml.safe_dump(self.config, sort_keys=False))
            return path

    fresh = not (LOCAL_DIR / "homeserver.db").exists()
    LOCAL_DIR.mkdir(parents=True, exist_ok=True)
    server = LocalSynapse(module_config or {}, name="local", directory=LOCAL_DIR, port=args.port)
    synapse_version = version("matrix-synapse")
    say(
        f"Starting Synapse {synapse_version} with the module "
        f"({'new' if fresh else 'existing'} homeserver in {rel(LOCAL_DIR)})"
    )
    # Synapse reports the git commit of the directory its code is in, which lies inside this
    # checkout (`.venv/`): it is not Synapse's own, so git must not look up into the checkout.
    os.environ["GIT_CEILING_DIRECTORIES"] = str(ROOT)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    status = 0
    try:
        server.start()
        credentials = admin_credentials(server.base_url, server.shared_secret)
        config_path = LOCAL_DIR / "homeserver.yaml"
        print(
            "\n"
            f"Synapse {synapse_version} with synapse_xsign_uia is running.\n"
            f"  URL:           {server.base_url}\n"
            f"  Server name:   {server.server_name}\n"
            f"  Admin user:    {credentials['user_id']}\n"
            f"  Password:      {credentials['password']}\n"
            f"  Access token:  {credentials['access_token']}\n"
            f"  Config:        {config_path} (your edits are kept)\n"
            + (
                f"  Metrics:       http://127.0.0.1:{args.metrics_port}/_synapse/metrics\n"
                if args.metrics_port
                else ""
            )
            + f"  Log:           {server.log_path}\n"
            f"  Credentials:   {CREDENTIALS}\n"
            "\n"
            "Watch the module's decisions:\n"
            f'  tail -F {rel(server.log_path)} | grep "cross-signing upload decision"\n'
            "Register more users:\n"
            f"  {rel(SYNAPSE_VENV)}/bin/register_new_matrix_user "
            f"-c {rel(config_path)} {server.base_url}\n"
            "\n"
            "Press Ctrl-C to stop.",
            flush=True,
        )
        assert server.process is not None
        while True:
            try:
                returncode = server.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                continue
            print(server.tail(), file=sys.stderr)
            say(f"Synapse exited unexpectedly with status {returncode}")
            status = 1
            break
    except Stop as e:
        say(f"{e}: stopping Synapse")
    except RuntimeError as e:
        # Synapse did not start; the message holds the end of its log.
        print(e, file=sys.stderr)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.stop(cleanup=False)
    if status == 0:
        say(f"Stopped. The homeserver stays in {rel(LOCAL_DIR)}; start it again the same way.")
    return status


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 - a clear message on an old python3
        sys.exit(f"Python 3.10 or later is needed; this is {sys.version.split()[0]}")
    args = parse_args(argv)
    if not in_synapse_venv():
        if os.environ.get(REEXEC_MARK):
            sys.exit(f"Running inside {SYNAPSE_VENV} failed: its python is {sys.executable}")
        python = ensure_venv()
        os.environ[REEXEC_MARK] = "1"
        os.execv(str(python), [str(python), str(Path(__file__).resolve()), *argv])
    return run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
