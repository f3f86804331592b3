"""HTTP on localhost: /healthz (JSON, 503 when the node cannot accept work) and /metrics."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicom_node.config import Config
from dicom_node.queue import Queue
from dicom_node.spool import Spool


def start_health_server(config: Config, queue: Queue, spool: Spool) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/metrics":
                body, status, kind = generate_latest(), 200, CONTENT_TYPE_LATEST
            elif self.path == "/healthz":
                free = spool.free_mb()
                healthy = free >= config.min_free_mb
                report = {"status": "ok" if healthy else "disk below watermark", "free_mb": round(free),
                          "min_free_mb": config.min_free_mb, **queue.counts()}
                body, status, kind = json.dumps(report).encode(), 200 if healthy else 503, "application/json"
            else:
                body, status, kind = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # access logs are noise here
            pass

    server = ThreadingHTTPServer((config.health_bind, config.health_port), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
