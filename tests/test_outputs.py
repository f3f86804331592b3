"""The result objects on their own: the headers hospitals see (identity, geometry, calibration,
patient attributes) across source header variants, validated by dciodvfy and read back by highdicom.
The masks are drawn here (two lung rectangles, opacity in the right lung only): the models are not
under test, the DICOM is."""
from __future__ import annotations

import subprocess
from datetime import datetime, timezone

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from dicom_node.outputs.capture import build_capture
from dicom_node.outputs.codes import OPACITY_PERCENT
from dicom_node.outputs.identity import Algorithm
from dicom_node.outputs.seg import build_segmentation
from dicom_node.outputs.source import prepare_source
from dicom_node.outputs.sr import build_report
from model.infer import LEFT, RIGHT, Segmentation

ALGORITHM = Algorithm("test model", "9.9.9")
STARTED = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
SOURCE = "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def drawn_segmentation(shape) -> Segmentation:
    rows, cols = shape
    lungs = np.zeros(shape, np.uint8)
    lungs[rows // 5:4 * rows // 5, cols // 8:7 * cols // 16] = RIGHT
    lungs[rows // 5:4 * rows // 5, 9 * cols // 16:7 * cols // 8] = LEFT
    opacity = np.zeros(shape, bool)
    opacity[rows // 2:4 * rows // 5, cols // 8:cols // 4] = True
    return Segmentation(lungs=lungs, opacity=opacity, lung_confidence=0.95,
                        zone_opacity_pct={z: 10.0 * i for i, z in enumerate("ABCDEF")},
                        zone_opacity_score={z: 10.0 * i + 2.5 for i, z in enumerate("ABCDEF")},
                        brixia={z: i % 4 for i, z in enumerate("ABCDEF")})


def with_geometry(ds, variant):
    """The source header as a modality might send it."""
    ds = ds.copy()
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "EstimatedRadiographicMagnificationFactor",
                    "FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "SliceThickness"):
        if keyword in ds:
            delattr(ds, keyword)
    if variant.startswith("frame of reference"):
        ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.2, 0.2]
        if variant == "frame of reference, complete geometry":
            ds.SliceThickness = 1
    elif variant.startswith("imager spacing"):
        ds.ImagerPixelSpacing = [0.15, 0.15]
        if variant == "imager spacing and ERMF":
            ds.EstimatedRadiographicMagnificationFactor = 1.2
    return ds


VARIANTS = {  # variant -> pixel area in the patient, mm² (None: not known)
    "frame of reference, complete geometry": 0.04, "frame of reference, no slice thickness": 0.04,
    "imager spacing and ERMF": (0.15 / 1.2) ** 2, "imager spacing only": None, "no spacing": None,
}


def build_all(ds):
    source = prepare_source(ds)
    seg = drawn_segmentation((ds.Rows, ds.Columns))
    segmentation = build_segmentation(source, seg, ALGORITHM, STARTED)
    report = build_report(source, segmentation, seg, ALGORITHM, STARTED)
    capture = build_capture(source, ds.pixel_array, seg, ALGORITHM, STARTED)
    return seg, segmentation, report, capture


def dciodvfy_errors(ds, path) -> list[str]:
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def radiograph(dicom_dir):
    return pydicom.dcmread(dicom_dir / SOURCE)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_header_variant_gives_valid_projection_results_with_areas_only_when_calibrated(radiograph, variant, tmp_path):
    ds = with_geometry(radiograph, variant)
    seg, segmentation, report, capture = build_all(ds)
    for kind, result in (("SEG", segmentation), ("SR", report), ("SC", capture)):
        assert dciodvfy_errors(result, tmp_path / f"{kind}.dcm") == [], (variant, kind)
        assert "FrameOfReferenceUID" not in result, (variant, kind)
    shared = segmentation.SharedFunctionalGroupsSequence[0]
    if variant == "no spacing":  # nothing invented
        assert "PixelMeasuresSequence" not in shared and "PlaneOrientationSequence" not in shared
    else:  # the source's own spacing, for viewers (see dicom_node/outputs/seg.py)
        source_spacing = ds.get("PixelSpacing") or ds.ImagerPixelSpacing
        assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [float(v) for v in source_spacing]
    masks = hd.seg.Segmentation.from_dataset(segmentation).get_pixels_by_source_instance(
        [ds.SOPInstanceUID], segment_numbers=[1, 2, 3])[0]
    assert (masks[..., 0] == (seg.lungs == RIGHT)).all() and (masks[..., 2] == seg.opacity).all()

    groups = hd.sr.Comprehensive3DSR.from_dataset(report).content.get_planar_roi_measurement_groups()
    areas = {g.tracking_identifier: g.get_measurements(name=codes.SCT.Area) for g in groups}
    pixel_area = VARIANTS[variant]
    if pixel_area is None:
        assert all(found == [] for found in areas.values()), variant
    else:
        right = areas["Right lung"][0]
        assert right.unit == codes.UCUM.SquareMillimeter
        assert float(right.value) == pytest.approx((seg.lungs == RIGHT).sum() * pixel_area, rel=1e-4)


def test_the_sr_groups_reference_their_segments_by_frame_tracking_uid_and_laterality(radiograph):
    seg, segmentation, report, _ = build_all(radiograph)
    groups = {g.tracking_identifier: g for g in
              hd.sr.Comprehensive3DSR.from_dataset(report).content.get_planar_roi_measurement_groups()}
    for segment in segmentation.SegmentSequence:
        group = groups[segment.SegmentLabel]
        assert group.tracking_uid == segment.TrackingUID
        frame = group.referenced_segmentation_frame[0].ReferencedSOPSequence[0]  # TID 1410: frame k = segment k
        assert frame.ReferencedSOPInstanceUID == segmentation.SOPInstanceUID
        assert int(frame.ReferencedFrameNumber) == segment.SegmentNumber and "ReferencedSegmentNumber" not in frame
        assert group.finding_type == codes.SCT.Lung or segment.SegmentLabel == "Opacity (AI)"
    # opacity only in the right lung: the opacity group and segment say right, not bilateral
    opacity_site = groups["Opacity (AI)"].finding_sites[0]
    assert opacity_site.laterality == codes.SCT.Right
    opacity_segment = segmentation.SegmentSequence[2]
    assert opacity_segment.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0].CodeValue == codes.SCT.Right.value
    assert segmentation.SegmentSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == codes.SCT.Right.value
    assert segmentation.SegmentSequence[1].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == codes.SCT.Left.value
    opacity_pct = float(groups["Opacity (AI)"].get_measurements(name=OPACITY_PERCENT)[0].value)
    assert opacity_pct == pytest.approx(seg.opacity_pct, abs=0.01)
    zones = hd.sr.Comprehensive3DSR.from_dataset(report).content.get_image_measurement_groups()[0]
    by_zone = {}
    for measurement in zones.get_measurements():  # zone order A-F; site laterality and zone name per item
        by_zone.setdefault(measurement.name.meaning, []).append(float(measurement.value))
    assert by_zone["Opacity percentage of lung area"] == [seg.zone_opacity_pct[z] for z in "ABCDEF"]
    assert by_zone["Expected opacity percentage of zone"] == [seg.zone_opacity_score[z] for z in "ABCDEF"]
    assert by_zone["Brixia zone score"] == [seg.brixia[z] for z in "ABCDEF"]
    assert by_zone["Brixia global score"] == [seg.brixia_global]


def test_the_same_input_gives_the_same_uids_and_one_series_per_source_series(radiograph):
    first, second = build_all(radiograph)[1:], build_all(radiograph)[1:]
    for a, b in zip(first, second):
        assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    sibling = radiograph.copy()
    sibling.SOPInstanceUID = pydicom.uid.generate_uid()  # another image of the same series
    third = build_all(sibling)[1:]
    for a, c in zip(first, third):
        assert a.SeriesInstanceUID == c.SeriesInstanceUID and a.SOPInstanceUID != c.SOPInstanceUID
    newer = Algorithm(ALGORITHM.name, "10.0.0")
    seg = drawn_segmentation((radiograph.Rows, radiograph.Columns))
    assert build_segmentation(prepare_source(radiograph), seg, newer, STARTED).SeriesInstanceUID != first[0].SeriesInstanceUID


def test_the_secondary_capture_header_follows_its_source(radiograph):
    ds = radiograph.copy()
    ds.IssuerOfPatientID, ds.StudyDescription, ds.Laterality = "HOSP-A", "CHEST 2 VIEWS", ""
    other = pydicom.Dataset()
    other.PatientID, other.IssuerOfPatientID = "98765", "HOSP-B"
    ds.OtherPatientIDsSequence = [other]
    ds.LossyImageCompression, ds.LossyImageCompressionRatio = "01", 10
    _, segmentation, report, capture = build_all(ds)
    for result in (segmentation, report, capture):
        for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "StudyDescription", "AccessionNumber",
                        "StudyInstanceUID"):
            assert result.get(keyword) == ds.get(keyword), (result.Modality, keyword)
        assert result.OtherPatientIDsSequence[0].IssuerOfPatientID == "HOSP-B"
    assert "Laterality" not in capture
    assert capture.ConversionType == "WSD" and capture.BurnedInAnnotation == "YES"
    assert capture.LossyImageCompression == "01" and float(capture.LossyImageCompressionRatio) == 10


@pytest.mark.parametrize("patient_orientation, expected", [(["L", "F"], [1, 0, 0, 0, 0, -1]),
                                                           (["R", "F"], [-1, 0, 0, 0, 0, -1]), (None, [1, 0, 0, 0, 1, 0])])
def test_the_seg_orientation_agrees_with_the_patient_orientation(radiograph, patient_orientation, expected):
    ds = with_geometry(radiograph, "imager spacing only")
    if patient_orientation:
        ds.PatientOrientation = patient_orientation
    elif "PatientOrientation" in ds:
        del ds.PatientOrientation
    segmentation = build_all(ds)[1]
    orientation = segmentation.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert [int(v) for v in orientation] == expected


@pytest.mark.parametrize("transfer_syntax, lossy", [(pydicom.uid.JPEGBaseline8Bit, True),
                                                     (pydicom.uid.ExplicitVRLittleEndian, False)])
def test_the_secondary_capture_is_marked_lossy_when_its_source_arrived_lossy_compressed(radiograph, transfer_syntax,
                                                                                         lossy):
    ds = radiograph.copy()
    ds.file_meta = pydicom.dataset.FileMetaDataset(ds.file_meta)
    ds.file_meta.TransferSyntaxUID = transfer_syntax  # the header as it came (pixels already decoded)
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if keyword in ds:
            delattr(ds, keyword)
    capture = build_all(ds)[3]
    assert (capture.get("LossyImageCompression") == "01") == lossy
