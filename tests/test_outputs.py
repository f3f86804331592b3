"""The result objects on their own: the headers hospitals see (identity, geometry, calibration,
patient attributes) across source header variants, validated by dciodvfy and read back by highdicom.
The masks are drawn here (two lung rectangles, opacity in the right lung only): the models are not
under test, the DICOM is."""
from __future__ import annotations

import html
import io
import re
import subprocess
from datetime import datetime, timezone

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from dicom_node.outputs import summary
from dicom_node.outputs.capture import build_capture
from dicom_node.outputs.codes import BRIXIA_GLOBAL_SCORE, OPACITY, OPACITY_PERCENT, ZONE_SITES
from dicom_node.outputs.identity import Algorithm
from dicom_node.outputs.presentation import build_presentation_state
from dicom_node.outputs.seg import build_segmentation
from dicom_node.outputs.source import prepare_source
from dicom_node.outputs.sr import build_report
from model.infer import LEFT, RIGHT, ZONE_NAMES, Segmentation

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


@pytest.fixture
def radiograph(dicom_dir):  # read for each test: Dataset.copy() is shallow, so tests that edit one would share it
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

    groups = hd.sr.ComprehensiveSR.from_dataset(report).content.get_planar_roi_measurement_groups()
    areas = {g.tracking_identifier: g.get_measurements(name=codes.SCT.Area) for g in groups}
    pixel_area = VARIANTS[variant]
    if pixel_area is None:
        assert all(found == [] for found in areas.values()), variant
    else:
        right = areas["Right lung"][0]
        assert right.unit == codes.UCUM.SquareMillimeter
        assert float(right.value) == pytest.approx((seg.lungs == RIGHT).sum() * pixel_area, rel=1e-4)


def sr_groups(report) -> list:
    return hd.sr.ComprehensiveSR.from_dataset(report).content.get_planar_roi_measurement_groups()


def test_the_sr_groups_reference_their_segments_by_frame_tracking_uid_and_laterality(radiograph):
    seg, segmentation, report, _ = build_all(radiograph)
    reading = hd.seg.Segmentation.from_dataset(segmentation)
    by_tracking_uid = {}
    for group in sr_groups(report):
        by_tracking_uid.setdefault(group.tracking_uid, []).append(group)
    for segment in segmentation.SegmentSequence:
        groups = by_tracking_uid[segment.TrackingUID]  # the segment's figures, and its outline
        referencing = [g for g in groups if g.referenced_segmentation_frame]
        assert len(referencing) == 1 and any(g.roi for g in groups), segment.SegmentLabel
        frame = referencing[0].referenced_segmentation_frame[0].ReferencedSOPSequence[0]  # TID 1410: frame k = segment k
        assert frame.ReferencedSOPInstanceUID == segmentation.SOPInstanceUID
        assert int(frame.ReferencedFrameNumber) == segment.SegmentNumber and "ReferencedSegmentNumber" not in frame
    # opacity only in the right lung: the opacity group and segment say right, not bilateral
    opacity_group = next(g for g in by_tracking_uid[segmentation.SegmentSequence[2].TrackingUID]
                         if g.referenced_segmentation_frame)
    assert opacity_group.finding_sites[0].laterality == codes.SCT.Right
    opacity_segment = segmentation.SegmentSequence[2]
    assert opacity_segment.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0].CodeValue == codes.SCT.Right.value
    for number, side in ((1, codes.SCT.Right), (2, codes.SCT.Left)):  # PS3.3 C.8.20.2: inside the property type's item
        description = reading.get_segment_description(number)
        assert "SegmentedPropertyTypeModifierCodeSequence" not in description
        modifier = description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
        assert (modifier.CodeValue, modifier.CodingSchemeDesignator) == (side.value, side.scheme_designator)


def lung_share(seg: Segmentation, site) -> float | None:
    """The opacity % of the lung(s) a finding site names, from the masks; None for a zone's site."""
    lateral = site.laterality if hasattr(site, "laterality") else None
    if site.value == codes.SCT.Lung:
        region = {codes.SCT.Right: seg.lungs == RIGHT, codes.SCT.Left: seg.lungs == LEFT}.get(lateral, seg.lungs > 0)
        return seg.opacity_pct_of(region)
    return {"3341006": seg.right_opacity_pct, "44029006": seg.left_opacity_pct}.get(site.value.value)


def test_every_percentage_of_a_lung_in_the_sr_is_the_share_of_the_lung_its_finding_site_names(radiograph):
    seg, _, report, _ = build_all(radiograph)
    checked = 0
    for group in sr_groups(report):
        for measurement in group.get_measurements(name=OPACITY_PERCENT):
            site = (measurement.finding_sites or group.finding_sites)[0]
            if group.tracking_identifier.startswith("Opacity region"):  # a region: part of its lung's share
                assert float(measurement.value) <= lung_share(seg, site) + 0.01
                continue
            expected = lung_share(seg, site)
            if expected is not None:
                assert float(measurement.value) == pytest.approx(expected, abs=0.01), (group.tracking_identifier, site.value)
                checked += 1
    assert checked >= 6  # summary (both, right, left), each lung, the opacity segment


def test_the_sr_opens_with_the_summary_and_outlines_every_finding_so_viewers_can_draw_it(radiograph):
    seg, _, report, _ = build_all(radiograph)
    groups = sr_groups(report)
    summary = groups[0]
    assert summary.tracking_identifier == "Opacity 10.0 % of both lungs (right 20 %, left 0.0 %), mild; Brixia 7/18"
    evaluations = {e.name.meaning: e.value for e in summary.get_qualitative_evaluations()}
    assert evaluations == {"Opacity": codes.SCT.Present, "Severity (attribute)": codes.SCT.Mild}
    assert float(summary.get_measurements(name=BRIXIA_GLOBAL_SCORE)[0].value) == seg.brixia_global
    for tracking_uid in {g.tracking_uid for g in groups}:  # OHIF 3.13 joins groups by Tracking UID and needs an outline
        outlined = [g.roi for g in groups if g.tracking_uid == tracking_uid and g.roi]
        assert outlined, tracking_uid
        for region in outlined:
            points = region.value
            assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE and (points[0] == points[-1]).all()
            assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == radiograph.SOPInstanceUID
    right_outline = next(g.roi.value for g in groups if g.tracking_identifier == "Right lung outline")
    rows, cols = np.nonzero(seg.lungs == RIGHT)  # the drawn rectangle, to the pixel edges
    assert right_outline[:, 0].min() == pytest.approx(cols.min(), abs=1) and right_outline[:, 0].max() == pytest.approx(cols.max() + 1, abs=1)
    assert right_outline[:, 1].min() == pytest.approx(rows.min(), abs=1) and right_outline[:, 1].max() == pytest.approx(rows.max() + 1, abs=1)
    zones = {g.tracking_identifier: g for g in groups if g.tracking_identifier.startswith("Zone ")}
    assert list(zones) == [f"Zone {z} ({ZONE_NAMES[z]})" for z in "ABCDEF"]
    for letter, group in zip("ABCDEF", zones.values()):
        values = {m.name.meaning: float(m.value) for m in group.get_measurements()}
        assert values == {"Opacity percentage of lung area": seg.zone_opacity_pct[letter],
                          "Expected opacity percentage of zone": seg.zone_opacity_score[letter],
                          "Brixia zone score": seg.brixia[letter]}
        site = group.finding_sites[0]
        assert (site.value, site.laterality) == ZONE_SITES[letter]


def test_a_film_without_opacity_has_no_opacity_group_and_says_absent(radiograph):
    ds = radiograph
    seg = drawn_segmentation((ds.Rows, ds.Columns))
    seg.opacity[:] = False
    source = prepare_source(ds)
    segmentation = build_segmentation(source, seg, ALGORITHM, STARTED)
    groups = sr_groups(build_report(source, segmentation, seg, ALGORITHM, STARTED))
    assert not any(g.finding_type == OPACITY and g.tracking_uid == segmentation.SegmentSequence[2].TrackingUID
                   for g in groups)
    assert [e.value for e in groups[0].get_qualitative_evaluations()] == [codes.SCT.Absent]


def test_dsr2html_prints_every_figure_with_its_name(radiograph, tmp_path):
    """Many PACS show an SR as text; DCMTK's renderer stands in for them."""
    seg, _, report, _ = build_all(radiograph)
    report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    page = subprocess.run(["dsr2html", str(tmp_path / "sr.dcm")], capture_output=True, text=True, check=True).stdout
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))
    summary = text.split('Tracking Identifier = "Right lung"')[0]  # the first group, before any other
    for figure in ("Opacity percentage of lung area: 9.98 %", "Opacity percentage of lung area: 19.97 % "
                   "Concept Modifier : Finding Site = Right lung", "Opacity percentage of lung area: 0.0 % "
                   "Concept Modifier : Finding Site = Left lung", "Brixia global score: 7", "Opacity: Present",
                   "Severity (attribute): Mild"):
        assert figure in summary, figure
    for letter in "ABCDEF":
        zone = text.split(f'Tracking Identifier = "Zone {letter} ({ZONE_NAMES[letter]})"')[1].split("Measurement Group")[0]
        assert f"Brixia zone score: {seg.brixia[letter]}" in zone, letter
        assert f"Opacity percentage of lung area: {seg.zone_opacity_pct[letter]:.1f} %" in zone, letter


def test_seg_segment_descriptions_carry_the_figures(radiograph):
    _, segmentation, _, _ = build_all(radiograph)
    assert [s.SegmentDescription for s in segmentation.SegmentSequence] == [
        "Right lung: opacity 20 %; Brixia A0 B1 C2", "Left lung: opacity 0.0 %; Brixia D3 E0 F1",
        "Opacity 10.0 % of both lungs (R 20 %, L 0.0 %); Brixia 7/18"]


def encoded(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_the_same_input_gives_the_same_bytes_and_one_series_per_source_series(radiograph):
    first, second = build_all(radiograph)[1:], build_all(radiograph)[1:]
    for a, b in zip(first, second):  # a re-run, e.g. after a crash: byte for byte the same result
        assert encoded(a) == encoded(b), a.Modality
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
    assert "Laterality" not in capture and capture.BodyPartExamined == ds.BodyPartExamined
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
    radiograph.pixel_array  # decoded as it arrived, before the header below claims another transfer syntax
    ds = radiograph.copy()
    ds.file_meta = pydicom.dataset.FileMetaDataset(ds.file_meta)
    ds.file_meta.TransferSyntaxUID = transfer_syntax  # the header as it came (pixels already decoded)
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if keyword in ds:
            delattr(ds, keyword)
    capture = build_all(ds)[3]
    assert (capture.get("LossyImageCompression") == "01") == lossy


def test_a_source_without_body_part_or_view_gives_valid_results_the_sc_included(dicom_dir, tmp_path):
    """The NCCID film has neither Body Part Examined nor View Position (nor Laterality)."""
    ds = pydicom.dcmread(dicom_dir / "nhsx-nccid/1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm")
    assert "BodyPartExamined" not in ds
    _, segmentation, report, capture = build_all(ds)
    for result in (segmentation, report, capture):
        assert dciodvfy_errors(result, tmp_path / f"{result.Modality}.dcm") == [], result.Modality
    assert capture.BodyPartExamined == "CHEST" and "Laterality" not in capture
    assert report.SOPClassUID == pydicom.uid.ComprehensiveSRStorage  # what PACS without 3D SR store


@pytest.mark.parametrize("right_rows, expected", [(0, None), (4, None), (8, codes.SCT.Mild), (40, codes.SCT.Moderate),
                                                  (70, codes.SCT.Severe)])
def test_presence_and_severity_follow_the_more_involved_lung(right_rows, expected):
    """Opacity in one lung only: 8 % of it (4 % of both lungs) is present and mild, not absent."""
    lungs = np.zeros((100, 100), np.uint8)
    lungs[:, :50], lungs[:, 50:] = RIGHT, LEFT
    seg = Segmentation(lungs=lungs, opacity=np.zeros((100, 100), bool), lung_confidence=1.0)
    seg.opacity[:right_rows, :50] = True
    assert summary.severity(seg) == expected
    assert summary.presence(seg) == (codes.SCT.Absent if expected is None else codes.SCT.Present)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_presentation_state_outlines_each_segment_and_shows_the_figures(radiograph, variant, tmp_path):
    ds = with_geometry(radiograph, variant)
    seg = drawn_segmentation((ds.Rows, ds.Columns))
    state = build_presentation_state(prepare_source(ds), seg, ALGORITHM, STARTED)
    assert dciodvfy_errors(state, tmp_path / "PR.dcm") == []
    assert encoded(state) == encoded(build_presentation_state(prepare_source(ds), seg, ALGORITHM, STARTED))
    layers = {item.GraphicLayer: item for item in state.GraphicAnnotationSequence}
    assert set(layers) == {"RIGHT_LUNG", "LEFT_LUNG", "OPACITY_AI", "FIGURES"}
    right = np.reshape(layers["RIGHT_LUNG"].GraphicObjectSequence[0].GraphicData, (-1, 2))
    rows, cols = np.nonzero(seg.lungs == RIGHT)
    assert (right[0] == right[-1]).all() and right[:, 0].min() == pytest.approx(cols.min() + 0.5)
    assert [t.UnformattedTextValue for t in layers["FIGURES"].TextObjectSequence] == [
        summary.sentence(seg), "AI RESULT - NOT FOR PRIMARY DIAGNOSIS"]
