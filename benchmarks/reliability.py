"""Run the fault, bad-input, load, security and scale-out tests and write docs/RELIABILITY.md from what they
observed (each test appends its rows to a JSON-lines log).

    .venv/bin/python benchmarks/reliability.py      # about 15 minutes on 2 cores; needs what .ci/run installs
The tests are the same ones `.ci/run` runs; this only collects their observations into tables."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_faults.py", "tests/test_bad_input.py", "tests/test_load.py", "tests/test_security.py",
         "tests/test_scale_out.py", "tests/test_liveness.py", "tests/test_stow.py", "tests/test_dicomweb_destinations.py"]
COUNTS = ("sent", "accepted", "delivered", "lost", "duplicated")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {memory_gib:.0f} GiB, Python {platform.python_version()}, {platform.system()}"


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = (" ".join(str(row.get(key, "")).split()).replace("|", "/") for _, key in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(rows: list[dict], outcome: int) -> str:
    by = {name: [r for r in rows if r["table"] == name] for name in ("faults", "load", "bad_input", "security")}
    for row in by["bad_input"] + by["security"]:
        row["result"] = "as expected" if row.get("ok") else "**NOT as expected**"
    counted = [r for r in by["faults"] + by["load"] if "sent" in r]
    totals = {key: sum(r[key] for r in counted) for key in COUNTS}
    failed = totals["accepted"] - totals["delivered"] - totals["lost"]
    rss = max((r["peak_rss_mb"] for r in by["load"] if "peak_rss_mb" in r), default="-")
    for row in by["faults"]:
        if "moments" in row:
            row["observed"] = "killed during: " + ", ".join(row["moments"]) + "; " + row["note"]
    return f"""# Reliability

Generated on {date.today()} by `.venv/bin/python benchmarks/reliability.py` (pytest exit code {outcome}) on
{machine()}. Every row is written by a test that runs in `.ci/run` with real parts: the `cxr-node` process,
Orthanc as the PACS, DCMTK `dcmsend`/`storescu` as senders (pynetdicom for byte-level broken inputs).

**Totals over the fault and load runs: {totals['sent']} instances sent, {totals['accepted']} accepted,
{totals['delivered']} delivered with one SEG and one SR each, {totals['lost']} lost, {totals['duplicated']}
duplicated.** {failed} accepted that failed on purpose (undecodable, or ending its worker every time): recorded as
failed with its reason, no result.
Instances sent but not accepted were refused with 0xA700 at the disk watermark, then sent again and
accepted. Peak RSS under load: {rss} MB.

"Lost" counts accepted instances without exactly one SEG and one SR in Orthanc; "duplicated" counts those
with more than one. Result UIDs are derived from the source UID and the model version, so a result re-sent
after a crash (at-least-once delivery) is the same object and the PACS keeps one copy.

## Faults

{table(by["faults"], [("fault", "case"), ("expected", "expected"), ("observed", "observed")] + [(c, c) for c in COUNTS])}

## Load

{table(by["load"], [("case", "case"), ("sent", "sent"), ("accepted", "accepted"), ("delivered", "delivered"),
                    ("lost", "lost"), ("duplicated", "duplicated"), ("peak RSS (MB)", "peak_rss_mb"),
                    ("all received (s)", "received_s"), ("all delivered (s)", "all_delivered_s"),
                    ("expected", "expected"), ("observed", "observed")])}

## Bad input ({len(by["bad_input"])} cases)

Expected outcomes: a DIMSE status to the sender (`0xA900` data set does not match the SOP class, `0xC000`
cannot understand), an association refusal, or the state the queue records (`cxr-node status --uid`) with
the words its reason must contain; over DICOMweb, the PS3.18 HTTP status and Failure Reason. Each DIMSE
case is followed by a good image (Faults: all delivered).

{table(by["bad_input"], [("input", "case"), ("expected", "expected"), ("observed", "observed"), ("", "result")])}

## Security

{table(by["security"], [("check", "case"), ("expected", "expected"), ("observed", "observed"), ("", "result")])}

The log of the bad-input run, which includes UTF-8, Latin-1 and malformed patient names, an ID and a birth
date, is searched for each of those values: none appears (`test_logs_hold_no_patient_names_ids_or_birth_dates`).

## Alerts and dashboard

`config/prometheus/cxr-node-alerts.yml` holds Prometheus alerting rules on the node's `/metrics`, and
`config/grafana/cxr-node-dashboard.json` a Grafana dashboard of the same metrics: queue depth by state,
throughput, analysis latency, delivery failures, liveness, disk. To load them, scrape every process
(`[health] port`, and `port` + 1, + 2... for a node's extra receiver processes; set `[health] bind` to an
address Prometheus can reach) in a job named `cxr-node`, list the rules file under `rule_files:` and route
`severity: critical` to paging. In Grafana, import the JSON (Dashboards > New > Import) and pick the
Prometheus data source. Receiver processes export their C-STORE outcomes, loops, disk and whether the
queue is reachable; the processes that run jobs export the queue's counts and every process's verdict. Each alert's description says what to
check (`cxr-node status`, `journalctl -u 'cxr-node@*'`, `/healthz`). `tests/test_alerts.py` runs
`promtool check rules` and `promtool test rules config/prometheus/cxr-node-alerts.test.yml` (each alert
firing and not firing). It also runs a real Prometheus against a real node whose worker cannot progress:
CxrQueueNotDraining fires, then resolves once the queue drains.

| alert | fires when | severity |
|---|---|---|
| CxrNodeDown | a scraped process has not answered for 2 min | critical |
| CxrNodeRestarting | a process started more than twice in 30 min (crash, OOM, watchdog) | warning |
| CxrLoopStalled | a loop made no progress for longer than `processing.liveness_seconds`, for 30 s (/healthz 503) | critical |
| CxrQueueNotDraining | instances queued or processing, and the process finished none in 10 min, for 5 min | critical |
| CxrResultsNotDelivered | results pending, and no PACS stored one in 15 min, for 10 min | critical |
| CxrDeliveriesRefused | results refused for good wait for `cxr-node retry`, for 1 min | warning |
| CxrAnalysesFailing | more than 2 analyses failed in 30 min, over 20 % of those finished | warning |
| CxrDiskBelowWatermark | free space on the spool below `storage.min_free_mb` for 1 min (new instances 0xA700) | critical |
| CxrProcessHeartbeatLost | a process in `cxr-node status` has been `dead` for 1 min (by role) | warning |
| CxrQueueUnreachable | the process cannot read its queue (PostgreSQL down, SQLite locked) for 30 s | critical |
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "observations.jsonl"
        outcome = subprocess.run([sys.executable, "-m", "pytest", "-q", *TESTS], cwd=REPO,
                                 env={**os.environ, "CXR_RELIABILITY_LOG": str(log)}).returncode
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    (REPO / "docs" / "RELIABILITY.md").write_text(render(rows, outcome))
    print(f"wrote docs/RELIABILITY.md from {len(rows)} observations (pytest exit code {outcome})")
    return outcome


if __name__ == "__main__":
    sys.exit(main())
