"""The queue's states and transitions, written once in SQL both backends run (SQLite, PostgreSQL).

instances: received -> queued (study stable) -> processing -> done | skipped | failed
results:   one row per (result object, destination): pending -> sent (also when stored with a
           warning) | failed (a permanent refusal, kept with its reason until `retry`);
           'written' when no destination is configured (the file in results_dir is the delivery).
Every transition is one committed transaction, and bytes (the received instance, a result) are
durable before the row that points at them, so a crash at any point leaves a state to resume from.
A backend supplies transactions, `accept` and where bytes are held (`_hold_result`, `_open`, `_delete`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from dicom_node.history import DAY, Film
from dicom_node.kinds import Kind
from dicom_node.queue.jobs import NO_DESTINATION, Delivery, Job, Outgoing, State, from_row
from dicom_node.spool import Spool

# Tables both backends create (column types both accept); a backend adds its own.
TABLES = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, study_uid TEXT, series_uid TEXT, sop_class_uid TEXT, calling_ae TEXT,
    path TEXT, state TEXT NOT NULL, reason TEXT, decided_by TEXT, opacity_pct DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0, received_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL, claimed_by TEXT);
CREATE INDEX IF NOT EXISTS instances_state ON instances(state);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS results (
    sop_uid TEXT NOT NULL, destination TEXT NOT NULL, source_sop_uid TEXT NOT NULL, kind TEXT NOT NULL,
    path TEXT, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at DOUBLE PRECISION,
    last_error TEXT, last_error_at DOUBLE PRECISION, created_at DOUBLE PRECISION NOT NULL, sent_at DOUBLE PRECISION,
    PRIMARY KEY (sop_uid, destination));
CREATE INDEX IF NOT EXISTS results_state ON results(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS films (
    source_uid TEXT PRIMARY KEY, patient_key TEXT NOT NULL, taken_at DOUBLE PRECISION,
    time_known INTEGER NOT NULL, study_uid TEXT NOT NULL,
    sr_uid TEXT NOT NULL, sr_series_uid TEXT NOT NULL, model_version TEXT NOT NULL, figures TEXT NOT NULL,
    recorded_at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS films_patient ON films(patient_key, taken_at);
CREATE TABLE IF NOT EXISTS processes (
    process_id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, role TEXT NOT NULL,
    version TEXT NOT NULL, started_at DOUBLE PRECISION NOT NULL, heartbeat_at DOUBLE PRECISION NOT NULL);
"""

# `cxr-node status` forgets a process this many liveness periods after its last heartbeat (600 s at 60 s).
FORGET_AFTER_LIVENESS = 10
# The reason of an instance whose analysis ended its worker every time it was tried (SQL both backends run).
DIED = "'worker died ' || attempts || ' times while analysing it'"


def _record_film(db, film: Film, now: float, replace: bool) -> None:
    row = dict(film.row(), recorded_at=now)
    updates = ", ".join(f"{column} = excluded.{column}" for column in row if column != "source_uid")
    db.execute(f"INSERT INTO films ({', '.join(row)}) VALUES ({', '.join('?' * len(row))}) ON CONFLICT (source_uid) "
               + (f"DO UPDATE SET {updates}" if replace else "DO NOTHING"), tuple(row.values()))


class Queue:
    """Shared by both backends; `results_dir` is where results go when no destination is configured."""

    def __init__(self, results_dir: Path | None = None):
        self.results_dir = results_dir

    # ------------------------------------------------------------ what a backend provides
    def _transaction(self, statements: Callable):
        """Run statements(db) in one transaction (db.execute(sql, args) with ? placeholders); raises
        QueueUnavailable when the database cannot be reached or written."""
        raise NotImplementedError

    def _query(self, sql: str, args=()) -> list[dict]:
        raise NotImplementedError

    def _hold_result(self, sop_uid: str, kind: str, data: bytes) -> str:
        """Keep a result's bytes durably until sent; returns where."""
        raise NotImplementedError

    def _open(self, path: str):
        """A path or file object pydicom reads; FileNotFoundError when the bytes are gone."""
        raise NotImplementedError

    def _delete(self, paths: list[str]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ receive side
    def known(self, sop_uid: str) -> bool:
        return bool(self._query("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)))

    def accept(self, received: Path, sop_uid, study_uid, series_uid, sop_class_uid, calling_ae) -> bool:
        """Keep a received file's bytes and record it as one instance, durably; False if the UID was
        already known. Raises OSError (bytes not kept) or QueueUnavailable (not recorded): either way
        nothing was accepted."""
        raise NotImplementedError

    def record_received(self, sop_uid, study_uid, series_uid, sop_class_uid, calling_ae, path,
                        state="received") -> bool:
        """Record an instance whose bytes are held at `path`; False if the SOP Instance UID was already known."""
        now = time.time()
        return self._transaction(lambda db: db.execute(
            "INSERT INTO instances (sop_uid, study_uid, series_uid, sop_class_uid, calling_ae, path, state,"
            " received_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            (sop_uid, study_uid, series_uid, sop_class_uid, calling_ae, str(path), state, now, now)
        ).rowcount == 1)

    def promote_stable(self, stable_seconds: float, enqueue: Callable[[list[str]], None] | None = None) -> int:
        """received -> queued for studies that got no new instance for `stable_seconds`. With a job
        engine, `enqueue` is given their UIDs first: an instance is 'queued' only once its job exists,
        and a crash in between promotes it again (the engine's queueing lock keeps it one job)."""
        now = time.time()
        stable = ("state = 'received' AND study_uid IN (SELECT study_uid FROM instances GROUP BY study_uid"
                  " HAVING MAX(received_at) <= ?)")
        if enqueue is None:
            return self._transaction(lambda db: db.execute(
                f"UPDATE instances SET state = 'queued', updated_at = ? WHERE {stable}",
                (now, now - stable_seconds)).rowcount)
        uids = [row["sop_uid"] for row in self._query(f"SELECT sop_uid FROM instances WHERE {stable}"
                                                      " ORDER BY received_at LIMIT 1000", (now - stable_seconds,))]
        if uids:
            enqueue(uids)
            self._transaction(lambda db: [db.execute("UPDATE instances SET state = 'queued', updated_at = ?"
                                                     " WHERE sop_uid = ? AND state = 'received'", (now, uid))
                                          for uid in uids])
        return len(uids)

    # ------------------------------------------------------------ worker side
    def recover(self, max_attempts: int) -> tuple[int, list[str]]:
        """Jobs interrupted by a crash (their worker died while analysing them) go back to the queue, those
        whose analysis ended its worker `max_attempts` times end failed instead: an image that kills its
        worker must not kill it for ever (the single-host engine; a job engine's retry goes through `start`).
        Returns (jobs queued again, UIDs failed)."""
        def statements(db):
            now = time.time()
            failed = db.execute(f"UPDATE instances SET state = 'failed', reason = {DIED}, updated_at = ?"
                                " WHERE state = 'processing' AND attempts >= ? RETURNING sop_uid",
                                (now, max_attempts)).fetchall()
            queued = db.execute("UPDATE instances SET state = 'queued', updated_at = ? WHERE state = 'processing'",
                                (now,)).rowcount
            return queued, [row["sop_uid"] for row in failed]
        return self._transaction(statements)

    def claim_next(self, process_id: str | None = None) -> Job | None:
        """The oldest queued job, now 'processing' and claimed by `process_id` (the single-host engine)."""
        rows = self._transaction(lambda db: db.execute(
            "UPDATE instances SET state = 'processing', attempts = attempts + 1, updated_at = ?, claimed_by = ?"
            " WHERE sop_uid = (SELECT sop_uid FROM instances WHERE state = 'queued' ORDER BY received_at LIMIT 1)"
            " RETURNING *", (time.time(), process_id)).fetchall())
        return from_row(Job, dict(rows[0])) if rows else None

    def start(self, sop_uid: str, process_id: str, max_attempts: int) -> Job | None:
        """A job engine runs the instance's job: the instance now 'processing' and claimed by `process_id`,
        or 'failed' when it was still 'processing' under another claimer (whose worker died) for the
        `max_attempts`th time; None if it is in no state to start (finished). This process's own re-run
        (its outcome could not be recorded) is not a new attempt."""
        def statements(db):
            now = time.time()
            rows = db.execute(
                f"UPDATE instances SET state = 'failed', reason = {DIED}, updated_at = ? WHERE sop_uid = ?"
                " AND state = 'processing' AND COALESCE(claimed_by, '') != ? AND attempts >= ? RETURNING *",
                (now, sop_uid, process_id, max_attempts)).fetchall()
            return rows or db.execute(
                "UPDATE instances SET state = 'processing', updated_at = ?, attempts = attempts + CASE"
                " WHEN state = 'processing' AND claimed_by = ? THEN 0 ELSE 1 END, claimed_by = ?"
                " WHERE sop_uid = ? AND state IN ('queued', 'processing') RETURNING *",
                (now, process_id, process_id, sop_uid)).fetchall()
        rows = self._transaction(statements)
        return from_row(Job, dict(rows[0])) if rows else None

    def input_file(self, job: Job):
        """The received instance's bytes, as a path or file object pydicom reads."""
        return self._open(job.path)

    def _finish(self, sop_uid, state, reason=None, decided_by=None, opacity_pct=None):
        return lambda db: db.execute(
            "UPDATE instances SET state = ?, reason = ?, decided_by = ?, opacity_pct = ?, updated_at = ?"
            " WHERE sop_uid = ?", (state, reason, decided_by, opacity_pct, time.time(), sop_uid))

    def skip(self, sop_uid: str, reason: str, decided_by: str) -> None:
        self._transaction(self._finish(sop_uid, "skipped", reason, decided_by))

    def fail(self, sop_uid: str, reason: str) -> None:
        self._transaction(self._finish(sop_uid, "failed", reason))

    def complete(self, job: Job, results: list[tuple[str, str, bytes]], destinations: list[str],
                 decided_by: str, opacity_pct: float, note: str | None = None, film: Film | None = None) -> None:
        """Instance done and its results (sop_uid, kind, bytes) queued for every destination, atomically
        (the bytes are held first), with `film` added to its patient's history. No destination: written to
        results_dir/<study>/, the delivery. `note` (kept as the reason) says what was unusual about it."""
        held = []
        for result_uid, kind, data in results:
            if destinations:
                held.append((result_uid, kind, self._hold_result(result_uid, kind, data)))
            else:
                folder = self.results_dir / job.study_uid
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                held.append((result_uid, kind, str(Spool.write(folder / Spool.file_name(result_uid, kind), data))))
        now = time.time()

        def statements(db):
            for result_uid, kind, path in held:
                for destination in destinations or [NO_DESTINATION]:
                    db.execute("INSERT INTO results (sop_uid, destination, source_sop_uid, kind, path, state,"
                               " next_attempt_at, created_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                               (result_uid, destination, job.sop_uid, kind, path,
                                "pending" if destinations else "written", now, now))
            if film:
                _record_film(db, film, now, replace=True)
            self._finish(job.sop_uid, "done", note, decided_by, opacity_pct)(db)
        self._transaction(statements)

    def remember_films(self, films: list[Film]) -> None:
        """Films learnt elsewhere (the PACS's copies of this node's SRs): added to the history, never
        over a film this node measured itself."""
        now = time.time()
        self._transaction(lambda db: [_record_film(db, film, now, replace=False) for film in films])

    # ------------------------------------------------------------ patient history
    def prior_film(self, patient_key: str, taken_at: float, time_known: bool, model_version: str,
                   source_uid: str) -> Film | None:
        """The patient's latest film taken before `taken_at`, other than `source_uid`, measured by
        `model_version`; on the same day only when both films' times of day are known."""
        day_start = taken_at // DAY * DAY
        rows = self._query("SELECT * FROM films WHERE patient_key = ? AND model_version = ? AND source_uid != ?"
                           " AND (taken_at < ? OR (taken_at < ? AND time_known = 1 AND ? = 1))"
                           " ORDER BY taken_at DESC LIMIT 1",
                           (patient_key, model_version, source_uid, day_start, taken_at, int(time_known)))
        return Film.from_row(rows[0]) if rows else None

    def films(self, patient_key: str) -> list[Film]:
        """A patient's films, in the order they were taken (those of unknown time last)."""
        rows = self._query("SELECT * FROM films WHERE patient_key = ? ORDER BY taken_at IS NULL, taken_at",
                           (patient_key,))
        return [Film.from_row(row) for row in rows]

    def purge_history(self, older_than: float) -> int:
        """Forget the films recorded before `older_than`; how many."""
        return self._transaction(lambda db: db.execute("DELETE FROM films WHERE recorded_at < ?",
                                                       (older_than,)).rowcount)

    def requeue(self, sop_uid: str, reason: str) -> None:
        """processing -> queued, keeping why (e.g. the disk filled up during the job); a run put back on
        purpose is not counted as an attempt (attempts count the runs that ended or killed their worker)."""
        self._transaction(lambda db: db.execute(
            "UPDATE instances SET state = 'queued', reason = ?, attempts = attempts - 1, updated_at = ?"
            " WHERE sop_uid = ?",
            (reason, time.time(), sop_uid)))

    def retry_failed(self, sop_uid: str | None = None) -> int:
        """failed -> queued (all failed instances, or one), with their attempts counted from 0 again."""
        where, args = ("AND sop_uid = ?", (sop_uid,)) if sop_uid else ("", ())
        return self._transaction(lambda db: db.execute(
            "UPDATE instances SET state = 'queued', reason = NULL, attempts = 0, updated_at = ?"
            f" WHERE state = 'failed' {where}",
            (time.time(), *args)).rowcount)

    # ------------------------------------------------------------ sender side
    def due_results(self, destination: str, limit: int = 50, sr_only_with_seg: bool = False) -> list[Outgoing]:
        """Pending results whose backoff has passed, SEG before SR of the same source; with
        `sr_only_with_seg`, an SR only once the SEG it references is stored at that destination."""
        held = (f" AND NOT (r.kind = '{Kind.SR}' AND EXISTS (SELECT 1 FROM results s WHERE s.source_sop_uid = r.source_sop_uid"
                f" AND s.destination = r.destination AND s.kind = '{Kind.SEG}' AND s.state != 'sent'))") if sr_only_with_seg else ""
        rows = self._query("SELECT * FROM results r WHERE state = 'pending' AND destination = ? AND next_attempt_at <= ?"
                           f"{held} ORDER BY created_at, kind = '{Kind.SR}' LIMIT ?", (destination, time.time(), limit))
        return [from_row(Outgoing, row) for row in rows]

    def result_file(self, outgoing: Outgoing):
        """The result's bytes, as a path or file object pydicom reads (FileNotFoundError when gone)."""
        return self._open(outgoing.path)

    def mark_sent(self, sop_uid: str, destination: str, warning: str | None = None) -> None:
        """Stored; a warning status (e.g. coerced attributes) is kept in last_error for the record."""
        now = time.time()
        self._transaction(lambda db: db.execute(
            "UPDATE results SET state = 'sent', sent_at = ?, last_error = ?, last_error_at = ?, attempts = attempts + 1"
            " WHERE sop_uid = ? AND destination = ?", (now, warning, now if warning else None, sop_uid, destination)))

    def mark_send_refused(self, sop_uid: str, destination: str, reason: str) -> None:
        """A permanent failure: state 'failed' with the reason; sent again only after `retry_failed_results`."""
        self._transaction(lambda db: db.execute(
            "UPDATE results SET state = 'failed', attempts = attempts + 1, last_error = ?, last_error_at = ?,"
            " next_attempt_at = NULL WHERE sop_uid = ? AND destination = ?", (reason, time.time(), sop_uid, destination)))

    def refuse_held_reports(self, source_sop_uid: str, destination: str, reason: str) -> int:
        """The pending SRs of a source whose SEG was refused at `destination` (sr_only_with_seg): failed too."""
        return self._transaction(lambda db: db.execute(
            "UPDATE results SET state = 'failed', last_error = ?, last_error_at = ?, next_attempt_at = NULL"
            " WHERE source_sop_uid = ? AND destination = ? AND kind = ? AND state = 'pending'",
            (reason, time.time(), source_sop_uid, destination, Kind.SR)).rowcount)

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
                                  (sop_uid, destination)).fetchone()["attempts"]
            delay, now = min(maximum, initial * 2 ** attempts), time.time()
            db.execute("UPDATE results SET attempts = attempts + 1, last_error = ?, last_error_at = ?, next_attempt_at = ?"
                       " WHERE sop_uid = ? AND destination = ?", (error, now, now + delay, sop_uid, destination))
        self._transaction(statements)

    def destinations_due(self) -> list[str]:
        """Destinations with a pending result whose backoff has passed."""
        return [row["destination"] for row in self._query(
            "SELECT DISTINCT destination FROM results WHERE state = 'pending' AND next_attempt_at <= ?", (time.time(),))]

    # ------------------------------------------------------------ the node's processes
    def register(self, process_id: str, host: str, pid: int, role: str, version: str, liveness_seconds: float) -> None:
        """A process joins; rows of processes dead for FORGET_AFTER_LIVENESS periods are dropped."""
        now = time.time()

        def statements(db):
            db.execute("DELETE FROM processes WHERE heartbeat_at < ? OR process_id = ?",
                       (now - FORGET_AFTER_LIVENESS * liveness_seconds, process_id))
            db.execute("INSERT INTO processes VALUES (?,?,?,?,?,?,?)", (process_id, host, pid, role, version, now, now))
        self._transaction(statements)

    def heartbeat(self, process_id: str) -> None:
        self._transaction(lambda db: db.execute("UPDATE processes SET heartbeat_at = ? WHERE process_id = ?",
                                                (time.time(), process_id)))

    def forget(self, host: str, pid: int) -> None:
        """A process known to be gone (its parent saw it exit): no longer listed."""
        self._transaction(lambda db: db.execute("DELETE FROM processes WHERE host = ? AND pid = ?", (host, pid)))

    def unregister(self, process_id: str) -> None:
        self._transaction(lambda db: db.execute("DELETE FROM processes WHERE process_id = ?", (process_id,)))

    def processes(self, liveness_seconds: float) -> list[dict]:
        """Every registered process: role, host, pid, version, seconds since its heartbeat, its verdict and
        the jobs it holds. A process records its heartbeat only while all its loops are alive: `alive` within
        a quarter of `liveness_seconds` (a few heartbeats), `late` within `liveness_seconds`, else `dead`;
        forgotten FORGET_AFTER_LIVENESS periods after its last heartbeat (its row stays until a process registers)."""
        now = time.time()
        rows = self._query("SELECT p.*, (SELECT COUNT(*) FROM instances i WHERE i.state = 'processing'"
                           " AND i.claimed_by = p.process_id) jobs_in_flight FROM processes p"
                           " WHERE p.heartbeat_at >= ? ORDER BY started_at",
                           (now - FORGET_AFTER_LIVENESS * liveness_seconds,))

        def verdict(age: float) -> str:
            return "alive" if age <= liveness_seconds / 4 else "late" if age <= liveness_seconds else "dead"
        return [{"role": r["role"], "host": r["host"], "pid": r["pid"], "version": r["version"],
                 "heartbeat_age_s": round(now - r["heartbeat_at"], 1), "verdict": verdict(now - r["heartbeat_at"]),
                 "jobs_in_flight": r["jobs_in_flight"]} for r in rows]

    # ------------------------------------------------------------ reporting and retention
    def counts(self) -> dict:
        instances = {str(s): 0 for s in State}
        instances.update({r["state"]: r["n"] for r in self._query("SELECT state, COUNT(*) n FROM instances GROUP BY state")})
        results = {str(s): 0 for s in Delivery}
        results.update({r["state"]: r["n"] for r in self._query("SELECT state, COUNT(*) n FROM results GROUP BY state")})
        return {"instances": instances, "results": results}

    def last_errors(self, limit: int = 10) -> list[dict]:
        """The latest failed instances and failed sends: `at` is when the error happened (null for a
        send error recorded before the queue kept that time), `next_attempt_at` when a send is tried again (none:
        it waits for `cxr-node retry`)."""
        failed = self._query("SELECT sop_uid, 'instance' kind, reason error, updated_at at, NULL next_attempt_at"
                             " FROM instances WHERE state = 'failed' ORDER BY updated_at DESC LIMIT ?", (limit,))
        sending = self._query("SELECT sop_uid, CASE state WHEN 'failed' THEN 'refused by ' ELSE 'send to ' END"
                              " || destination kind, last_error error, last_error_at at, next_attempt_at"
                              " FROM results WHERE state IN ('pending', 'failed') AND last_error IS NOT NULL"
                              " ORDER BY last_error_at DESC NULLS LAST LIMIT ?", (limit,))
        return failed + sending

    def instance(self, sop_uid: str) -> Job | None:
        rows = self._query("SELECT * FROM instances WHERE sop_uid = ?", (sop_uid,))
        return from_row(Job, rows[0]) if rows else None

    def results_of(self, source_sop_uid: str) -> list[Outgoing]:
        """Every result made from one instance, one per destination, with its delivery state."""
        return [from_row(Outgoing, row) for row in self._query(
            "SELECT * FROM results WHERE source_sop_uid = ? ORDER BY kind, destination", (source_sop_uid,))]

    def expired_files(self, older_than: float) -> list[str]:
        """Bytes of finished work older than the retention: inputs whose results all left, results sent
        everywhere (a refused result keeps its bytes for `retry`)."""
        inputs = self._query(
            "SELECT path FROM instances i WHERE state IN ('done', 'skipped') AND updated_at < ? AND path != ''"
            " AND NOT EXISTS (SELECT 1 FROM results r WHERE r.source_sop_uid = i.sop_uid AND r.state = 'pending')",
            (older_than,))
        results = self._query("SELECT DISTINCT path FROM results WHERE state = 'sent' AND sent_at < ? AND path != ''"
                              " AND sop_uid NOT IN (SELECT sop_uid FROM results WHERE state IN ('pending', 'failed'))",
                              (older_than,))
        return [r["path"] for r in inputs + results]

    def purge(self, older_than: float) -> int:
        """Delete the bytes `expired_files` names and forget where they were; how many."""
        paths = self.expired_files(older_than)
        self._delete(paths)
        self._transaction(lambda db: [(db.execute("UPDATE instances SET path = '' WHERE path = ?", (path,)),
                                       db.execute("UPDATE results SET path = '' WHERE path = ?", (path,)))
                                      for path in paths])
        return len(paths)
