"""Job states in SQLite (WAL, synchronous=FULL): the only place that knows them.

instances: received -> queued (study stable) -> processing -> done | skipped | failed
results:   one row per (result object, destination): pending -> sent (also when stored with a
           warning) | failed (a permanent refusal, kept with its reason until `retry`);
           'written' when no destination is configured (the file in results_dir is the delivery).
Every transition is one committed transaction, so a crash at any point leaves a state to resume
from: `recover` puts interrupted 'processing' jobs back in the queue at start-up.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path

# PRAGMA user_version. 1: instances and results; 2: the processes table and who claimed a job.
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, study_uid TEXT, series_uid TEXT, sop_class_uid TEXT, calling_ae TEXT,
    path TEXT, state TEXT NOT NULL, reason TEXT, decided_by TEXT, opacity_pct REAL,
    attempts INTEGER NOT NULL DEFAULT 0, received_at REAL NOT NULL, updated_at REAL NOT NULL, claimed_by TEXT);
CREATE INDEX IF NOT EXISTS instances_state ON instances(state);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS results (
    sop_uid TEXT NOT NULL, destination TEXT NOT NULL, source_sop_uid TEXT NOT NULL, kind TEXT NOT NULL,
    path TEXT, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL,
    last_error TEXT, created_at REAL NOT NULL, sent_at REAL, PRIMARY KEY (sop_uid, destination));
CREATE INDEX IF NOT EXISTS results_state ON results(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS processes (
    process_id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, role TEXT NOT NULL,
    version TEXT NOT NULL, started_at REAL NOT NULL, heartbeat_at REAL NOT NULL);
"""
MIGRATIONS = {  # version reached -> statements that bring the version before it there
    2: "ALTER TABLE instances ADD COLUMN claimed_by TEXT;",
}


class SchemaTooNew(RuntimeError):
    """The queue was written by a newer cxr-node: refusing it keeps this one from misreading it."""
NO_DESTINATION = ""


class State(StrEnum):
    """Where a received instance is (a str, so it is stored and compared as one)."""
    RECEIVED = "received"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class Delivery(StrEnum):
    """Where one result is on its way to one destination."""
    PENDING = "pending"
    SENT = "sent"
    WRITTEN = "written"
    FAILED = "failed"


def _from_row(cls, row: dict):
    """A Job or Outgoing from a table row (the columns it has fields for)."""
    return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})


@dataclass(frozen=True)
class Job:
    """A received instance: what the worker claims and `cxr-node status --uid` shows."""
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    calling_ae: str
    path: str
    state: State
    attempts: int
    received_at: float
    updated_at: float
    reason: str | None = None
    decided_by: str | None = None
    opacity_pct: float | None = None
    claimed_by: str | None = None  # the process working on it (host:pid:start)

    def __post_init__(self):
        object.__setattr__(self, "state", State(self.state))  # the column holds its value


@dataclass(frozen=True)
class Outgoing:
    """One result for one destination: what the sender sends."""
    sop_uid: str
    destination: str
    source_sop_uid: str
    kind: str
    path: str
    state: Delivery
    attempts: int
    created_at: float
    next_attempt_at: float | None = None
    last_error: str | None = None
    sent_at: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "state", Delivery(self.state))  # the column holds its value


class Queue:
    def __init__(self, path: Path, busy_timeout: float = 30):
        """`busy_timeout`: seconds to wait for another process's write lock before sqlite3.Error."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=busy_timeout)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the sender hears 0x0000
        self._migrate()
        self.path.chmod(0o600)

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION (a new file is created at it); refuse a newer one."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # one process migrates; the others then see the version
            try:
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise SchemaTooNew(f"{self.path}: queue schema version {version} is newer than this cxr-node's "
                                       f"({SCHEMA_VERSION}); run the newer cxr-node or restore a backup")
                fresh = not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'instances'").fetchone()
                if not fresh:
                    for target in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                        for statement in filter(str.strip, MIGRATIONS[target].split(";")):
                            self._db.execute(statement)
                for statement in filter(str.strip, SCHEMA.split(";")):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _transaction(self, statements):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = statements(self._db)
                self._db.execute("COMMIT")
                return result
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _query(self, sql, args=()):
        with self._lock:
            return [dict(row) for row in self._db.execute(sql, args).fetchall()]

    # ------------------------------------------------------------ receive side
    def known(self, sop_uid: str) -> bool:
        return bool(self._query("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)))

    def record_received(self, sop_uid, study_uid, series_uid, sop_class_uid, calling_ae, path,
                        state="received", reason=None) -> bool:
        """Record a spooled instance; False if the SOP Instance UID was already known."""
        now = time.time()
        return self._transaction(lambda db: db.execute(
            "INSERT OR IGNORE INTO instances (sop_uid, study_uid, series_uid, sop_class_uid, calling_ae, path,"
            " state, reason, received_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (sop_uid, study_uid, series_uid, sop_class_uid, calling_ae, str(path), state, reason, now, now)
        ).rowcount == 1)

    def promote_stable(self, stable_seconds: float) -> int:
        """received -> queued for studies that got no new instance for `stable_seconds`."""
        now = time.time()
        return self._transaction(lambda db: db.execute(
            "UPDATE instances SET state = 'queued', updated_at = ? WHERE state = 'received' AND study_uid IN"
            " (SELECT study_uid FROM instances GROUP BY study_uid HAVING MAX(received_at) <= ?)",
            (now, now - stable_seconds)).rowcount)

    # ------------------------------------------------------------ worker side
    def recover(self) -> int:
        """Jobs interrupted by a crash go back to the queue."""
        return self._transaction(lambda db: db.execute(
            "UPDATE instances SET state = 'queued', updated_at = ? WHERE state = 'processing'",
            (time.time(),)).rowcount)

    def claim_next(self, process_id: str | None = None) -> Job | None:
        """The oldest queued job, now 'processing' and claimed by `process_id`."""
        def claim(db):
            row = db.execute("SELECT * FROM instances WHERE state = 'queued' ORDER BY received_at LIMIT 1").fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute("UPDATE instances SET state = 'processing', attempts = attempts + 1, updated_at = ?,"
                       " claimed_by = ? WHERE sop_uid = ?", (now, process_id, row["sop_uid"]))
            return _from_row(Job, dict(row, state=State.PROCESSING, attempts=row["attempts"] + 1, updated_at=now))
        return self._transaction(claim)

    def _finish(self, sop_uid, state, reason=None, decided_by=None, opacity_pct=None):
        return lambda db: db.execute(
            "UPDATE instances SET state = ?, reason = ?, decided_by = ?, opacity_pct = ?, updated_at = ?"
            " WHERE sop_uid = ?", (state, reason, decided_by, opacity_pct, time.time(), sop_uid))

    def skip(self, sop_uid: str, reason: str, decided_by: str) -> None:
        self._transaction(self._finish(sop_uid, "skipped", reason, decided_by))

    def fail(self, sop_uid: str, reason: str) -> None:
        self._transaction(self._finish(sop_uid, "failed", reason))

    def complete(self, sop_uid: str, results: list[tuple[str, str, Path]], destinations: list[str],
                 decided_by: str, opacity_pct: float, note: str | None = None) -> None:
        """Instance done and its results (sop_uid, kind, path) queued for every destination, atomically;
        `note` (kept as the reason) says what was unusual about it."""
        now = time.time()

        def statements(db):
            for result_uid, kind, path in results:
                for destination in destinations or [NO_DESTINATION]:
                    db.execute("INSERT OR IGNORE INTO results (sop_uid, destination, source_sop_uid, kind, path,"
                               " state, next_attempt_at, created_at) VALUES (?,?,?,?,?,?,?,?)",
                               (result_uid, destination, sop_uid, kind, str(path),
                                "pending" if destinations else "written", now, now))
            self._finish(sop_uid, "done", note, decided_by, opacity_pct)(db)
        self._transaction(statements)

    def requeue(self, sop_uid: str, reason: str) -> None:
        """processing -> queued, keeping why (e.g. the disk filled up during the job)."""
        self._transaction(lambda db: db.execute(
            "UPDATE instances SET state = 'queued', reason = ?, updated_at = ? WHERE sop_uid = ?",
            (reason, time.time(), sop_uid)))

    def retry_failed(self, sop_uid: str | None = None) -> int:
        """failed -> queued (all failed instances, or one)."""
        where, args = ("AND sop_uid = ?", (sop_uid,)) if sop_uid else ("", ())
        return self._transaction(lambda db: db.execute(
            f"UPDATE instances SET state = 'queued', reason = NULL, updated_at = ? WHERE state = 'failed' {where}",
            (time.time(), *args)).rowcount)

    # ------------------------------------------------------------ sender side
    def due_results(self, destination: str, limit: int = 50, sr_only_with_seg: bool = False) -> list[Outgoing]:
        """Pending results whose backoff has passed, SEG before SR of the same source; with
        `sr_only_with_seg`, an SR only once the SEG it references is stored at that destination."""
        held = (" AND NOT (r.kind = 'SR' AND EXISTS (SELECT 1 FROM results s WHERE s.source_sop_uid = r.source_sop_uid"
                " AND s.destination = r.destination AND s.kind = 'SEG' AND s.state != 'sent'))") if sr_only_with_seg else ""
        rows = self._query("SELECT * FROM results r WHERE state = 'pending' AND destination = ? AND next_attempt_at <= ?"
                           f"{held} ORDER BY created_at, kind = 'SR' LIMIT ?", (destination, time.time(), limit))
        return [_from_row(Outgoing, row) for row in rows]

    def mark_sent(self, sop_uid: str, destination: str, warning: str | None = None) -> None:
        """Stored; a warning status (e.g. coerced attributes) is kept in last_error for the record."""
        self._transaction(lambda db: db.execute(
            "UPDATE results SET state = 'sent', sent_at = ?, last_error = ?, attempts = attempts + 1"
            " WHERE sop_uid = ? AND destination = ?", (time.time(), warning, sop_uid, destination)))

    def mark_send_refused(self, sop_uid: str, destination: str, reason: str) -> None:
        """A permanent failure: state 'failed' with the reason; sent again only after `retry_failed_results`."""
        self._transaction(lambda db: db.execute(
            "UPDATE results SET state = 'failed', attempts = attempts + 1, last_error = ?, next_attempt_at = NULL"
            " WHERE sop_uid = ? AND destination = ?", (reason, sop_uid, destination)))

    def refuse_held_reports(self, source_sop_uid: str, destination: str, reason: str) -> int:
        """The pending SRs of a source whose SEG was refused at `destination` (sr_only_with_seg): failed too."""
        return self._transaction(lambda db: db.execute(
            "UPDATE results SET state = 'failed', last_error = ?, next_attempt_at = NULL WHERE source_sop_uid = ?"
            " AND destination = ? AND kind = 'SR' AND state = 'pending'", (reason, source_sop_uid, destination)).rowcount)

    def retry_failed_results(self, uid: str | None = None) -> int:
        """failed -> pending, due now: every refused result, or those of one result or source UID."""
        where, args = ("AND (sop_uid = ? OR source_sop_uid = ?)", (uid, uid)) if uid else ("", ())
        return self._transaction(lambda db: db.execute(
            f"UPDATE results SET state = 'pending', next_attempt_at = ? WHERE state = 'failed' {where}",
            (time.time(), *args)).rowcount)

    def mark_send_failed(self, sop_uid: str, destination: str, error: str, initial: float, maximum: float) -> None:
        """Exponential backoff: initial * 2^attempts, capped at maximum. Never dropped."""
        def statements(db):
            attempts = db.execute("SELECT attempts FROM results WHERE sop_uid = ? AND destination = ?",
                                  (sop_uid, destination)).fetchone()[0]
            delay = min(maximum, initial * 2 ** attempts)
            db.execute("UPDATE results SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?"
                       " WHERE sop_uid = ? AND destination = ?", (error, time.time() + delay, sop_uid, destination))
        self._transaction(statements)

    # ------------------------------------------------------------ the node's processes
    def register(self, process_id: str, host: str, pid: int, role: str, version: str) -> None:
        """A process joins (rows of processes silent for 10 minutes are dropped: they died)."""
        now = time.time()

        def statements(db):
            db.execute("DELETE FROM processes WHERE heartbeat_at < ?", (now - 600,))
            db.execute("INSERT OR REPLACE INTO processes VALUES (?,?,?,?,?,?,?)",
                       (process_id, host, pid, role, version, now, now))
        self._transaction(statements)

    def heartbeat(self, process_id: str) -> None:
        self._transaction(lambda db: db.execute("UPDATE processes SET heartbeat_at = ? WHERE process_id = ?",
                                                (time.time(), process_id)))

    def unregister(self, process_id: str) -> None:
        self._transaction(lambda db: db.execute("DELETE FROM processes WHERE process_id = ?", (process_id,)))

    def processes(self) -> list[dict]:
        """Every registered process: role, host, pid, version, seconds since its heartbeat, jobs it holds."""
        rows = self._query("SELECT p.*, (SELECT COUNT(*) FROM instances i WHERE i.state = 'processing'"
                           " AND i.claimed_by = p.process_id) jobs_in_flight FROM processes p ORDER BY started_at")
        now = time.time()
        return [{"role": r["role"], "host": r["host"], "pid": r["pid"], "version": r["version"],
                 "heartbeat_age_s": round(now - r["heartbeat_at"], 1), "jobs_in_flight": r["jobs_in_flight"]}
                for r in rows]

    # ------------------------------------------------------------ reporting and retention
    def counts(self) -> dict:
        instances = {str(s): 0 for s in State}
        instances.update({r["state"]: r["n"] for r in self._query("SELECT state, COUNT(*) n FROM instances GROUP BY state")})
        results = {str(s): 0 for s in Delivery}
        results.update({r["state"]: r["n"] for r in self._query("SELECT state, COUNT(*) n FROM results GROUP BY state")})
        return {"instances": instances, "results": results}

    def last_errors(self, limit: int = 10) -> list[dict]:
        failed = self._query("SELECT sop_uid, 'instance' kind, reason error, updated_at at FROM instances"
                             " WHERE state = 'failed' ORDER BY updated_at DESC LIMIT ?", (limit,))
        sending = self._query("SELECT sop_uid, CASE state WHEN 'failed' THEN 'refused by ' ELSE 'send to ' END"
                              " || destination kind, last_error error, COALESCE(next_attempt_at, created_at) at"
                              " FROM results WHERE state IN ('pending', 'failed') AND last_error IS NOT NULL"
                              " ORDER BY at DESC LIMIT ?", (limit,))
        return failed + sending

    def instance(self, sop_uid: str) -> Job | None:
        rows = self._query("SELECT * FROM instances WHERE sop_uid = ?", (sop_uid,))
        return _from_row(Job, rows[0]) if rows else None

    def expired_files(self, older_than: float) -> list[str]:
        """Files of finished work older than the retention: inputs whose results all left, results sent
        everywhere (a refused result keeps its file for `retry`)."""
        inputs = self._query(
            "SELECT path FROM instances i WHERE state IN ('done', 'skipped') AND updated_at < ? AND path != ''"
            " AND NOT EXISTS (SELECT 1 FROM results r WHERE r.source_sop_uid = i.sop_uid AND r.state = 'pending')",
            (older_than,))
        results = self._query("SELECT path FROM results WHERE state = 'sent' AND sent_at < ? AND path != ''"
                              " AND sop_uid NOT IN (SELECT sop_uid FROM results WHERE state IN ('pending', 'failed'))",
                              (older_than,))
        return [r["path"] for r in inputs + results]

    def forget_files(self, paths: list[str]) -> None:
        def statements(db):
            for path in paths:
                db.execute("UPDATE instances SET path = '' WHERE path = ?", (path,))
                db.execute("UPDATE results SET path = '' WHERE path = ?", (path,))
        self._transaction(statements)

    def close(self) -> None:
        with self._lock:
            self._db.close()
