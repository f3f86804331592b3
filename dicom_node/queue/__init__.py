"""The queue: one interface (dicom_node.queue.base.Queue), two backends. SQLite with the spool folder
on one host (the embedded default), or PostgreSQL shared by receivers and workers on many hosts."""
from __future__ import annotations

from dicom_node.queue.base import Queue
from dicom_node.queue.jobs import (NO_DESTINATION, Delivery, Job, Outgoing, QueueUnavailable, SchemaTooNew,
                                   State)
from dicom_node.queue.sqlite import SQLiteQueue

__all__ = ["NO_DESTINATION", "Delivery", "Job", "Outgoing", "Queue", "QueueUnavailable", "SQLiteQueue",
           "SchemaTooNew", "State", "open_queue"]


def open_queue(config, spool=None) -> Queue:
    """The backend `[queue]` names: SQLite in state_dir beside `spool`, or PostgreSQL at `queue.dsn`."""
    if config.queue_backend == "postgresql":
        from dicom_node.queue.postgresql import PostgresQueue  # psycopg only where it is used
        return PostgresQueue(config.queue_dsn, config.results_dir)
    return SQLiteQueue(config.state_dir / "queue.sqlite3", spool, config.results_dir)
