"""Structured logs: one JSON object per line on stderr (journald keeps them). They carry UIDs,
AE titles and reasons, never patient names, IDs or birth dates."""
from __future__ import annotations

import json
import logging
import time

LOGGER = logging.getLogger("cxr_node")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)),
                 "level": record.levelname, "pid": record.process, "event": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(entry, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom at INFO/DEBUG prints association and dataset details (which can hold patient data).
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # APScheduler warns each time a periodic job is still running when its next run is due; that
    # is the intended coalescing under load, not a fault.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # procrastinate logs every job start and end at INFO (periodic jobs several times a second); its
    # warnings and failures stay. psycopg's pool repeats each failed reconnection while PostgreSQL is down.
    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


def log(event: str, level: int = logging.INFO, **fields) -> None:
    LOGGER.log(level, event, extra={"fields": fields})
