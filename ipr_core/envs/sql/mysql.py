"""The server backend: a MariaDB/MySQL server holding the dump (InterCode's own setting).

The dump is loaded once into the server (skipped when a marker row says this
dump is already there, under a server lock so concurrent loaders wait); the
agent connects as a read-only user (``ReadOnlyAccount``) with
``max_statement_time`` (MariaDB) or ``max_execution_time`` (MySQL),
``sql_select_limit`` and ``group_concat_max_len`` set from ``Limits`` for its
session. Each statement first passes ``vet_names`` (the functions it calls,
no system names); its rows are streamed and counted against ``Limits``, and
the connection is dropped when one is broken mid-stream. A lost connection
raises ``EnvError``; the next ``reset_session`` reconnects.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import parse_qsl, unquote, urlsplit

from ipr_core.envs.base import EnvError
from ipr_core.envs.sql.dump import Dump
from ipr_core.envs.sql.results import QueryResult
from ipr_core.envs.sql.sandbox import Limits, vet_names


@dataclass(frozen=True)
class MySQLURL:
    """Where the server is and the admin account that loads the dump."""

    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    password: str = ""
    options: Mapping[str, str] = field(default_factory=dict)  # unix_socket, ssl_disabled, ...

    @classmethod
    def parse(cls, url: str) -> "MySQLURL":
        """``mysql://user:password@host:port/?unix_socket=...`` (also ``mariadb://``)."""
        u = urlsplit(url)
        if u.scheme not in ("mysql", "mariadb"):
            raise ValueError(f"mysql_url must start with mysql:// or mariadb://, got {url.split('@')[-1]!r}")
        return cls(u.hostname or "127.0.0.1", u.port or 3306, unquote(u.username or "root"), unquote(u.password or ""), dict(parse_qsl(u.query)))

    def connect_args(self, user: str | None = None, password: str | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"host": self.host, "port": self.port, "user": user or self.user, "password": self.password if password is None else password}
        for k, v in self.options.items():
            args[k] = v.lower() in ("1", "true", "yes") if k.startswith("ssl_") else v
        return args

    def redacted(self) -> str:
        return f"mysql://{self.user}:***@{self.host}:{self.port}"


@dataclass(frozen=True)
class ReadOnlyAccount:
    """The server account the agent's queries run as: SELECT and SHOW VIEW on the dump's databases only."""

    user: str = "ipr_agent"
    password: str = "ipr_agent"


def _is_client_error(errno: int | None) -> bool:
    """Client-side errors (the connection is gone or broken): CR_* codes 2000-2999,
    and the connector's own (-1, None). Server errors answer a statement: 1xxx, 3xxx+."""
    return errno is None or errno < 1000 or 2000 <= errno < 3000


# command denied, access denied to a database, privilege needed (FILE), read-only server
_PRIVILEGE_ERRNOS = {1142, 1143, 1044, 1227, 1290, 1370}
# A value cut to fit: GROUP_CONCAT past group_concat_max_len (1260), a function
# result past max_allowed_packet (1301, NULL instead, or an error).
_TRUNCATION_ERRNOS = {1260, 1301}
_SKIP_DUMP = re.compile(r"^(?:CREATE\s+USER|GRANT|FLUSH|/\*!\d+\s+SET\s+NAMES)\b", re.I)
_META_DB = "ipr_flow_meta"


class MySQLBackend:
    """A MariaDB/MySQL server holding the dump; the agent runs as a read-only user.

    ``url`` is an account that may create databases and users (used once, to
    load the dump and create the read-only user); every query afterwards runs
    as the ``agent`` account with SELECT on the dump's databases only.
    """

    kind = "mysql"

    def __init__(
        self,
        dump: Dump,
        url: str,
        limits: Limits = Limits(),
        agent: ReadOnlyAccount = ReadOnlyAccount(),
        connect_timeout_s: float = 10.0,
    ):
        try:
            import mysql.connector  # noqa: F401
        except ImportError as e:
            raise ImportError("the mysql backend needs mysql-connector-python: pip install 'ipr-flow[intercode_sql]'") from e
        self.dump = dump
        self.url = MySQLURL.parse(url)
        self.limits = limits
        self.agent = agent
        self.connect_timeout_s = connect_timeout_s
        self.flavor = ""
        self.load_s = self.ensure_loaded()
        self._cnx: Any = None
        self._db: str | None = None

    # -- administration (once) --

    def _connect(self, user: str | None = None, password: str | None = None, database: str | None = None) -> Any:
        import mysql.connector

        try:
            # use_pure: the C extension's build may not load (OpenSSL mismatch) and
            # the two return some types differently; one code path everywhere.
            return mysql.connector.connect(
                **self.url.connect_args(user, password),
                database=database,
                use_pure=True,
                autocommit=True,
                charset="utf8mb4",
                collation="utf8mb4_general_ci",
                connection_timeout=self.connect_timeout_s,
            )
        except mysql.connector.Error as e:
            raise EnvError(f"cannot connect to {self.url.redacted()} as {user or self.url.user}: {e}") from e

    def ensure_loaded(self) -> float:
        """Load the dump unless this server already holds it; create the read-only user. Returns seconds spent loading (0 when skipped)."""
        cnx = self._connect()
        try:
            cur = cnx.cursor()
            cur.execute("SELECT VERSION(), @@lower_case_table_names")
            version, lctn = cur.fetchone()
            self.flavor = "mariadb" if "mariadb" in str(version).lower() else "mysql"
            if int(lctn) != 1:
                raise EnvError(
                    f"{self.url.redacted()} runs with lower_case_table_names={lctn}: InterCode-SQL needs 1 "
                    "(the gold queries mix table-name case); start the server with --lower-case-table-names=1"
                )
            cur.execute("SELECT GET_LOCK('ipr_flow_intercode_sql_load', 600)")
            if cur.fetchone()[0] != 1:
                raise EnvError("timed out waiting for another process to load the InterCode-SQL dump")
            try:
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{_META_DB}`")
                cur.execute(f"CREATE TABLE IF NOT EXISTS `{_META_DB}`.`loaded_dumps` (sha256 CHAR(64) PRIMARY KEY, loaded_at DATETIME, seconds DOUBLE)")
                cur.execute(f"SELECT seconds FROM `{_META_DB}`.`loaded_dumps` WHERE sha256 = %s", (self.dump.sha256,))
                row = cur.fetchone()
                seconds = 0.0
                if row is None:
                    seconds = self._load(cur)
                    cur.execute(f"DELETE FROM `{_META_DB}`.`loaded_dumps`")
                    cur.execute(f"INSERT INTO `{_META_DB}`.`loaded_dumps` VALUES (%s, NOW(), %s)", (self.dump.sha256, seconds))
                self._create_readonly_user(cur)
            finally:
                cur.execute("SELECT RELEASE_LOCK('ipr_flow_intercode_sql_load')")
                cur.fetchall()
            return seconds
        finally:
            cnx.close()

    def _load(self, cur: Any) -> float:
        t0 = time.perf_counter()
        for db in self.dump.databases.values():
            cur.execute(f"DROP DATABASE IF EXISTS `{db.name}`")
            cur.execute(f"CREATE DATABASE `{db.name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
            cur.execute(f"USE `{db.name}`")
            for stmt in db.statements:
                if not _SKIP_DUMP.match(stmt):
                    cur.execute(stmt)
                    if cur.with_rows:
                        cur.fetchall()
            # Fresh statistics now, not from InnoDB's background recalculation a few
            # seconds after the bulk load: that changed join plans mid-session and with
            # them which of several tied rows ``ORDER BY ... LIMIT 1`` returned (the
            # gold query then disagreed with itself). No writes follow, so they stay.
            for table in db.tables:
                cur.execute(f"ANALYZE TABLE `{db.name}`.`{table.name}`")
                cur.fetchall()
        return time.perf_counter() - t0

    def _create_readonly_user(self, cur: Any) -> None:
        user, pw = self.agent.user, self.agent.password
        cur.execute("CREATE USER IF NOT EXISTS %s@'%%' IDENTIFIED BY %s", (user, pw))
        cur.execute("ALTER USER %s@'%%' IDENTIFIED BY %s", (user, pw))
        for db in self.dump.databases.values():
            cur.execute(f"GRANT SELECT, SHOW VIEW ON `{db.name.lower()}`.* TO %s@'%%'", (user,))

    # -- the agent's session --

    def _session(self) -> Any:
        # No ping per statement (a round trip): a dead connection surfaces as an
        # error, which closes it, and the next reset() reconnects.
        if self._cnx is None:
            self._cnx = self._connect(self.agent.user, self.agent.password)
            self._db = None
            self._configure(self._cnx)
        return self._cnx

    def _configure(self, cnx: Any) -> None:
        limits = self.limits
        if self.flavor == "mariadb":
            timeout = f"max_statement_time = {limits.statement_timeout_s:.3f}"
        else:  # MySQL: SELECT statements only, in milliseconds
            timeout = f"max_execution_time = {int(limits.statement_timeout_s * 1000)}"
        cur = cnx.cursor()
        # One round trip. The server stops after max_rows + 1 rows unless the query
        # says LIMIT itself, and builds no GROUP_CONCAT value over max_cell_bytes.
        cur.execute(f"SET SESSION {timeout}, sql_select_limit = {limits.max_rows + 1}, group_concat_max_len = {limits.max_cell_bytes}")
        cur.close()

    def reset_session(self, db: str) -> None:
        import mysql.connector

        name = self.dump.database(db).name.lower()
        for attempt in range(2):
            try:
                fresh = self._cnx is None
                cnx = self._session()
                if not fresh:
                    # COM_RESET_CONNECTION: drops the user variables and session
                    # settings the previous episode may have left; configure again.
                    cnx.cmd_reset_connection()
                    self._configure(cnx)
                cnx.database = name
                self._db = name
                return
            except (mysql.connector.Error, EnvError) as e:
                self.close()
                if attempt:
                    raise EnvError(f"cannot start a MySQL session on {name}: {e}") from e

    def execute(self, db: str, sql: str) -> QueryResult:
        import mysql.connector

        refusal = vet_names(sql)  # the functions the SQLite authorizer would deny, and system names
        if refusal is not None:
            return refusal
        name = self.dump.database(db).name.lower()
        cnx = self._session()
        try:
            if self._db != name:
                cnx.database = name
                self._db = name
            cur = cnx.cursor()  # unbuffered: rows are read (and counted) one at a time
            cur.execute(sql)
            if not cur.with_rows:
                cur.close()
                return QueryResult(rows=None)
            if len(cur.description) > self.limits.max_columns:
                result = self.limits.too_many_columns()
            else:
                result = self.limits.collect(iter(cur.fetchone, None))
            if not result.ok:
                # The rest may still be streaming: dropping the connection is the cheap way out.
                self.close()
                return result
            warned = cur.warning_count > 0
            cur.close()
            if warned and self._truncated(cnx):
                return self.limits.cell_too_large()  # as SQLite, which refuses to build the value
        except mysql.connector.Error as e:
            return self._error(e)
        return result

    def _truncated(self, cnx: Any) -> bool:
        """Whether the last statement's warnings say the server cut a value to fit."""
        cur = cnx.cursor()
        cur.execute("SHOW WARNINGS")
        codes = {row[1] for row in cur.fetchall()}
        cur.close()
        return bool(codes & _TRUNCATION_ERRNOS)

    def _error(self, e: Any) -> QueryResult:
        """A server error as the result (MySQL's wording, as SQLite's are reworded); a client error raises EnvError."""
        errno = getattr(e, "errno", None)
        if _is_client_error(errno):
            self.close()
            raise EnvError(f"lost the MySQL connection: {e}") from e
        if errno in (1969, 3024):  # ER_STATEMENT_TIMEOUT (MariaDB), ER_QUERY_TIMEOUT (MySQL)
            return self.limits.timed_out()
        if errno in _TRUNCATION_ERRNOS:
            return self.limits.cell_too_large()
        msg = getattr(e, "msg", None) or str(e)
        # MariaDB names itself in syntax errors; InterCode's server (and the SQLite backend) say MySQL.
        msg = msg.replace("your MariaDB server version", "your MySQL server version")
        return QueryResult(error=msg, refused=errno in _PRIVILEGE_ERRNOS)

    def close(self) -> None:
        if self._cnx is not None:
            try:
                self._cnx.close()
            except Exception:  # a dead connection cannot be closed politely
                pass
            self._cnx = None
            self._db = None
