"""`cxr-node serve`: wire receiver, workers, scheduler and health together; stop cleanly on SIGTERM."""
from __future__ import annotations

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
from dicom_node.config import Config
from dicom_node.logs import log, setup_logging
from dicom_node.outputs.identity import Algorithm
from dicom_node.queue import Queue
from dicom_node.receiver import Receiver
from dicom_node.scheduler import start_scheduler
from dicom_node.sender import Sender
from dicom_node.spool import Spool
from dicom_node.systemd import notify
from dicom_node.worker import Worker
from model.infer import choose_providers, load_pipeline, read_manifest


def algorithm_identity() -> Algorithm:
    """Model name and a version that pins the exact weights (their sha256)."""
    info = read_manifest()
    hashes = ",".join(f"{name.split('.')[0]}:{digest[:12]}" for name, digest in sorted(info.sha256.items()))
    return Algorithm(name="cxr-node lung+opacity U-Net", version=f"{info.version} sha256 {hashes}")


HEARTBEAT_SECONDS = 5


def join(queue: Queue, role: str) -> str:
    """Register this process in the queue (what `cxr-node status` lists); returns its id."""
    host, pid = socket.gethostname(), os.getpid()
    process_id = f"{host}:{pid}:{time.time():.0f}"  # a restarted process never takes a dead one's id
    queue.register(process_id, host, pid, role, __version__)
    return process_id


def open_state(config: Config) -> tuple[Queue, Spool]:
    os.umask(0o077)  # spool, queue and results readable by the service user only
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Queue(config.state_dir / "queue.sqlite3"), Spool(config.state_dir)


class ReceiverProcesses:
    """The node's extra receiver processes (`node.receiver_processes` - 1, each `serve --role receiver`
    on the shared port): started with the node, restarted when one dies, stopped before it."""

    def __init__(self, config: Config):
        site = ["--config", config.source[-1]] if len(config.source) > 1 else []
        self.command = [sys.executable, "-m", "dicom_node.cli", "serve", "--role", "receiver", *site]
        self.processes = [self._spawn() for _ in range(config.receiver_processes - 1)]
        self.stopping = False

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(self.command)  # same working folder, stdout and stderr (the journal)

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
    `receiver`: only receive into the shared spool and queue (one of those extra processes)."""
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
    removed, recovered = spool.clean_temporary(2 * config.network_timeout), queue.recover()
    log("starting", config=config.source, state_dir=str(config.state_dir), recovered_jobs=recovered,
        removed_partial_files=removed, destinations=[d.name for d in config.destinations] or "results_dir")
    pipeline = load_pipeline(threads=config.onnx_threads, providers=list(config.providers))
    algorithm = algorithm_identity()
    audit.application(started=True)
    process_id = join(queue, "all")
    worker = Worker(config, queue, spool, pipeline, algorithm, process_id)
    workers = [threading.Thread(target=worker.run, args=(stop,), name=f"worker-{i}") for i in range(config.workers)]
    for thread in workers:
        thread.start()
    receiver = Receiver(config, queue, spool, audit)
    receiver.start()
    receivers = ReceiverProcesses(config)
    scheduler = start_scheduler(config, queue, spool, Sender(config, queue, audit))
    scheduler.add_job(receivers.restart_dead, trigger="interval", seconds=2, max_instances=1, coalesce=True)
    scheduler.add_job(queue.heartbeat, args=[process_id], trigger="interval", seconds=HEARTBEAT_SECONDS,
                      max_instances=1, coalesce=True)
    health = None
    if config.health_port:
        from dicom_node.health import start_health_server
        health = start_health_server(config, queue, spool)
    notify("READY=1")
    log("ready", model=algorithm.version, onnx_providers=choose_providers(list(config.providers)))
    stop.wait()
    notify("STOPPING=1")
    log("stopping: no new associations, finishing the current jobs")
    receivers.stop()
    receiver.stop()
    scheduler.shutdown(wait=True)
    for thread in workers:
        thread.join(timeout=60)
    if health:
        health.shutdown()
    queue.unregister(process_id)
    queue.close()
    audit.application(started=False)
    log("stopped")
    return 0


def serve_receiver(config: Config, queue: Queue, spool: Spool, audit: AuditTrail, stop: threading.Event) -> int:
    """Only the receiver (no models loaded): what the `all` process's workers then analyse."""
    audit.application(started=True)
    receiver = Receiver(config, queue, spool, audit)
    receiver.start()
    process_id, parent = join(queue, "receiver"), os.getppid()

    def heartbeat_and_watch_parent():  # the `all` process that started this one was killed (kill -9): follow it
        while not stop.wait(HEARTBEAT_SECONDS):
            queue.heartbeat(process_id)
            if os.getppid() != parent:
                log("the node that started this receiver is gone; stopping", 30)
                stop.set()
    threading.Thread(target=heartbeat_and_watch_parent, name="heartbeat", daemon=True).start()
    log("ready", role="receiver")
    stop.wait()
    receiver.stop()
    queue.unregister(process_id)
    queue.close()
    audit.application(started=False)
    log("stopped", role="receiver")
    return 0
