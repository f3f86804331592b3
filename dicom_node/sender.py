"""Pending results -> each destination, by C-STORE (DIMSE) or STOW-RS (DICOMweb: dicomweb_sender.py), by
the answer's outcome class (outcomes.py; PS3.4 B.2.3, PS3.7 C): success and warning are stored (a warning
is logged and kept), a transient failure is retried with exponential backoff, a permanent one is marked
failed with its reason until `cxr-node retry`."""
from __future__ import annotations

import re
import ssl
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.audit import AuditTrail
from dicom_node.config import Config, Destination
from dicom_node import dicomweb_sender
from dicom_node.kinds import RESULT_KINDS, Kind
from dicom_node.logs import log
from dicom_node.metrics import SEND_FAILURES, SENT
from dicom_node.outcomes import PERMANENT, STORED, TRANSIENT, TRANSIENT_STATUSES, WARNING, status_class
from dicom_node.queue import Outgoing, Queue, QueueUnavailable

RESULT_SOP_CLASSES = tuple(kind.sop_class_uid for kind in RESULT_KINDS.values())
RESULT_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class _HandshakeRecordingSocket(ssl.SSLSocket):
    """pynetdicom logs a failed TLS handshake and only reports the association as not established: this
    socket keeps the error on its context (`handshake_error`), so that the reason can name the cause."""

    def connect(self, address) -> None:
        try:
            super().connect(address)
        except ssl.SSLError as error:
            self.context.handshake_error = error
            raise


def client_tls_context(destination: Destination) -> ssl.SSLContext:
    """TLS 1.2+ client context: the destination's certificate must chain to its CA and name its host."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(destination.tls.ca_certificates))
    context.sslsocket_class = _HandshakeRecordingSocket
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
    """An association with `destination` (over TLS when it has TLS settings) and, when it is not
    established, why: e.g. "TLS: certificate verify failed: Hostname mismatch, ..."."""
    context = client_tls_context(destination) if destination.tls else None
    assoc = _client_ae(calling_ae or config.ae_title, config.network_timeout).associate(
        destination.host, destination.port, ae_title=destination.ae_title,
        tls_args=(context, destination.host) if context else None)
    if assoc.is_established:
        return assoc, ""
    if handshake_error := getattr(context, "handshake_error", None):  # "[SSL: CODE] what (_ssl.c:NNN)": the words
        return assoc, "TLS: " + re.sub(r"^\[SSL: \w+\] | \(_ssl\.c:\d+\)$", "", str(handshake_error))
    return assoc, "association rejected, aborted or destination unreachable"


def echo(config: Config, destination: Destination, calling_ae: str | None = None) -> tuple[bool, str]:
    """C-ECHO one destination (calling as this node unless told otherwise): (ok, what happened)."""
    try:
        assoc, failure = associate(config, destination, calling_ae)
    except (OSError, ssl.SSLError) as error:
        return False, f"TLS or network error: {error}"
    if failure:
        return False, failure
    status = assoc.send_c_echo()
    assoc.release()
    if status and status.Status == 0x0000:
        return True, "C-ECHO 0x0000"
    return False, f"C-ECHO status {getattr(status, 'Status', 'none')}"


class Sender:
    def __init__(self, config: Config, queue: Queue, audit: AuditTrail | None = None):
        self.config, self.queue, self.audit = config, queue, audit

    def _header(self, outgoing: Outgoing) -> pydicom.Dataset | None:
        """What the audit and the redaction of an Error Comment need of a result; None when unreadable."""
        try:
            return pydicom.dcmread(self.queue.result_file(outgoing), stop_before_pixels=True,
                                   specific_tags=["SOPClassUID", "StudyInstanceUID", "PatientID", "PatientName"])
        except (OSError, QueueUnavailable, pydicom.errors.InvalidDicomError):
            return None

    def _error_comment(self, status, outgoing: Outgoing) -> str:
        """The destination's Error Comment (0000,0902) of a C-STORE answer, on one line, without the
        result's patient ID or name (the reason is logged); "" when there is none."""
        comment = " ".join(str(getattr(status, "ErrorComment", "") or "").split())[:200]
        header = self._header(outgoing) if comment else None
        if header is not None:
            patient = [str(header.get("PatientID", "")), *re.split(r"[\^=]", str(header.get("PatientName", "")))]
            for value in sorted({v.strip() for v in patient if len(v.strip()) > 1}, key=len, reverse=True):
                comment = re.sub(re.escape(value), "[patient]", comment, flags=re.IGNORECASE)
        return comment

    def _audit(self, outgoing: Outgoing, destination: Destination, stored: bool, detail: str = "") -> None:
        if not self.audit:
            return
        header = self._header(outgoing)
        sop_class = str(header.get("SOPClassUID", "")) if header is not None else ""
        self.audit.result_sent(destination, header, sop_class, outgoing.sop_uid, stored, detail)

    def _failed(self, outgoing: Outgoing, destination: Destination, error: str, kind: str = TRANSIENT) -> None:
        SEND_FAILURES.labels(destination.name, kind).inc()
        if kind == PERMANENT:
            self.queue.mark_send_refused(outgoing.sop_uid, destination.name, error)
            log("send refused; kept as failed until `cxr-node retry`", 40, uid=outgoing.sop_uid, kind=outgoing.kind,
                destination=destination.name, error=error)
            if destination.sr_only_with_seg and outgoing.kind == Kind.SEG:
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

    def _record(self, outgoing: Outgoing, destination: Destination, outcome: str, reason: str,
                answered: bool = True) -> tuple[int, int]:
        """Record one answer; (stored, permanently refused). `reason`: the warning or the failure;
        `answered`: the destination answered (a transfer that failed is audited)."""
        if outcome in (STORED, WARNING):
            warning = reason if outcome == WARNING else None
            self.queue.mark_sent(outgoing.sop_uid, destination.name, warning)
            self._audit(outgoing, destination, stored=True, detail=warning or "")
            SENT.labels(destination.name, outcome).inc()
            log("result stored", 30 if warning else 20, uid=outgoing.sop_uid, kind=outgoing.kind,
                source_uid=outgoing.source_sop_uid, destination=destination.name,
                **({"warning": warning} if warning else {}))
            return 1, 0
        self._failed(outgoing, destination, reason, outcome)
        if answered:
            self._audit(outgoing, destination, stored=False, detail=reason)
        return 0, int(outcome == PERMANENT)

    def _held(self, outgoing: Outgoing, destination: Destination):
        """The result's bytes as the queue holds them (a spool path or a file object); None, recorded as
        refused, when they are gone: nothing can bring them back, so say so and do not spin."""
        try:
            return self.queue.result_file(outgoing)
        except FileNotFoundError as error:
            self._failed(outgoing, destination, f"result file missing: {error}", PERMANENT)
            return None

    def _send_batch(self, destination: Destination, batch: list[Outgoing]) -> tuple[int, int]:
        """(stored, permanently refused) of `batch`: over one association, or one STOW-RS request each."""
        if destination.dicomweb:
            return self._stow_batch(destination, batch)
        try:
            assoc, failure = associate(self.config, destination)
        except (OSError, ssl.SSLError) as error:  # e.g. the CA file cannot be read
            failure = f"TLS or network error: {error}"
        if failure:
            for outgoing in batch:
                self._failed(outgoing, destination, failure)
            return 0, 0
        stored = refused = 0
        try:
            for outgoing in batch:
                if (held := self._held(outgoing, destination)) is None:
                    refused += 1
                    continue
                try:  # a spool file is sent as stored, not decoded
                    status = assoc.send_c_store(held if isinstance(held, Path) else pydicom.dcmread(held))
                except ValueError as error:  # no accepted presentation context: the PACS does not take this class
                    outcome = self._record(outgoing, destination, PERMANENT, f"not accepted by the destination: {error}",
                                           answered=False)
                except pydicom.errors.InvalidDicomError as error:
                    outcome = self._record(outgoing, destination, PERMANENT, f"result file unreadable: {error}",
                                           answered=False)
                except (OSError, RuntimeError) as error:
                    outcome = self._record(outgoing, destination, TRANSIENT, f"{type(error).__name__}: {error}",
                                           answered=False)
                else:
                    code = getattr(status, "Status", None)
                    comment = f": {text}" if (text := self._error_comment(status, outgoing)) else ""
                    if status_class(code) == WARNING:
                        reason = f"stored with warning status 0x{code:04X}{comment}"
                    elif code is None:
                        reason = "no response (association lost)"
                    else:
                        known = f" ({TRANSIENT_STATUSES[code]})" if code in TRANSIENT_STATUSES else ""
                        reason = f"C-STORE status 0x{code:04X}{known}{comment}"
                    outcome = self._record(outgoing, destination, status_class(code), reason, answered=code is not None)
                stored, refused = stored + outcome[0], refused + outcome[1]
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        return stored, refused

    def _stow_batch(self, destination: Destination, batch: list[Outgoing]) -> tuple[int, int]:
        """(stored, permanently refused) of `batch`, one STOW-RS request per result (a refusal names
        its own result); a transient failure leaves the rest for the next pass."""
        web = dicomweb_sender.client(destination.dicomweb, self.config.network_timeout)
        stored = refused = 0
        for outgoing in batch:
            if (held := self._held(outgoing, destination)) is None:
                refused += 1
                continue
            data = held.read_bytes() if isinstance(held, Path) else held.read()
            outcome, reason, answered = dicomweb_sender.stow(web, data, outgoing.sop_uid)
            result = self._record(outgoing, destination, outcome, reason, answered=answered)
            stored, refused = stored + result[0], refused + result[1]
            if outcome == TRANSIENT:  # the server is down or busy: the others wait for the backoff too
                for waiting in batch[batch.index(outgoing) + 1:]:
                    self._failed(waiting, destination, reason)
                break
        return stored, refused
