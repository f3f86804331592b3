"""The single-host engine (SQLite): at start, the jobs a crash interrupted go back to the queue (or end
failed after `max_attempts` deaths); `processing.workers` claim loops analyse; timers promote stable
studies, send due results and purge by retention."""
from __future__ import annotations

import contextlib
import threading

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.config import Config
from dicom_node.liveness import Liveness, Loop, cause
from dicom_node.logs import log
from dicom_node.metrics import FAILED_AFTER_DEATHS, REQUEUED
from dicom_node.queue import Queue, QueueUnavailable
from dicom_node.scheduler import add_loop, purge_expired
from dicom_node.sender import Sender
from dicom_node.spool import Spool
from dicom_node.worker import Worker


class LocalEngine:
    def __init__(self, config: Config, queue: Queue, spool: Spool, worker: Worker, sender: Sender,
                 liveness: Liveness, stop: threading.Event):
        self.config, self.queue, self.spool, self.worker, self.sender = config, queue, spool, worker, sender
        self.liveness, self.stop = liveness, stop
        self.threads: list[threading.Thread] = []

    def start(self, scheduler: BackgroundScheduler) -> None:
        self.recover()
        for index in range(self.config.workers):
            loop = Loop(f"worker-{index}", self.liveness)
            self.threads.append(threading.Thread(target=self.claim_loop, args=(loop,), name=loop.name))
            self.threads[-1].start()
        add_loop(scheduler, self.liveness, "promote", self.queue.promote_stable, self.config.stable_seconds,
                 seconds=0.5)
        if self.config.destinations:
            add_loop(scheduler, self.liveness, "send", self.sender.send_due, seconds=1)
        add_loop(scheduler, None, "purge", purge_expired, self.queue, self.config, minutes=60)

    def recover(self) -> None:
        """The jobs the last stop interrupted (their worker died analysing them)."""
        recovered, poisoned = self.queue.recover(self.config.max_attempts)
        REQUEUED.inc(recovered)
        FAILED_AFTER_DEATHS.inc(len(poisoned))
        if recovered:
            log("jobs interrupted by the last stop queued again", 30, jobs=recovered)
        for uid in poisoned:
            log("instance failed: its analysis ended the worker every time", 40, uid=uid,
                attempts=self.config.max_attempts)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=90)

    def claim_loop(self, loop: Loop) -> None:
        """Claim, process, repeat, until `stop`. A claim or queue error never ends it: it is retried with
        backoff, and the loop beats only while it can work."""
        stop = self.stop
        while not stop.is_set():
            try:
                if self.spool.free_mb() < self.config.min_free_mb:  # results need room too; wait for it
                    loop.ok()  # waiting by design (/healthz says why), not stuck
                    stop.wait(1)
                    continue
                job = self.queue.claim_next(self.worker.process_id)
            except Exception as error:  # e.g. another process holds the SQLite queue past the busy timeout
                stop.wait(loop.failed(error))
                continue
            loop.ok()
            if job is None:
                stop.wait(0.2)
                continue
            try:
                self.worker.process(job)
            except QueueUnavailable as error:  # the outcome could not be recorded (e.g. disk full): redo the job later
                log("queue write failed; the job goes back to the queue once it can be written", 40,
                    uid=job.sop_uid, error=cause(error))
                while not stop.wait(1):
                    with contextlib.suppress(QueueUnavailable):
                        self.queue.requeue(job.sop_uid, f"queue write failed: {error}")
                        break
