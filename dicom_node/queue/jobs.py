"""What the queue holds, the same for every backend: a received instance (Job), one result on its way
to one destination (Outgoing), and their states."""
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum

from dicom_node.kinds import Kind

NO_DESTINATION = ""


class SchemaTooNew(RuntimeError):
    """The queue was written by a newer cxr-node: refusing it keeps this one from misreading it."""


class QueueUnavailable(RuntimeError):
    """The queue cannot be read or written now (locked past its timeout, disk full, database down or
    restarting): nothing was recorded; the caller answers or retries accordingly."""


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


def from_row(cls, row: dict):
    """A Job or Outgoing from a table row (the columns it has fields for)."""
    return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})


@dataclass(frozen=True)
class Job:
    """A received instance: what a worker claims and `cxr-node status --uid` shows."""
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    calling_ae: str
    path: str  # where its bytes are: a spool file (SQLite) or its key in the files table (PostgreSQL)
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
    kind: Kind
    path: str
    state: Delivery
    attempts: int
    created_at: float
    next_attempt_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None  # when last_error happened
    sent_at: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "state", Delivery(self.state))  # the columns hold their values
        object.__setattr__(self, "kind", Kind(self.kind))
