"""pynetdicom AE: association policy, C-ECHO, and C-STORE into the durable spool. `Receiver.store` holds the
receive-time checks and the durable accept that the STOW-RS endpoint (dicom_node/stow.py) shares.

An instance is acknowledged 0x0000 only once its bytes and its queue row are committed (the file
fsynced and renamed into the spool with SQLite; bytes and row in one transaction with PostgreSQL).
Non-chest or non-image objects are accepted too (the worker records them as skipped).
"""
from __future__ import annotations

import errno
import functools
import socket
import ssl
import tempfile
import threading
from pathlib import Path

import pydicom
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1,
                         JPEGLossless, JPEGLSLossless, JPEGLSNearLossless, RLELossless, UID)
from pynetdicom import AE, AllStoragePresentationContexts, _config, dimse_messages, evt
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.sop_class import Verification

from dicom_node.audit import AuditTrail
from dicom_node.config import Config, ConfigError, TLSSettings
from dicom_node.logs import log
from dicom_node.metrics import RECEIVED
from dicom_node.queue import Queue, QueueUnavailable
from dicom_node.spool import Spool

TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                     JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
                     JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless]
STORAGE_SOP_CLASSES = frozenset(context.abstract_syntax for context in AllStoragePresentationContexts)
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000


def check_dataset(ds: pydicom.Dataset, sop_class: str, sop_uid: str, study_uid: str = "") -> tuple[int, str] | None:
    """A DIMSE error status and its reason when the data set contradicts its C-STORE request or
    lacks what every result needs (valid Study and Series Instance UIDs), or belongs to another study
    than `study_uid` (a STOW-RS request to /studies/{study}); None when it can be kept."""
    try:
        own_uid, own_class = str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", ""))
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
    except Exception as error:  # pydicom parses lazily; a broken element raises on first access
        return CANNOT_UNDERSTAND, f"data set cannot be parsed: {error}"
    if own_uid != sop_uid:
        return CANNOT_UNDERSTAND, "SOP Instance UID in the data set differs from the request" if own_uid \
            else "data set has no SOP Instance UID"
    if own_class != sop_class:
        return DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID in the data set differs from the request" if own_class \
            else "data set has no SOP Class UID"
    if not study or not series:
        return DOES_NOT_MATCH_SOP_CLASS, "data set has no Study or Series Instance UID"
    for name, value in (("Study Instance UID", study), ("Series Instance UID", series)):
        if not UID(value).is_valid:
            return CANNOT_UNDERSTAND, f"{name} is not a valid UID (PS3.5 9.1)"
    if study_uid and study != study_uid:  # PS3.18 10.5: "Study Instance UID mismatch"
        return DOES_NOT_MATCH_SOP_CLASS, "Study Instance UID differs from the study of the request"
    return None


def tls_context(tls: TLSSettings) -> ssl.SSLContext:
    """Server side of DICOM TLS (PS3.15 B.1): TLS 1.2 or later, our certificate, and client
    certificates verified against the configured CAs when they are required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates:
        context.load_verify_locations(tls.ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


class SharedPortServer(ThreadedAssociationServer):
    """Listens with SO_REUSEPORT, so that the node's receiver processes (`receiver_processes`) share the
    port and the kernel spreads new associations across them. Linux lets only processes of the same
    user join, so another account cannot take a share of the port."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class Receiver:
    def __init__(self, config: Config, queue: Queue, spool: Spool, audit: AuditTrail | None = None):
        self.config, self.queue, self.spool, self.audit = config, queue, spool, audit
        self.server = None

    def handle_store(self, event) -> int | pydicom.Dataset:
        """The C-STORE answer: 0x0000, or a refusal with its reason as the Error Comment (0000,0902)."""
        status, header, outcome = self.store(event.dataset_path, str(event.request.AffectedSOPClassUID),
                                             str(event.request.AffectedSOPInstanceUID or ""), event.assoc.requestor.ae_title)
        if self.audit:
            self.audit.instance_received(event.assoc.requestor.ae_title, event.assoc.requestor.address, header,
                                         str(event.request.AffectedSOPClassUID or ""),
                                         str(event.request.AffectedSOPInstanceUID or ""), status == 0x0000, outcome)
        if status == 0x0000:
            return status
        answer = pydicom.Dataset()
        answer.Status, answer.ErrorComment = status, outcome.removeprefix("refused: ")[:64]  # LO: 64 characters
        return answer

    def store(self, received: Path, sop_class: str, uid: str, calling: str, study_uid: str = "") -> tuple[int, object, str]:
        """Check and accept the data set streamed into `received` (in the spool's incoming folder) that its
        request calls `sop_class` / `uid`: (status, the data set's header or None, what happened)."""
        free_mb = self.spool.free_mb()
        if free_mb < self.config.min_free_mb:
            RECEIVED.labels("out_of_resources").inc()
            log("refused: disk below watermark", 30, uid=uid, calling_ae=calling, free_mb=round(free_mb))
            return OUT_OF_RESOURCES, None, "refused: disk below watermark"
        # PS3.5 9.1, as pydicom checks it (the value read without its padding); so also a safe file name or key
        if not UID(uid).is_valid:
            RECEIVED.labels("bad_uid").inc()
            outcome = "refused: SOP Instance UID is not a valid UID (PS3.5 9.1)"
            log(outcome, 30, calling_ae=calling, uid=uid[:80])
            return CANNOT_UNDERSTAND, None, outcome
        ds = None
        try:
            ds = pydicom.dcmread(received, stop_before_pixels=True)
            problem = check_dataset(ds, sop_class, uid, study_uid)
        except Exception as error:  # pydicom raises various types for broken streams
            problem = CANNOT_UNDERSTAND, f"data set cannot be read: {str(error)[:200]}"
        if problem:  # checked before the duplicate test: a copy of a held instance is no excuse for a bad one
            RECEIVED.labels("invalid").inc()
            log("refused: " + problem[1], 30, uid=uid, calling_ae=calling, status=f"0x{problem[0]:04X}")
            return problem[0], ds, "refused: " + problem[1]
        try:
            known = self.queue.known(uid)
        except QueueUnavailable as error:
            return self._queue_failed(uid, calling, ds, error)
        if known:
            RECEIVED.labels("duplicate").inc()
            log("duplicate acknowledged, not processed again", uid=uid, calling_ae=calling)
            return 0x0000, ds, "duplicate: already held"
        study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        try:
            self.queue.accept(received, uid, study, series, sop_class, calling)
        except OSError as error:  # disk full between the watermark check and the write
            RECEIVED.labels("out_of_resources").inc()
            log("refused: spool write failed", 40, uid=uid, calling_ae=calling, error=error.strerror)
            return OUT_OF_RESOURCES, ds, "refused: spool write failed"
        except QueueUnavailable as error:  # not recorded, so not accepted: the sender sends it again
            return self._queue_failed(uid, calling, ds, error)
        RECEIVED.labels("accepted").inc()
        log("instance received", uid=uid, study_uid=study, calling_ae=calling)
        return 0x0000, ds, ""

    @staticmethod
    def _queue_failed(uid: str, calling: str, ds, error: Exception) -> tuple[int, object, str]:
        """The queue cannot be read or written (locked past its timeout, I/O error, database down):
        nothing is acknowledged that is not recorded durably; out of resources tells the sender to try again."""
        RECEIVED.labels("out_of_resources").inc()
        log("refused: queue unavailable", 40, uid=uid, calling_ae=calling, error=str(error))
        return OUT_OF_RESOURCES, ds, f"refused: queue unavailable ({error})"

    def start(self) -> None:
        # Data sets stream to a file as they arrive (no copy held in memory per association), created
        # in the spool's incoming folder so that accepting it is a rename. pynetdicom makes that file
        # with its own reference to tempfile.NamedTemporaryFile: only that reference is pointed at the
        # spool (tempfile's process-wide folder stays as it is), and stop() puts both settings back.
        self._pynetdicom_settings = _config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile
        _config.STORE_RECV_CHUNKED_DATASET = True
        dimse_messages.NamedTemporaryFile = functools.partial(tempfile.NamedTemporaryFile, dir=self.spool.incoming)
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.config.network_timeout
        ae.require_called_aet = self.config.require_called_ae
        ae.require_calling_aet = list(self.config.allowed_calling_aes)
        ae.maximum_pdu_size = 0  # no limit: fewer, larger P-DATA reads
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_REJECTED, self._rejected),
                    (evt.EVT_ACCEPTED, self._accepted)]
        try:
            self.server = ae.make_server(
                (self.config.bind, self.config.port), evt_handlers=handlers,
                ssl_context=tls_context(self.config.tls) if self.config.tls else None,
                server_class=SharedPortServer if self.config.receiver_processes > 1 else ThreadedAssociationServer)
        except OSError as error:
            _config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile = self._pynetdicom_settings
            if error.errno == errno.EADDRINUSE:  # a setting to change, or another node to stop: no traceback
                raise ConfigError(f"node.port: {self.config.bind}:{self.config.port} is already in use by "
                                  "another process") from None
            raise
        ae._servers.append(self.server)  # as AE.start_server does: the server's shutdown() removes it there
        self.thread = threading.Thread(target=self.server.serve_forever, name="receiver", daemon=True)
        self.thread.start()
        log("receiver listening", ae_title=self.config.ae_title, bind=self.config.bind, port=self.config.port,
            tls=bool(self.config.tls), shared_port=self.config.receiver_processes > 1)

    def check(self) -> None:
        """Raises when the listening thread has ended: nothing is received any more."""
        if not self.thread.is_alive():
            raise RuntimeError("the receiver's listening thread has ended")

    def _accepted(self, event) -> None:
        if self.audit:
            self.audit.association(event.assoc.requestor.ae_title, event.assoc.requestor.address, accepted=True)

    def _rejected(self, event) -> None:
        called = event.assoc.requestor.primitive.called_ae_title if event.assoc.requestor.primitive else ""
        log("association rejected", 30, calling_ae=event.assoc.requestor.ae_title, called_ae=called)
        if self.audit:
            self.audit.association(event.assoc.requestor.ae_title, event.assoc.requestor.address, accepted=False,
                                   detail=f"association rejected (called AE title {called!r})")

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            _config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile = self._pynetdicom_settings
