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
from dicom_node.engines import engine_for
from dicom_node.liveness import Liveness, Loop
from dicom_node.logs import log, setup_logging
from dicom_node.outputs.identity import Algorithm
from dicom_node.queue import Queue, QueueUnavailable, open_queue
from dicom_node.receiver import Receiver
from dicom_node.scheduler import add_loop, refresh_gauges, start_scheduler
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
RECEIVER_INDEX = "CXR_NODE_RECEIVER_INDEX"  # 1, 2...: such a process serves /healthz on health.port + its index


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
    on the shared port): started with the node, restarted when one dies (its row in `status` forgotten),
    stopped before it. One that cannot start (exit 2: its health port in use) stops the node with exit 2."""

    def __init__(self, config: Config, queue: Queue, stop: threading.Event):
        site = ["--config", config.source[-1]] if len(config.source) > 1 else []
        self.command = [sys.executable, "-m", "dicom_node.cli", "serve", "--role", "receiver", *site]
        self.queue, self.node_stop = queue, stop
        self.processes = [self._spawn(index) for index in range(1, config.receiver_processes)]
        self.stopping = self.cannot_start = False

    def _spawn(self, index: int) -> subprocess.Popen:  # same working folder, stdout and stderr (the journal)
        return subprocess.Popen(self.command, env={**os.environ, FOLLOWED_PARENT: str(os.getpid()),
                                                   RECEIVER_INDEX: str(index)})

    def restart_dead(self) -> None:
        for index, process in enumerate(self.processes):
            if process.poll() is None or self.stopping:
                continue
            with contextlib.suppress(QueueUnavailable):  # gone for sure: not a `dead` row in `status` for 10 periods
                self.queue.forget(socket.gethostname(), process.pid)
            if process.returncode == 2:  # a configuration error, said on its stderr: starting it again cannot help
                log("receiver process cannot start (configuration error above); stopping the node", 50,
                    receiver_pid=process.pid)
                self.cannot_start = True
                self.node_stop.set()
                return
            log("receiver process exited; starting another", 40, receiver_pid=process.pid, exit_code=process.returncode)
            self.processes[index] = self._spawn(index + 1)

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
    if role == "receiver" and config.queue_backend != "postgresql" and FOLLOWED_PARENT not in os.environ:
        raise ConfigError('serve --role receiver: needs [queue] backend = "postgresql" (with SQLite, receiver '
                          "processes are started by the `all` process: node.receiver_processes)")
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
    # Files half written by a crash; not the ones receiver processes are writing now.
    removed = spool.clean_temporary(2 * config.network_timeout)
    log("starting", role=role, queue=config.queue_backend, config=config.source, state_dir=str(config.state_dir),
        removed_partial_files=removed, destinations=[d.name for d in config.destinations] or "results_dir")
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
    health = None
    if config.health_port:  # before any thread that would keep the process alive: a port in use ends it (exit 2)
        from dicom_node.health import start_health_server
        health = start_health_server(config, queue, spool, liveness, config.health_port)
    engine = engine_for(config, queue, spool, worker, sender, liveness, stop)
    receivers = ReceiverProcesses(config, queue, stop) if role == "all" else None
    scheduler = start_scheduler(config, queue, spool, liveness)
    engine.start(scheduler)
    if receiver:
        add_loop(scheduler, liveness, "receiver", receiver.check, seconds=2)
    if stow:
        add_loop(scheduler, liveness, "stow-rs", stow.check, seconds=2)
    if receivers:
        add_loop(scheduler, liveness, "receiver-processes", receivers.restart_dead, seconds=2)
    add_loop(scheduler, None, "heartbeat", heartbeat, queue, process_id, liveness,  # watched in `status` instead
             seconds=config.liveness_seconds / HEARTBEATS_PER_LIVENESS)
    notify("READY=1")
    log("ready", role=role, model=algorithm.version, onnx_providers=choose_providers(list(config.providers)))
    stop.wait()
    notify("STOPPING=1")
    log("stopping: " + ("no new associations, " if receiver else "") + "finishing the current jobs")
    if receivers:
        receivers.stop()
    if receiver:
        receiver.stop()
    if stow:
        stow.stop()
    scheduler.shutdown(wait=True)
    engine.join()
    if isinstance(segmenter, BatchingPipeline):
        segmenter.close()
    if health:
        health.shutdown()
    with contextlib.suppress(QueueUnavailable):
        queue.unregister(process_id)
    queue.close()
    audit.application(started=False)
    log("stopped")
    return 2 if receivers and receivers.cannot_start else 0


def heartbeat(queue: Queue, process_id: str, liveness: Liveness) -> None:
    """This process is alive (`cxr-node status`): recorded only while every loop of it is, so a
    process with a dead loop shows as late, then dead. Withheld or not written, it is the heartbeat loop's failure."""
    if stalled := liveness.stalled():
        raise RuntimeError(f"heartbeat withheld: no progress in {', '.join(sorted(stalled))}")
    queue.heartbeat(process_id)


def serve_receiver(config: Config, queue: Queue, spool: Spool, audit: AuditTrail, stop: threading.Event) -> int:
    """Only the receiver (no models loaded): the `all` process's workers, or the cluster's, analyse
    what it takes. Serves /healthz and /metrics (C-STORE outcomes, disk, queue reachable) like every process."""
    receiver = Receiver(config, queue, spool, audit)
    stow = StowServer(config, receiver, audit) if config.dicomweb else None
    receiver.start()
    if stow:
        stow.start()
    liveness = Liveness(config.liveness_seconds)
    health = None
    if config.health_port:
        from dicom_node.health import start_health_server
        health = start_health_server(config, queue, spool, liveness,
                                     config.health_port + int(os.environ.get(RECEIVER_INDEX, 0)))
    audit.application(started=True)
    process_id = join(queue, "receiver", config)
    parent = os.environ.get(FOLLOWED_PARENT)
    loop = Loop("receiver", liveness)

    def heartbeat_and_watch_parent():  # the `all` process that started this one was killed (kill -9): follow it
        while True:  # a round at once: /metrics has the disk and the queue from the start
            try:
                receiver.check()
                if stow:
                    stow.check()
                refresh_gauges(config, queue, spool, queue_counts=False)  # the workers export the queue's counts
                loop.ok()
                heartbeat(queue, process_id, liveness)
            except Exception as error:
                loop.failed(error)
            if parent and str(os.getppid()) != parent:
                log("the node that started this receiver is gone; stopping", 30)
                stop.set()
            if stop.wait(config.liveness_seconds / HEARTBEATS_PER_LIVENESS):
                return
    threading.Thread(target=heartbeat_and_watch_parent, name="heartbeat", daemon=True).start()
    log("ready", role="receiver")
    stop.wait()
    receiver.stop()
    if stow:
        stow.stop()
    if health:
        health.shutdown()
    with contextlib.suppress(QueueUnavailable):
        queue.unregister(process_id)
    queue.close()
    audit.application(started=False)
    log("stopped", role="receiver")
    return 0
