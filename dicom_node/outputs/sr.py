"""TID 1500 Measurement Report (Comprehensive 3D SR) of one radiograph.

One TID 1410 planar ROI group per SEG segment (right lung, left lung, opacity), each referencing its
segmentation frame and sharing the segment's Tracking UID: the opacity % of that region and, only
when the source's pixel size in the patient is known, its area in mm² with the calibration stated.
Then one group with the opacity % and the expected opacity % of each Brixia zone and the Brixia scores."""
from __future__ import annotations

from datetime import datetime

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from dicom_node.outputs.codes import (BRIXIA_GLOBAL_SCORE, BRIXIA_ZONE_SCORE, EXPECTED_OPACITY_PERCENT, LATERALITY,
                                      LUNG, OPACITY, OPACITY_PERCENT, PLAIN_CHEST_XRAY, SCORE_UNIT, ZONE_SITES,
                                      private_scheme_identification)
from dicom_node.outputs.identity import MANUFACTURER, Algorithm, derived_uid, finish_header, lo, result_identity
from dicom_node.outputs.segments import SEGMENTS
from dicom_node.outputs.source import calibration
from model.infer import ZONES, Segmentation


def _percent(value: float, finding_sites=None) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=OPACITY_PERCENT, value=round(value, 2), unit=codes.UCUM.Percent,
                             finding_sites=finding_sites)


def build_report(source: pydicom.Dataset, segmentation: pydicom.Dataset, seg: Segmentation,
                 algorithm: Algorithm, started: datetime) -> hd.sr.Comprehensive3DSR:
    """`source` as `prepare_source` gives it, but with its spacing attributes (see `calibration`)."""
    calibrated = calibration(source)
    parameters = [f"pixel size {calibrated.row_mm:g} x {calibrated.column_mm:g} mm from {calibrated.basis}"] if calibrated \
        else ["no pixel size in the patient plane known: no areas"]
    algorithm_id = hd.sr.AlgorithmIdentification(name=lo(algorithm.name), version=lo(algorithm.version),
                                                 parameters=parameters)
    source_image = hd.sr.SourceImageForSegmentation(source.SOPClassUID, source.SOPInstanceUID)
    groups = []
    for segment in SEGMENTS:
        mask = segment.mask(seg)
        measurements = [_percent(segment.opacity_pct(seg))]
        if calibrated:
            measurements.insert(0, hd.sr.Measurement(name=codes.SCT.Area, unit=codes.UCUM.SquareMillimeter,
                                                     value=round(int(mask.sum()) * calibrated.pixel_area_mm2, 2)))
        laterality = segment.laterality(seg)
        site = hd.sr.FindingSite(LUNG, laterality=LATERALITY[laterality] if laterality else None)
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=segment.tracking_uid(source.SOPInstanceUID, algorithm),
                                                         identifier=segment.label),
            referenced_segment=hd.sr.ReferencedSegmentationFrame(
                sop_class_uid=segmentation.SOPClassUID, sop_instance_uid=segmentation.SOPInstanceUID,
                frame_number=segment.number, segment_number=segment.number, source_image=source_image),
            finding_type=segment.property_type, finding_sites=[site], algorithm_id=algorithm_id,
            measurements=measurements))

    zone_measurements = []
    for letter in ZONES:
        location, laterality = ZONE_SITES[letter]
        site = [hd.sr.FindingSite(location, laterality=laterality)]
        zone_measurements.append(_percent(seg.zone_opacity_pct[letter], site))
        zone_measurements.append(hd.sr.Measurement(name=EXPECTED_OPACITY_PERCENT, unit=codes.UCUM.Percent,
                                                   value=round(seg.zone_opacity_score[letter], 2), finding_sites=site))
        if seg.brixia:
            zone_measurements.append(hd.sr.Measurement(name=BRIXIA_ZONE_SCORE, value=seg.brixia[letter],
                                                       unit=SCORE_UNIT, finding_sites=site))
    if seg.brixia:
        zone_measurements.append(hd.sr.Measurement(
            name=BRIXIA_GLOBAL_SCORE, value=seg.brixia_global, unit=SCORE_UNIT,
            finding_sites=[hd.sr.FindingSite(LUNG, laterality=LATERALITY["bilateral"])]))
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(source.SOPInstanceUID, "zones", algorithm.version),
            identifier="Opacity by lung zone (upper/middle/lower thirds)"),
        finding_type=OPACITY, algorithm_id=algorithm_id, measurements=zone_measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)]))

    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("cxr-node-device", algorithm.name), name="cxr-node", manufacturer_name=MANUFACTURER,
            model_name=lo(algorithm.name)))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY, imaging_measurements=groups)
    result = hd.sr.Comprehensive3DSR(
        evidence=[source, segmentation], content=report, **result_identity(source, "SR", algorithm),
        is_complete=True, is_final=False, is_verified=False,  # IHE AI Results: UNVERIFIED
        contributing_equipment=[algorithm.contributing_equipment(started)])
    result.CodingSchemeIdentificationSequence = [private_scheme_identification()]
    finish_header(result, source, "SR", started)
    _frame_references_only(result.ContentSequence)
    return result


def _frame_references_only(content: pydicom.Sequence) -> None:
    """A reference to a segmentation frame names the frame, not also the segment (PS3.3 C.10.4:
    Referenced Segment Number only when segments rather than frames are referenced). highdicom writes
    both; frame k holds segment k, so nothing is lost."""
    for item in content:
        for reference in item.get("ReferencedSOPSequence", []):
            if "ReferencedFrameNumber" in reference and "ReferencedSegmentNumber" in reference:
                del reference.ReferencedSegmentNumber
        _frame_references_only(item.get("ContentSequence", []))
