"""The node end to end with real parts: Orthanc as the PACS, DCMTK as the modality, dciodvfy as the
validator, highdicom reading the results back."""
from __future__ import annotations

import contextlib
import csv
import io
import shutil
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from pynetdicom.sop_class import SegmentationStorage

from dicom_node.outputs.codes import BRIXIA_GLOBAL_SCORE, BRIXIA_ZONE_SCORE, OPACITY_PERCENT
from tests.harness import Node, Orthanc, dcmsend, storescu, wait_for

TRANSCODERS = {  # DCMTK command that writes the uncompressed radiograph in another transfer syntax
    "jpeg_lossless": ["dcmcjpeg", "+e1"], "jpeg_ls": ["dcmcjpls"], "rle": ["dcmcrle"], "deflate": ["dcmconv", "+td"],
}


def new_instance(ds: pydicom.Dataset, path: Path, decompress=False) -> Path:
    """Save a copy as a different instance (new SOP Instance UID, same study)."""
    ds = ds.copy()
    if decompress:
        ds.decompress()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def inputs(dicom_dir, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("inputs")
    shared = sorted(dicom_dir.rglob("*.dcm"))
    mono1 = new_instance(pydicom.dcmread(dicom_dir / "torchxrayvision" / "Fake_MONOHR1.dcm"), folder / "mono1.dcm")
    plain = new_instance(pydicom.dcmread(dicom_dir / "pydicom-data" / "RG1_J2KR.dcm"), folder / "uncompressed.dcm",
                         decompress=True)
    transcoded = []
    for name, command in TRANSCODERS.items():
        source = new_instance(pydicom.dcmread(plain), folder / f"{name}-in.dcm")
        subprocess.run([*command, str(source), str(folder / f"{name}.dcm")], check=True, capture_output=True)
        transcoded.append(folder / f"{name}.dcm")
    return {"shared": shared, "extra": [mono1, plain, *transcoded]}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield orthanc
    orthanc.stop()


@pytest.fixture(scope="module")
def syslog_collector():
    """A UDP socket standing in for the hospital's syslog collector (RFC 5426)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.5)
    yield sock
    sock.close()


@pytest.fixture(scope="module")
def node(pacs, syslog_collector, tmp_path_factory):
    collector = f"udp://127.0.0.1:{syslog_collector.getsockname()[1]}"
    node = Node(tmp_path_factory.mktemp("node"), destinations=[("pacs", pacs)], audit={"syslog": collector}).start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def pushed(node, inputs):
    files = inputs["shared"] + inputs["extra"]
    result = dcmsend(node.port, files)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(node.idle, 300, 1, "node to analyse and deliver everything")
    return files


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def frontal_sources(inputs) -> dict[str, Path]:
    """Every pushed frontal chest image by SOP Instance UID (the first of two files sharing a UID wins)."""
    sources = {}
    for path in inputs["shared"] + inputs["extra"]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.SOPClassUID.name.startswith(("Computed", "Secondary")) or "nhsx" in str(path):
            sources.setdefault(str(ds.SOPInstanceUID), path)
    return sources


def results_by_source(pacs: Orthanc) -> dict[str, dict[str, list[pydicom.Dataset]]]:
    found: dict = {}
    for modality in ("SEG", "SR"):
        for instance in pacs.instances(modality):
            ds = pydicom.dcmread(io.BytesIO(pacs.file(instance["id"])))
            if modality == "SEG":
                sources = [ref.ReferencedSOPInstanceUID for series in ds.ReferencedSeriesSequence
                           for ref in series.ReferencedInstanceSequence]
            else:
                sources = [ref.ReferencedSOPInstanceUID for study in ds.CurrentRequestedProcedureEvidenceSequence
                           for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence
                           if ref.ReferencedSOPClassUID != SegmentationStorage]
            for uid in sources:
                found.setdefault(uid, {"SEG": [], "SR": []})[modality].append(ds)
    return found


def dciodvfy_errors(ds: pydicom.Dataset, folder: Path) -> list[str]:
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def opacity_percent_in_report(report: pydicom.Dataset) -> float:
    """The opacity % of both lungs: the summary group's (the report's first) first percentage."""
    summary = hd.sr.ComprehensiveSR.from_dataset(report).content.get_planar_roi_measurement_groups()[0]
    return float(summary.get_measurements(name=OPACITY_PERCENT)[0].value)


def test_each_frontal_chest_image_gets_one_valid_seg_and_sr(pushed, inputs, pacs, tmp_path):
    sources = frontal_sources(inputs)
    assert len(sources) == 10  # 4 shared frontal images + MONOCHROME1 copy + 5 transfer syntaxes
    results = results_by_source(pacs)
    for uid, path in sources.items():
        source = pydicom.dcmread(path, stop_before_pixels=True)
        assert uid in results, f"no results for {path.name}"
        segs, reports = results[uid]["SEG"], results[uid]["SR"]
        assert len(segs) == 1 and len(reports) == 1, path.name
        seg_ds, report = segs[0], reports[0]
        for result in (seg_ds, report):
            assert result.StudyInstanceUID == source.StudyInstanceUID
            assert result.SeriesInstanceUID != source.SeriesInstanceUID
            assert dciodvfy_errors(result, tmp_path) == [], (path.name, result.Modality)
        seg = hd.seg.Segmentation.from_dataset(seg_ds)
        masks = seg.get_pixels_by_source_instance([uid], segment_numbers=[1, 2, 3])[0].astype(bool)
        assert masks.shape == (source.Rows, source.Columns, 3)
        lungs, opacity = masks[..., 0] | masks[..., 1], masks[..., 2]
        assert lungs.mean() > 0.1, f"{path.name}: lungs cover {lungs.mean():.1%}"
        assert not (opacity & ~lungs).any(), f"{path.name}: opacity outside the lungs"
        assert abs(opacity_percent_in_report(report) - 100 * opacity.sum() / lungs.sum()) <= 0.1
        assert report.VerificationFlag == "UNVERIFIED"
        sr_tracking = {group.tracking_uid for group in hd.sr.ComprehensiveSR.from_dataset(report).content
                       .get_planar_roi_measurement_groups()}
        found = [segment.TrackingUID for number, segment in enumerate(seg_ds.SegmentSequence) if masks[..., number].any()]
        assert set(found) <= sr_tracking  # SR groups link to the segments that hold something
        for result in (seg_ds, report):  # IHE AI Results: the algorithm as processing equipment
            assert any(item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102" and item.Manufacturer == "cxr-node"
                       for item in result.ContributingEquipmentSequence)


def test_lateral_and_non_image_objects_are_skipped_with_a_reason(pushed, dicom_dir, node, pacs):
    lateral = uid_of(dicom_dir / "highdicom" / "dx_image.dcm")
    record = node.status(lateral)
    assert record["state"] == "skipped" and "lateral" in record["reason"]
    assert lateral not in results_by_source(pacs)
    for name in ("seg_image_cr_binary.dcm", "sr_document.dcm"):
        record = node.status(uid_of(dicom_dir / "highdicom" / name))
        assert record["state"] == "skipped" and "not a radiograph" in record["reason"]


def test_missing_view_tags_are_decided_from_the_image(pushed, dicom_dir, node):
    nccid = next((dicom_dir / "nhsx-nccid").glob("*.dcm"))
    record = node.status(uid_of(nccid))
    assert record["state"] == "done" and record["decided_by"] == "image"


def test_unknown_calling_ae_and_wrong_called_ae_are_rejected(node, inputs):
    image = inputs["extra"][1]
    for calling, called in (("INTRUDER", "CXR_NODE"), ("STORESCU", "SOMEONE_ELSE")):
        result = storescu(node.port, [image], calling, called)
        assert result.returncode != 0
        assert "Association Rejected" in result.stdout + result.stderr


def test_duplicate_push_creates_no_second_result(pushed, node, pacs, dicom_dir):
    image = sorted((dicom_dir / "torchxrayvision").glob("1.2*.dcm"))[0]
    before = node.metrics()
    assert dcmsend(node.port, [image]).returncode == 0
    wait_for(node.idle, 60, what="idle")
    duplicates = lambda text: float(next(  # noqa: E731
        (line.split()[-1] for line in text.splitlines() if line.startswith('cxr_instances_received_total{outcome="duplicate"}')), 0))
    assert duplicates(node.metrics()) == duplicates(before) + 1
    assert node.status(uid_of(image))["attempts"] == 1
    results = results_by_source(pacs)[uid_of(image)]
    assert len(results["SEG"]) == len(results["SR"]) == 1


def test_echo_and_status_commands(node, pushed):
    echo = node.cli("echo")
    assert echo.returncode == 0, echo.stdout
    assert f"this node (CXR_NODE@127.0.0.1:{node.port}): ok" in echo.stdout and "pacs" in echo.stdout
    counts = node.status()
    assert counts["instances"]["failed"] == 0 and counts["results"]["pending"] == 0
    assert counts["results"]["sent"] == 2 * counts["instances"]["done"]


def test_logs_carry_no_patient_names_or_ids(pushed, node, inputs):
    log = node.log()
    for path in inputs["shared"]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for value in (str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))):
            if len(value) >= 4 and not value.isdigit():  # digit-only IDs could occur inside UIDs
                assert value not in log, f"{path.name}: patient data in the log"


def test_results_reach_a_pacs_that_was_down_at_first(tmp_path, inputs):
    pacs = Orthanc(tmp_path / "late-pacs")  # ports chosen, not started yet
    node = Node(tmp_path / "node", destinations=[("late", pacs)]).start()
    try:
        image = inputs["extra"][0]
        assert dcmsend(node.port, [image]).returncode == 0
        wait_for(lambda: node.status()["instances"]["done"] == 1, 60, what="analysis")
        wait_for(lambda: node.status()["last_errors"], 30, what="a failed send attempt")
        assert node.status()["results"] == {"pending": 2, "sent": 0, "written": 0, "failed": 0}  # down: transient
        pacs.start()
        wait_for(lambda: node.status()["results"]["sent"] == 2, 60, what="delivery after the PACS came up")
        assert len(pacs.instances("SEG")) == 1 and len(pacs.instances("SR")) == 1
    finally:
        node.stop()
        pacs.stop()


def test_disk_below_watermark_answers_out_of_resources(tmp_path, inputs):
    free_mb = shutil.disk_usage(tmp_path).free / 2**20
    node = Node(tmp_path / "node", storage={"min_free_mb": int(free_mb) + 10_000}).start()
    try:
        result = storescu(node.port, [inputs["extra"][1]])  # storescu proposes uncompressed syntaxes only
        assert "Refused: OutOfResources" in result.stdout + result.stderr  # status 0xA700
        assert node.status()["instances"] == {s: 0 for s in ("received", "queued", "processing", "done", "skipped", "failed")}
    finally:
        node.stop()


def test_without_destinations_results_are_written_to_the_results_folder(tmp_path, inputs):
    node = Node(tmp_path / "node").start()
    try:
        assert dcmsend(node.port, [inputs["extra"][0]]).returncode == 0
        wait_for(lambda: node.status()["results"]["written"] == 2, 60, what="results written")
        written = sorted((tmp_path / "node" / "state" / "results").rglob("*.dcm"))
        assert {pydicom.dcmread(p).Modality for p in written} == {"SEG", "SR"}
        for path in written:  # <kind>_<SOP Instance UID>.dcm
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert path.name == f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
        unknown = node.cli("status", "--uid", "1.2.3.4.5")
        assert unknown.returncode == 1 and "unknown SOP Instance UID 1.2.3.4.5" in unknown.stderr
        mislabelled = node.status(uid_of(inputs["extra"][0]))  # MONOCHROME2 pixels labelled MONOCHROME1
        assert mislabelled["state"] == "done" and "pixels read inverted" in mislabelled["reason"]
    finally:
        node.stop()
    report = next(p for p in written if p.name.startswith("SR_"))
    assert sr_brixia_scores(report) == predicted_brixia_scores(inputs["extra"][0], tmp_path / "predict")


def test_batched_workers_give_each_image_its_own_results(tmp_path, dicom_dir):
    """Three analyses at a time sharing model runs (batch_size 3): each image's SR holds what
    `cxr-node predict` finds for it alone."""
    sources = [dicom_dir / "torchxrayvision" / "Fake_MONOHR1.dcm", dicom_dir / "pydicom-data" / "RG1_J2KR.dcm",
               next((dicom_dir / "nhsx-nccid").glob("*.dcm"))]
    files = [new_instance(pydicom.dcmread(path), tmp_path / f"{index}.dcm") for index, path in enumerate(sources)]
    node = Node(tmp_path / "node", processing={"workers": 3, "batch_size": 3, "stable_seconds": 1}).start()
    try:
        assert dcmsend(node.port, files).returncode == 0  # one study each, stable together: claimed together
        wait_for(lambda: node.status()["results"]["written"] == 6, 120, what="results written")
    finally:
        node.stop()
    reports = {pydicom.dcmread(p).CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
               .ReferencedSOPSequence[0].ReferencedSOPInstanceUID: p
               for p in (tmp_path / "node" / "state" / "results").rglob("SR_*.dcm")}
    for index, path in enumerate(files):
        assert sr_brixia_scores(reports[uid_of(path)]) == predicted_brixia_scores(path, tmp_path / f"predict{index}")


def sr_brixia_scores(path) -> dict:
    """{zone letter or 'global': score} read back from the SR with highdicom: each zone's group and the summary."""
    groups = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(path)).content.get_planar_roi_measurement_groups()
    scores = {"global": int(groups[0].get_measurements(name=BRIXIA_GLOBAL_SCORE)[0].value)}
    for group in groups:
        if group.tracking_identifier.startswith("Zone "):
            scores[group.tracking_identifier[5]] = int(group.get_measurements(name=BRIXIA_ZONE_SCORE)[0].value)
    return scores


def predicted_brixia_scores(image, out_dir) -> dict:
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "predict", str(image), "--out", str(out_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    row = next(csv.DictReader(open(out_dir / "predictions.csv")))
    scores = {z: int(row[f"brixia_{z}"]) for z in "ABCDEF"} | {"global": int(row["brixia_global"])}
    assert sum(scores[z] for z in "ABCDEF") == scores["global"] and len(scores) == 7
    return scores


def test_optional_secondary_capture_and_presentation_state_show_the_outlines_for_pacs_without_seg(tmp_path, inputs):
    node = Node(tmp_path / "node", outputs={"secondary_capture": True, "presentation_state": True}).start()
    try:
        assert dcmsend(node.port, [inputs["extra"][1]]).returncode == 0  # the CR radiograph, uncompressed
        wait_for(lambda: node.status()["results"]["written"] == 4, 90, what="SEG, SR, SC and GSPS written")
    finally:
        node.stop()
    written = {ds.SOPClassUID: ds for ds in map(pydicom.dcmread, (tmp_path / "node" / "state" / "results").rglob("*.dcm"))}
    capture, seg_ds = written[pydicom.uid.SecondaryCaptureImageStorage], written[SegmentationStorage]
    source = pydicom.dcmread(inputs["extra"][1], stop_before_pixels=True)
    assert capture.BurnedInAnnotation == "YES"
    assert list(capture.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "NOT FOR PRIMARY DIAGNOSIS" in capture.DerivationDescription
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert dciodvfy_errors(capture, tmp_path) == []
    rgb = capture.pixel_array.astype(int)
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 60
    lungs = hd.seg.Segmentation.from_dataset(seg_ds).get_pixels_by_source_instance(
        [source.SOPInstanceUID], segment_numbers=[1, 2])[0].any(axis=-1)
    outline = coloured & ~np.pad(coloured[:200], ((0, rgb.shape[0] - 200), (0, 0)))  # below the burned-in text
    assert outline.sum() > 1000 and (outline & lungs).sum() > 0.3 * outline.sum()  # lines along the lung edges

    state = written[pydicom.uid.GrayscaleSoftcopyPresentationStateStorage]
    assert dciodvfy_errors(state, tmp_path) == []
    assert state.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    layers = {item.GraphicLayer: item for item in state.GraphicAnnotationSequence}
    assert {"RIGHT_LUNG", "LEFT_LUNG", "FIGURES"} <= set(layers)
    for layer in ("RIGHT_LUNG", "LEFT_LUNG"):  # each vertex is the centre of a boundary pixel of the SEG's lung
        points = np.concatenate([np.reshape(g.GraphicData, (-1, 2)) for g in layers[layer].GraphicObjectSequence])
        assert len(points) > 10 and lungs[points[:, 1].astype(int), points[:, 0].astype(int)].all(), layer
    report = written[pydicom.uid.ComprehensiveSRStorage]
    summary = hd.sr.ComprehensiveSR.from_dataset(report).content.get_planar_roi_measurement_groups()[0]
    texts = [t.UnformattedTextValue for t in layers["FIGURES"].TextObjectSequence]
    assert texts[0] == summary.tracking_identifier and "NOT FOR PRIMARY DIAGNOSIS" in texts[1]


def test_audit_messages_record_associations_transfers_and_results_without_patient_names(
        pushed, node, inputs, syslog_collector):
    """IHE ATNA: DICOM audit messages (PS3.15 A.5) in the local audit log, the same sent to syslog."""
    result = storescu(node.port, [inputs["extra"][1]], "INTRUDER", "CXR_NODE")  # one rejected association
    assert result.returncode != 0
    wait_for(lambda: "INTRUDER" in (node.folder / "state" / "audit.log").read_text(), 10, what="the audit record")
    lines = (node.folder / "state" / "audit.log").read_text().splitlines()
    messages = [ET.fromstring(line) for line in lines]

    def events(code, action=None, outcome=None):
        return [m for m in messages if m.find("EventIdentification/EventID").get("csd-code") == code
                and action in (None, m.find("EventIdentification").get("EventActionCode"))
                and outcome in (None, m.find("EventIdentification").get("EventOutcomeIndicator"))]

    assert events("110100")  # application start
    assert events("110114", outcome="0") and any(
        m.find("ActiveParticipant").get("UserID") == "INTRUDER" for m in events("110114", outcome="4"))
    counts = node.status()
    received = [m for m in events("110104", "C", "0")]
    sent = [m for m in events("110104", "R", "0")]
    assert len(sent) == counts["results"]["sent"]
    instance_uids = {i.get("UID") for m in received for i in m.iter("Instance")}
    assert {uid_of(path) for path in inputs["shared"] + inputs["extra"]} <= instance_uids
    for message in sent:  # each sent result names the PACS as destination and its study and patient
        roles = {p.find("RoleIDCode").get("csd-code"): p.get("UserID") for p in message.iter("ActiveParticipant")}
        assert roles == {"110153": "CXR_NODE", "110152": "ORTHANC"}
        kinds = {o.get("ParticipantObjectTypeCodeRole") for o in message.iter("ParticipantObjectIdentification")}
        assert "3" in kinds
    text = "\n".join(lines)
    for path in inputs["shared"]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        name = str(ds.get("PatientName", ""))
        if len(name) >= 4 and name != ds.get("PatientID"):  # (an anonymised file may use its ID as name)
            assert name not in text, f"{path.name}: patient name in the audit log"
    assert "ParticipantObjectName" not in text

    datagrams = []
    with contextlib.suppress(socket.timeout):
        while True:
            datagrams.append(syslog_collector.recv(65535))
    assert len(datagrams) >= len(lines) - 1  # the collector got every message (the stop message comes later)
    header, _, body = datagrams[0].partition(b" - \xef\xbb\xbf")
    assert header.startswith(b"<85>1 ") and b"IHE+RFC-3881" in header
    assert ET.fromstring(body.decode()).tag == "AuditMessage"
