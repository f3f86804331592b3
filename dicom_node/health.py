"""HTTP on localhost: /healthz (JSON, 503 when the node cannot accept or do work) and /metrics."""
from __future__ import annotations

import errno
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicom_node.config import Config, ConfigError
from dicom_node.liveness import Liveness, cause
from dicom_node.metrics import LIVENESS_SECONDS, LOOP_AGE
from dicom_node.queue import Queue, QueueUnavailable
from dicom_node.spool import Spool


def health_report(config: Config, queue: Queue, spool: Spool, liveness: Liveness) -> dict:
    """What /healthz answers; `status` "ok" only with room on the disk, every loop alive and the queue readable."""
    free, stalled = spool.free_mb(), liveness.stalled()
    problems = (["disk below watermark"] if free < config.min_free_mb else []) + \
        ([f"loops without progress for over {liveness.seconds:g} s"] if stalled else [])
    try:
        counts = queue.counts()
    except QueueUnavailable as error:
        counts = {}
        problems.append(f"queue unavailable: {cause(error)}")
    return {"status": "; ".join(problems) or "ok", "free_mb": round(free), "min_free_mb": config.min_free_mb,
            "stalled_loops": stalled, **counts}


def start_health_server(config: Config, queue: Queue, spool: Spool, liveness: Liveness,
                        port: int) -> ThreadingHTTPServer:
    """Serving on `port` in a thread; a port in use is a ConfigError (exit 2) naming the setting."""
    LIVENESS_SECONDS.set(liveness.seconds)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/metrics":
                # read at scrape time: a value a loop set would freeze when that very loop stalls
                for loop, age in liveness.ages().items():
                    LOOP_AGE.labels(loop).set(age)
                body, status, kind = generate_latest(), 200, CONTENT_TYPE_LATEST
            elif self.path == "/healthz":
                report = health_report(config, queue, spool, liveness)
                status = 200 if report["status"] == "ok" else 503
                body, kind = json.dumps(report).encode(), "application/json"
            else:
                body, status, kind = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # access logs are noise here
            pass

    try:
        server = ThreadingHTTPServer((config.health_bind, port), Handler)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ConfigError(f"health.port: {config.health_bind}:{port} is already in use by another process "
                              "(the extra receiver processes of a node take health.port + 1, + 2...)") from None
        raise
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
