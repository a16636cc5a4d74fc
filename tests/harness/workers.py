"""A scaled-out homeserver for the tests: a private PostgreSQL cluster, a Redis server, a
Synapse main process and one or more `generic_worker`s serving the client API, all on
loopback."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
import yaml
from signedjson.key import generate_signing_key, write_signing_keys

from tests.harness.parallel import run_parallel
from tests.harness.server import MODULE, base_config, deep_merge, free_port, write_log_config

# Set by CI: a missing PostgreSQL or Redis is then a failure, not a skip.
REQUIRE_ENV = "XSIGN_REQUIRE_WORKER_TESTS"

INSTALL_HINT = (
    "install them to run the worker tests: `apt-get install postgresql redis-server` and "
    "`pip install 'matrix-synapse[postgres,redis]'`"
)


def _find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the PostgreSQL server binaries off PATH.
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def pg_stat_statements_available() -> bool:
    """Whether the PostgreSQL that `initdb` belongs to ships the `pg_stat_statements`
    extension (part of the server package on recent Debian releases, of `postgresql-contrib`
    on older ones)."""
    initdb = _find_binary("initdb")
    if initdb is None:
        return False
    pg_config = Path(initdb).resolve().parent / "pg_config"
    if pg_config.exists():
        sharedir = subprocess.run(
            [str(pg_config), "--sharedir"], check=True, capture_output=True, text=True
        ).stdout.strip()
        return (Path(sharedir) / "extension" / "pg_stat_statements.control").exists()
    return bool(glob.glob("/usr/share/postgresql/*/extension/pg_stat_statements.control"))


def missing_requirements() -> list[str]:
    """What the worker deployment needs and this machine lacks."""
    missing = [name for name in ("initdb", "pg_ctl", "redis-server") if _find_binary(name) is None]
    for module, extra in (("psycopg2", "postgres"), ("txredisapi", "redis")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"{module} (matrix-synapse[{extra}])")
    return missing


def skip_without_worker_requirements() -> None:
    """Skip the calling test when PostgreSQL or Redis is missing, or fail it where the
    environment says the worker tests must run (CI)."""
    import pytest

    missing = missing_requirements()
    if missing:
        message = f"missing {', '.join(missing)}; {INSTALL_HINT}"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but the worker tests cannot run: {message}")
        pytest.skip(message)


def _wait_for(
    check: Any,
    what: str,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{tail}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} was not ready in {timeout}s:\n{tail}")


class PostgresCluster:
    """A throw-away cluster created with `initdb`, trusting loopback connections.

    With `pg_stat_statements` the cluster preloads that extension's library: without it the
    extension's views refuse to answer.
    """

    def __init__(self, directory: Path, pg_stat_statements: bool = False) -> None:
        self.directory = directory
        self.pg_stat_statements = pg_stat_statements
        self.data = directory / "pgdata"
        self.port = free_port()
        self.log = directory / "postgres.log"
        self._user: str | None = None
        if os.geteuid() == 0:
            # initdb refuses to run as root.
            self._user = "postgres"
            try:
                pwd.getpwnam(self._user)
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", self._user], check=True)

    def _run(self, *args: str) -> None:
        command = list(args)
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> PostgresCluster:
        options = (
            f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        if self.pg_stat_statements:
            options += " -c shared_preload_libraries=pg_stat_statements"
        self.data.mkdir(parents=True)
        self.log.touch()
        if self._user is not None:
            shutil.chown(self.directory, self._user)
            shutil.chown(self.data, self._user)
            shutil.chown(self.log, self._user)
        self._run(
            str(_find_binary("initdb")),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        )
        self._run(
            str(_find_binary("pg_ctl")),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-o",
            options,
            "start",
        )
        return self

    def connect(self, database: str) -> Any:
        """A connection to `database` as the superuser, each statement committed on its own."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database)
        conn.autocommit = True
        return conn

    def execute(self, database: str, statement: str) -> None:
        """Run one statement outside a transaction, as the superuser."""
        conn = self.connect(database)
        try:
            with conn.cursor() as cursor:
                cursor.execute(statement)
        finally:
            conn.close()

    def create_database(self, name: str) -> None:
        # Synapse requires the C collation.
        self.execute(
            "postgres",
            f"CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        )

    def stop(self) -> None:
        if self.data.exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run(
                    str(_find_binary("pg_ctl")), "-D", str(self.data), "-m", "immediate", "stop"
                )


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.log = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                str(_find_binary("redis-server")),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        import socket

        def ping() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")

        _wait_for(ping, "redis-server", 30, self.process, self.log)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


class SynapseProcess:
    """One Synapse process (main or worker) started from config files."""

    def __init__(
        self, name: str, app: str, configs: list[Path], port: int, log: Path, cwd: Path
    ) -> None:
        self.name = name
        self.app = app
        self.configs = configs
        self.port = port
        self.log = log
        self.cwd = cwd
        self.base_url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180) -> SynapseProcess:
        args = [sys.executable, "-m", self.app]
        for config in self.configs:
            args += ["-c", str(config)]
        stdout = (self.cwd / f"{self.name}.stdout").open("ab")
        self.process = subprocess.Popen(args, cwd=self.cwd, stdout=stdout, stderr=subprocess.STDOUT)
        stdout.close()
        _wait_for(
            lambda: requests.get(f"{self.base_url}/health", timeout=2).status_code == 200,
            f"Synapse {self.name}",
            timeout,
            self.process,
            self.cwd / f"{self.name}.stdout",
        )
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_lines(self, needle: str) -> list[str]:
        if not self.log.exists():
            return []
        return [
            line for line in self.log.read_text(errors="replace").splitlines() if needle in line
        ]


class WorkerDeployment:
    """PostgreSQL + Redis + Synapse main (client, admin and replication listeners) + `workers`
    generic workers, `worker1` to `workerN`, each with a client listener, a log file and a
    configuration file of its own; the module is loaded in every process, or in none with
    `with_module=False` (native Synapse, for comparison).

    With `pg_stat_statements` the cluster preloads that extension and the `synapse` database
    has it (see `pg_stat_statements_available`).

    `log_config_template`, if given, is the logging configuration of every process instead of
    the harness's, with `{log_file}` where the process's log file goes.

    `workers` lists the worker processes in order; `worker` is the first of them.
    """

    def __init__(
        self,
        module_config: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
        workers: int = 1,
        *,
        with_module: bool = True,
        pg_stat_statements: bool = False,
        log_config_template: str | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"a deployment needs at least one worker, not {workers}")
        self.directory = Path(tempfile.mkdtemp(prefix="xsign-workers-"))
        self.module_config = module_config or {}
        self.extra_config = extra_config or {}
        self.with_module = with_module
        self.log_config_template = log_config_template
        self.postgres = PostgresCluster(self.directory, pg_stat_statements=pg_stat_statements)
        self.redis = RedisServer(self.directory)
        self.main_port = free_port()
        self.replication_port = free_port()
        self.config: dict[str, Any] = {}
        self.main = SynapseProcess(
            "main",
            "synapse.app.homeserver",
            [],
            self.main_port,
            self.directory / "main.log",
            self.directory,
        )
        self.workers: list[SynapseProcess] = [
            SynapseProcess(
                f"worker{number}",
                "synapse.app.generic_worker",
                [],
                free_port(),
                self.directory / f"worker{number}.log",
                self.directory,
            )
            for number in range(1, workers + 1)
        ]

    @property
    def worker(self) -> SynapseProcess:
        return self.workers[0]

    @property
    def processes(self) -> list[SynapseProcess]:
        """Main first, then the workers."""
        return [self.main, *self.workers]

    @property
    def shared_secret(self) -> str:
        return str(self.config["registration_shared_secret"])

    def _log_config(self, name: str) -> Path:
        path = self.directory / f"{name}.log.yaml"
        log_file = self.directory / f"{name}.log"
        if self.log_config_template is None:
            return write_log_config(path, log_file)
        path.write_text(self.log_config_template.format(log_file=log_file))
        return path

    def _write_configs(self) -> None:
        config = base_config(self.directory, self.main_port, "localhost")
        config["log_config"] = str(self._log_config("main"))
        config["listeners"].append(
            {
                "port": self.replication_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "resources": [{"names": ["replication"]}],
            }
        )
        config["database"] = {
            "name": "psycopg2",
            "args": {
                "user": "postgres",
                "host": "127.0.0.1",
                "port": self.postgres.port,
                "database": "synapse",
                "cp_min": 1,
                "cp_max": 10,
            },
        }
        config["redis"] = {"enabled": True, "host": "127.0.0.1", "port": self.redis.port}
        config["instance_map"] = {"main": {"host": "127.0.0.1", "port": self.replication_port}}
        if self.with_module:
            config["modules"] = [{"module": MODULE, "config": self.module_config}]
        self.config = deep_merge(config, self.extra_config)
        with open(self.config["signing_key_path"], "w") as f:
            write_signing_keys(f, [generate_signing_key("a_test")])
        main_path = self.directory / "homeserver.yaml"
        main_path.write_text(yaml.safe_dump(self.config))

        self.main.configs = [main_path]
        for worker in self.workers:
            worker_path = self.directory / f"{worker.name}.yaml"
            worker_path.write_text(
                yaml.safe_dump(
                    {
                        "worker_app": "synapse.app.generic_worker",
                        "worker_name": worker.name,
                        "worker_listeners": [
                            {
                                "type": "http",
                                "port": worker.port,
                                "bind_addresses": ["127.0.0.1"],
                                "resources": [{"names": ["client"]}],
                            }
                        ],
                        "worker_log_config": str(self._log_config(worker.name)),
                    }
                )
            )
            worker.configs = [main_path, worker_path]

    def start(self) -> WorkerDeployment:
        try:
            self.postgres.start()
            self.postgres.create_database("synapse")
            if self.postgres.pg_stat_statements:
                self.postgres.execute("synapse", "CREATE EXTENSION pg_stat_statements")
            self.redis.start()
            self._write_configs()
            # Main first: it prepares the empty database.
            self.main.start()
            self._start_workers()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_workers(self) -> None:
        # Side by side: each takes seconds, mostly spent importing Synapse.
        run_parallel([worker.start for worker in self.workers])

    def stop(self, cleanup: bool = True) -> None:
        for worker in self.workers:
            worker.stop()
        self.main.stop()
        self.redis.stop()
        self.postgres.stop()
        if cleanup:
            shutil.rmtree(self.directory, ignore_errors=True)
