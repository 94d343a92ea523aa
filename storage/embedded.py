"""A private Postgres server under the data directory, used when ``DATABASE_URL`` is unset.

Binaries come from the system (``pg_ctl`` on PATH or Debian's /usr/lib/postgresql/*/bin) or, on a machine
without them, from the ``pgserver`` wheel. Postgres refuses to run as root, so as root the server runs as the
``postgres`` system user (or an ``agenthub`` user created for it).

The server listens on 127.0.0.1, where any local user can connect: the superuser has a random password, kept in
the ``superuser_password`` file (mode 0600) beside the cluster's directory and part of the URL ``start`` returns.
"""

from __future__ import annotations

import errno
import functools
import operator
import os
import pwd
import secrets
import shutil
import struct
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import structlog

log = structlog.get_logger(__name__)

INIT_MARKER = "agenthub.initialised"  # written into the cluster's directory once initdb has succeeded

# POSIX access ACLs as Linux stores them in an extended attribute (what setfacl writes; no ACL library needed)
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
_GROUP_CLASS = (_USER, _GROUP_OBJ, _GROUP)


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


def _can_traverse(path: Path, uid: int, gids: list[int]) -> bool:
    """Whether the mode bits let the user ``uid`` (in groups ``gids``) through ``path``."""
    st = path.stat()
    if st.st_uid == uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid in gids:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def _grant_traverse(path: Path, uid: int) -> None:
    """Let the one user ``uid`` traverse ``path``, as ``setfacl -m u:UID:x`` does: an ACL entry, not o+x, which
    would let every local user through (into /root, say, to read its world-readable files)."""
    try:
        raw = os.getxattr(path, _ACL_XATTR)
    except OSError as e:
        if e.errno != errno.ENODATA:
            raise
        mode = path.stat().st_mode  # no ACL yet: the one the mode bits stand for
        base = ((_USER_OBJ, mode >> 6 & 7, _NO_ID), (_GROUP_OBJ, mode >> 3 & 7, _NO_ID), (_OTHER, mode & 7, _NO_ID))
        raw = struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *entry) for entry in base)
    acl = {(tag, uid_or_gid): perm for tag, perm, uid_or_gid in struct.iter_unpack("<HHI", raw[4:])}
    acl[(_USER, uid)] = acl.get((_USER, uid), 0) | 1
    # the mask, recomputed as setfacl does: what the named entries and the owning group may do
    acl[(_MASK, _NO_ID)] = functools.reduce(operator.or_, (p for (t, _), p in acl.items() if t in _GROUP_CLASS))
    entries = (struct.pack("<HHI", tag, perm, i) for (tag, i), perm in sorted(acl.items()))  # the kernel's order
    os.setxattr(path, _ACL_XATTR, struct.pack("<I", _ACL_VERSION) + b"".join(entries))


class EmbeddedPostgres:
    """Owns one data directory and one server process; idempotent start/stop."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root.resolve()
        self.pgdata = self.root / "pgdata"
        self.password_file = self.root / "superuser_password"
        self.port = port
        self.bin = find_bin_dir()
        self.user = self._service_user()

    @property
    def url(self) -> str:
        """With the superuser's password; without one for a cluster an older version made (trust, no file)."""
        auth = "postgres"
        if self.password_file.exists():
            auth += ":" + quote(self.password_file.read_text().strip(), safe="")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/postgres"

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
            gids = os.getgrouplist(self.user, entry.pw_gid)
            for p in self.root.parents:  # the service user must reach its directory, and only it
                if _can_traverse(p, entry.pw_uid, gids):
                    continue
                try:
                    _grant_traverse(p, entry.pw_uid)
                except OSError as e:
                    raise RuntimeError(
                        f"the {self.user} user that runs Postgres cannot reach {self.root} through {p}, and {p} "
                        f"takes no ACL to let only that user through ({e.strerror}): use a data directory it can "
                        f"reach, or run `chmod o+x {p}` if every local user may go through it"
                    ) from e
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            if self.pgdata.exists():
                os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def initialised(self) -> bool:
        """Whether ``pgdata`` holds a whole cluster. initdb writes PG_VERSION first, so an interrupted one leaves
        it in a directory no server can start from; whole is with the marker written after initdb succeeded or,
        from a version before the marker, once a server has started on it (postmaster.opts)."""
        return (self.pgdata / "PG_VERSION").exists() and (
            (self.pgdata / INIT_MARKER).exists() or (self.pgdata / "postmaster.opts").exists()
        )

    def _chown_to_service_user(self, fd_or_path: int | Path) -> None:
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(fd_or_path, entry.pw_uid, entry.pw_gid)

    def _initialise(self) -> None:
        """initdb with a new random superuser password. A directory an interrupted initdb left is moved aside,
        not deleted: from a version before the marker it could be a cluster no server has started on yet."""
        if self.pgdata.exists():
            if (self.pgdata / "postmaster.pid").exists():
                raise RuntimeError(f"{self.pgdata} is not a whole cluster but a server may run on it (postmaster.pid)")
            aside = self.root / f"pgdata.incomplete-{time.time_ns()}"
            log.warning("moving aside a data directory an interrupted initdb left", pgdata=str(aside))
            self.pgdata.rename(aside)
        log.info("initialising embedded postgres", pgdata=str(self.pgdata), bin=str(self.bin))
        self.password_file.unlink(missing_ok=True)  # a new cluster, a new password
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
        with os.fdopen(fd, "w") as f:
            self._chown_to_service_user(fd)  # initdb, run as that user, reads it
            f.write(secrets.token_urlsafe(32))
        self._run(
            "initdb",
            "-D",
            str(self.pgdata),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={self.password_file}",
            "-E",
            "UTF8",
        )
        (self.pgdata / INIT_MARKER).touch()
        self._chown_to_service_user(self.pgdata / INIT_MARKER)

    def running(self) -> bool:
        if not self.initialised():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.pgdata), check=False).returncode == 0

    def start(self) -> str:
        """Initialise on first use, start if not running; returns the connection URL."""
        self._prepare_dirs()
        if not self.initialised():
            self._initialise()
        elif not self.password_file.exists():
            log.warning(
                "embedded postgres initialised by an older version: any local user can connect without a password",
                pgdata=str(self.pgdata),
            )
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
        """Stop the server if it runs. Asked of ``pg_ctl stop`` itself, not of ``pg_ctl status`` first: a status
        that failed for its own reasons (``runuser`` under load, say) read as "not running" and the stop was
        skipped in silence. A server that is still there after a failed stop is an error."""
        if not (self.pgdata / "postmaster.pid").exists():  # pg_ctl stop -w returns once the server removed it
            return
        done = self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.pgdata), check=False)
        if done.returncode != 0 and self.running():
            raise RuntimeError(f"embedded postgres did not stop: {(done.stderr or done.stdout).strip()}")
