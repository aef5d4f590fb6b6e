"""A throwaway MariaDB server for the InterCode-SQL MySQL-backend tests and benchmarks.

``LocalMariaDB`` runs ``mariadb-install-db`` into its own datadir and starts
``mariadbd`` on 127.0.0.1 on a free port (``lower_case_table_names=1``, as
InterCode's server), and stops it by PID. MariaDB itself is installed by
``.ci/mariadb.sh`` (``find_mariadb`` says whether it is there).

    from mariadb_fixture import LocalMariaDB   # tests/ on sys.path
    with LocalMariaDB() as server:
        env = InterCodeSQLEnv(backend="mysql", mysql_url=server.url)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mariadb() -> tuple[str, str] | None:
    """(mariadbd, mariadb-install-db) paths, or None when MariaDB is not installed (see .ci/mariadb.sh)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/usr/local/sbin"
    server = shutil.which("mariadbd", path=path) or shutil.which("mysqld", path=path)
    install = shutil.which("mariadb-install-db", path=path) or shutil.which("mysql_install_db", path=path)
    return (server, install) if server and install else None


class LocalMariaDB:
    """mariadbd on 127.0.0.1 (a free port) with its own datadir, stopped by PID.

    Runs with ``lower_case_table_names=1`` as InterCode's server did. ``url`` is
    the root account (loopback only, no password) for ``MySQLBackend``.

        with LocalMariaDB() as server:
            env = InterCodeSQLEnv(backend="mysql", mysql_url=server.url)
    """

    def __init__(self, workdir: str | Path | None = None, port: int | None = None, startup_timeout_s: float = 60.0):
        found = find_mariadb()
        if found is None:
            raise FileNotFoundError("MariaDB is not installed (mariadbd, mariadb-install-db): run .ci/mariadb.sh")
        self.server_bin, self.install_bin = found
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="ipr-mariadb-"))
        self.port = port or _free_port()
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.start_s = 0.0

    @property
    def url(self) -> str:
        return f"mysql://root@127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _user_args(self) -> list[str]:
        return ["--user=root"] if os.geteuid() == 0 else []

    def start(self) -> "LocalMariaDB":
        t0 = time.perf_counter()
        data = self.workdir / "data"
        log = self.workdir / "error.log"
        if not (data / "mysql").exists():
            data.mkdir(parents=True, exist_ok=True)
            r = subprocess.run(
                [self.install_bin, "--no-defaults", f"--datadir={data}", "--auth-root-authentication-method=normal", "--skip-test-db", "--lower-case-table-names=1", *self._user_args()],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if r.returncode != 0:
                raise RuntimeError(f"mariadb-install-db failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}")
        args = [
            self.server_bin,
            "--no-defaults",
            f"--datadir={data}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.workdir / 'mysqld.sock'}",
            f"--pid-file={self.workdir / 'mysqld.pid'}",
            f"--log-error={log}",
            "--lower-case-table-names=1",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--performance-schema=OFF",
            "--innodb-buffer-pool-size=32M",
            "--innodb-log-file-size=16M",
            "--max-connections=64",
            *self._user_args(),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                self.proc = None
                raise RuntimeError(f"mariadbd exited during start-up:\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"mariadbd did not accept connections on port {self.port} within {self.startup_timeout_s:.0f} s")
        self.start_s = time.perf_counter() - t0
        return self

    def peak_rss_kib(self) -> int:
        """The server process's peak resident memory so far (VmHWM, Linux), in KiB; 0 when unknown."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except (OSError, TypeError):
            return 0
        return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalMariaDB":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve_or_skip(workdir: str | Path) -> Iterator[LocalMariaDB]:
    """A started ``LocalMariaDB`` for a pytest fixture (``yield from``), stopped afterwards;
    the test skips, saying why, when MariaDB or mysql-connector is not installed."""
    import pytest

    if find_mariadb() is None:
        pytest.skip("MariaDB is not installed (run .ci/mariadb.sh)")
    pytest.importorskip("mysql.connector")
    server = LocalMariaDB(workdir=workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
