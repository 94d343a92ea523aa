"""A private Postgres server under the data directory, used when ``DATABASE_URL`` is unset.

Binaries come from the system (``pg_ctl`` on PATH or Debian's /usr/lib/postgresql/*/bin) or, on a machine
without them, from the ``pgserver`` wheel. Postgres refuses to run as root, so as root the server runs as the
``postgres`` system user (or an ``agenthub`` user created for it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def find_bin_dir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if debian:
        return debian[-1].parent
    try:
        import pgserver
    except ImportError as e:  # pragma: no cover - pgserver is a dependency
        raise RuntimeError("no Postgres binaries: install postgresql or the pgserver wheel") from e
    return Path(pgserver.__file__).parent / "pginstall" / "bin"


class EmbeddedPostgres:
    """Owns one data directory and one server process; idempotent start/stop."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root.resolve()
        self.pgdata = self.root / "pgdata"
        self.port = port
        self.bin = find_bin_dir()
        self.user = self._service_user()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _service_user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "agenthub"):
            try:
                pwd.getpwnam(name)
                return name
            except KeyError:
                continue
        subprocess.run(["useradd", "--system", "--no-create-home", "agenthub"], check=True, capture_output=True)
        return "agenthub"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True)

    def _prepare_dirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.user:
            entry = pwd.getpwnam(self.user)
            for p in [self.root, *self.root.parents]:
                p.chmod(p.stat().st_mode | 0o011)  # let the service user traverse to its directory
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            if self.pgdata.exists():
                os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def initialised(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def running(self) -> bool:
        if not self.initialised():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.pgdata), check=False).returncode == 0

    def start(self) -> str:
        """Initialise on first use, start if not running; returns the connection URL."""
        self._prepare_dirs()
        if not self.initialised():
            log.info("initialising embedded postgres", pgdata=str(self.pgdata), bin=str(self.bin))
            self._run("initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        if not self.running():
            opts = (
                # TCP only: a Unix socket under the data dir breaks on a path with a space or over 107 bytes
                f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                "-c max_connections=300 -c shared_buffers=256MB -c fsync=on"
            )
            res = self._run(
                "pg_ctl",
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(self.pgdata),
                "-l",
                str(self.pgdata / "server.log"),
                "-o",
                opts,
                check=False,
            )
            if res.returncode != 0:
                tail = (self.pgdata / "server.log").read_text()[-2000:] if (self.pgdata / "server.log").exists() else ""
                raise RuntimeError(f"embedded postgres failed to start: {res.stderr.strip()}\n{tail}")
            log.info("embedded postgres started", port=self.port)
        return self.url

    def stop(self, mode: str = "fast") -> None:
        if self.running():
            self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.pgdata))
