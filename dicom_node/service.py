"""`cxr-node serve`: wire receiver, workers, scheduler and health together; stop cleanly on SIGTERM."""
from __future__ import annotations

import os
import signal
import threading

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


def open_state(config: Config) -> tuple[Queue, Spool]:
    os.umask(0o077)  # spool, queue and results readable by the service user only
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Queue(config.state_dir / "queue.sqlite3"), Spool(config.state_dir)


def serve(config: Config) -> int:
    setup_logging(config.log_level)
    queue, spool = open_state(config)
    removed, recovered = spool.clean_temporary(), queue.recover()
    log("starting", config=config.source, state_dir=str(config.state_dir), recovered_jobs=recovered,
        removed_partial_files=removed, destinations=[d.name for d in config.destinations] or "results_dir")
    pipeline = load_pipeline(threads=config.onnx_threads, providers=list(config.providers))
    algorithm = algorithm_identity()
    audit = AuditTrail(config.audit_log, config.ae_title, config.audit_syslog)
    audit.application(started=True)
    stop = threading.Event()
    worker = Worker(queue, spool, pipeline, algorithm, [d.name for d in config.destinations], config.results_dir,
                    config.min_free_mb, config.secondary_capture)  # stateless between jobs: threads share it
    workers = [threading.Thread(target=worker.run, args=(stop,), name=f"worker-{i}") for i in range(config.workers)]
    for thread in workers:
        thread.start()
    receiver = Receiver(config, queue, spool, audit)
    receiver.start()
    scheduler = start_scheduler(config, queue, spool, Sender(config, queue, audit))
    health = None
    if config.health_port:
        from dicom_node.health import start_health_server
        health = start_health_server(config, queue, spool)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    notify("READY=1")
    log("ready", model=algorithm.version, onnx_providers=choose_providers(list(config.providers)))
    stop.wait()
    notify("STOPPING=1")
    log("stopping: no new associations, finishing the current jobs")
    receiver.stop()
    scheduler.shutdown(wait=True)
    for thread in workers:
        thread.join(timeout=60)
    if health:
        health.shutdown()
    queue.close()
    audit.application(started=False)
    log("stopped")
    return 0
