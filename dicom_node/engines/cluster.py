"""The cluster engine (PostgreSQL): procrastinate runs the jobs in every worker process of the cluster.

`analyse` one instance and `send` one destination's due results; and the periodic work, deferred
once per tick for the whole cluster (procrastinate's periodic tasks): promote stable studies (the
outbox: an instance is marked queued only after its job is deferred), put back the jobs of workers
whose heartbeat stopped, look for due sends, purge by retention. A job may run twice (its worker
died after the work, before recording it): each is written so that a second run changes nothing,
and result UIDs are derived from the source UID and the model, so a PACS never gets a second copy.

procrastinate's tables live in the queue's database: this engine creates them, and applies the
migrations procrastinate ships when an upgrade brings a newer version.
"""
from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import procrastinate
import psycopg
from apscheduler.schedulers.background import BackgroundScheduler
from procrastinate.exceptions import AlreadyEnqueued
from procrastinate.schema import SchemaManager
from procrastinate.worker import Worker as Engine

from dicom_node.config import Config
from dicom_node.liveness import Liveness, Loop
from dicom_node.logs import log
from dicom_node.metrics import FAILED_AFTER_DEATHS, REQUEUED
from dicom_node.queue import QueueUnavailable, SchemaTooNew, State
from dicom_node.queue.postgresql import UNAVAILABLE, PostgresQueue
from dicom_node.scheduler import purge_expired
from dicom_node.sender import Sender
from dicom_node.worker import Worker

# A job whose outcome could not be recorded (the database restarting, unreachable) runs again, for as
# long as that takes: nothing received may be dropped.
UNTIL_RECORDED = procrastinate.RetryStrategy(wait=2, retry_exceptions={QueueUnavailable})
# The procrastinate version whose schema a database holds when cxr-node has not recorded one: the only
# version cxr-node used before it recorded them.
UNRECORDED_VERSION = "3.10.0"
SCHEMA_LOCK = 0x63787232  # pg_advisory_xact_lock key: one process installs or migrates, the others wait


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def install_schema(dsn: str) -> list[str]:
    """procrastinate's schema in the queue's database: created if absent, else brought from the version
    recorded there to the installed one by procrastinate's own migrations (pre and post, in order: stop
    every worker of the old version before starting a new one). Returns the migrations applied; raises
    SchemaTooNew for a schema of a newer procrastinate, QueueUnavailable when the database cannot be reached."""
    installed = procrastinate.__version__
    try:
        with psycopg.connect(dsn, connect_timeout=5) as connection:  # one transaction: all of it or none
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            connection.execute("CREATE TABLE IF NOT EXISTS cxr_node_procrastinate (version TEXT NOT NULL)")
            recorded = connection.execute("SELECT version FROM cxr_node_procrastinate").fetchone()
            present = connection.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone()[0]
            applied = []
            if not present:
                connection.execute(SchemaManager.get_schema())
            else:
                current = recorded[0] if recorded else UNRECORDED_VERSION
                if _version(current) > _version(installed):
                    raise SchemaTooNew(f"procrastinate schema {current} in the queue's database is newer than the "
                                       f"installed procrastinate {installed}; run the newer cxr-node")
                for migration in sorted(Path(SchemaManager.get_migrations_path()).glob("*.sql")):
                    if _version(current) < _version(migration.name[:8]) <= _version(installed):
                        connection.execute(migration.read_text())
                        applied.append(migration.name)
            connection.execute("DELETE FROM cxr_node_procrastinate")
            connection.execute("INSERT INTO cxr_node_procrastinate VALUES (%s)", (installed,))
    except UNAVAILABLE as error:
        raise QueueUnavailable(f"PostgreSQL not reachable: {error}") from error
    if applied:
        log("procrastinate schema migrated", from_version=current, to_version=installed, migrations=applied)
    return applied


def queued_without_job(queue: PostgresQueue) -> list[str]:
    """Queued instances procrastinate holds no waiting or running job for (`cxr-node retry`, a job put
    back after the disk filled up): what the promotion defers again."""
    return [row["sop_uid"] for row in queue.query(
        "SELECT sop_uid FROM instances i WHERE state = 'queued' AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs j"
        " WHERE j.queueing_lock = 'analyse:' || i.sop_uid AND j.status IN ('todo', 'doing')) LIMIT 1000")]


def build_app(config: Config, queue: PostgresQueue, worker: Worker, sender: Sender) -> procrastinate.App:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=config.queue_dsn, min_size=1, max_size=4))

    def defer_analyse(uids: list[str]) -> None:
        for uid in uids:
            try:  # one waiting job per instance (no `lock`: procrastinate checks locks by scanning the waiting jobs)
                analyse.configure(queueing_lock=f"analyse:{uid}").defer(sop_uid=uid)
            except AlreadyEnqueued:
                pass

    def defer_send(destination: str) -> None:
        lock = f"send:{destination}"  # one association per destination at a time, as on one host
        try:
            send.configure(lock=lock, queueing_lock=lock).defer(destination=destination)
        except AlreadyEnqueued:
            pass  # the waiting one will send this result too

    @app.task(name="analyse", queue="analyse", retry=UNTIL_RECORDED)
    def analyse(sop_uid: str) -> str:
        job = queue.start(sop_uid, worker.process_id, config.max_attempts)
        if job is None:
            return "nothing to do"  # finished by an earlier run of this job
        if job.state is State.FAILED:  # another worker died analysing it max_attempts times
            FAILED_AFTER_DEATHS.inc()
            log("instance failed", 40, uid=sop_uid, reason=job.reason)
            return str(job.state)
        state = worker.process(job)
        if state is State.DONE:
            for destination in worker.destinations:
                defer_send(destination)
        return str(state)

    @app.task(name="send", queue="send", retry=UNTIL_RECORDED)
    def send(destination: str) -> int:
        return sender.send_due(destination)

    @app.periodic(cron="* * * * * *", periodic_id="promote")
    @app.task(name="promote", queue="cluster", retry=UNTIL_RECORDED)
    def promote(timestamp: int) -> int:
        defer_analyse(queued_without_job(queue))  # `cxr-node retry`, or a job put back when the disk was full
        return queue.promote_stable(config.stable_seconds, enqueue=defer_analyse)

    @app.periodic(cron="* * * * * *", periodic_id="sends")
    @app.task(name="sends", queue="cluster", retry=UNTIL_RECORDED)
    def sends(timestamp: int) -> None:
        for destination in queue.destinations_due():  # retries whose backoff has passed
            defer_send(destination)

    @app.periodic(cron="* * * * * */2", periodic_id="stalled")
    @app.task(name="stalled", queue="cluster")
    async def stalled(timestamp: int) -> int:
        jobs = await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=config.stalled_seconds)
        for job in jobs:
            await app.job_manager.retry_job(job)
            REQUEUED.inc()
            log("job of a worker without heartbeat queued again", 30, task=job.task_name, job_args=job.task_kwargs)
        return len(jobs)

    @app.periodic(cron="17 * * * *", periodic_id="purge")
    @app.task(name="purge", queue="cluster", retry=UNTIL_RECORDED)
    def purge(timestamp: int) -> int:
        return purge_expired(queue, config)

    return app


def run_engines(app: procrastinate.App, config: Config, name: str, stop: threading.Event, liveness: Liveness) -> None:
    """procrastinate's workers until `stop`: `config.workers` jobs of `analyse` at a time, and apart
    from them (so that no send or periodic job waits for an inference) `send` and `cluster`. Each sends
    a heartbeat every liveness_seconds / 6 (a third of `stalled_seconds`); jobs that succeeded are
    deleted (the instance and result rows are the record). A database outage stops an engine: it is
    started again with backoff, and beats `liveness` only while it runs."""
    options = dict(install_signal_handlers=False, update_heartbeat_interval=config.stalled_seconds / 3,
                   stalled_worker_timeout=config.stalled_seconds, shutdown_graceful_timeout=60,
                   fetch_job_polling_interval=1, listen_notify=True, delete_jobs="successful")
    pool = Loop("engine-pool", None)  # watched through the engines: they run only while it is open
    engines = {queue: Loop(f"engine-{queue}", liveness) for queue in ("analyse", "send")}

    async def supervise(queues: list[str], concurrency: int) -> None:
        loop = engines[queues[0]]
        while not stop.is_set():
            engine = Engine(app=app, queues=queues, concurrency=concurrency, name=f"{name}/{queues[0]}", **options)
            running = asyncio.create_task(engine.run())
            while not running.done() and not stop.is_set():
                await asyncio.sleep(0.2)
                if not running.done():
                    loop.ok()
            engine.stop()
            try:
                await running
                delay = 1  # it ended by itself: start it again
            except Exception as error:  # the database went away under it
                delay = loop.failed(error)
            if not stop.is_set():
                await asyncio.sleep(delay)

    async def main() -> None:
        while not stop.is_set():
            try:
                async with app.open_async():
                    pool.ok()
                    await asyncio.gather(supervise(["analyse"], config.workers), supervise(["send", "cluster"], 2))
            except Exception as error:  # the pool could not open: the database is not reachable yet
                await asyncio.sleep(pool.failed(error))
    asyncio.run(main())


class ClusterEngine:
    """procrastinate's workers in one thread of this process (the service's `Engine`)."""

    def __init__(self, config: Config, queue: PostgresQueue, worker: Worker, sender: Sender, liveness: Liveness,
                 stop: threading.Event):
        install_schema(config.queue_dsn)
        self.app = build_app(config, queue, worker, sender)
        self.thread = threading.Thread(target=run_engines, name="jobs",
                                       args=(self.app, config, worker.process_id, stop, liveness))

    def start(self, scheduler: BackgroundScheduler) -> None:  # its periodic jobs are procrastinate's, once per cluster
        self.thread.start()

    def join(self) -> None:
        self.thread.join(timeout=90)
