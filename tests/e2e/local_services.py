"""PostgreSQL and Redis from the Debian packages, started on loopback for a test.

The distributed-mode test needs the metadata database and the Celery broker a
real deployment uses, without Docker: each server gets a free port on
127.0.0.1, a throw-away data directory and no persistence worth keeping.
Postgres refuses to run as root, so as root it runs as the `postgres` system
user (`apt-get install postgresql` creates it) with a data directory that user owns.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from devtools.seaweed import free_port

START_TIMEOUT_S = 60
DATABASE, USER = "airflow", "airflow"


class LocalServiceError(RuntimeError):
    """A local server is missing or did not start; the message says which and what to install."""


@dataclass
class LocalServer:
    """A server process on 127.0.0.1:`port` whose files live in `root`, removed on stop."""

    process: subprocess.Popen
    port: int
    root: Path
    stop_signal: int = signal.SIGTERM

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        """The tail of the server's log, for failure messages."""
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


class Postgres(LocalServer):
    """A PostgreSQL server with database and trusted user `airflow` on loopback."""

    def url(self, scheme: str = "postgresql+psycopg2") -> str:
        return f"{scheme}://{USER}@127.0.0.1:{self.port}/{DATABASE}"


class Redis(LocalServer):
    """A Redis server on loopback; `url` is database 0."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_postgres() -> Postgres:
    """initdb a fresh cluster, start it (fast, unsafe fsync settings) and create the `airflow` database."""
    owner = _postgres_owner()
    root = Path(tempfile.mkdtemp(prefix="tlp-postgres-"))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    as_owner = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []} if owner else {}
    env = {**os.environ, "HOME": str(root), "LC_ALL": "C.UTF-8"}
    initdb = subprocess.run([_postgres_binary("initdb"), "-D", str(root / "data"), "-U", USER, "-A", "trust",
                             "-E", "UTF8", "--no-sync"], cwd=root, env=env, capture_output=True, text=True,
                            **as_owner)
    if initdb.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise LocalServiceError(f"initdb failed in {root}: {initdb.stderr[-2000:]}")
    port = free_port()
    log = open(root / "server.log", "ab")
    process = subprocess.Popen(
        [_postgres_binary("postgres"), "-D", str(root / "data"), "-h", "127.0.0.1", "-p", str(port),
         "-k", str(root), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
         "-c", "max_connections=200"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **as_owner)
    # SIGINT is Postgres' "fast" shutdown: it does not wait for Airflow's pooled connections to close
    server = Postgres(process=process, port=port, root=root, stop_signal=signal.SIGINT)
    _wait(server, lambda: _create_database(port))
    return server


def start_redis() -> Redis:
    """A Redis server with persistence off: the Celery broker lives only as long as the test."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise LocalServiceError("redis-server not found; install the Debian package redis-server")
    root = Path(tempfile.mkdtemp(prefix="tlp-redis-"))
    port = free_port()
    log = open(root / "server.log", "ab")
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(root), "--save", "",
         "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Redis(process=process, port=port, root=root)
    _wait(server, lambda: _ping_redis(port))
    return server


def missing_packages() -> list[str]:
    """The Debian packages of these servers that are not installed on this machine."""
    missing = [] if shutil.which("redis-server") else ["redis-server"]
    try:
        _postgres_binary("postgres")
    except LocalServiceError:
        missing.insert(0, "postgresql")
    return missing


def _postgres_binary(name: str) -> str:
    """A PostgreSQL server program: on PATH, or the newest Debian /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[4]))
    if found is None and not candidates:
        raise LocalServiceError(f"{name} not found; install the Debian package postgresql")
    return found or candidates[-1]


def _postgres_owner() -> pwd.struct_passwd | None:
    """The `postgres` user to run the server as when we are root (Postgres refuses root); None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise LocalServiceError("running as root but there is no `postgres` user to run PostgreSQL as; "
                                "install the Debian package postgresql (it creates the user)") from None


def _create_database(port: int) -> None:
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=port, user=USER, dbname="postgres", connect_timeout=2)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        connection.close()


def _ping_redis(port: int) -> None:
    import redis

    redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=2).ping()


def _wait(server: LocalServer, ready) -> None:
    """Call `ready` until it stops raising; stop the server and raise with its log if it never does."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            ready()
            return
        except Exception as error:  # not accepting connections yet
            last_error = error
            time.sleep(0.3)
    log = server.log()
    server.stop()
    raise LocalServiceError(f"{type(server).__name__} on port {server.port} did not become ready "
                            f"({last_error or f'exited with {server.process.returncode}'}):\n{log}")
