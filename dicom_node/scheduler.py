"""The process's timers (APScheduler): refresh gauges, remove half-written files, ping the systemd
watchdog; the single-host engine adds its own (dicom_node/engines/local.py). Every job is a `Loop`:
an error is retried with backoff and never ends it; the frequent ones beat `liveness`, and the watchdog
is pinged only while every loop of the process is alive."""
from __future__ import annotations

import time
from collections import Counter
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.config import Config
from dicom_node.liveness import Liveness, Loop, guarded
from dicom_node.logs import log
from dicom_node.metrics import FREE_MB, INSTANCES, MIN_FREE_MB, PROCESSES, QUEUE_REACHABLE, RESULTS
from dicom_node.queue import Queue, QueueUnavailable
from dicom_node.spool import Spool
from dicom_node.systemd import notify, watchdog_interval


def purge_expired(queue: Queue, config: Config) -> int:
    """Delete held inputs whose results all left, and results delivered, older than retention; forget
    the films of the patients' history older than its own retention."""
    now = time.time()
    purged = queue.purge(now - config.retention_days * 86400)
    films = queue.purge_history(now - config.history_days * 86400)
    if purged or films:
        log("retention purge", files=purged, films=films)
    return purged


def refresh_gauges(config: Config, queue: Queue, spool: Spool, queue_counts: bool = True) -> None:
    """Disk first: it needs no queue, so it stays current while the database is down. `queue_counts`
    False (a receiver-only process): only whether the queue is reachable; the processes that run jobs
    export its counts, which the "queue not draining" alert reads per process."""
    FREE_MB.set(spool.free_mb())
    MIN_FREE_MB.set(config.min_free_mb)
    try:
        if not queue_counts:
            queue.known("")  # one primary-key read: reachable or not, without counting the whole queue
            QUEUE_REACHABLE.set(1)
            return
        counts, processes = queue.counts(), queue.processes(config.liveness_seconds)
    except QueueUnavailable:
        QUEUE_REACHABLE.set(0)
        raise  # the loop's failure: logged with its cause, retried with backoff
    QUEUE_REACHABLE.set(1)
    for state, n in counts["instances"].items():
        INSTANCES.labels(state).set(n)
    for state, n in counts["results"].items():
        RESULTS.labels(state).set(n)
    verdicts = Counter((p["role"], p["verdict"]) for p in processes)
    for role in ("all", "receiver", "worker"):  # every pair set, so a dead process gone from the table reads 0
        for verdict in ("alive", "late", "dead"):
            PROCESSES.labels(role, verdict).set(verdicts[role, verdict])


def add_loop(scheduler: BackgroundScheduler, liveness: Liveness | None, name: str, function, *args,
             **interval) -> None:
    """`function(*args)` at this interval (`next_run_time`: the first run), as a loop that beats `liveness`
    (None: hourly, not watched)."""
    scheduler.add_job(guarded(Loop(name, liveness), function, *args), trigger="interval", max_instances=1,
                      coalesce=True, id=name, **interval)


def start_scheduler(config: Config, queue: Queue, spool: Spool, liveness: Liveness) -> BackgroundScheduler:
    scheduler = BackgroundScheduler()
    # at once, not in 5 s: until then /metrics would show a queue unreachable and an empty disk
    add_loop(scheduler, liveness, "gauges", refresh_gauges, config, queue, spool, seconds=5,
             next_run_time=datetime.now())
    # what a crashed receiver left half written (files still being received are newer than this)
    add_loop(scheduler, None, "clean", spool.clean_temporary, 2 * config.network_timeout, minutes=60)
    interval = watchdog_interval()
    if interval:
        scheduler.add_job(ping_watchdog, args=[liveness], trigger="interval", seconds=interval / 2, id="watchdog",
                          max_instances=1, coalesce=True)
    scheduler.start()
    return scheduler


def ping_watchdog(liveness: Liveness) -> None:
    """Feed systemd's watchdog only while every loop is alive: a dead or stuck one gets the node restarted."""
    stalled = liveness.stalled()
    if stalled:
        log("watchdog not pinged: loops without progress", 40, stalled_loops=stalled)
    else:
        notify("WATCHDOG=1")
