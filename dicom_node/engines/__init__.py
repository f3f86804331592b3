"""How a deployment runs its jobs (analyse, send, promote stable studies, purge): one engine per
deployment, picked once by the service from `[queue] backend`.

- `local` (SQLite, one host): claim loops in this process, APScheduler timers, recovery at start.
- `cluster` (PostgreSQL, many hosts): procrastinate's workers, periodic jobs and stalled-job retry.

The stages (receiver, worker, sender) know neither: the engine calls `Worker.process` and
`Sender.send_due`."""
from __future__ import annotations

import threading
from typing import Protocol

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.config import Config
from dicom_node.liveness import Liveness
from dicom_node.queue import Queue
from dicom_node.sender import Sender
from dicom_node.spool import Spool
from dicom_node.worker import Worker


class Engine(Protocol):
    def start(self, scheduler: BackgroundScheduler) -> None:
        """Begin running jobs (timers, if the engine has any, join `scheduler`); every loop beats `liveness`."""

    def join(self) -> None:
        """Once `stop` is set: wait for the jobs in flight to finish."""


def engine_for(config: Config, queue: Queue, spool: Spool, worker: Worker, sender: Sender,
               liveness: Liveness, stop: threading.Event) -> Engine:
    if config.queue_backend == "postgresql":
        from dicom_node.engines.cluster import ClusterEngine  # procrastinate only where it is used
        return ClusterEngine(config, queue, worker, sender, liveness, stop)
    from dicom_node.engines.local import LocalEngine
    return LocalEngine(config, queue, spool, worker, sender, liveness, stop)
