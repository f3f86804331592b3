"""pynetdicom AE: association policy, C-ECHO, and C-STORE into the durable spool.

An instance is acknowledged 0x0000 only once its file is fsynced and renamed and its queue row
committed. Non-chest or non-image objects are accepted too (the worker records them as skipped).
"""
from __future__ import annotations

import pydicom
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1,
                         JPEGLossless, JPEGLSLossless, JPEGLSNearLossless, RLELossless)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from dicom_node.config import Config
from dicom_node.logs import log
from dicom_node.metrics import RECEIVED
from dicom_node.queue import Queue
from dicom_node.spool import Spool

TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                     JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
                     JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless]
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


class Receiver:
    def __init__(self, config: Config, queue: Queue, spool: Spool):
        self.config, self.queue, self.spool = config, queue, spool
        self.server = None

    def handle_store(self, event) -> int:
        calling = event.assoc.requestor.ae_title
        uid = str(event.request.AffectedSOPInstanceUID or "")
        if self.spool.free_mb() < self.config.min_free_mb:
            RECEIVED.labels("out_of_resources").inc()
            log("refused: disk below watermark", 30, uid=uid, calling_ae=calling, free_mb=round(self.spool.free_mb()))
            return OUT_OF_RESOURCES
        try:
            path = self.spool.input_path(uid)
        except ValueError:
            RECEIVED.labels("bad_uid").inc()
            log("refused: unusable SOP Instance UID", 30, calling_ae=calling, uid=uid[:80])
            return CANNOT_UNDERSTAND
        if self.queue.known(uid):
            RECEIVED.labels("duplicate").inc()
            log("duplicate acknowledged, not processed again", uid=uid, calling_ae=calling)
            return 0x0000
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as error:  # pynetdicom raises various types for broken streams
            RECEIVED.labels("undecodable").inc()
            log("refused: dataset cannot be read", 30, uid=uid, calling_ae=calling, error=str(error)[:200])
            return CANNOT_UNDERSTAND
        try:
            Spool.write(path, data)
        except OSError as error:  # disk full between the watermark check and the write
            RECEIVED.labels("out_of_resources").inc()
            log("refused: spool write failed", 40, uid=uid, calling_ae=calling, error=error.strerror)
            return OUT_OF_RESOURCES
        study = series = ""
        try:
            ds = event.dataset
            study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        except Exception:  # kept and recorded: the worker gives the precise reason
            pass
        self.queue.record_received(uid, study, series, str(event.request.AffectedSOPClassUID), calling, path)
        RECEIVED.labels("accepted").inc()
        log("instance received", uid=uid, study_uid=study, calling_ae=calling)
        return 0x0000

    def start(self) -> None:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.config.network_timeout
        ae.require_called_aet = self.config.require_called_ae
        ae.require_calling_aet = list(self.config.allowed_calling_aes)
        ae.maximum_pdu_size = 0  # no limit: fewer, larger P-DATA reads
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_REJECTED, self._rejected)]
        self.server = ae.start_server((self.config.bind, self.config.port), block=False, evt_handlers=handlers)
        log("receiver listening", ae_title=self.config.ae_title, bind=self.config.bind, port=self.config.port)

    @staticmethod
    def _rejected(event) -> None:
        log("association rejected", 30, calling_ae=event.assoc.requestor.ae_title,
            called_ae=event.assoc.requestor.primitive.called_ae_title if event.assoc.requestor.primitive else "")

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
