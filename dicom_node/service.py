"""`cxr-node serve`: wire receiver, workers, scheduler and health together by role; stop cleanly on SIGTERM."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

from dicom_node import __version__
from dicom_node.audit import AuditTrail
from dicom_node.config import Config, ConfigError
from dicom_node.liveness import Liveness, Loop
from dicom_node.logs import log, setup_logging
from dicom_node.metrics import FAILED_AFTER_DEATHS, REQUEUED
from dicom_node.outputs.identity import Algorithm
from dicom_node.queue import Queue, QueueUnavailable, open_queue
from dicom_node.receiver import Receiver
from dicom_node.scheduler import add_loop, start_scheduler
from dicom_node.sender import Sender
from dicom_node.spool import Spool
from dicom_node.stow import StowServer
from dicom_node.history import ChangeLimits
from dicom_node.systemd import notify
from dicom_node.worker import Worker
from model.batching import BatchingPipeline
from model.infer import choose_providers, load_pipeline, read_manifest


def algorithm_identity() -> Algorithm:
    """Model name and a version that pins the exact weights (their sha256)."""
    info = read_manifest()
    hashes = ",".join(f"{name.split('.')[0]}:{digest[:12]}" for name, digest in sorted(info.sha256.items()))
    limits = ChangeLimits(**info.repeatability) if info.repeatability else None
    return Algorithm(name="cxr-node lung+opacity U-Net", version=f"{info.version} sha256 {hashes}",
                     model_version=info.version, change_limits=limits)


HEARTBEATS_PER_LIVENESS = 12  # a process's row in `status` is refreshed this often per liveness period (5 s at 60 s)
FOLLOWED_PARENT = "CXR_NODE_PARENT_PID"  # set for the receiver processes an `all` process starts: they stop with it


def join(queue: Queue, role: str, config: Config) -> str:
    """Register this process in the queue (what `cxr-node status` lists); returns its id."""
    host, pid = socket.gethostname(), os.getpid()
    process_id = f"{host}:{pid}:{time.time():.0f}"  # a restarted process never takes a dead one's id
    queue.register(process_id, host, pid, role, __version__, config.liveness_seconds)
    return process_id


def open_state(config: Config) -> tuple[Queue, Spool]:
    os.umask(0o077)  # spool, queue and results readable by the service user only
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    spool = Spool(config.state_dir)
    return open_queue(config, spool), spool


class ReceiverProcesses:
    """The node's extra receiver processes (`node.receiver_processes` - 1, each `serve --role receiver`
    on the shared port): started with the node, restarted when one dies, stopped before it."""

    def __init__(self, config: Config):
        site = ["--config", config.source[-1]] if len(config.source) > 1 else []
        self.command = [sys.executable, "-m", "dicom_node.cli", "serve", "--role", "receiver", *site]
        self.processes = [self._spawn() for _ in range(config.receiver_processes - 1)]
        self.stopping = False

    def _spawn(self) -> subprocess.Popen:  # same working folder, stdout and stderr (the journal)
        return subprocess.Popen(self.command, env={**os.environ, FOLLOWED_PARENT: str(os.getpid())})

    def restart_dead(self) -> None:
        for index, process in enumerate(self.processes):
            if process.poll() is not None and not self.stopping:
                log("receiver process exited; starting another", 40, receiver_pid=process.pid,
                    exit_code=process.returncode)
                self.processes[index] = self._spawn()

    def stop(self) -> None:
        self.stopping = True
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def serve(config: Config, role: str = "all") -> int:
    """`all`: receive, analyse and send (with `receiver_processes` - 1 extra receiver processes);
    `receiver`: only receive; `worker` (PostgreSQL only): only analyse and send, on any host."""
    if role == "worker" and config.queue_backend != "postgresql":
        raise ConfigError('serve --role worker: needs [queue] backend = "postgresql" (with SQLite the `all` '
                          "process is the only worker)")
    setup_logging(config.log_level)
    # highdicom warns about odd person names by quoting the name: patient data must stay out of the
    # logs. Set once, before any thread starts (warnings.catch_warnings is not thread-safe).
    warnings.filterwarnings("ignore", category=UserWarning, module="highdicom")
    queue, spool = open_state(config)
    audit = AuditTrail(config.audit_log, config.ae_title, config.audit_syslog)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if role == "receiver":
        return serve_receiver(config, queue, spool, audit, stop)
    cluster = config.queue_backend == "postgresql"  # jobs run by procrastinate, the cluster's periodic work too
    # Files half written by a crash; not the ones receiver processes are writing now. On one host, the
    # jobs a crash interrupted; in a cluster, procrastinate's stalled-job retry brings those back.
    removed = spool.clean_temporary(2 * config.network_timeout)
    recovered, poisoned = (0, []) if cluster else queue.recover(config.max_attempts)
    REQUEUED.inc(recovered)
    FAILED_AFTER_DEATHS.inc(len(poisoned))
    log("starting", role=role, queue=config.queue_backend, config=config.source, state_dir=str(config.state_dir),
        recovered_jobs=recovered, removed_partial_files=removed,
        destinations=[d.name for d in config.destinations] or "results_dir")
    for uid in poisoned:
        log("instance failed: its analysis ended the worker every time", 40, uid=uid, attempts=config.max_attempts)
    receiver = Receiver(config, queue, spool, audit) if role == "all" else None
    stow = StowServer(config, receiver, audit) if receiver and config.dicomweb else None
    if receiver:  # before any other thread: a port in use ends the process (exit 2) with nothing left running
        receiver.start()
    if stow:
        stow.start()
    pipeline = load_pipeline(threads=config.onnx_threads, providers=list(config.providers))
    batch_size = min(config.batch_size, config.workers)  # a batch fills from concurrent jobs
    segmenter = BatchingPipeline(pipeline, batch_size) if batch_size > 1 else pipeline
    algorithm = algorithm_identity()
    audit.application(started=True)
    process_id = join(queue, role, config)
    worker = Worker(config, queue, spool, segmenter, algorithm, process_id)
    sender = Sender(config, queue, audit)
    liveness = Liveness(config.liveness_seconds)
    if cluster:
        from dicom_node.tasks import build_app, run_engines
        workers = [threading.Thread(target=run_engines, name="jobs", args=(
            build_app(config, queue, worker, sender), config, process_id, stop, liveness))]
    else:
        workers = [threading.Thread(target=worker.run, args=(stop, Loop(f"worker-{i}", liveness)), name=f"worker-{i}")
                   for i in range(config.workers)]
    for thread in workers:
        thread.start()
    receivers = ReceiverProcesses(config) if role == "all" else None
    scheduler = start_scheduler(config, queue, spool, liveness, None if cluster else sender)
    if receiver:
        add_loop(scheduler, liveness, "receiver", receiver.check, seconds=2)
    if stow:
        add_loop(scheduler, liveness, "stow-rs", stow.check, seconds=2)
    if receivers:
        add_loop(scheduler, liveness, "receiver-processes", receivers.restart_dead, seconds=2)
    add_loop(scheduler, None, "heartbeat", heartbeat, queue, process_id, liveness,  # watched in `status` instead
             seconds=config.liveness_seconds / HEARTBEATS_PER_LIVENESS)
    health = None
    if config.health_port:
        from dicom_node.health import start_health_server
        health = start_health_server(config, queue, spool, liveness)
    notify("READY=1")
    log("ready", role=role, model=algorithm.version, onnx_providers=choose_providers(list(config.providers)))
    stop.wait()
    notify("STOPPING=1")
    log("stopping: no new associations, finishing the current jobs")
    if receivers:
        receivers.stop()
    if receiver:
        receiver.stop()
    if stow:
        stow.stop()
    scheduler.shutdown(wait=True)
    for thread in workers:
        thread.join(timeout=90)
    if isinstance(segmenter, BatchingPipeline):
        segmenter.close()
    if health:
        health.shutdown()
    with contextlib.suppress(QueueUnavailable):
        queue.unregister(process_id)
    queue.close()
    audit.application(started=False)
    log("stopped")
    return 0


def heartbeat(queue: Queue, process_id: str, liveness: Liveness) -> None:
    """This process is alive (`cxr-node status`): recorded only while every loop of it is, so a
    process with a dead loop shows as late, then dead. Withheld or not written, it is the heartbeat loop's failure."""
    if stalled := liveness.stalled():
        raise RuntimeError(f"heartbeat withheld: no progress in {', '.join(sorted(stalled))}")
    queue.heartbeat(process_id)


def serve_receiver(config: Config, queue: Queue, spool: Spool, audit: AuditTrail, stop: threading.Event) -> int:
    """Only the receiver (no models loaded): the `all` process's workers, or the cluster's, analyse
    what it takes."""
    receiver = Receiver(config, queue, spool, audit)
    stow = StowServer(config, receiver, audit) if config.dicomweb else None
    receiver.start()
    if stow:
        stow.start()
    audit.application(started=True)
    process_id = join(queue, "receiver", config)
    parent = os.environ.get(FOLLOWED_PARENT)

    liveness = Liveness(config.liveness_seconds)
    loop = Loop("receiver", liveness)

    def heartbeat_and_watch_parent():  # the `all` process that started this one was killed (kill -9): follow it
        while not stop.wait(config.liveness_seconds / HEARTBEATS_PER_LIVENESS):
            try:
                receiver.check()
                if stow:
                    stow.check()
                loop.ok()
                heartbeat(queue, process_id, liveness)
            except Exception as error:
                loop.failed(error)
            if parent and str(os.getppid()) != parent:
                log("the node that started this receiver is gone; stopping", 30)
                stop.set()
    threading.Thread(target=heartbeat_and_watch_parent, name="heartbeat", daemon=True).start()
    log("ready", role="receiver")
    stop.wait()
    receiver.stop()
    if stow:
        stow.stop()
    with contextlib.suppress(QueueUnavailable):
        queue.unregister(process_id)
    queue.close()
    audit.application(started=False)
    log("stopped", role="receiver")
    return 0
