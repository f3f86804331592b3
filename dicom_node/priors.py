"""Priors the node never measured itself (a new installation, a history it no longer has): this node's
own earlier SRs of the patient, found in the PACS by C-FIND and fetched by C-GET, their figures read back.
Cheaper than fetching and analysing the prior images, and the figures are those the radiologist saw.

`[priors] pacs` names the destination to ask; it is asked only when the local history has no prior. Any
failure (PACS down, refusal, an SR it cannot read) leaves the film without a comparison, never fails it."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import highdicom as hd
import pydicom
from pydicom.uid import ComprehensiveSRStorage, SegmentationStorage
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet)

from dicom_node.config import Config, Destination
from dicom_node.history import Film, film_time
from dicom_node.logs import log
from dicom_node.outputs.codes import BRIXIA_GLOBAL_SCORE, OPACITY_PERCENT
from dicom_node.kinds import RESULT_KINDS, Kind
from dicom_node.sender import client_tls_context

PENDING = (0xFF00, 0xFF01)


def report_series(config: Config, pacs: Destination, patient_id: str, before: datetime) -> list[pydicom.Dataset]:
    """C-FIND: this node's SR series of the patient in studies of the look-back window, newest first."""
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.PatientID, query.Modality = patient_id, "SR"
    query.SeriesDescription = RESULT_KINDS[Kind.SR].series_description
    query.StudyDate = f"{before - timedelta(days=config.priors_lookback_days):%Y%m%d}-{before:%Y%m%d}"
    query.StudyTime = query.StudyInstanceUID = query.SeriesInstanceUID = ""
    found = []
    with QueryRetrieve(config, pacs) as (assoc, _):
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if status and status.Status in PENDING and identifier is not None:
                found.append(identifier)
    return sorted(found, key=lambda s: (s.get("StudyDate", ""), s.get("StudyTime", "")), reverse=True)


def fetch_reports(config: Config, pacs: Destination, series: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """C-GET: the SRs of up to `priors_max_studies` of `series`."""
    with QueryRetrieve(config, pacs) as (assoc, received):
        for item in series[:config.priors_max_studies]:
            request = pydicom.Dataset()
            request.QueryRetrieveLevel = "SERIES"
            request.StudyInstanceUID, request.SeriesInstanceUID = item.StudyInstanceUID, item.SeriesInstanceUID
            for _status, _identifier in assoc.send_c_get(request, StudyRootQueryRetrieveInformationModelGet):
                pass
        return received


def film_from_report(report: pydicom.Dataset, patient_key: str) -> Film | None:
    """The figures of one of this node's SRs, as a film taken at its study's date and time; None if it is
    not one (no summary group with the opacity %)."""
    try:
        summary = hd.sr.ComprehensiveSR.from_dataset(report).content.get_planar_roi_measurement_groups()[0]
        both, right, left = (float(m.value) for m in summary.get_measurements(name=OPACITY_PERCENT)[:3])
    except (IndexError, ValueError, AttributeError, TypeError):
        return None
    brixia = summary.get_measurements(name=BRIXIA_GLOBAL_SCORE)
    source = next((instance.ReferencedSOPInstanceUID for study in report.get("CurrentRequestedProcedureEvidenceSequence", [])
                   for series in study.ReferencedSeriesSequence for instance in series.ReferencedSOPSequence
                   if instance.ReferencedSOPClassUID != SegmentationStorage), None)
    study_time = pydicom.Dataset()  # the SR copies its source's study: the film's date and time
    study_time.StudyDate, study_time.StudyTime = report.get("StudyDate", ""), report.get("StudyTime", "")
    version = str(report.ContributingEquipmentSequence[0].SoftwareVersions[0]).split()[0] \
        if report.get("ContributingEquipmentSequence") else ""
    if source is None or not version:
        return None
    return Film(patient_key, *film_time(study_time), source, report.StudyInstanceUID, report.SOPInstanceUID,
                report.SeriesInstanceUID, version,
                {"opacity_pct": both, "right_pct": right, "left_pct": left, "zone_pct": None, "brixia": None,
                 "brixia_global": round(float(brixia[0].value)) if brixia else None})


def films_from_pacs(config: Config, patient_key: str, patient_id: str, issuer: str, before: float) -> list[Film]:
    """The patient's earlier films as this node's SRs in the PACS tell them; [] on any failure (logged).
    `before`: the film's wall clock (history.film_time)."""
    pacs = next(d for d in config.destinations if d.name == config.priors_pacs)
    try:
        series = report_series(config, pacs, patient_id, datetime.fromtimestamp(before, timezone.utc))
        reports = fetch_reports(config, pacs, series) if series else []
    except Exception as error:  # the PACS down or refusing: no comparison, the analysis goes on
        log("priors query failed; no comparison with a prior film", 30, destination=pacs.name, error=str(error))
        return []
    films = [film_from_report(report, patient_key) for report in reports
             if str(report.get("IssuerOfPatientID", "")) == issuer]
    return [film for film in films if film is not None]


class QueryRetrieve:
    """An association with `pacs` for Study Root C-FIND and C-GET of Comprehensive SRs (as their SCP);
    yields (assoc, the SRs received so far)."""

    def __init__(self, config: Config, pacs: Destination):
        self.config, self.pacs, self.received = config, pacs, []

    def __enter__(self):
        ae = AE(ae_title=self.config.ae_title)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.config.network_timeout
        for context in (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet,
                        ComprehensiveSRStorage):
            ae.add_requested_context(context)
        tls = client_tls_context(self.pacs) if self.pacs.tls else None
        self.assoc = ae.associate(self.pacs.host, self.pacs.port, ae_title=self.pacs.ae_title,
                                  ext_neg=[build_role(ComprehensiveSRStorage, scp_role=True)],
                                  evt_handlers=[(evt.EVT_C_STORE, self._store)],
                                  tls_args=(tls, self.pacs.host) if tls else None)
        if not self.assoc.is_established:
            raise ConnectionError(f"no association with {self.pacs.ae_title} at {self.pacs.host}:{self.pacs.port}")
        return self.assoc, self.received

    def _store(self, event) -> int:
        self.received.append(event.dataset)
        return 0x0000

    def __exit__(self, *exc) -> None:
        self.assoc.release()
