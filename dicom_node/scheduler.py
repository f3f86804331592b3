"""Periodic jobs (APScheduler): refresh gauges, remove half-written files, ping the systemd watchdog
and, on one host (SQLite), promote stable studies, send results and purge by retention. With
PostgreSQL those three run once per cluster as procrastinate periodic tasks (dicom_node/tasks.py)."""
from __future__ import annotations

import time

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.config import Config
from dicom_node.logs import log
from dicom_node.metrics import FREE_MB, INSTANCES, RESULTS
from dicom_node.queue import Queue
from dicom_node.sender import Sender
from dicom_node.spool import Spool
from dicom_node.systemd import notify, watchdog_interval


def purge_expired(queue: Queue, retention_days: float) -> int:
    """Delete held inputs whose results all left, and results delivered, older than retention."""
    purged = queue.purge(time.time() - retention_days * 86400)
    if purged:
        log("retention purge", files=purged)
    return purged


def refresh_gauges(queue: Queue, spool: Spool) -> None:
    counts = queue.counts()
    for state, n in counts["instances"].items():
        INSTANCES.labels(state).set(n)
    for state, n in counts["results"].items():
        RESULTS.labels(state).set(n)
    FREE_MB.set(spool.free_mb())


def start_scheduler(config: Config, queue: Queue, spool: Spool, sender: Sender | None = None) -> BackgroundScheduler:
    """Node-local timers; with `sender` (the single-host engine) also promotion, sending and purge."""
    scheduler = BackgroundScheduler()
    every = dict(trigger="interval", max_instances=1, coalesce=True)
    if sender:
        scheduler.add_job(queue.promote_stable, args=[config.stable_seconds], seconds=0.5, id="promote", **every)
        if config.destinations:
            scheduler.add_job(sender.send_due, seconds=1, id="send", **every)
        scheduler.add_job(purge_expired, args=[queue, config.retention_days], minutes=60, id="purge", **every)
    scheduler.add_job(refresh_gauges, args=[queue, spool], seconds=5, id="gauges", **every)
    # what a crashed receiver left half written (files still being received are newer than this)
    scheduler.add_job(spool.clean_temporary, args=[2 * config.network_timeout], minutes=60, id="clean", **every)
    interval = watchdog_interval()
    if interval:
        scheduler.add_job(notify, args=["WATCHDOG=1"], seconds=interval / 2, id="watchdog", **every)
    scheduler.start()
    return scheduler
