"""C-STORE SCU: pending results -> each destination, by the answer's status class (PS3.4 B.2.3, PS3.7 C):
success and warning are stored (a warning is logged and kept), a transient failure is retried with
exponential backoff, a permanent one is marked failed with its reason until `cxr-node retry`."""
from __future__ import annotations

import ssl
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import (Comprehensive3DSRStorage, EnhancedSRStorage, SecondaryCaptureImageStorage,
                                  SegmentationStorage, Verification)
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.audit import AuditTrail
from dicom_node.config import Config, Destination
from dicom_node.logs import log
from dicom_node.metrics import SEND_FAILURES, SENT
from dicom_node.queue import Outgoing, Queue, QueueUnavailable

RESULT_SOP_CLASSES = (SegmentationStorage, Comprehensive3DSRStorage, EnhancedSRStorage, SecondaryCaptureImageStorage)
RESULT_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
STORED, WARNING, TRANSIENT, PERMANENT = "stored", "warning", "transient", "permanent"
# Failures worth trying again as they are: the PACS is short of resources or busy.
TRANSIENT_STATUSES = {0x0110: "processing failure", 0x0210: "duplicate invocation", 0x0213: "resource limitation"}


def status_class(status: int | None) -> str:
    """What a C-STORE answer means for the result: STORED, WARNING, TRANSIENT or PERMANENT.
    No answer (association lost) is TRANSIENT; failures not known to pass (0xA9xx data set does not
    match the SOP class, 0xCxxx cannot understand, 0x0122 SOP class not supported, ...) are PERMANENT."""
    if status is None:
        return TRANSIENT
    if status == 0x0000:
        return STORED
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return WARNING
    if 0xA700 <= status <= 0xA7FF or status in TRANSIENT_STATUSES:
        return TRANSIENT
    return PERMANENT


def client_tls_context(destination: Destination) -> ssl.SSLContext:
    """TLS 1.2+ client context: the destination's certificate must chain to its CA and name its host."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(destination.tls.ca_certificates))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if destination.tls.certificate:
        context.load_cert_chain(destination.tls.certificate, destination.tls.private_key)
    return context


def _client_ae(ae_title: str, network_timeout: float) -> AE:
    ae = AE(ae_title=ae_title)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = network_timeout
    for sop_class in RESULT_SOP_CLASSES:
        ae.add_requested_context(sop_class, RESULT_TRANSFER_SYNTAXES)
    ae.add_requested_context(Verification)
    return ae


def associate(config: Config, destination: Destination, calling_ae: str | None = None):
    """An association with `destination` (over TLS when it has TLS settings)."""
    tls_args = (client_tls_context(destination), destination.host) if destination.tls else None
    return _client_ae(calling_ae or config.ae_title, config.network_timeout).associate(
        destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)


def echo(config: Config, destination: Destination, calling_ae: str | None = None) -> tuple[bool, str]:
    """C-ECHO one destination (calling as this node unless told otherwise): (ok, what happened)."""
    try:
        assoc = associate(config, destination, calling_ae)
    except (OSError, ssl.SSLError) as error:
        return False, f"TLS or network error: {error}"
    if not assoc.is_established:
        return False, "association rejected or no answer"
    status = assoc.send_c_echo()
    assoc.release()
    if status and status.Status == 0x0000:
        return True, "C-ECHO 0x0000"
    return False, f"C-ECHO status {getattr(status, 'Status', 'none')}"


class Sender:
    def __init__(self, config: Config, queue: Queue, audit: AuditTrail | None = None):
        self.config, self.queue, self.audit = config, queue, audit

    def _audit(self, outgoing: Outgoing, destination: Destination, stored: bool, detail: str = "") -> None:
        if not self.audit:
            return
        try:
            header = pydicom.dcmread(self.queue.result_file(outgoing), stop_before_pixels=True,
                                     specific_tags=["SOPClassUID", "StudyInstanceUID", "PatientID"])
        except (OSError, QueueUnavailable, pydicom.errors.InvalidDicomError):
            header = None
        sop_class = str(header.get("SOPClassUID", "")) if header is not None else ""
        self.audit.result_sent(destination, header, sop_class, outgoing.sop_uid, stored, detail)

    def _failed(self, outgoing: Outgoing, destination: Destination, error: str, kind: str = TRANSIENT) -> None:
        SEND_FAILURES.labels(destination.name, kind).inc()
        if kind == PERMANENT:
            self.queue.mark_send_refused(outgoing.sop_uid, destination.name, error)
            log("send refused; kept as failed until `cxr-node retry`", 40, uid=outgoing.sop_uid, kind=outgoing.kind,
                destination=destination.name, error=error)
            if destination.sr_only_with_seg and outgoing.kind == "SEG":
                self.queue.refuse_held_reports(outgoing.source_sop_uid, destination.name,
                                               f"not sent: its SEG was refused ({error})")
            return
        self.queue.mark_send_failed(outgoing.sop_uid, destination.name, error,
                                    self.config.retry_initial_seconds, self.config.retry_max_seconds)
        log("send failed; will retry", 30, uid=outgoing.sop_uid, destination=destination.name, error=error,
            attempt=outgoing.attempts + 1)

    def send_due(self, only: str | None = None) -> int:
        """One pass over every destination (or the one named `only`); returns how many results were stored."""
        stored = 0
        for destination in self.config.destinations:
            if only and destination.name != only:
                continue
            while batch := self.queue.due_results(destination.name, sr_only_with_seg=destination.sr_only_with_seg):
                sent_now, refused = self._send_batch(destination, batch)
                stored += sent_now
                if sent_now + refused < len(batch):
                    break  # transient failures wait for their backoff
        return stored

    def _send_batch(self, destination: Destination, batch: list[Outgoing]) -> tuple[int, int]:
        """(stored, permanently refused) of `batch`, over one association."""
        try:
            assoc = associate(self.config, destination)
        except (OSError, ssl.SSLError) as error:  # e.g. the destination's certificate does not verify
            for outgoing in batch:
                self._failed(outgoing, destination, f"TLS or network error: {error}")
            return 0, 0
        if not assoc.is_established:
            for outgoing in batch:
                self._failed(outgoing, destination, "association rejected, aborted or destination unreachable")
            return 0, 0
        stored = refused = 0
        try:
            for outgoing in batch:
                try:
                    held = self.queue.result_file(outgoing)
                except FileNotFoundError as error:  # nothing can bring the bytes back: say so, do not spin
                    self._failed(outgoing, destination, f"result file missing: {error}", PERMANENT)
                    refused += 1
                    continue
                try:  # a spool file is sent as stored, not decoded
                    status = assoc.send_c_store(held if isinstance(held, Path) else pydicom.dcmread(held))
                except ValueError as error:  # no accepted presentation context: the PACS does not take this class
                    self._failed(outgoing, destination, f"not accepted by the destination: {error}", PERMANENT)
                    refused += 1
                    continue
                except pydicom.errors.InvalidDicomError as error:
                    self._failed(outgoing, destination, f"result file unreadable: {error}", PERMANENT)
                    refused += 1
                    continue
                except (OSError, RuntimeError) as error:
                    self._failed(outgoing, destination, f"{type(error).__name__}: {error}")
                    continue
                code = getattr(status, "Status", None)
                outcome = status_class(code)
                if outcome in (STORED, WARNING):
                    warning = f"stored with warning status 0x{code:04X}" if outcome == WARNING else None
                    self.queue.mark_sent(outgoing.sop_uid, destination.name, warning)
                    self._audit(outgoing, destination, stored=True, detail=warning or "")
                    SENT.labels(destination.name, outcome).inc()
                    log("result stored", 30 if warning else 20, uid=outgoing.sop_uid, kind=outgoing.kind,
                        source_uid=outgoing.source_sop_uid, destination=destination.name,
                        **({"warning": warning} if warning else {}))
                    stored += 1
                else:
                    reason = "no response (association lost)" if code is None else \
                        f"C-STORE status 0x{code:04X}" + (f" ({TRANSIENT_STATUSES[code]})" if code in TRANSIENT_STATUSES else "")
                    self._failed(outgoing, destination, reason, outcome)
                    if code is not None:  # the destination answered: a transfer that failed
                        self._audit(outgoing, destination, stored=False, detail=reason)
                    refused += outcome == PERMANENT
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        return stored, refused
