"""The change since the patient's prior film: the history each backend keeps and purges, and a real node
that compares a film with the patient's latest earlier one in its SR (read back with highdicom, checked
by dciodvfy), takes a late older film without rewriting newer results, and lists a patient's films."""
from __future__ import annotations

import calendar
import hashlib
import io
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from dicom_node.history import Film, film_time, history_key, patient_key
from dicom_node.outputs.codes import (BRIXIA_GLOBAL_SCORE, OPACITY_CHANGE, OPACITY_PERCENT, OPACITY_PERCENT_CHANGE,
                                      PRIOR_OPACITY_PERCENT)
from model.infer import read_manifest
from tests.harness import Node, dcmsend, wait_for
from tests.test_node_integration import dciodvfy_errors
from tests.test_node_units import received

NCCID = "nhsx-nccid/1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"
OTHER = "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


SECRET = b"site secret"


def film_row(key: str, uid: str, day: int, version: str = "3.0.0", opacity: float = 10.0,
             time_known: bool = True) -> Film:
    at = calendar.timegm((2020, 3, day, 10 if time_known else 0, 0, 0))
    return Film(key, at, time_known, uid, f"study-{uid}", f"sr-{uid}", f"series-{uid}", version,
                {"opacity_pct": opacity, "brixia_global": 4})


def test_the_prior_is_the_latest_film_taken_before_by_the_same_model_and_the_history_is_purged(make_queue, tmp_path):
    queue = make_queue()
    key, other_patient = patient_key(SECRET, "P1", "HOSP"), patient_key(SECRET, "P1", "OTHER HOSPITAL")
    assert key != other_patient and patient_key(SECRET, "") is None
    for uid, day, version, patient, timed in (("1.1", 10, "3.0.0", key, True), ("1.2", 12, "3.0.0", key, True),
                                              ("1.3", 13, "2.1.0", key, True), ("1.4", 13, "3.0.0", other_patient, True),
                                              ("1.5", 14, "3.0.0", key, False)):
        assert received(queue, tmp_path, uid, study=uid)
        queue.promote_stable(0)
        queue.complete(queue.claim_next(), [], [], "tags", 1.0, film=film_row(patient, uid, day, version, time_known=timed))

    def prior(day: int, timed: bool = True) -> str | None:
        at = film_row(key, "1.9", day, time_known=timed)
        found = queue.prior_film(key, at.taken_at, timed, "3.0.0", "1.9")
        return found.source_uid if found else None
    assert prior(13) == "1.2"  # not 1.3 (another model) nor 1.4 (another patient)
    assert prior(11) == "1.1" and prior(10) is None  # strictly before
    assert prior(14) == "1.2"  # 1.5 is of that day at an unknown time: before or after, nobody knows
    assert prior(15, timed=False) == "1.5"  # a day later, time known or not
    assert [f.source_uid for f in queue.films(key)] == ["1.1", "1.2", "1.3", "1.5"]
    assert queue.films(key)[3].taken == "2020-03-14" and queue.films(key)[0].taken == "2020-03-10 10:00"
    assert queue.films(key)[0].figures == {"opacity_pct": 10.0, "brixia_global": 4}
    assert queue.purge_history(time.time() - 3600) == 0  # recorded just now: kept
    assert queue.purge_history(time.time() + 1) == 5
    assert queue.films(key) == []


def test_patient_keys_need_the_sites_secret_and_film_times_are_the_wall_clock_written_on_the_film(tmp_path):
    secret = history_key(tmp_path / "history.key", create=True)
    assert (tmp_path / "history.key").stat().st_mode & 0o777 == 0o600
    assert history_key(tmp_path / "history.key", create=True) == secret  # made once
    assert history_key(tmp_path / "other.key", create=False) is None
    assert patient_key(secret, "12345", "HOSP") != patient_key(b"another site", "12345", "HOSP")
    assert patient_key(secret, "12345", "HOSP") != hashlib.sha256(b"HOSP\x0012345").hexdigest()

    def taken(**attributes) -> str:
        ds = pydicom.Dataset()
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        at, known = film_time(ds)
        return Film("k", at, known, "1", "", "", "", "", {}).taken
    assert taken(AcquisitionDateTime="20201101063000+0200") == "2020-11-01 06:30"  # as written: offsets ignored
    assert taken(AcquisitionDate="2020-06-05", StudyDate="20200606", StudyTime="0700") == "2020-06-06 07:00"
    assert taken(AcquisitionDate="20200610", AcquisitionTime="256199", StudyDate="20200610") == "2020-06-10"
    assert taken(StudyDate="20201001") == "2020-10-01" and taken() == "?"


def chest_film(dicom_dir: Path, source: str, folder: Path, day: str, patient: str = "HIST-0042") -> Path:
    """A new study of `source` for `patient`, taken on `day` (YYYYMMDD) at 10:15."""
    ds = pydicom.dcmread(dicom_dir / source)
    ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = patient, "HOSP", "Doe^Jane"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyDate = ds.AcquisitionDate = day
    ds.AcquisitionTime = "101500"
    if "AcquisitionDateTime" in ds:
        del ds.AcquisitionDateTime
    path = folder / f"{day}-{Path(source).stem[:20]}.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def sent_and_analysed(node: Node, path: Path, written_before: int) -> tuple[hd.sr.ComprehensiveSR, Path]:
    """Send one film, wait for its SEG and SR; its SR read back with highdicom, and the SR's file."""
    assert dcmsend(node.port, [path]).returncode == 0
    wait_for(lambda: node.status()["results"].get("written", 0) == written_before + 2, 120, what="SEG and SR written")
    study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    report = next((node.folder / "state" / "results" / study).glob("SR_*.dcm"))
    return hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(report)), report


def change_group(report: hd.sr.ComprehensiveSR):
    groups = [g for g in report.content.get_planar_roi_measurement_groups()
              if g.get_measurements(name=OPACITY_PERCENT_CHANGE)]
    assert len(groups) <= 1
    return groups[0] if groups else None


def value(group, name) -> float:
    return float(group.get_measurements(name=name)[0].value)


@pytest.fixture
def node(tmp_path):
    node = Node(tmp_path / "node", processing={"stable_seconds": 0}).start()
    yield node
    node.stop()


def test_a_film_two_days_after_another_carries_the_change_and_references_the_prior_sr(node, dicom_dir, tmp_path):
    first = chest_film(dicom_dir, NCCID, tmp_path / "films", "20200310")
    second = chest_film(dicom_dir, OTHER, tmp_path / "films", "20200312")
    prior, _ = sent_and_analysed(node, first, 0)
    report, path = sent_and_analysed(node, second, 2)
    assert change_group(prior) is None  # nothing before it
    group = change_group(report)
    assert group is not None
    prior_pct = value(prior.content.get_planar_roi_measurement_groups()[0], OPACITY_PERCENT)
    this_pct = value(report.content.get_planar_roi_measurement_groups()[0], OPACITY_PERCENT)
    assert value(group, PRIOR_OPACITY_PERCENT) == pytest.approx(prior_pct, abs=0.01)
    assert value(group, OPACITY_PERCENT_CHANGE) == pytest.approx(this_pct - prior_pct, abs=0.02)
    limit = read_manifest().repeatability["opacity_pct"]
    direction = group.get_qualitative_evaluations(name=OPACITY_CHANGE)[0].value.meaning
    expected = "No status change" if abs(this_pct - prior_pct) <= limit else \
        ("Increased" if this_pct > prior_pct else "Decreased")
    assert direction == expected
    identifier = str(group.tracking_identifier)
    assert "since 2020-03-10" in identifier and f"repeatability ({limit:.1f})" in identifier
    brixia_change = round(value(report.content.get_planar_roi_measurement_groups()[0], BRIXIA_GLOBAL_SCORE)
                          - value(prior.content.get_planar_roi_measurement_groups()[0], BRIXIA_GLOBAL_SCORE))
    assert f"Brixia {brixia_change:+d}" in identifier
    evidence = pydicom.dcmread(path).PertinentOtherEvidenceSequence[0]
    assert evidence.StudyInstanceUID == pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == prior.SOPInstanceUID
    assert dciodvfy_errors(pydicom.dcmread(path), tmp_path) == []
    listed = node.cli("history", "--patient", "HIST-0042", "--issuer", "HOSP")
    assert listed.returncode == 0 and [line.split(" | ")[0] for line in listed.stdout.splitlines()[2:]] == \
        ["| 2020-03-10 10:15", "| 2020-03-12 10:15"]
    assert node.cli("history", "--patient", "HIST-0042").returncode == 1  # another issuer's patient: none
    for database in (node.folder / "state").glob("queue.sqlite3*"):  # the history keeps no name and no ID
        assert b"Doe^Jane" not in database.read_bytes() and b"HIST-0042" not in database.read_bytes()


def test_a_late_older_film_is_compared_with_earlier_films_and_leaves_newer_results_as_sent(node, dicom_dir, tmp_path):
    films = tmp_path / "films"
    newer, newer_path = sent_and_analysed(node, chest_film(dicom_dir, NCCID, films, "20200314"), 0)
    sent = newer_path.read_bytes()
    older, _ = sent_and_analysed(node, chest_film(dicom_dir, OTHER, films, "20200310"), 2)
    assert change_group(older) is None  # no film of this patient was taken before it
    assert newer_path.read_bytes() == sent  # the newer film's SR is not rewritten
    latest, _ = sent_and_analysed(node, chest_film(dicom_dir, OTHER, films, "20200316"), 4)
    assert "since 2020-03-14" in str(change_group(latest).tracking_identifier)  # taken order, not arrival
    assert value(change_group(latest), PRIOR_OPACITY_PERCENT) == pytest.approx(
        value(newer.content.get_planar_roi_measurement_groups()[0], OPACITY_PERCENT), abs=0.01)


def test_the_presentation_state_and_the_secondary_capture_show_the_change(dicom_dir):
    from datetime import datetime

    from dicom_node.history import compare, figures
    from dicom_node.outputs.capture import burn_in
    from dicom_node.outputs.presentation import build_presentation_state
    from dicom_node.outputs.source import prepare_source
    from dicom_node.pixels import dataset_gray
    from dicom_node.service import algorithm_identity
    from model.infer import load_pipeline

    ds = pydicom.dcmread(dicom_dir / NCCID)
    gray = dataset_gray(ds)
    seg, algorithm = load_pipeline().segment(gray), algorithm_identity()
    prior = film_row("k", "1.2", 10)
    prior = Film(**{**prior.__dict__, "figures": dict(figures(seg), opacity_pct=seg.opacity_pct - 20)})
    change = compare(seg, prior, algorithm.change_limits, prior.taken_at + 2 * 86400)
    assert change.direction == "increased" and change.sentence().startswith("Opacity +20 points since 2020-03-10")
    state = build_presentation_state(prepare_source(ds), seg, algorithm, datetime(2020, 3, 12), change)
    texts = [text.UnformattedTextValue for annotation in state.GraphicAnnotationSequence
             for text in annotation.get("TextObjectSequence", [])]
    assert change.sentence() in texts
    assert (burn_in(gray, seg, change) != burn_in(gray, seg)).any()


def test_a_new_installation_finds_the_prior_in_the_pacs_through_query_retrieve(dicom_dir, tmp_path):
    """Node A measured the first film and sent its SR to Orthanc; node B, a new installation with an empty
    history and `[priors] pacs`, finds that SR by C-FIND, fetches it by C-GET and compares with it."""
    from tests.harness import Orthanc

    pacs = Orthanc(tmp_path / "orthanc", query_retrieve=True).start()
    films = tmp_path / "films"
    try:
        first = Node(tmp_path / "a", destinations=[("pacs", pacs)], processing={"stable_seconds": 0}).start()
        try:
            assert dcmsend(first.port, [chest_film(dicom_dir, NCCID, films, "20200310")]).returncode == 0
            wait_for(lambda: first.status()["results"].get("sent", 0) == 2, 120, what="node A's SEG and SR in Orthanc")
        finally:
            first.stop()
        prior_sr = pacs.instances("SR")[0]["tags"]["SOPInstanceUID"]
        second = Node(tmp_path / "b", destinations=[("pacs", pacs)], processing={"stable_seconds": 0},
                      priors={"pacs": "pacs"}).start()
        try:
            later = chest_film(dicom_dir, OTHER, films, "20200312")
            assert dcmsend(second.port, [later]).returncode == 0
            wait_for(lambda: second.status()["results"].get("sent", 0) == 2, 120, what="node B's SEG and SR in Orthanc")
            listed = second.cli("history", "--patient", "HIST-0042", "--issuer", "HOSP").stdout
        finally:
            second.stop()
        study = pydicom.dcmread(later, stop_before_pixels=True).StudyInstanceUID
        report = next(pydicom.dcmread(io.BytesIO(pacs.file(i["id"]))) for i in pacs.instances("SR")
                      if i["tags"]["StudyInstanceUID"] == study)
    finally:
        pacs.stop()
    group = change_group(hd.sr.ComprehensiveSR.from_dataset(report))
    assert group is not None and "since 2020-03-10" in str(group.tracking_identifier)
    referenced = report.PertinentOtherEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == prior_sr
    assert prior_sr in listed and "2020-03-12" in listed  # the prior learnt from the PACS joined the history


def test_a_pacs_that_cannot_be_asked_leaves_the_film_without_a_comparison(tmp_path):
    from dicom_node.config import ConfigError, load_config
    from dicom_node.priors import films_from_pacs
    from tests.harness import free_port

    site = tmp_path / "node.toml"
    site.write_text(f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {free_port()}\n'
                    '[priors]\npacs = "pacs"\n[node]\nnetwork_timeout = 2\n')
    assert films_from_pacs(load_config(site, tmp_path), "key", "HIST-0042", "HOSP", time.time()) == []
    site.write_text('[priors]\npacs = "pacs"\n')  # no such destination: refused at start, named
    with pytest.raises(ConfigError, match="priors.pacs: no DIMSE destination named 'pacs'"):
        load_config(site, tmp_path)
