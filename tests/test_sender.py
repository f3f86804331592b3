"""Sender semantics against a loopback pynetdicom C-STORE SCP that answers each status class in turn:
warnings count as stored once, transient failures are retried after their backoff, permanent ones end
'failed' with their reason (visible in status and /metrics) and are sent again only by `retry`."""
from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from prometheus_client import REGISTRY
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, SegmentationStorage

from dicom_node.config import load_config
from dicom_node.queue import Queue
from dicom_node.sender import PERMANENT, STORED, TRANSIENT, WARNING, Sender, status_class
from tests.harness import REPO, free_port

SOURCE = "1.2.826.0.1.3680043.10.1"
PATIENT_ID, PATIENT_NAME = "PID-SENDER-4711", "Doe^Jane"


class LoopbackPacs:
    """A C-STORE SCP that answers the next status of `answers` (0x0000 once they run out; a (status,
    Error Comment) pair answers with that comment) and keeps what it stored; over TLS with `ssl_context`."""

    def __init__(self, sop_classes=(SegmentationStorage, ComprehensiveSRStorage), transfer_syntaxes=None,
                 ssl_context=None):
        self.answers, self.received, self.port = [], [], free_port()
        ae = AE(ae_title="PACS")
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, transfer_syntaxes)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=ssl_context,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event):
        answer = self.answers.pop(0) if self.answers else 0x0000
        status, comment = answer if isinstance(answer, tuple) else (answer, None)
        self.received.append((event.request.AffectedSOPInstanceUID, status))
        if comment is None:
            return status
        response = pydicom.Dataset()
        response.Status, response.ErrorComment = status, comment
        return response

    def stored(self) -> list[str]:
        return [uid for uid, status in self.received if status_class(status) in (STORED, WARNING)]


@pytest.fixture
def pacs():
    server = LoopbackPacs()
    yield server
    server.server.shutdown()


def result_file(folder: Path, uid: str, sop_class: str) -> Path:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.PatientID, ds.PatientName = PATIENT_ID, PATIENT_NAME
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, uid
    path = folder / f"{uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def setup(make_queue, tmp_path, pacs, **destination) -> tuple[Queue, Sender]:
    """A Sender to `pacs` and a queue of the backend under test holding one SEG and one SR to send;
    the site file (tmp_path/node.toml) names both. `destination`: keys of the destination to set."""
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, **destination}
    (tmp_path / "node.toml").write_text(
        f'[storage]\nstate_dir = "{tmp_path / "state"}"\n[retry]\ninitial_seconds = 0.2\nmax_seconds = 0.4\n'
        f'{make_queue.site}[[destinations]]\n' + "".join(f"{key} = {json.dumps(value)}\n" for key, value in destination.items()))
    config = load_config(tmp_path / "node.toml")
    queue = make_queue()
    queue.record_received(SOURCE, "1.2", "1.3", "cr", "MODALITY", tmp_path / "in.dcm")
    queue.complete(queue.instance(SOURCE),
                   [("2.25.1", "SEG", result_file(tmp_path, "2.25.1", SegmentationStorage).read_bytes()),
                    ("2.25.2", "SR", result_file(tmp_path, "2.25.2", ComprehensiveSRStorage).read_bytes())],
                   ["pacs"], "tags", 1.0)
    return queue, Sender(config, queue)


def state(queue: Queue, uid: str) -> dict:
    return queue._query("SELECT * FROM results WHERE sop_uid = ?", (uid,))[0]


def send_until_quiet(sender: Sender, seconds: float = 1.5) -> None:
    """Send passes for a while, so that every backoff of the test's retry settings has passed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sender.send_due()
        time.sleep(0.1)


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("status, expected", [(0x0000, STORED), (0x0001, WARNING), (0xB000, WARNING),
                                              (0xB007, WARNING), (0xA700, TRANSIENT), (0xA7FF, TRANSIENT),
                                              (0x0110, TRANSIENT), (0x0213, TRANSIENT), (None, TRANSIENT),
                                              (0xA900, PERMANENT), (0xC000, PERMANENT), (0x0122, PERMANENT),
                                              (0x0124, PERMANENT)])
def test_status_classes(status, expected):
    assert status_class(status) == expected


def test_a_warning_counts_as_stored_once_and_is_kept(make_queue, tmp_path, pacs):
    queue, sender = setup(make_queue, tmp_path, pacs)
    pacs.answers = [0xB000]
    send_until_quiet(sender)
    assert sorted(pacs.stored()) == ["2.25.1", "2.25.2"] and len(pacs.received) == 2  # never sent again
    assert state(queue, "2.25.1")["state"] == "sent" and "0xB000" in state(queue, "2.25.1")["last_error"]


def test_a_transient_failure_is_retried_after_its_backoff(make_queue, tmp_path, pacs):
    queue, sender = setup(make_queue, tmp_path, pacs)
    pacs.answers = [0xA700]
    before = metric("cxr_send_failures_total", destination="pacs", **{"class": "transient"})
    sender.send_due()
    row = state(queue, "2.25.1")
    assert row["state"] == "pending" and "0xA700" in row["last_error"] and row["next_attempt_at"] > time.time()
    send_until_quiet(sender)
    assert [uid for uid, _ in pacs.received] == ["2.25.1", "2.25.2", "2.25.1"]
    assert state(queue, "2.25.1")["state"] == "sent"
    assert metric("cxr_send_failures_total", destination="pacs", **{"class": "transient"}) == before + 1


def test_a_permanent_failure_is_failed_with_its_reason_until_retry(make_queue, tmp_path, pacs):
    queue, sender = setup(make_queue, tmp_path, pacs)
    pacs.answers = [0xA900]
    before = metric("cxr_send_failures_total", destination="pacs", **{"class": "permanent"})
    send_until_quiet(sender)
    assert [uid for uid, _ in pacs.received] == ["2.25.1", "2.25.2"]  # the refused SEG is not sent again
    row = state(queue, "2.25.1")
    assert row["state"] == "failed" and "0xA900" in row["last_error"]
    assert queue.counts()["results"]["failed"] == 1
    assert any(e["sop_uid"] == "2.25.1" and e["kind"] == "refused by pacs" for e in queue.last_errors())
    assert metric("cxr_send_failures_total", destination="pacs", **{"class": "permanent"}) == before + 1
    assert queue.retry_failed_results(SOURCE) == 1  # `cxr-node retry --uid SOURCE`
    send_until_quiet(sender)
    assert state(queue, "2.25.1")["state"] == "sent" and pacs.stored().count("2.25.1") == 1


def test_a_pacs_without_seg_refuses_it_permanently(make_queue, tmp_path):
    pacs = LoopbackPacs(sop_classes=(ComprehensiveSRStorage,))
    try:
        queue, sender = setup(make_queue, tmp_path, pacs)
        send_until_quiet(sender)
        row = state(queue, "2.25.1")
        assert row["state"] == "failed" and "not accepted" in row["last_error"]
        assert pacs.stored() == ["2.25.2"]  # without sr_only_with_seg the SR still goes
    finally:
        pacs.server.shutdown()


def test_sr_only_with_seg_holds_the_sr_until_its_seg_is_stored(make_queue, tmp_path, pacs):
    queue, sender = setup(make_queue, tmp_path, pacs, sr_only_with_seg=True)
    pacs.answers = [0xA700]  # the SEG fails once
    sender.send_due()
    assert [uid for uid, _ in pacs.received] == ["2.25.1"]  # the SR waited
    send_until_quiet(sender)
    assert [uid for uid, _ in pacs.received] == ["2.25.1", "2.25.1", "2.25.2"]


def test_sr_only_with_seg_fails_the_sr_when_its_seg_is_refused(make_queue, tmp_path, pacs):
    queue, sender = setup(make_queue, tmp_path, pacs, sr_only_with_seg=True)
    pacs.answers = [0xC000]
    send_until_quiet(sender)
    assert pacs.stored() == []
    row = state(queue, "2.25.2")
    assert row["state"] == "failed" and "its SEG was refused" in row["last_error"]
    assert queue.retry_failed_results(SOURCE) == 2
    send_until_quiet(sender)
    assert pacs.stored() == ["2.25.1", "2.25.2"]


def test_a_pacs_that_takes_only_implicit_vr_gets_the_results_converted(make_queue, tmp_path):
    pacs = LoopbackPacs(transfer_syntaxes=[pydicom.uid.ImplicitVRLittleEndian])  # the results are explicit VR
    try:
        queue, sender = setup(make_queue, tmp_path, pacs)
        send_until_quiet(sender, 0.5)
        assert sorted(pacs.stored()) == ["2.25.1", "2.25.2"]
    finally:
        pacs.server.shutdown()


def test_a_result_whose_file_is_gone_is_refused_not_retried_for_ever(make_queue, tmp_path, pacs):
    queue, sender = setup(make_queue, tmp_path, pacs)
    queue._delete([state(queue, "2.25.1")["path"]])  # the SEG's bytes are gone
    send_until_quiet(sender, 0.5)
    row = state(queue, "2.25.1")
    assert row["state"] == "failed" and "result file missing" in row["last_error"]
    assert pacs.stored() == ["2.25.2"]


def test_the_destinations_error_comment_is_kept_in_the_reason_and_status_uid_shows_each_result(make_queue, tmp_path,
                                                                                                pacs):
    queue, sender = setup(make_queue, tmp_path, pacs)
    pacs.answers = [(0xC000, "Patient ID mismatch with RIS order")]  # the SEG refused, the SR stored
    send_until_quiet(sender, 0.5)
    reason = "C-STORE status 0xC000: Patient ID mismatch with RIS order"
    assert state(queue, "2.25.1")["state"] == "failed" and state(queue, "2.25.1")["last_error"] == reason
    assert any(e["sop_uid"] == "2.25.1" and e["error"] == reason for e in queue.last_errors())
    shown = subprocess.run([sys.executable, "-m", "dicom_node.cli", "status", "--uid", SOURCE, "--config",
                            str(tmp_path / "node.toml")], capture_output=True, text=True, timeout=120, cwd=REPO)
    report = json.loads(shown.stdout)
    assert report["state"] == "done" and report["delivery"] == {"failed": 1, "sent": 1}, shown.stdout + shown.stderr
    results = {r["kind"]: r for r in report["results"]}
    assert results["SEG"]["state"] == "failed" and results["SEG"]["last_error"] == reason
    assert results["SR"]["state"] == "sent" and results["SR"]["destination"] == "pacs"


def test_a_warnings_comment_is_logged_and_kept_without_patient_identifiers(make_queue, tmp_path, pacs, caplog):
    queue, sender = setup(make_queue, tmp_path, pacs)
    pacs.answers = [(0xB000, f"Coerced: Patient ID {PATIENT_ID}, name JANE DOE")]
    with caplog.at_level(logging.INFO, logger="cxr_node"):
        send_until_quiet(sender, 0.5)
    warning = "stored with warning status 0xB000: Coerced: Patient ID [patient], name [patient] [patient]"
    assert state(queue, "2.25.1")["state"] == "sent" and state(queue, "2.25.1")["last_error"] == warning
    logged = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert warning in logged and PATIENT_ID not in logged and "JANE" not in logged


def tls_server(pki: Path, certificate: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / f"{certificate}.pem", pki / f"{certificate}.key")
    return context


@pytest.mark.parametrize("certificate, ca, host, cause", [
    ("server", "ca", "127.0.0.1", None),
    ("server", "rogue", "127.0.0.1", "TLS: certificate verify failed: unable to get local issuer certificate"),
    ("elsewhere", "ca", "localhost",
     "TLS: certificate verify failed: Hostname mismatch, certificate is not valid for 'localhost'."),
], ids=["trusted", "wrong CA", "host name mismatch"])
def test_a_tls_failure_names_its_cause_in_the_reason_and_in_echo(make_queue, tmp_path, pki, certificate, ca, host,
                                                                 cause):
    pacs = LoopbackPacs(ssl_context=tls_server(pki, certificate))
    try:
        queue, sender = setup(make_queue, tmp_path, pacs, host=host, tls_ca_certificates=str(pki / f"{ca}.pem"))
        sender.send_due()
        if cause is None:  # the control: the same PACS, trusted and named right, stores both
            assert sorted(pacs.stored()) == ["2.25.1", "2.25.2"]
            return
        assert pacs.received == [] and state(queue, "2.25.1")["state"] == "pending"  # transient: retried
        assert state(queue, "2.25.1")["last_error"] == cause
        assert any(e["sop_uid"] == "2.25.1" and e["error"] == cause for e in queue.last_errors())
        echo = subprocess.run([sys.executable, "-m", "dicom_node.cli", "echo", "--config", str(tmp_path / "node.toml")],
                              capture_output=True, text=True, timeout=120, cwd=REPO)
        assert echo.returncode == 1 and f"pacs (PACS@{host}:{pacs.port}): FAILED - {cause}\n" in echo.stdout, echo.stdout
    finally:
        pacs.server.shutdown()
