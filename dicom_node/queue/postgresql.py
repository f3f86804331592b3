"""The cluster backend: PostgreSQL holds the states and the bytes, so that any host can run any role.

Received instances and results (until sent) are kept in the `files` table (bytea), in the same
database and transaction as their rows: nothing else has to be shared, backed up or replicated,
and a host's loss loses nothing that was acknowledged. Jobs are run by the cluster engine
(dicom_node/engines/cluster.py), which keeps procrastinate's tables in the same database.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from dicom_node.queue.base import TABLES, Queue
from dicom_node.queue.jobs import QueueUnavailable, SchemaTooNew

# cxr_node_schema.version. 1: the SQLite tables and files; 2: when a result's last
# error happened; 3: the patients' films (a new table: TABLES creates it).
SCHEMA_VERSION = 3
MIGRATIONS = {  # version reached -> statements that bring the version before it there
    2: "ALTER TABLE results ADD COLUMN last_error_at DOUBLE PRECISION;",
    3: "",
}
OWN_TABLES = """
CREATE TABLE IF NOT EXISTS files (key TEXT PRIMARY KEY, data BYTEA NOT NULL);
ALTER TABLE files ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS cxr_node_schema (version INTEGER NOT NULL);
"""
MIGRATION_LOCK = 0x63787231  # pg_advisory_xact_lock key: one node migrates, the others wait for it
UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


class _Statements:
    """db.execute(sql, args) with the `?` placeholders the shared SQL uses."""

    def __init__(self, cursor):
        self.cursor = cursor

    def execute(self, sql: str, args=()):
        return self.cursor.execute(sql.replace("?", "%s"), args)


class PostgresQueue(Queue):
    def __init__(self, dsn: str, results_dir: Path | None = None, timeout: float = 5, connections: int = 8):
        """`timeout`: seconds to wait for a connection (the database down or restarting) before
        QueueUnavailable; the pool reconnects by itself once it is back."""
        super().__init__(results_dir)
        self.pool = ConnectionPool(dsn, min_size=1, max_size=connections, timeout=timeout, open=False,
                                   check=ConnectionPool.check_connection, kwargs={"connect_timeout": max(1, int(timeout))})
        try:
            self.pool.open(wait=True, timeout=timeout)
        except PoolTimeout as error:
            self.pool.close()
            raise QueueUnavailable(f"PostgreSQL not reachable: {error}") from error
        self._migrate()

    def _migrate(self) -> None:
        def statements(db):
            db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            found = db.execute("SELECT to_regclass('cxr_node_schema') IS NOT NULL present").fetchone()["present"]
            version = (db.execute("SELECT MAX(version) v FROM cxr_node_schema").fetchone()["v"] or 0) if found else 0
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(f"PostgreSQL queue schema version {version} is newer than this cxr-node's "
                                   f"({SCHEMA_VERSION}); run the newer cxr-node")
            if version == SCHEMA_VERSION:
                return
            for target in range(version + 1, SCHEMA_VERSION + 1) if version else ():  # a new database: none
                if MIGRATIONS[target]:
                    db.cursor.execute(MIGRATIONS[target])
            db.cursor.execute(TABLES + OWN_TABLES)
            db.execute("DELETE FROM cxr_node_schema")
            db.execute("INSERT INTO cxr_node_schema VALUES (?)", (SCHEMA_VERSION,))
        self._transaction(statements)

    def _transaction(self, statements):
        try:
            with self.pool.connection() as connection, connection.cursor(row_factory=dict_row) as cursor:
                return statements(_Statements(cursor))  # committed as the block ends, rolled back on an error
        except UNAVAILABLE as error:
            raise QueueUnavailable(str(error).strip().splitlines()[0]) from error

    def _query(self, sql, args=()):
        return self._transaction(lambda db: db.execute(sql, args).fetchall())

    def accept(self, received: Path, sop_uid, study_uid, series_uid, sop_class_uid, calling_ae) -> bool:
        data, now = Path(received).read_bytes(), time.time()

        def statements(db):  # the row and its bytes in one transaction: both or neither
            recorded = db.execute(
                "INSERT INTO instances (sop_uid, study_uid, series_uid, sop_class_uid, calling_ae, path, state,"
                " received_at, updated_at) VALUES (?,?,?,?,?,?,'received',?,?) ON CONFLICT DO NOTHING",
                (sop_uid, study_uid, series_uid, sop_class_uid, calling_ae, sop_uid, now, now)).rowcount == 1
            if recorded:
                db.execute("INSERT INTO files VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET data = excluded.data",
                           (sop_uid, data))
            return recorded
        recorded = self._transaction(statements)
        Path(received).unlink(missing_ok=True)
        return recorded

    def _hold_result(self, sop_uid: str, kind: str, data: bytes) -> str:
        self._transaction(lambda db: db.execute(
            "INSERT INTO files VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET data = excluded.data", (sop_uid, data)))
        return sop_uid

    def _open(self, path: str) -> io.BytesIO:
        rows = self._query("SELECT data FROM files WHERE key = ?", (path,)) if path else []
        if not rows:
            raise FileNotFoundError(f"no bytes held under {path!r} (purged after the retention period?)")
        return io.BytesIO(rows[0]["data"])

    def _delete(self, paths: list[str]) -> None:
        self._transaction(lambda db: db.execute("DELETE FROM files WHERE key = ANY(?)", (list(paths),)))

    def query(self, sql: str, args=()) -> list[dict]:
        """A read on the queue's database, for the cluster engine (which joins procrastinate's tables)."""
        return self._query(sql, args)

    def close(self) -> None:
        self.pool.close()
