"""Claimed instance -> filter -> pixels -> models -> SEG + SR, durably held and queued for sending."""
from __future__ import annotations

import errno
import functools
import io
import time
from datetime import datetime

import pydicom

from dicom_node import filter as chest_filter
from dicom_node.config import Config
from dicom_node.history import Change, Film, compare, figures, film_time, history_key, patient_key
from dicom_node.kinds import Kind
from dicom_node.logs import log
from dicom_node.metrics import PROCESSED, PROCESSING_SECONDS
from dicom_node.outputs.capture import build_capture
from dicom_node.outputs.identity import Algorithm
from dicom_node.outputs.presentation import build_presentation_state
from dicom_node.outputs.seg import build_segmentation
from dicom_node.outputs.source import prepare_source
from dicom_node.outputs.sr import build_report
from dicom_node.pixels import UnusableImage, dataset_gray
from dicom_node.priors import films_from_pacs
from dicom_node.queue import Job, Queue, QueueUnavailable, State
from dicom_node.spool import Spool
from model.infer import Segmenter


def encode(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Worker:
    """Stateless between jobs: the engine's threads share one (dicom_node/engines)."""

    def __init__(self, config: Config, queue: Queue, spool: Spool, pipeline: Segmenter,
                 algorithm: Algorithm, process_id: str | None = None):
        self.config, self.queue, self.spool, self.pipeline, self.algorithm = config, queue, spool, pipeline, algorithm
        self.destinations = [destination.name for destination in config.destinations]
        self.process_id = process_id  # recorded on the jobs it claims (`cxr-node status`: jobs in flight)

    def process(self, job: Job) -> State:
        """Finish one claimed job; returns its final state. A failure of the image is recorded; only
        QueueUnavailable is raised (the outcome cannot be recorded: the job is to be run again)."""
        uid = job.sop_uid
        started = time.perf_counter()
        try:
            state = self._process(job)
        except QueueUnavailable:
            raise
        except UnusableImage as error:
            state = State.FAILED
            self.queue.fail(uid, f"unusable image: {error}")
            log("instance failed", uid=uid, reason=str(error))
        except Exception as error:  # one bad image must not stop the others; the reason is kept
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                state = State.QUEUED  # the disk filled up under us: not the image's fault, try again later
                self.queue.requeue(uid, f"disk full: {error.strerror}")
                log("disk full while writing results; job put back in the queue", 40, uid=uid)
            else:
                state = State.FAILED
                reason = f"{type(error).__name__}: {error}"[:500]
                self.queue.fail(uid, reason)
                log("instance failed", 40, uid=uid, reason=reason)
        PROCESSED.labels(state).inc()
        PROCESSING_SECONDS.observe(time.perf_counter() - started)
        return state

    def _process(self, job: Job) -> State:
        uid = job.sop_uid
        received = datetime.fromtimestamp(job.received_at).astimezone()  # the results' time: the same on a re-run
        ds = pydicom.dcmread(self.queue.input_file(job))
        decision = chest_filter.by_tags(ds)
        if decision.frontal_chest is False:
            return self._skip(uid, decision)
        gray = dataset_gray(ds)
        seg = self.pipeline.segment(gray)
        decision = chest_filter.with_image(decision, seg)
        if not decision.frontal_chest:
            return self._skip(uid, decision)
        source = prepare_source(ds)
        patient_id, issuer = str(ds.get("PatientID", "")), str(ds.get("IssuerOfPatientID", ""))
        key, taken = patient_key(self.history_key, patient_id, issuer), film_time(ds)
        change = self._change_since_prior(ds, seg, key, taken)
        segmentation = build_segmentation(source, seg, self.algorithm, received)
        report = build_report(source, segmentation, seg, self.algorithm, received, change)
        outputs = [(Kind.SEG, segmentation), (Kind.SR, report)]
        if self.config.secondary_capture:
            shown = gray.max() + gray.min() - gray if seg.inverted else gray  # as the models read it
            outputs.append((Kind.SC, build_capture(source, shown, seg, self.algorithm, received, change)))
        if self.config.presentation_state:
            outputs.append((Kind.PR, build_presentation_state(source, seg, self.algorithm, received, change)))
        film = Film(key, *taken, uid, ds.StudyInstanceUID, report.SOPInstanceUID, report.SeriesInstanceUID,
                    self.algorithm.model_version, figures(seg)) if key else None
        results = [(result.SOPInstanceUID, kind, encode(result)) for kind, result in outputs]
        note = (f"pixels read inverted: their lungs contradict PhotometricInterpretation "
                f"{ds.get('PhotometricInterpretation', '')}") if seg.inverted else None
        self.queue.complete(job, results, self.destinations, decision.decided_by, seg.opacity_pct, note, film)
        compared = {"prior_sr_uid": change.prior.sr_uid, "change_points": change.opacity_points} if change else {}
        log("instance analysed", uid=uid, decided_by=decision.decided_by, opacity_pct=round(seg.opacity_pct, 2),
            seg_uid=segmentation.SOPInstanceUID, sr_uid=report.SOPInstanceUID, **compared,
            **({"note": note} if note else {}))
        return State.DONE

    @functools.cached_property
    def history_key(self) -> bytes:
        return history_key(self.config.history_key_file, create=True)

    def _change_since_prior(self, ds: pydicom.Dataset, seg, key: str | None,
                            taken: tuple[float | None, bool]) -> Change | None:
        """The change since the patient's latest film taken before this one, measured by the same model
        version: from the node's history, else (`[priors] pacs`) from its earlier SRs in the PACS, which
        join the history; None without a patient, a readable time, a prior, or measured change limits."""
        taken_at, time_known = taken
        if key is None or self.algorithm.change_limits is None:
            return None
        if taken_at is None:
            log("no comparison with a prior film: no readable acquisition, content or study date", 30,
                uid=ds.SOPInstanceUID)
            return None
        version = self.algorithm.model_version

        def prior() -> Film | None:
            return self.queue.prior_film(key, taken_at, time_known, version, ds.SOPInstanceUID)
        found = prior()
        if found is None and self.config.priors_pacs:
            fetched = films_from_pacs(self.config, key, str(ds.get("PatientID", "")),
                                      str(ds.get("IssuerOfPatientID", "")), taken_at)
            self.queue.remember_films([f for f in fetched if f.source_uid != ds.SOPInstanceUID])
            found = prior()
        return compare(seg, found, self.algorithm.change_limits, taken_at) if found else None

    def _skip(self, uid: str, decision: chest_filter.Decision) -> State:
        self.queue.skip(uid, decision.reason, decision.decided_by)
        log("instance skipped", uid=uid, reason=decision.reason, decided_by=decision.decided_by)
        return State.SKIPPED
