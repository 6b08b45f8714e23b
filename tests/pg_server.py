"""A real PostgreSQL server for the call store's tests: initdb + pg_ctl into a temporary folder, on a free
port of 127.0.0.1, stopped at the end (conftest.py's session fixture `postgres_server`).

Debian's server (.ci/run installs `postgresql`) keeps its programs in /usr/lib/postgresql/N/bin
(`pg_config --bindir` says which). PostgreSQL refuses to run as root, and the tests run as root on CI:
then initdb and the server run as `nobody` (setpriv), in a folder that user owns. Each test gets a
database of its own (`new_database`).
"""
from __future__ import annotations

import glob
import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile

from tests.sip_peers import free_port

HOST = "127.0.0.1"
USER = "postgres"  # the superuser initdb makes (trust authentication: loopback only)


def find_bindir() -> pathlib.Path | None:
    """The folder holding initdb, pg_ctl and postgres; None when PostgreSQL is not installed."""
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            candidates.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    candidates += ["/usr/local/bin", "/opt/homebrew/bin", "/usr/local/opt/postgresql/bin"]
    for folder in candidates:
        if folder and all(os.access(os.path.join(folder, p), os.X_OK) for p in ("initdb", "pg_ctl", "postgres")):
            return pathlib.Path(folder)
    return None


class PostgresServer:
    def __init__(self, bindir: pathlib.Path, *, durable: bool = False):
        self.durable = durable  # fsync on (a benchmark's realistic commits); off for tests
        self.bindir = bindir
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="callbot-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port(kind=1)  # SOCK_STREAM
        self._as: list[str] = []
        self._n = 0
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            os.chmod(self.root, 0o700)
            self._as = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", "--"]

    def _run(self, *args: str, timeout: float = 60) -> None:
        env = {**os.environ, "LC_ALL": "C", "HOME": str(self.root)}
        out = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout, env=env,
                             cwd=self.root)
        if out.returncode:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({out.returncode}): {out.stdout}{out.stderr}{log}")

    def start(self) -> PostgresServer:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        self._pg_ctl_start()
        return self

    def _pg_ctl_start(self) -> None:
        options = f"-h {HOST} -p {self.port} -k {self.root}"
        if not self.durable:
            options += " -F -c fsync=off -c full_page_writes=off"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", options, "start")

    def pause(self) -> None:
        """Stops the server, keeping its data (`resume` starts it again on the same port)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        self._pg_ctl_start()

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@{HOST}:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        import psycopg

        self._n += 1
        name = f"calls_{os.getpid()}_{self._n}"
        with psycopg.connect(f"host={HOST} port={self.port} user={USER} dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
