"""C-STORE SCU: pending results -> each destination, retried with exponential backoff until the
destination answers 0x0000. Nothing is ever marked sent on any other answer."""
from __future__ import annotations

from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import (Comprehensive3DSRStorage, EnhancedSRStorage, SecondaryCaptureImageStorage,
                                  SegmentationStorage, Verification)
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.config import Config, Destination
from dicom_node.logs import log
from dicom_node.metrics import SEND_FAILURES, SENT
from dicom_node.queue import Queue

RESULT_SOP_CLASSES = (SegmentationStorage, Comprehensive3DSRStorage, EnhancedSRStorage, SecondaryCaptureImageStorage)


def _client_ae(ae_title: str, network_timeout: float) -> AE:
    ae = AE(ae_title=ae_title)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = network_timeout
    for sop_class in RESULT_SOP_CLASSES:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    return ae


def echo(config: Config, destination: Destination, calling_ae: str | None = None) -> tuple[bool, str]:
    """C-ECHO one destination (calling as this node unless told otherwise): (ok, what happened)."""
    assoc = _client_ae(calling_ae or config.ae_title, config.network_timeout).associate(
        destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        return False, "association rejected or no answer"
    status = assoc.send_c_echo()
    assoc.release()
    if status and status.Status == 0x0000:
        return True, "C-ECHO 0x0000"
    return False, f"C-ECHO status {getattr(status, 'Status', 'none')}"


class Sender:
    def __init__(self, config: Config, queue: Queue):
        self.config, self.queue = config, queue

    def _failed(self, row: dict, destination: Destination, error: str) -> None:
        SEND_FAILURES.labels(destination.name).inc()
        self.queue.mark_send_failed(row["sop_uid"], destination.name, error,
                                    self.config.retry_initial_seconds, self.config.retry_max_seconds)
        log("send failed", 30, uid=row["sop_uid"], destination=destination.name, error=error,
            attempt=row["attempts"] + 1)

    def send_due(self) -> int:
        """One pass over every destination; returns how many results were stored."""
        stored = 0
        for destination in self.config.destinations:
            while rows := self.queue.due_results(destination.name):
                sent_now = self._send_batch(destination, rows)
                stored += sent_now
                if sent_now < len(rows):
                    break  # failures wait for their backoff
        return stored

    def _send_batch(self, destination: Destination, rows: list[dict]) -> int:
        ae = _client_ae(self.config.ae_title, self.config.network_timeout)
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if not assoc.is_established:
            for row in rows:
                self._failed(row, destination, "association rejected, aborted or destination unreachable")
            return 0
        stored = 0
        try:
            for row in rows:
                try:
                    status = assoc.send_c_store(Path(row["path"]))  # sent as stored, not decoded
                except (OSError, ValueError, RuntimeError) as error:
                    self._failed(row, destination, f"{type(error).__name__}: {error}")
                    continue
                code = getattr(status, "Status", None)
                if code == 0x0000:
                    self.queue.mark_sent(row["sop_uid"], destination.name)
                    SENT.labels(destination.name).inc()
                    log("result stored", uid=row["sop_uid"], kind=row["kind"], source_uid=row["source_sop_uid"],
                        destination=destination.name)
                    stored += 1
                else:
                    self._failed(row, destination, "no response (association lost)" if code is None
                                 else f"C-STORE status 0x{code:04X}")
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        return stored
