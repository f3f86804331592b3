"""Periodic jobs (APScheduler): promote stable studies, send results, refresh gauges, purge by
retention, remove half-written files, and ping the systemd watchdog."""
from __future__ import annotations

import time
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.config import Config
from dicom_node.logs import log
from dicom_node.metrics import FREE_MB, INSTANCES, RESULTS
from dicom_node.queue import Queue
from dicom_node.sender import Sender
from dicom_node.spool import Spool
from dicom_node.systemd import notify, watchdog_interval


def purge_expired(queue: Queue, retention_days: float) -> int:
    """Delete spooled inputs whose results all left, and results delivered, older than retention."""
    paths = queue.expired_files(time.time() - retention_days * 86400)
    for path in paths:
        Path(path).unlink(missing_ok=True)
    queue.forget_files(paths)
    if paths:
        log("retention purge", files=len(paths))
    return len(paths)


def refresh_gauges(queue: Queue, spool: Spool) -> None:
    counts = queue.counts()
    for state, n in counts["instances"].items():
        INSTANCES.labels(state).set(n)
    for state, n in counts["results"].items():
        RESULTS.labels(state).set(n)
    FREE_MB.set(spool.free_mb())


def start_scheduler(config: Config, queue: Queue, spool: Spool, sender: Sender) -> BackgroundScheduler:
    scheduler = BackgroundScheduler()
    every = dict(trigger="interval", max_instances=1, coalesce=True)
    scheduler.add_job(queue.promote_stable, args=[config.stable_seconds], seconds=0.5, id="promote", **every)
    if config.destinations:
        scheduler.add_job(sender.send_due, seconds=1, id="send", **every)
    scheduler.add_job(refresh_gauges, args=[queue, spool], seconds=5, id="gauges", **every)
    scheduler.add_job(purge_expired, args=[queue, config.retention_days], minutes=60, id="purge", **every)
    # what a crashed receiver left half written (files still being received are newer than this)
    scheduler.add_job(spool.clean_temporary, args=[2 * config.network_timeout], minutes=60, id="clean", **every)
    interval = watchdog_interval()
    if interval:
        scheduler.add_job(notify, args=["WATCHDOG=1"], seconds=interval / 2, id="watchdog", **every)
    scheduler.start()
    return scheduler
