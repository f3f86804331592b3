"""Prometheus metrics (served on /metrics by health.py); config/prometheus/cxr-node-alerts.yml alerts on them."""
from prometheus_client import Counter, Gauge, Histogram

RECEIVED = Counter("cxr_instances_received_total", "Instances answered (C-STORE requests and STOW-RS parts), by outcome",
                   ["outcome"])
PROCESSED = Counter("cxr_instances_processed_total", "Instances finished by the worker, by state", ["state"])
SENT = Counter("cxr_results_sent_total", "Result objects stored by a destination, by status class "
               "(stored: 0x0000, warning: 0x0001 or 0xBxxx)", ["destination", "status"])
SEND_FAILURES = Counter("cxr_send_failures_total", "Failed C-STORE attempts of results, by class "
                        "(transient: retried; permanent: kept as failed until `cxr-node retry`)", ["destination", "class"])
PROCESSING_SECONDS = Histogram("cxr_processing_seconds", "Worker time per instance (decode, models, SEG+SR)",
                               buckets=(0.25, 0.5, 1, 2, 4, 8, 16, 32))
INSTANCES = Gauge("cxr_instances", "Instances by queue state", ["state"])
RESULTS = Gauge("cxr_results", "Result deliveries by state", ["state"])
FREE_MB = Gauge("cxr_spool_free_megabytes", "Free space on the spool's filesystem")
MIN_FREE_MB = Gauge("cxr_spool_min_free_megabytes", "The disk watermark (storage.min_free_mb): below it new "
                    "instances get 0xA700 and the worker waits")
QUEUE_REACHABLE = Gauge("cxr_queue_reachable", "1 while this process's last read of the queue (SQLite or "
                        "PostgreSQL) succeeded, 0 while it fails")
PROCESSES = Gauge("cxr_processes", "Processes registered in the queue (`cxr-node status`), by role and heartbeat "
                  "verdict (alive, late, dead)", ["role", "verdict"])
LOOP_AGE = Gauge("cxr_loop_progress_age_seconds", "Seconds since each watched loop of this process last made "
                 "progress", ["loop"])
REQUEUED = Counter("cxr_jobs_requeued_total", "Jobs queued again because the worker holding them died (found at "
                   "start on one host; as stalled jobs in a cluster)")
FAILED_AFTER_DEATHS = Counter("cxr_jobs_failed_after_worker_deaths_total", "Instances ended failed because their "
                              "analysis ended its worker processing.max_attempts times")
LIVENESS_SECONDS = Gauge("cxr_liveness_seconds", "processing.liveness_seconds: a loop silent for longer is "
                         "stalled (/healthz 503, no watchdog ping)")

# Finished states exported at 0 from the start: increase() sees the first completion after a restart, and
# "nothing completed" is a 0, not a missing series.
for _state in ("done", "skipped", "failed"):
    PROCESSED.labels(_state)
