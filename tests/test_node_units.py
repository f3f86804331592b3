"""Configuration, queue states and the systemd unit."""
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dicom_node.config import ConfigError, load_config
from dicom_node.queue import SQLiteQueue as Queue, State

REPO = Path(__file__).resolve().parents[1]


def test_embedded_defaults_load():
    config = load_config()
    assert config.ae_title == "CXR_NODE" and config.port == 11112 and config.destinations == ()


@pytest.mark.parametrize("text, message", [
    ("[node]\nport = 70000\n", "node.port"),
    ("[node]\nae_title = \"MUCH_TOO_LONG_AE_TITLE\"\n", "node.ae_title"),
    ("[processing]\nworkers = 0\n", "processing.workers"),
    ("[storage]\nmin_free_mb = \"lots\"\n", "storage.min_free_mb"),
    ("[node]\nprot = 104\n", "node.prot"),
    ("[[destinations]]\nname = \"pacs\"\nhost = \"h\"\nport = 104\n", "ae_title"),
    ("[logging]\nlevel = \"LOUD\"\n", "logging.level"),
    ("[tls]\nenabled = true\n", "tls.certificate"),
    ("[tls]\nenabled = true\ncertificate = \"/no/such.pem\"\n", "tls.certificate"),
    ("[outputs]\nsecondary_capture = \"yes\"\n", "outputs.secondary_capture"),
    ("not toml at all [", "not valid TOML"),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\nsr_only_with_seg = 1\n',
     "destinations[0].sr_only_with_seg"),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\ntls_ca_certificates = "/no/ca.pem"\n',
     "destinations[0].tls_ca_certificates"),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\ntls = true\n', "destinations[0].tls"),
    ('[audit]\nsyslog = "syslog.example.org"\n', "audit.syslog"),
    ('[queue]\nbackend = "mysql"\n', "queue.backend"),
    ('[queue]\nbackend = "postgresql"\n', "queue.dsn"),
    ('[queue]\nstalled_seconds = 30\n', "queue.stalled_seconds: removed: a worker silent for processing.liveness_seconds / 2"),
    ("[processing]\nbatch_size = 0\n", "processing.batch_size"),
    ('[node]\nrequire_called_ae = "no"\n', "node.require_called_ae: Input should be a valid boolean, got 'no'"),
    ('[tls]\nrequire_client_certificate = "false"\n', "tls.require_client_certificate"),
    ('[health]\nport = "8088"\n', "health.port"),
    ("[processing]\nliveness_seconds = 5\n", "processing.liveness_seconds"),
    ("[processing]\nmax_attempts = 1.5\n", "processing.max_attempts"),
    ("[nodes]\nport = 104\n", "unknown setting 'nodes'"),
])
def test_invalid_settings_are_named(tmp_path, text, message):
    path = tmp_path / "site.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)


def test_cli_exits_2_on_a_bad_configuration(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text("[node]\nport = 0\n")
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "status", "--config", str(path)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "node.port" in result.stderr


def test_a_string_where_a_boolean_belongs_stops_serve_with_exit_2_naming_the_key(tmp_path):
    """bool("no") is True: the node once started with require_called_ae = "no" checking called AE titles."""
    path = tmp_path / "site.toml"
    path.write_text(f'[node]\nrequire_called_ae = "no"\n[storage]\nstate_dir = "{tmp_path / "state"}"\n')
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(path)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2 and "node.require_called_ae" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "state").exists()  # nothing started


@pytest.mark.parametrize("taken_by", ["node", "health"])
def test_a_port_in_use_stops_serve_with_exit_2_and_one_line(tmp_path, taken_by):
    import socket

    from tests.harness import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"node": port, "health": free_port()} if taken_by == "node" else {"node": free_port(), "health": port}
        path = tmp_path / "site.toml"
        path.write_text(f'[node]\nport = {ports["node"]}\n[storage]\nstate_dir = "{tmp_path / "state"}"\n'
                        f'[health]\nport = {ports["health"]}\n')
        result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(path)],
                                capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"cxr-node: configuration error: {taken_by}.port: 127.0.0.1:{port} "
                                                     "is already in use by another process")


def received(queue, tmp_path, uid="1.2.3", study="9") -> bool:
    """Accept a small file as instance `uid`, as the receiver does."""
    incoming = tmp_path / f"incoming-{uid}"
    incoming.write_bytes(b"DICM" + uid.encode())
    return queue.accept(incoming, uid, study, "8", "1.2.840.10008.5.1.4.1.1.1", "AE")


def held_bytes(source) -> bytes:
    """What a queue's input_file or result_file holds (a spool path, or a file object)."""
    return source.read() if hasattr(source, "read") else Path(source).read_bytes()


def test_interrupted_jobs_are_recovered_and_results_not_duplicated(make_queue, tmp_path):
    queue = make_queue()
    assert received(queue, tmp_path)
    assert not received(queue, tmp_path)  # a duplicate: recorded once
    assert queue.promote_stable(0) == 1
    assert queue.claim_next().sop_uid == "1.2.3"
    queue.close()
    queue = make_queue()  # as after kill -9 during processing
    assert queue.recover(3) == (1, [])
    job = queue.claim_next()
    assert job.state == State.PROCESSING and job.attempts == 2  # this claim is the second attempt
    assert held_bytes(queue.input_file(job)) == b"DICM1.2.3"
    results = [("2.25.1", "SEG", b"seg"), ("2.25.2", "SR", b"sr")]
    queue.complete(job, results, ["pacs"], "tags", 12.5)
    queue.complete(job, results, ["pacs"], "tags", 12.5)  # reprocessing gives the same result UIDs
    assert queue.counts()["results"]["pending"] == 2
    assert queue.start("1.2.3", "h:1:1", 3) is None  # a re-delivered job of a finished instance does nothing


def test_an_instance_whose_worker_died_max_attempts_times_ends_failed_until_retried(make_queue, tmp_path):
    """The single-host engine counts a death at recovery, a job engine when another process starts the job
    a dead one left 'processing': the `max_attempts`th death fails the instance with why; `retry` resets it."""
    queue = make_queue()
    received(queue, tmp_path)
    queue.promote_stable(0)
    died = "worker died 3 times while analysing it"
    for attempt in (1, 2):
        assert queue.claim_next("h:1:1").attempts == attempt
        assert queue.recover(3) == (1, [])  # the node restarted after its worker died
    assert queue.claim_next("h:1:1").attempts == 3
    assert queue.recover(3) == (0, ["1.2.3"])
    assert (queue.instance("1.2.3").state, queue.instance("1.2.3").reason) == (State.FAILED, died)
    assert queue.counts()["instances"]["failed"] == 1 and queue.last_errors()[0]["error"] == died
    assert queue.retry_failed("1.2.3") == 1 and queue.instance("1.2.3").attempts == 0
    assert queue.start("1.2.3", "w1", 3).attempts == 1
    assert queue.start("1.2.3", "w1", 3).attempts == 1  # w1's own re-run (outcome not recorded): not a new attempt
    assert queue.start("1.2.3", "w2", 3).attempts == 2  # w1 died holding it
    assert queue.start("1.2.3", "w3", 3).attempts == 3
    failed = queue.start("1.2.3", "w4", 3)  # w3 died too: the third death
    assert (failed.state, failed.reason) == (State.FAILED, died)
    assert queue.start("1.2.3", "w5", 3) is None  # a late duplicate of the job does nothing


def test_a_job_put_back_on_purpose_is_not_counted_as_an_attempt(make_queue, tmp_path):
    queue = make_queue()
    received(queue, tmp_path)
    queue.promote_stable(0)
    queue.claim_next()
    queue.requeue("1.2.3", "disk full: No space left on device")
    assert queue.claim_next().attempts == 1


def test_failed_sends_back_off_and_are_never_dropped(make_queue, tmp_path):
    queue = make_queue()
    received(queue, tmp_path)
    queue.complete(queue.instance("1.2.3"), [("2.25.1", "SEG", b"seg")], ["pacs"], "tags", 1.0)
    delays = []
    for _ in range(6):
        queue.mark_send_failed("2.25.1", "pacs", "refused", initial=1, maximum=8)
        row = queue._query("SELECT * FROM results")[0]
        delays.append(round(row["next_attempt_at"] - time.time()))
    assert delays == [1, 2, 4, 8, 8, 8]
    assert row["state"] == "pending" and row["last_error"] == "refused"
    assert queue.due_results("pacs") == [] and queue.destinations_due() == []  # waiting for its backoff
    queue.mark_sent("2.25.1", "pacs")
    assert queue.counts()["results"]["sent"] == 1


def test_last_errors_say_when_each_error_happened_and_when_a_send_is_tried_again(make_queue, tmp_path):
    queue = make_queue()
    received(queue, tmp_path)
    received(queue, tmp_path, "1.2.4")
    queue.complete(queue.instance("1.2.3"), [("2.25.1", "SEG", b"seg"), ("2.25.2", "SR", b"sr")], ["pacs"], "tags", 1.0)
    before = time.time()
    queue.mark_send_failed("2.25.1", "pacs", "unreachable", initial=600, maximum=600)
    queue.mark_send_refused("2.25.2", "pacs", "C-STORE status 0xC000")
    queue.fail("1.2.4", "cannot be decoded")
    after = time.time()
    errors = {e["sop_uid"]: e for e in queue.last_errors()}
    assert errors.keys() == {"2.25.1", "2.25.2", "1.2.4"}
    assert all(before <= e["at"] <= after for e in errors.values())  # not the next attempt's time
    assert errors["2.25.1"]["next_attempt_at"] >= before + 600  # retried then
    assert errors["2.25.2"]["next_attempt_at"] is None and errors["1.2.4"]["next_attempt_at"] is None  # on `retry`


def test_retention_purges_the_bytes_of_finished_work_only(make_queue, tmp_path):
    queue = make_queue()
    for uid in ("1.1", "1.2"):
        received(queue, tmp_path, uid)
        queue.promote_stable(0)
        job = queue.start(uid, None, 3)
        queue.complete(job, [(f"2.25.{uid}", "SEG", b"seg")], ["pacs"], "tags", 1.0)
    queue.mark_sent("2.25.1.1", "pacs")
    assert queue.purge(older_than=time.time() + 1) == 2  # 1.1's input and its sent SEG; 1.2 still sending
    with pytest.raises(FileNotFoundError):
        queue.input_file(queue.instance("1.1"))
    assert held_bytes(queue.input_file(queue.instance("1.2"))) == b"DICM1.2"
    assert held_bytes(queue.result_file(queue.due_results("pacs")[0])) == b"seg"
    assert queue.purge(older_than=time.time() + 1) == 0


def test_the_outbox_queues_an_instance_only_after_its_job_is_deferred(make_queue, tmp_path):
    queue = make_queue()
    received(queue, tmp_path)

    def engine_down(uids):
        raise RuntimeError("no job deferred")
    with pytest.raises(RuntimeError):
        queue.promote_stable(0, enqueue=engine_down)
    assert queue.instance("1.2.3").state == State.RECEIVED  # promoted again on the next tick
    deferred = []
    assert queue.promote_stable(0, enqueue=deferred.extend) == 1
    assert deferred == ["1.2.3"] and queue.instance("1.2.3").state == State.QUEUED


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path):
    unit = (REPO / "systemd" / "cxr-node@.service").read_text()
    executable = Path(sys.executable).with_name("cxr-node")
    copy = tmp_path / "cxr-node@worker.service"  # verify checks that ExecStart exists: point it at this install
    copy.write_text(unit.replace("/opt/cxr-node/.venv/bin/cxr-node", str(executable)))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_onnx_providers_skip_what_is_not_installed_and_keep_the_cpu_last():
    import onnxruntime as ort

    from model.infer import choose_providers
    chosen = choose_providers(["CUDAExecutionProvider", "NoSuchExecutionProvider", "CPUExecutionProvider"])
    assert chosen[-1] == "CPUExecutionProvider" and "NoSuchExecutionProvider" not in chosen
    assert ("CUDAExecutionProvider" in chosen) == ("CUDAExecutionProvider" in ort.get_available_providers())


def test_echo_fails_when_the_node_itself_does_not_answer(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    site = tmp_path / "site.toml"
    site.write_text(f'[node]\nport = {port}\n[storage]\nstate_dir = "{tmp_path / "state"}"\n')
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "echo", "--config", str(site)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"this node (CXR_NODE@127.0.0.1:{port}): FAILED" in result.stdout


def test_echo_checks_what_the_role_uses(tmp_path):
    """A worker listens on no port: its echo checks the queue and the destinations, not `node.port`."""
    import socket

    with socket.socket() as sock:  # a port nobody listens on: the node's, and PostgreSQL's
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def echo(role: str, queue: str = "") -> subprocess.CompletedProcess:
        site = tmp_path / "site.toml"
        site.write_text(f'[node]\nport = {port}\n[storage]\nstate_dir = "{tmp_path / "state"}"\n{queue}')
        return subprocess.run([sys.executable, "-m", "dicom_node.cli", "echo", "--role", role, "--config", str(site)],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
    worker = echo("worker")
    assert worker.returncode == 0 and "this node" not in worker.stdout and "queue (sqlite): not made yet" in worker.stdout
    assert echo("receiver").returncode == 1
    unreachable = echo("worker", f'[queue]\nbackend = "postgresql"\ndsn = "postgresql://cxr@127.0.0.1:{port}/cxr"\n')
    assert unreachable.returncode == 1 and "queue (postgresql): FAILED" in unreachable.stdout


def test_the_node_reaches_the_model_only_through_its_interface():
    """Serving code imports `model.infer`, `model.image` and `model.batching` only (the Segmenter
    protocol and what implements it); the CLI also dispatches the model's
    own commands (`evaluate`, `train`) to `model.evaluate`, `model.evidence`, `model.repeatability` and
    `model.training`."""
    import ast

    allowed = {"model.infer", "model.image", "model.batching"}
    for path in sorted((REPO / "dicom_node").rglob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "model":
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.split(".")[0] == "model"}
        extra = {"model.evaluate", "model.evidence", "model.repeatability", "model.training"} \
            if path.name == "cli.py" else set()
        assert imported <= allowed | extra, (path.name, imported - allowed - extra)


def test_derived_uids_are_the_same_in_every_process_and_differ_by_input():
    from dicom_node.outputs.identity import derived_uid

    code = "from dicom_node.outputs.identity import derived_uid; print(derived_uid('1.2.3', 'SR', '2.0.0'))"
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    uid = derived_uid("1.2.3", "SR", "2.0.0")
    assert uid == other_process and pydicom_valid(uid)
    assert len({uid, derived_uid("1.2.3", "SEG", "2.0.0"), derived_uid("1.2.3", "SR", "2.0.1"),
                derived_uid("1.2.4", "SR", "2.0.0")}) == 4


def pydicom_valid(uid: str) -> bool:
    import pydicom

    return pydicom.uid.UID(uid).is_valid and len(uid) <= 64


def test_an_old_queue_is_migrated_and_a_newer_one_refused(tmp_path):
    import sqlite3

    from dicom_node.queue.sqlite import SCHEMA_VERSION
    old = sqlite3.connect(tmp_path / "q.sqlite3")  # the 0.3.0 schema: no version, no claimed_by, no last_error_at
    old.executescript("CREATE TABLE instances (sop_uid TEXT PRIMARY KEY, study_uid TEXT, series_uid TEXT,"
                      " sop_class_uid TEXT, calling_ae TEXT, path TEXT, state TEXT NOT NULL, reason TEXT,"
                      " decided_by TEXT, opacity_pct REAL, attempts INTEGER NOT NULL DEFAULT 0,"
                      " received_at REAL NOT NULL, updated_at REAL NOT NULL);"
                      "CREATE TABLE results (sop_uid TEXT NOT NULL, destination TEXT NOT NULL, source_sop_uid TEXT NOT NULL,"
                      " kind TEXT NOT NULL, path TEXT, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
                      " next_attempt_at REAL, last_error TEXT, created_at REAL NOT NULL, sent_at REAL,"
                      " PRIMARY KEY (sop_uid, destination));"
                      "INSERT INTO instances (sop_uid, state, received_at, updated_at) VALUES ('1.2.3', 'queued', 1, 1);"
                      "INSERT INTO results (sop_uid, destination, source_sop_uid, kind, state, last_error, created_at)"
                      " VALUES ('2.25.1', 'pacs', '1.2.0', 'SEG', 'failed', 'refused', 1);")
    old.commit()
    old.close()
    queue = Queue(tmp_path / "q.sqlite3")
    assert queue.claim_next("host:1:1").sop_uid == "1.2.3"  # kept, and claimable with the new column
    assert [(e["error"], e["at"]) for e in queue.last_errors()] == [("refused", None)]  # its time was not kept
    queue.mark_send_refused("2.25.1", "pacs", "refused again")
    assert queue.last_errors()[0]["at"] > 1
    queue.close()
    newer = sqlite3.connect(tmp_path / "q.sqlite3")
    newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer.commit()
    newer.close()
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "q.sqlite3").rename(state / "queue.sqlite3")
    (tmp_path / "site.toml").write_text(f'[storage]\nstate_dir = "{state}"\n')
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "status", "--config", str(tmp_path / "site.toml")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "newer than this cxr-node" in result.stderr


def test_status_lists_the_processes_and_the_jobs_they_hold(make_queue, tmp_path):
    queue = make_queue()
    queue.register("h:10:1", "h", 10, "all", "0.4.0", 60)
    queue.register("h:11:1", "h", 11, "receiver", "0.4.0", 60)
    queue.record_received("1.2.3", "9", "8", "c", "AE", tmp_path / "a.dcm", state="queued")
    queue.claim_next("h:10:1")
    processes = {p["pid"]: p for p in queue.processes(60)}
    assert processes[10]["role"] == "all" and processes[10]["jobs_in_flight"] == 1
    assert processes[11]["role"] == "receiver" and processes[11]["jobs_in_flight"] == 0
    assert processes[10]["heartbeat_age_s"] < 5 and processes[10]["verdict"] == "alive"
    queue.unregister("h:11:1")
    assert [p["pid"] for p in queue.processes(60)] == [10]
    time.sleep(0.6)  # no heartbeat since: late past a quarter of the liveness period, dead past all of it
    assert [p["verdict"] for p in queue.processes(2)] == ["late"]
    assert [p["verdict"] for p in queue.processes(0.5)] == ["dead"]
    queue.register("h:12:1", "h", 12, "worker", "0.4.0", 0.05)  # dead for 10 periods: forgotten
    assert [p["pid"] for p in queue.processes(60)] == [12]
    queue.forget("h", 12)  # its parent saw it exit
    assert queue.processes(60) == []


def test_status_prints_times_as_local_iso_8601_with_their_offset(tmp_path):
    from datetime import datetime

    from dicom_node.spool import Spool

    (tmp_path / "site.toml").write_text(f'[storage]\nstate_dir = "{tmp_path / "state"}"\n')
    (tmp_path / "state").mkdir()
    queue = Queue(tmp_path / "state" / "queue.sqlite3", Spool(tmp_path / "state"))
    queue.record_received("1.2.3", "9", "8", "c", "AE", tmp_path / "a.dcm", state="queued")
    queue.fail("1.2.3", "unusable image: test")
    queue.close()

    def status(*args) -> dict:
        result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "status", *args, "--config",
                                 str(tmp_path / "site.toml")], capture_output=True, text=True, cwd=REPO, timeout=60)
        return json.loads(result.stdout)
    times = [status()["last_errors"][0]["at"], status("--uid", "1.2.3")["received_at"]]
    for text in times:
        parsed = datetime.fromisoformat(text)
        assert parsed.utcoffset() is not None and abs(parsed.timestamp() - time.time()) < 60, text


def test_a_queue_that_cannot_be_written_refuses_with_out_of_resources_and_keeps_nothing(tmp_path, dicom_dir):
    """Another process holds the SQLite write lock past the busy timeout: the C-STORE gets 0xA700 (try
    again), not a 0x0000 for an instance the queue never recorded; once the lock is gone it is accepted."""
    import sqlite3

    import pydicom
    from pynetdicom import AE

    from dicom_node.receiver import Receiver
    from dicom_node.spool import Spool
    from tests.harness import free_port

    port = free_port()
    (tmp_path / "node.toml").write_text(f'[node]\nport = {port}\n[storage]\nstate_dir = "{tmp_path / "state"}"\n'
                                        'min_free_mb = 0\n')
    config = load_config(tmp_path / "node.toml")
    spool = Spool(config.state_dir)
    queue = Queue(config.state_dir / "queue.sqlite3", spool, busy_timeout=0.2)
    receiver = Receiver(config, queue, spool)
    receiver.start()
    ds = pydicom.dcmread(dicom_dir / "torchxrayvision" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    blocker = sqlite3.connect(config.state_dir / "queue.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process writing, for longer than the busy timeout
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=config.ae_title)
    try:
        assert assoc.send_c_store(ds).Status == 0xA700
        assert list(spool.inputs.iterdir()) == [] and not queue.known(ds.SOPInstanceUID)
        blocker.execute("ROLLBACK")
        assert assoc.send_c_store(ds).Status == 0x0000  # the sender's retry
        assert queue.known(ds.SOPInstanceUID) and len(list(spool.inputs.iterdir())) == 1
    finally:
        assoc.release()
        blocker.close()
        receiver.stop()


def test_a_receiver_answers_out_of_resources_while_postgresql_is_down(tmp_path, dicom_dir):
    """PostgreSQL stopped: the C-STORE gets 0xA700 (nothing acknowledged that is not committed) and no
    file is left behind; once it is back, the same receiver (its pool reconnects) accepts the retry."""
    import pydicom
    from pynetdicom import AE

    from dicom_node.queue.postgresql import PostgresQueue
    from dicom_node.receiver import Receiver
    from dicom_node.spool import Spool
    from tests.harness import PostgreSQL, free_port, wait_for

    server = PostgreSQL(Path(tempfile.mkdtemp(prefix="cxr-pg-"))).start()  # its own: this test stops it
    port = free_port()
    (tmp_path / "node.toml").write_text(f'[node]\nport = {port}\n[storage]\nstate_dir = "{tmp_path / "state"}"\n'
                                        f'min_free_mb = 0\n[queue]\nbackend = "postgresql"\ndsn = "{server.dsn()}"\n')
    config = load_config(tmp_path / "node.toml")
    spool = Spool(config.state_dir)
    queue = PostgresQueue(config.queue_dsn, timeout=1)
    receiver = Receiver(config, queue, spool)
    receiver.start()
    ds = pydicom.dcmread(dicom_dir / "torchxrayvision" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=config.ae_title)
    try:
        server.stop()
        assert assoc.send_c_store(ds).Status == 0xA700
        assert list(spool.incoming.iterdir()) == []
        server.start()
        wait_for(lambda: assoc.send_c_store(ds).Status == 0x0000, 60, 1, "the sender's retry to be accepted")
        assert queue.known(ds.SOPInstanceUID)
        assert pydicom.dcmread(queue.input_file(queue.instance(ds.SOPInstanceUID))).SOPInstanceUID == ds.SOPInstanceUID
        assert list(spool.incoming.iterdir()) == []  # the bytes live in PostgreSQL only
    finally:
        assoc.release()
        receiver.stop()
        queue.close()
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


def test_a_postgresql_queue_of_a_newer_schema_is_refused(postgresql):
    from dicom_node.queue import SchemaTooNew
    from dicom_node.queue.postgresql import SCHEMA_VERSION, PostgresQueue

    dsn = postgresql.create_database("newer_schema")
    PostgresQueue(dsn).close()
    postgresql.query("newer_schema", f"UPDATE cxr_node_schema SET version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNew, match="newer than this cxr-node"):
        PostgresQueue(dsn)


def test_a_postgresql_queue_of_schema_1_is_migrated(postgresql):
    from dicom_node.queue.postgresql import SCHEMA_VERSION, PostgresQueue

    dsn = postgresql.create_database("schema_1")
    PostgresQueue(dsn).close()
    postgresql.query("schema_1", "ALTER TABLE results DROP COLUMN last_error_at; UPDATE cxr_node_schema SET version = 1;"
                                 "INSERT INTO results (sop_uid, destination, source_sop_uid, kind, state, last_error,"
                                 " created_at) VALUES ('2.25.1', 'pacs', '1.2.3', 'SEG', 'failed', 'refused', 1)")
    queue = PostgresQueue(dsn)
    try:
        assert [(e["error"], e["at"]) for e in queue.last_errors()] == [("refused", None)]  # kept; its time was not
        queue.mark_send_refused("2.25.1", "pacs", "refused again")
        assert queue.last_errors()[0]["at"] > 1
        assert postgresql.query("schema_1", "SELECT version FROM cxr_node_schema") == [[str(SCHEMA_VERSION)]]
    finally:
        queue.close()


def test_procrastinate_schema_of_an_older_version_is_brought_up_by_its_own_migrations(postgresql):
    """A cluster database made by procrastinate 3.3.0 (its schema.sql, as that release shipped it) is brought
    to the installed version by the migrations procrastinate ships, once; afterwards its tables, columns,
    functions, triggers and indexes are those of a fresh install. A schema of a newer procrastinate is refused."""
    import psycopg
    from procrastinate import __version__ as installed

    from dicom_node.engines.cluster import install_schema
    from dicom_node.queue import SchemaTooNew

    def shape(database: str) -> list[list[str]]:
        return postgresql.query(database, """
            SELECT 'column', table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' '
                   || COALESCE(column_default, '') FROM information_schema.columns WHERE table_name LIKE 'procrastinate%'
            UNION ALL SELECT 'function', p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')'
                   FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                   WHERE n.nspname = 'public' AND p.proname LIKE 'procrastinate%'
            UNION ALL SELECT 'enum', t.typname || ' ' || e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
            UNION ALL SELECT 'trigger', c.relname || ' ' || t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                   WHERE NOT t.tgisinternal
            UNION ALL SELECT 'index', indexdef FROM pg_indexes WHERE tablename LIKE 'procrastinate%'
            ORDER BY 1, 2""")

    fresh, old = postgresql.create_database("procrastinate_fresh"), postgresql.create_database("procrastinate_old")
    assert install_schema(fresh) == []
    with psycopg.connect(old) as db:
        db.execute((REPO / "tests" / "fixtures" / "procrastinate-3.3.0-schema.sql").read_text())
        db.execute("CREATE TABLE cxr_node_procrastinate (version TEXT NOT NULL); "
                   "INSERT INTO cxr_node_procrastinate VALUES ('3.3.0')")
    assert shape("procrastinate_old") != shape("procrastinate_fresh")
    assert install_schema(old) == ["03.04.00_01_pre_add_retry_failed_job_procedure.sql",
                                   "03.04.00_50_post_add_retry_failed_job_procedure.sql"]
    assert shape("procrastinate_old") == shape("procrastinate_fresh")
    assert install_schema(old) == []  # recorded: applied once
    assert postgresql.query("procrastinate_old", "SELECT version FROM cxr_node_procrastinate") == [[installed]]
    postgresql.query("procrastinate_old", "UPDATE cxr_node_procrastinate SET version = '99.0.0'")
    with pytest.raises(SchemaTooNew, match="procrastinate schema 99.0.0"):
        install_schema(old)


def test_promotion_defers_one_analyse_job_per_instance_and_again_once_its_job_ended(postgresql, tmp_path):
    """The cluster's outbox: however often `promote` runs, an instance has one waiting job; a queued
    instance whose job ended without finishing it (put back after a full disk, `cxr-node retry`) gets another."""
    from types import SimpleNamespace

    from dicom_node.queue.postgresql import PostgresQueue
    from dicom_node.engines.cluster import build_app, install_schema

    database = "outbox"
    dsn = postgresql.create_database(database)
    (tmp_path / "node.toml").write_text(f'[storage]\nstate_dir = "{tmp_path / "state"}"\n[processing]\n'
                                        f'stable_seconds = 0\n[queue]\nbackend = "postgresql"\ndsn = "{dsn}"\n')
    queue = PostgresQueue(dsn)
    install_schema(dsn)
    app = build_app(load_config(tmp_path / "node.toml"), queue, SimpleNamespace(destinations=[], process_id=None),
                    sender=None)

    def analyse_jobs() -> list[list[str]]:
        return postgresql.query(database, "SELECT args->>'sop_uid', status FROM procrastinate_jobs"
                                          " WHERE task_name = 'analyse' ORDER BY id")
    try:
        received(queue, tmp_path)
        with app.open():
            for _ in range(3):
                app.tasks["promote"](timestamp=0)  # the periodic task's body, as a worker runs it
            assert analyse_jobs() == [["1.2.3", "todo"]] and queue.instance("1.2.3").state == State.QUEUED
            postgresql.query(database, "UPDATE procrastinate_jobs SET status = 'succeeded'")  # ended, instance queued
            app.tasks["promote"](timestamp=0)
            assert analyse_jobs() == [["1.2.3", "succeeded"], ["1.2.3", "todo"]]
    finally:
        queue.close()


def test_postgresql_unreachable_at_start_exits_1_and_says_so(tmp_path):
    from tests.harness import free_port

    (tmp_path / "site.toml").write_text(f'[queue]\nbackend = "postgresql"\n'
                                        f'dsn = "postgresql://cxr@127.0.0.1:{free_port()}/cxr"\n')
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "status", "--config", str(tmp_path / "site.toml")],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1 and "queue unavailable" in result.stderr


@pytest.mark.parametrize("role", ["worker", "receiver"])
def test_worker_and_lone_receiver_roles_need_postgresql(tmp_path, role):
    """With SQLite the `all` process analyses: a worker, or a receiver it did not start, would wait for nothing."""
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--role", role],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and 'backend = "postgresql"' in result.stderr


def test_audit_messages_reach_a_tcp_syslog_collector_with_octet_counting(tmp_path):
    """RFC 5424 over TCP, framed as RFC 6587 octet counting: `LENGTH SP MESSAGE`."""
    import socket
    import xml.etree.ElementTree as ET

    from dicom_node.audit import AuditTrail

    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    audit = AuditTrail(tmp_path / "audit.log", "CXR_NODE", f"tcp://127.0.0.1:{server.getsockname()[1]}")
    audit.application(started=True)
    connection, _ = server.accept()
    with connection, server:
        data = b""
        while b" " not in data or len(data) < int(data.split(b" ", 1)[0]) + len(data.split(b" ", 1)[0]) + 1:
            data += connection.recv(65536)
    length, record = data.split(b" ", 1)
    assert int(length) == len(record) and record.startswith(b"<85>1 ")
    message = ET.fromstring(record.split(b"\xef\xbb\xbf", 1)[1].decode())
    assert message.find("EventIdentification/EventID").get("csd-code") == "110100"
    assert (tmp_path / "audit.log").read_text().strip() == ET.tostring(message, encoding="unicode")


def test_half_written_files_are_removed_only_once_no_process_can_still_be_writing_them(tmp_path):
    import os

    from dicom_node.spool import Spool

    spool = Spool(tmp_path / "state")
    fresh, stale = spool.incoming / "fresh.dcm", spool.incoming / "stale.dcm"
    fresh.write_bytes(b"being received by another receiver process")
    stale.write_bytes(b"left by a crash")
    os.utime(stale, (time.time() - 300, time.time() - 300))
    assert spool.clean_temporary(older_than_seconds=120) == 1
    assert fresh.exists() and not stale.exists()


def test_an_audit_log_that_cannot_be_written_never_raises(tmp_path):
    from dicom_node.audit import AuditTrail

    audit = AuditTrail(tmp_path / "no such folder" / "audit.log", "CXR_NODE")
    audit.application(started=True)  # logged, not raised: a DICOM answer must not depend on it
    assert not (tmp_path / "no such folder").exists()
