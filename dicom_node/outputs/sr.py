"""TID 1500 Measurement Report (Comprehensive 3D SR): opacity % of both lungs, each lung and each
zone, the Brixia score of each zone and of both lungs, lung and opacity areas, referencing the SEG
segments and the source image."""
from __future__ import annotations

from datetime import datetime

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.outputs import (BRIXIA_GLOBAL_SCORE, BRIXIA_ZONE_SCORE, LEFT_LUNG, MANUFACTURER, OPACITY,
                                OPACITY_PERCENT, PIXELS, RIGHT_LUNG, SCORE_UNIT, Algorithm, derived_uid,
                                pixel_spacing_mm)
from dicom_node.outputs.seg import segment_tracking_uid
from model.infer import LEFT, RIGHT, ZONES, Segmentation

PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
ZONE_SITES = {  # Brixia zone -> (zone of lung, laterality)
    "A": (codes.SCT.UpperZoneOfLung, codes.SCT.Right), "B": (codes.SCT.MiddleZoneOfLung, codes.SCT.Right),
    "C": (codes.SCT.LowerZoneOfLung, codes.SCT.Right), "D": (codes.SCT.UpperZoneOfLung, codes.SCT.Left),
    "E": (codes.SCT.MiddleZoneOfLung, codes.SCT.Left), "F": (codes.SCT.LowerZoneOfLung, codes.SCT.Left),
}


def _percent(value: float, finding_sites=None) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=OPACITY_PERCENT, value=round(value, 2), unit=codes.UCUM.Percent,
                             finding_sites=finding_sites)


def build_report(source: pydicom.Dataset, segmentation: pydicom.Dataset, seg: Segmentation,
                 algorithm: Algorithm, started: datetime) -> hd.sr.Comprehensive3DSR:
    """Areas are in mm2 when the source gives a pixel spacing, else in pixels (unit {pixels})."""
    spacing = pixel_spacing_mm(source)
    pixel_area, area_unit = (spacing[0] * spacing[1], codes.UCUM.SquareMillimeter) if spacing else (1.0, PIXELS)
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name[:64], version=algorithm.version[:64])
    source_image = hd.sr.SourceImageForSegmentation(source.SOPClassUID, source.SOPInstanceUID)

    def area(pixels: int) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=codes.SCT.Area, value=round(pixels * pixel_area, 2), unit=area_unit)

    def segment_group(number, label, finding_type, site, measurements):
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=segment_tracking_uid(source.SOPInstanceUID, number, algorithm), identifier=label),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=segmentation.SOPClassUID, sop_instance_uid=segmentation.SOPInstanceUID,
                segment_number=number, source_images=[source_image]),
            finding_type=finding_type, finding_sites=[site], algorithm_id=algorithm_id, measurements=measurements)

    groups = [
        segment_group(1, "Right lung", RIGHT_LUNG, hd.sr.FindingSite(codes.SCT.Lung, laterality=codes.SCT.Right),
                      [area(int((seg.lungs == RIGHT).sum())), _percent(seg.right_opacity_pct)]),
        segment_group(2, "Left lung", LEFT_LUNG, hd.sr.FindingSite(codes.SCT.Lung, laterality=codes.SCT.Left),
                      [area(int((seg.lungs == LEFT).sum())), _percent(seg.left_opacity_pct)]),
        segment_group(3, "Opacity (AI)", OPACITY, hd.sr.FindingSite(codes.SCT.Lung, laterality=codes.SCT.Bilateral),
                      [area(seg.opacity_area_px), _percent(seg.opacity_pct)]),
    ]
    zone_measurements = []
    for letter in ZONES:
        location, laterality = ZONE_SITES[letter]
        site = [hd.sr.FindingSite(location, laterality=laterality)]
        zone_measurements.append(_percent(seg.zone_opacity_pct[letter], site))
        if seg.brixia:
            zone_measurements.append(hd.sr.Measurement(name=BRIXIA_ZONE_SCORE, value=seg.brixia[letter],
                                                       unit=SCORE_UNIT, finding_sites=site))
    if seg.brixia:
        zone_measurements.append(hd.sr.Measurement(
            name=BRIXIA_GLOBAL_SCORE, value=seg.brixia_global, unit=SCORE_UNIT,
            finding_sites=[hd.sr.FindingSite(codes.SCT.Lung, laterality=codes.SCT.Bilateral)]))
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
            model_name=algorithm.name[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY, imaging_measurements=groups)
    result = hd.sr.Comprehensive3DSR(
        evidence=[source, segmentation], content=report,
        series_instance_uid=derived_uid(source.SeriesInstanceUID, "SR", algorithm.version), series_number=9902,
        sop_instance_uid=derived_uid(source.SOPInstanceUID, "SR", algorithm.version),
        instance_number=int(source.get("InstanceNumber") or 1), manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,  # IHE AI Results: UNVERIFIED
        contributing_equipment=[algorithm.contributing_equipment(started)])
    result.SeriesDescription = "AI opacity measurements (cxr-node)"
    private_scheme = pydicom.Dataset()
    private_scheme.CodingSchemeDesignator = OPACITY_PERCENT.scheme_designator
    private_scheme.CodingSchemeName = "cxr-node private codes"
    private_scheme.CodingSchemeResponsibleOrganization = "cxr-node"
    result.CodingSchemeIdentificationSequence = [private_scheme]
    # Content date/time = start of the analysis (IHE AI Results).
    result.ContentDate, result.ContentTime = started.strftime("%Y%m%d"), started.strftime("%H%M%S.%f")
    return result
