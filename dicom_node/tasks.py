"""The PostgreSQL backend's jobs, run by procrastinate in every worker process of the cluster.

`analyse` one instance and `send` one destination's due results; and the periodic work, deferred
once per tick for the whole cluster (procrastinate's periodic tasks): promote stable studies (the
outbox: an instance is marked queued only after its job is deferred), put back the jobs of workers
whose heartbeat stopped, look for due sends, purge by retention. A job may run twice (its worker
died after the work, before recording it): each is written so that a second run changes nothing,
and result UIDs are derived from the source UID and the model, so a PACS never gets a second copy.
"""
from __future__ import annotations

import asyncio
import threading

import procrastinate
from procrastinate.exceptions import AlreadyEnqueued
from procrastinate.worker import Worker as Engine

from dicom_node.config import Config
from dicom_node.liveness import Liveness, Loop
from dicom_node.logs import log
from dicom_node.metrics import FAILED_AFTER_DEATHS, REQUEUED
from dicom_node.queue import QueueUnavailable, State
from dicom_node.queue.postgresql import PostgresQueue
from dicom_node.scheduler import purge_expired
from dicom_node.sender import Sender
from dicom_node.worker import Worker

# A job whose outcome could not be recorded (the database restarting, unreachable) runs again, for as
# long as that takes: nothing received may be dropped.
UNTIL_RECORDED = procrastinate.RetryStrategy(wait=2, retry_exceptions={QueueUnavailable})


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
        defer_analyse(queue.queued_without_job())  # `cxr-node retry`, or a job put back when the disk was full
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
    a heartbeat every stalled_seconds / 3; jobs that succeeded are deleted (the instance and result rows
    are the record). A database outage stops an engine: it is started again with backoff, and beats
    `liveness` only while it runs."""
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
