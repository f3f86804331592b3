"""Prometheus metrics (served on /metrics by health.py)."""
from prometheus_client import Counter, Gauge, Histogram

RECEIVED = Counter("cxr_instances_received_total", "C-STORE requests answered, by outcome", ["outcome"])
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
