"""Scale-out on one PostgreSQL: 2 receiver processes and 3 worker processes share the queue. 300
instances go in through both receivers while one worker is SIGKILLed mid-inference, one receiver is
SIGKILLed mid-association (its sender sends the rest through the other) and PostgreSQL restarts. At
the PACS (Orthanc's REST API) every image then has exactly one SEG and one SR. And one node (role all)
on PostgreSQL, as a site starts before it adds hosts."""
from __future__ import annotations

import threading
import time

import pytest

from tests.harness import Node, Orthanc, chest_copies, dcmsend, dcmsend_report, wait_for
from tests.test_faults import SOURCES, delivery, uids

pytestmark = pytest.mark.slow

INSTANCES = 300
LIVENESS_SECONDS = 12  # the default is 60 s: a worker silent for half of it is dead (its job runs elsewhere),
STALLED_SECONDS = LIVENESS_SECONDS / 2  # and `status` calls a process dead once its heartbeat (every 1 s) is
HEARTBEAT_LIMIT = LIVENESS_SECONDS  # older than liveness_seconds


def test_receivers_and_workers_on_one_database_lose_and_duplicate_nothing(tmp_path, dicom_dir, postgresql, record):
    files = chest_copies([dicom_dir / s for s in SOURCES], INSTANCES, tmp_path / "images", size=512)
    by_uid = dict(zip(uids(files), files))
    database = "scale_out"
    queue = {"backend": "postgresql", "dsn": postgresql.create_database(database)}
    pacs = Orthanc(tmp_path / "orthanc").start()
    receivers = [Node(tmp_path / f"receiver{i}", role="receiver", queue=queue,
                      processing={"liveness_seconds": LIVENESS_SECONDS}).start() for i in range(2)]
    workers = [Node(tmp_path / f"worker{i}", destinations=[("pacs", pacs)], role="worker", queue=queue,
                    processing={"stable_seconds": 0, "onnx_threads": 1, "liveness_seconds": LIVENESS_SECONDS}).start()
               for i in range(3)]
    accepted: set[str] = set()
    refused: list[str] = []  # statuses other than success (0xA700 while the database restarts)
    lock = threading.Lock()

    def push(share: list[str], first: Node, name: str) -> None:
        """dcmsend through `first` until every instance of `share` is acknowledged; once `first`
        is gone, through the receiver still up (as a sender behind a load balancer would)."""
        for attempt in range(30):
            waiting = [by_uid[uid] for uid in share if uid not in accepted]
            if not waiting:
                return
            receiver = first if first.process.poll() is None else receivers[0]
            statuses = dcmsend_report(receiver.port, waiting, tmp_path / f"{name}-{attempt}.txt")
            with lock:
                accepted.update(uid for uid, status in statuses.items() if status == "0x0000")
                refused.extend(status for status in statuses.values() if status != "0x0000")
            time.sleep(0.5)

    def sql(query: str) -> list[list[str]]:
        return postgresql.query(database, query)

    uids_in_order = list(by_uid)
    pushers = [threading.Thread(target=push, args=(uids_in_order[i::2], receivers[i], f"sender{i}")) for i in range(2)]
    started = time.monotonic()
    try:
        for pusher in pushers:
            pusher.start()
        # a receiver killed mid-association: once it has taken some of its sender's instances
        wait_for(lambda: receivers[1].log().count('"instance received"') >= 20, 120, 0.1, "receiver 1 busy")
        receivers[1].kill()
        # a worker killed mid-inference: the one holding an instance in processing
        held = wait_for(lambda: sql("SELECT sop_uid, claimed_by FROM instances WHERE state = 'processing' LIMIT 1"),
                        120, 0.05, "a job in processing")[0]
        victim = next(w for w in workers if f":{w.process.pid}:" in held[1])
        victim.kill()
        killed_at = time.monotonic()
        mid_inference = sql(f"SELECT 1 FROM instances WHERE sop_uid = '{held[0]}' AND state = 'processing'"
                            f" AND claimed_by = '{held[1]}'")  # still its job after the kill
        postgresql.restart()  # while receivers take instances and workers record results
        wait_for(lambda: sql(f"SELECT 1 FROM instances WHERE sop_uid = '{held[0]}' AND (state != 'processing'"
                             f" OR claimed_by != '{held[1]}')"), 120, 0.2, "the dead worker's job to run elsewhere")
        requeued_s = time.monotonic() - killed_at
        for pusher in pushers:
            pusher.join(600)
        wait_for(lambda: sql("SELECT COUNT(*) FROM results WHERE state = 'sent'") == [[str(2 * INSTANCES)]],
                 900, 2, "every result sent")
        elapsed = time.monotonic() - started
        states = dict(sql("SELECT state, COUNT(*) FROM instances GROUP BY state"))
        doing = sql("SELECT COUNT(*) FROM procrastinate_jobs WHERE status = 'doing'")[0][0]
        time.sleep(max(0.0, killed_at + HEARTBEAT_LIMIT + 1 - time.monotonic()))  # long enough for the dead to show
        survivor = workers[(workers.index(victim) + 1) % 3]
        status, metrics = survivor.status(), survivor.metrics()
        lost, duplicated = delivery(pacs, list(by_uid))
        stored = {modality: len(pacs.instances(modality)) for modality in ("SEG", "SR")}
    finally:
        for node in receivers + workers:
            if node.process.poll() is None:
                node.stop()
        pacs.stop()
    record("faults", case=f"PostgreSQL queue, 2 receivers + 3 workers, {INSTANCES} images (512x512): a worker "
           f"SIGKILLed mid-inference, a receiver mid-association, PostgreSQL restarted",
           expected="every image: one SEG + one SR", sent=INSTANCES, accepted=len(accepted),
           delivered=INSTANCES - lost, lost=lost, duplicated=duplicated,
           observed=f"all delivered in {elapsed:.0f} s; the dead worker's job ran again after {requeued_s:.1f} s "
                    f"(liveness_seconds {LIVENESS_SECONDS}); C-STOREs answered {sorted(set(refused))} x{len(refused)} "
                    "during the restart, sent again")
    assert mid_inference and len(accepted) == INSTANCES and states == {"done": str(INSTANCES)}
    assert (lost, duplicated) == (0, 0) and stored == {"SEG": INSTANCES, "SR": INSTANCES}
    assert doing == "0"  # no job left claimed by a dead worker
    assert 'cxr_instances_processed_total{state="done"}' in metrics  # each worker exports its own /metrics
    assert requeued_s < STALLED_SECONDS + 10
    ages = {p["pid"]: p["heartbeat_age_s"] for p in status["processes"]}  # `cxr-node status` shows the cluster
    assert ages[victim.process.pid] > HEARTBEAT_LIMIT and ages[receivers[1].process.pid] > HEARTBEAT_LIMIT
    assert all(ages[node.process.pid] < HEARTBEAT_LIMIT for node in (receivers[0], *set(workers) - {victim}))
    assert sorted(p["role"] for p in status["processes"]) == ["receiver"] * 2 + ["worker"] * 3


def test_one_node_on_postgresql_receives_analyses_and_sends(tmp_path, dicom_dir, postgresql):
    """`serve` (role all) with the PostgreSQL queue: what a site runs before it adds hosts."""
    files = chest_copies([dicom_dir / s for s in SOURCES], 6, tmp_path / "images", size=512)
    pacs = Orthanc(tmp_path / "orthanc").start()
    database = "one_node"
    node = Node(tmp_path / "node", destinations=[("pacs", pacs)],
                queue={"backend": "postgresql", "dsn": postgresql.create_database(database)}).start()
    try:
        assert dcmsend(node.port, files).returncode == 0
        wait_for(lambda: node.status()["results"]["sent"] == 12, 120, 1, "every result sent")
        assert [p["role"] for p in node.status()["processes"]] == ["all"]
        assert delivery(pacs, uids(files)) == (0, 0)
        assert not list((tmp_path / "node" / "state" / "inputs").iterdir())  # the bytes live in the database
        finished = "SELECT COUNT(*) FROM procrastinate_jobs WHERE task_name IN ('analyse', 'send') AND status = 'succeeded'"
        assert postgresql.query(database, finished) == [["0"]]  # deleted once done: the queue's rows are the record
    finally:
        node.stop()
        pacs.stop()


def test_a_worker_killed_holding_the_same_instance_max_attempts_times_fails_it_and_the_rest_are_delivered(
        tmp_path, dicom_dir, postgresql, record):
    """The cluster's poison image: each worker that analyses it is SIGKILLed (as a crash or the OOM killer
    would end it). The third death leaves it `failed` with why, in `status` and `/metrics`; the other
    instances are delivered meanwhile."""
    import psycopg

    poison, *others = chest_copies([dicom_dir / SOURCES[0]], 5, tmp_path / "images", per_study=1)
    poison_uid, *other_uids = uids([poison, *others])
    database = "poison"
    dsn = postgresql.create_database(database)
    queue = {"backend": "postgresql", "dsn": dsn}
    processing = {"stable_seconds": 0, "onnx_threads": 1, "liveness_seconds": LIVENESS_SECONDS, "max_attempts": 3}
    pacs = Orthanc(tmp_path / "orthanc").start()
    receiver = Node(tmp_path / "receiver", role="receiver", queue=queue,
                    processing={"liveness_seconds": LIVENESS_SECONDS}).start()
    workers = [Node(tmp_path / f"worker{i}", destinations=[("pacs", pacs)], role="worker", queue=queue,
                    processing=processing).start() for i in range(2)]
    died = "worker died 3 times while analysing it"
    claimers = []
    try:
        with psycopg.connect(dsn, autocommit=True) as db:
            def claimed_by() -> str | None:  # the process analysing the poison image now, if a new one
                row = db.execute("SELECT claimed_by FROM instances WHERE sop_uid = %s AND state = 'processing'",
                                 (poison_uid,)).fetchone()
                return row[0] if row and row[0] not in claimers else None
            assert dcmsend(receiver.port, [poison, *others]).returncode == 0
            for _ in range(3):
                claimers.append(wait_for(claimed_by, 120, 0.01, "a worker analysing the poison image"))
                victim = next(w for w in workers if f":{w.process.pid}:" in claimers[-1])
                victim.kill()
                victim.start()
            wait_for(lambda: db.execute("SELECT state FROM instances WHERE sop_uid = %s",
                                        (poison_uid,)).fetchone()[0] == "failed", 120, 0.5, "the poison image failed")
        wait_for(lambda: delivery(pacs, other_uids) == (0, 0), 300, 2, "the other instances delivered")
        failed = workers[0].status(poison_uid)
        wait_for(lambda: any('cxr_instances{state="failed"} 1.0' in w.metrics() for w in workers), 30,
                 what="/metrics counting the failed instance")
        deaths = sum(float(line.split()[-1]) for w in workers for line in w.metrics().splitlines()
                     if line.startswith("cxr_jobs_failed_after_worker_deaths_total "))
    finally:
        for node in (receiver, *workers):
            node.stop()
        pacs.stop()
    record("faults", case="PostgreSQL queue, 2 workers: each worker analysing the same image SIGKILLed, 3 times "
                          "(max_attempts 3), 4 other images sent with it",
           expected=f"failed '{died}' in status and /metrics; the others delivered",
           observed=f"{failed['state']}: {failed['reason']} after {failed['attempts']} attempts; "
                    f"failed-after-deaths counter {deaths:g}; the 4 others delivered",
           sent=5, accepted=5, delivered=4, lost=0, duplicated=0)
    assert (failed["state"], failed["reason"], failed["attempts"]) == ("failed", died, 3)
    assert len(set(claimers)) == 3 and deaths == 1
