"""The embedded backend: SQLite (WAL, synchronous=FULL) for the states, the spool folder for the bytes.
One host; its processes (receivers, the worker threads) share the file."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from dicom_node.queue.base import TABLES, Queue
from dicom_node.queue.jobs import QueueUnavailable, SchemaTooNew
from dicom_node.spool import Spool

# PRAGMA user_version. 1: instances and results; 2: the processes table and who claimed a job; 3: when a
# result's last error happened; 4: the patients' films (a new table: TABLES creates it).
SCHEMA_VERSION = 4
MIGRATIONS = {  # version reached -> statements that bring the version before it there
    2: "ALTER TABLE instances ADD COLUMN claimed_by TEXT;",
    3: "ALTER TABLE results ADD COLUMN last_error_at DOUBLE PRECISION;",
    4: "",
}


class SQLiteQueue(Queue):
    def __init__(self, path: Path, spool: Spool | None = None, results_dir: Path | None = None,
                 busy_timeout: float = 30):
        """`spool` holds the bytes (inputs, results until sent); `busy_timeout`: seconds to wait for
        another process's write lock before QueueUnavailable."""
        super().__init__(results_dir)
        self.path, self.spool = Path(path), spool
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=busy_timeout)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the sender hears 0x0000
        self._migrate()
        # Reads on their own connection: in WAL mode they never wait for a writer, so /healthz and `status`
        # answer while a writer of this process waits out another process's lock (up to the busy timeout).
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                       timeout=busy_timeout)
        self._reader.row_factory = sqlite3.Row
        self.path.chmod(0o600)

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION (a new file is created at it); refuse a newer one."""
        def statements(db):  # BEGIN IMMEDIATE: one process migrates; the others then see the version
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(f"{self.path}: queue schema version {version} is newer than this cxr-node's "
                                   f"({SCHEMA_VERSION}); run the newer cxr-node or restore a backup")
            if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'instances'").fetchone():
                for target in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                    for statement in filter(str.strip, MIGRATIONS[target].split(";")):
                        db.execute(statement)
            for statement in filter(str.strip, TABLES.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._transaction(statements)

    def _transaction(self, statements):
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise QueueUnavailable(str(error)) from error
            try:
                result = statements(self._db)
                self._db.execute("COMMIT")
                return result
            except BaseException as error:
                self._db.execute("ROLLBACK")
                if isinstance(error, sqlite3.Error):
                    raise QueueUnavailable(str(error)) from error
                raise

    def _query(self, sql, args=()):
        with self._read_lock:
            try:
                return [dict(row) for row in self._reader.execute(sql, args).fetchall()]
            except sqlite3.Error as error:
                raise QueueUnavailable(str(error)) from error

    def accept(self, received: Path, sop_uid, study_uid, series_uid, sop_class_uid, calling_ae) -> bool:
        path = Spool.commit(received, self.spool.input_path(sop_uid))  # a rename: bytes written once
        try:
            return self.record_received(sop_uid, study_uid, series_uid, sop_class_uid, calling_ae, path)
        except QueueUnavailable:
            path.unlink(missing_ok=True)  # not recorded, so not accepted: the sender sends it again
            raise

    def _hold_result(self, sop_uid: str, kind: str, data: bytes) -> str:
        return str(Spool.write(self.spool.result_path(sop_uid, kind), data))

    def _open(self, path: str) -> Path:
        if not path or not Path(path).exists():
            raise FileNotFoundError(path or "no file recorded (purged after the retention period?)")
        return Path(path)

    def _delete(self, paths: list[str]) -> None:
        for path in paths:
            Path(path).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._db.close()
            self._reader.close()
