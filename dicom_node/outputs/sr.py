"""TID 1500 Measurement Report (Comprehensive SR: 2D image coordinates only) of one radiograph.

Groups, in the order a radiologist reads them (TID 1410 planar ROIs, each region an outline on the source
image, so viewers such as OHIF draw them and list their values):
1. the summary: the lung fields (convex hull of both lungs); tracking identifier = the summary sentence ("Opacity 41 % of both lungs
   (right 41 %, left 41 %), moderate; Brixia 5/18"); opacity present/absent and severity as qualitative
   evaluations; the opacity % of both lungs and of each, and the Brixia global score;
2. each SEG segment (right lung, left lung, opacity when found): one group referencing its SEG frame with
   the segment's figures and the segment's Tracking UID, and one group with the same Tracking UID whose
   region is the segment's outline, so that a reader that follows tracking UIDs, as OHIF does, joins the
   figures to the outline; for the opacity, its regions (the largest with the segment's Tracking UID),
   each with its share of the lung it lies in;
3. Brixia zones A-F, each outlined and named ("Zone A (right upper)"), with its opacity %, expected
   opacity % and Brixia score;
4. when the patient has a prior film (dicom_node/history.py): the change since it, over the lung fields,
   its tracking identifier the change sentence ("Opacity +12 points since 2020-03-14, beyond repeatability
   (9.4); Brixia +3, beyond repeatability (1.6)"), with the prior's figures, the changes, the limits, the
   direction and whether it is beyond the limit; the prior's SR is in Pertinent Other Evidence.
Every percentage's finding site (its own, else its group's) names the lung(s) it is a share of. Areas in
mm² only when the source's pixel size in the patient is known, with the calibration stated. Containers
are SEPARATE, so text renderers print each value with its name."""
from __future__ import annotations

from datetime import datetime

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage

from dicom_node.outputs import summary
from dicom_node.history import Change
from dicom_node.kinds import Kind
from dicom_node.outputs.codes import (BEYOND_REPEATABILITY, BRIXIA_GLOBAL_SCORE, BRIXIA_GLOBAL_SCORE_CHANGE,
                                      BRIXIA_REPEATABILITY_LIMIT,
                                      BRIXIA_ZONE_SCORE, CHANGE_DIRECTION, EXPECTED_OPACITY_PERCENT, LATERALITY, LUNG,
                                      ONE_LUNG, OPACITY, OPACITY_CHANGE, OPACITY_PERCENT, OPACITY_PERCENT_CHANGE,
                                      OPACITY_REPEATABILITY_LIMIT, PLAIN_CHEST_XRAY, PRIOR_BRIXIA_GLOBAL_SCORE,
                                      PRIOR_OPACITY_PERCENT, SCORE_UNIT, ZONE_SITES, private_scheme_identification)
from dicom_node.outputs.identity import MANUFACTURER, Algorithm, derived_uid, finish_header, lo, result_identity
from dicom_node.outputs.outlines import hull, outlines
from dicom_node.outputs.segments import SEGMENTS
from dicom_node.outputs.source import calibration
from model.infer import LEFT, RIGHT, ZONE_NAMES, Segmentation

# Opacity regions listed one by one: the largest ones, down to 0.5 % of the lungs (the SEG holds every pixel).
MAX_OPACITY_REGIONS = 8
MIN_REGION_SHARE = 0.005
LUNG_SIDES = {RIGHT: "right", LEFT: "left"}


def _percent(value: float, laterality: str | None = None) -> hd.sr.Measurement:
    """An opacity % of the lung(s) named by `laterality` (None: those of its group)."""
    sites = None
    if laterality in ONE_LUNG:
        sites = [hd.sr.FindingSite(ONE_LUNG[laterality])]
    elif laterality:
        sites = [hd.sr.FindingSite(LUNG, laterality=LATERALITY[laterality])]
    return hd.sr.Measurement(name=OPACITY_PERCENT, value=round(value, 2), unit=codes.UCUM.Percent, finding_sites=sites)


class _ReportBuilder:
    def __init__(self, source: pydicom.Dataset, segmentation: pydicom.Dataset, seg: Segmentation,
                 algorithm: Algorithm, change: Change | None):
        self.source, self.segmentation, self.seg, self.algorithm = source, segmentation, seg, algorithm
        self.change = change
        self.calibrated = calibration(source)
        parameters = [f"pixel size {self.calibrated.row_mm:g} x {self.calibrated.column_mm:g} mm from "
                      f"{self.calibrated.basis}"] if self.calibrated else ["no pixel size in the patient plane known: no areas"]
        self.algorithm_id = hd.sr.AlgorithmIdentification(name=lo(algorithm.name), version=lo(algorithm.version),
                                                          parameters=parameters)

    def uid(self, part: str) -> str:
        return derived_uid(self.source.SOPInstanceUID, part, self.algorithm.version)

    def area(self, mask: np.ndarray) -> list[hd.sr.Measurement]:
        if not self.calibrated:
            return []
        return [hd.sr.Measurement(name=codes.SCT.Area, unit=codes.UCUM.SquareMillimeter,
                                  value=round(int(mask.sum()) * self.calibrated.pixel_area_mm2, 2))]

    def region_group(self, uid: str, identifier: str, polyline: np.ndarray, finding_type, sites, measurements=(),
                     evaluations=()) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
        region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=polyline,
                                   source_image=hd.sr.SourceImageForRegion(self.source.SOPClassUID,
                                                                           self.source.SOPInstanceUID))
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=identifier), referenced_region=region,
            finding_type=finding_type, finding_sites=sites, algorithm_id=self.algorithm_id,
            measurements=list(measurements) or None, qualitative_evaluations=list(evaluations) or None)

    def summary_group(self):
        seg = self.seg
        evaluations = [hd.sr.QualitativeEvaluation(OPACITY, summary.presence(seg))]
        if grade := summary.severity(seg):
            evaluations.append(hd.sr.QualitativeEvaluation(codes.SCT.Severity, grade))
        measurements = [_percent(seg.opacity_pct), _percent(seg.right_opacity_pct, "right"),
                        _percent(seg.left_opacity_pct, "left")]
        if seg.brixia:
            measurements.append(hd.sr.Measurement(name=BRIXIA_GLOBAL_SCORE, value=seg.brixia_global, unit=SCORE_UNIT))
        return self.region_group(self.uid("summary"), summary.sentence(seg), self.lung_fields(), LUNG,
                                 [hd.sr.FindingSite(LUNG, laterality=LATERALITY["bilateral"])], measurements, evaluations)

    def lung_fields(self) -> np.ndarray:
        lungs = self.seg.lungs > 0
        return hull(lungs if lungs.any() else ~lungs)

    def change_group(self):
        """The change since the prior film, over the lung fields."""
        change, prior = self.change, self.change.prior.figures
        measurements = [
            hd.sr.Measurement(name=PRIOR_OPACITY_PERCENT, value=prior["opacity_pct"], unit=codes.UCUM.Percent),
            hd.sr.Measurement(name=OPACITY_PERCENT_CHANGE, value=change.opacity_points, unit=codes.UCUM.Percent),
            hd.sr.Measurement(name=OPACITY_REPEATABILITY_LIMIT, value=change.limits.opacity_pct, unit=codes.UCUM.Percent)]
        if change.brixia_points is not None:
            measurements += [
                hd.sr.Measurement(name=PRIOR_BRIXIA_GLOBAL_SCORE, value=prior["brixia_global"], unit=SCORE_UNIT),
                hd.sr.Measurement(name=BRIXIA_GLOBAL_SCORE_CHANGE, value=change.brixia_points, unit=SCORE_UNIT),
                hd.sr.Measurement(name=BRIXIA_REPEATABILITY_LIMIT, value=change.limits.brixia_global, unit=SCORE_UNIT)]
        evaluations = [hd.sr.QualitativeEvaluation(OPACITY_CHANGE, CHANGE_DIRECTION[change.direction]),
                       hd.sr.QualitativeEvaluation(BEYOND_REPEATABILITY,
                                                   codes.SCT.Yes if change.opacity_beyond else codes.SCT.No)]
        return self.region_group(self.uid("change"), change.sentence(), self.lung_fields(), OPACITY,
                                 [hd.sr.FindingSite(LUNG, laterality=LATERALITY["bilateral"])], measurements, evaluations)

    def segment_groups(self):
        """Per non-empty SEG segment: its figures referencing its SEG frame, and its outline, one Tracking UID."""
        seg = self.seg
        segmentation_source = hd.sr.SourceImageForSegmentation(self.source.SOPClassUID, self.source.SOPInstanceUID)
        groups = []
        for segment in SEGMENTS:
            mask = segment.mask(seg)
            shapes = outlines(mask)
            if not shapes:  # nothing to outline or measure (no opacity found)
                continue
            laterality = segment.laterality(seg)
            sites = [hd.sr.FindingSite(LUNG, laterality=LATERALITY[laterality] if laterality else None)]
            uid = segment.tracking_uid(self.source.SOPInstanceUID, self.algorithm)
            if segment.property_type == OPACITY:  # where the opacity is; its share of both lungs
                measurements = [_percent(seg.opacity_pct, "bilateral")]
            else:
                measurements = [_percent(segment.opacity_pct(seg), laterality)]
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=segment.label),
                referenced_segment=hd.sr.ReferencedSegmentationFrame(
                    sop_class_uid=self.segmentation.SOPClassUID, sop_instance_uid=self.segmentation.SOPInstanceUID,
                    frame_number=segment.number, segment_number=segment.number, source_image=segmentation_source),
                finding_type=segment.property_type, finding_sites=sites, algorithm_id=self.algorithm_id,
                measurements=self.area(mask) + measurements))
            if segment.property_type == OPACITY:  # its regions; the largest shares the segment's Tracking UID
                for number, (region, lung) in enumerate(self.opacity_regions(), start=1):
                    groups.append(self.opacity_region_group(
                        number, region, lung, uid if number == 1 else self.uid(f"opacity-region-{number}")))
            else:
                groups.append(self.region_group(uid, f"{segment.label} outline", shapes[0], LUNG, sites))
        return groups

    def opacity_regions(self) -> list[tuple[np.ndarray, int]]:
        """(mask, lung label) of each listed opacity region: the largest, then the next ones down to
        MIN_REGION_SHARE of the lungs."""
        count, components, stats, _ = cv2.connectedComponentsWithStats(self.seg.opacity.astype(np.uint8))
        areas = stats[1:, cv2.CC_STAT_AREA]
        order = [k + 1 for k in np.argsort(areas)[::-1]
                 if k == np.argmax(areas) or areas[k] >= MIN_REGION_SHARE * self.seg.lung_area_px]
        regions = []
        for label in order[:MAX_OPACITY_REGIONS]:
            mask = components == label
            lung = RIGHT if (self.seg.lungs[mask] == RIGHT).sum() >= (self.seg.lungs[mask] == LEFT).sum() else LEFT
            regions.append((mask, lung))
        return regions

    def opacity_region_group(self, number: int, mask: np.ndarray, lung: int, uid: str):
        """Opacity region `number` (1 = largest): its outline, area and share of the lung it lies in."""
        side = LUNG_SIDES[lung]
        in_lung = self.seg.lungs == lung
        share = 100.0 * int((mask & in_lung).sum()) / max(1, int(in_lung.sum()))
        return self.region_group(uid, f"Opacity region {number} ({side} lung)", outlines(mask)[0], OPACITY,
                                 [hd.sr.FindingSite(LUNG, laterality=LATERALITY[side])],
                                 self.area(mask) + [_percent(share, side)])

    def zone_groups(self):
        seg, groups = self.seg, []
        for letter, mask in seg.zone_masks().items():
            shapes = outlines(mask)
            if not shapes:
                continue
            location, laterality = ZONE_SITES[letter]
            # the score first: viewers that label an outline print its first few values only
            measurements = [hd.sr.Measurement(name=BRIXIA_ZONE_SCORE, value=seg.brixia[letter], unit=SCORE_UNIT)] \
                if seg.brixia else []
            measurements += [_percent(seg.zone_opacity_pct[letter]),
                             hd.sr.Measurement(name=EXPECTED_OPACITY_PERCENT, unit=codes.UCUM.Percent,
                                               value=round(seg.zone_opacity_score[letter], 2))]
            groups.append(self.region_group(self.uid(f"zone-{letter}"), f"Zone {letter} ({ZONE_NAMES[letter]})",
                                            shapes[0], OPACITY, [hd.sr.FindingSite(location, laterality=laterality)],
                                            measurements))
        return groups

    def groups(self):
        change = [self.change_group()] if self.change else []
        return [self.summary_group()] + change + self.segment_groups() + self.zone_groups()


def build_report(source: pydicom.Dataset, segmentation: pydicom.Dataset, seg: Segmentation,
                 algorithm: Algorithm, started: datetime, change: Change | None = None) -> hd.sr.ComprehensiveSR:
    """`source` as `prepare_source` gives it, but with its spacing attributes (see `calibration`);
    `change`: since the patient's prior film, if there is one."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("cxr-node-device", algorithm.name), name="cxr-node", manufacturer_name=MANUFACTURER,
            model_name=lo(algorithm.name)))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=_ReportBuilder(source, segmentation, seg, algorithm, change).groups())
    result = hd.sr.ComprehensiveSR(
        evidence=[source, segmentation], content=report, **result_identity(source, Kind.SR, algorithm),
        is_complete=True, is_final=False, is_verified=False,  # IHE AI Results: UNVERIFIED
        contributing_equipment=[algorithm.contributing_equipment(started)])
    result.CodingSchemeIdentificationSequence = [private_scheme_identification()]
    finish_header(result, source, Kind.SR, started)
    result.ContinuityOfContent = "SEPARATE"
    _separate_items(result.ContentSequence)
    if change:  # the prior's SR: evidence from outside the current requested procedure (PS3.3 C.17.2)
        result.PertinentOtherEvidenceSequence = [_evidence(change.prior.study_uid, change.prior.sr_series_uid,
                                                           ComprehensiveSRStorage, change.prior.sr_uid)]
    return result


def _evidence(study_uid: str, series_uid: str, sop_class_uid: str, sop_uid: str) -> pydicom.Dataset:
    """One Hierarchical SOP Instance Reference Macro item (PS3.3 Table C.17-3)."""
    instance, series, study = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID = sop_class_uid, sop_uid
    series.SeriesInstanceUID, series.ReferencedSOPSequence = series_uid, [instance]
    study.StudyInstanceUID, study.ReferencedSeriesSequence = study_uid, [series]
    return study


def _separate_items(content: pydicom.Sequence) -> None:
    """Containers hold separate items, not continuous prose (so renderers name each value); and a
    reference to a segmentation frame names the frame, not also the segment (PS3.3 C.10.4: Referenced
    Segment Number only when segments rather than frames are referenced; frame k holds segment k)."""
    for item in content:
        if item.ValueType == "CONTAINER":
            item.ContinuityOfContent = "SEPARATE"
        for reference in item.get("ReferencedSOPSequence", []):
            if "ReferencedFrameNumber" in reference and "ReferencedSegmentNumber" in reference:
                del reference.ReferencedSegmentNumber
        _separate_items(item.get("ContentSequence", []))
