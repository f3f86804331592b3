"""Data handling: polygon rasterisation, the patient split, patients by content and the locked test
set, lung geometry."""
import csv
import json

import cv2
import numpy as np

from model import patients as P
from model.data import load_quex_records, load_records, make_split, rasterize_labelme_doc, read_lung_labels, read_split
from model.lungs import LEFT, RIGHT, split_right_left, zone_map


def shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def test_rasterised_polygon_area_matches_shoelace_area(cxr_dir):
    checked = 0
    for path in sorted((cxr_dir / "opacity-labelme").glob("*.json")):
        doc = json.loads(path.read_text())
        shape = (doc["imageHeight"], doc["imageWidth"])
        for polygon in doc["shapes"]:
            mask = rasterize_labelme_doc(dict(doc, shapes=[polygon]), shape)[polygon["label"]]
            expected = shoelace(np.array(polygon["points"]))
            assert abs(mask.sum() - expected) <= 0.01 * expected, (path.name, polygon["label"])
            checked += 1
    assert checked >= 30


def test_no_patient_in_two_splits_and_split_file_is_current(cxr_dir):
    records = load_records(cxr_dir)
    committed = read_split()
    assert {r.filename for r in records} == set(committed)
    patient_splits = {}
    for record in records:
        patient_splits.setdefault(record.patient, set()).add(committed[record.filename])
    assert all(len(splits) == 1 for splits in patient_splits.values())
    regenerated = make_split(records)
    assert all(committed[r.filename] == regenerated[r.patient] for r in records)
    assert {"train", "val", "test"} == set(committed.values())


def test_v7_masks_give_a_right_lung_on_the_image_left(cxr_dir):
    records = [r for r in load_records(cxr_dir) if r.lung_mask_path][:20]
    for record in records:
        labels, _ = read_lung_labels(record.lung_mask_path)
        right_columns = np.nonzero(labels == RIGHT)[1]
        left_columns = np.nonzero(labels == LEFT)[1]
        assert right_columns.size and left_columns.size, record.filename
        assert right_columns.mean() < left_columns.mean(), record.filename


def test_merged_lungs_are_cut_at_the_narrowest_column():
    mask = np.zeros((100, 100), bool)
    mask[10:90, 10:45] = True
    mask[10:90, 55:90] = True
    mask[40:45, 45:55] = True  # a bridge joins the two lungs
    labels = split_right_left(mask)
    assert (labels[:, :45][mask[:, :45]] == RIGHT).all()
    assert (labels[:, 55:][mask[:, 55:]] == LEFT).all()


def test_zones_split_each_lung_in_thirds():
    labels = np.zeros((90, 60), np.uint8)
    labels[0:90, 0:30] = RIGHT
    labels[30:90, 30:60] = LEFT
    zones = zone_map(labels)
    assert set(np.unique(zones[0:30, 0:30])) == {1} and set(np.unique(zones[60:90, 0:30])) == {3}
    assert set(np.unique(zones[30:50, 30:60])) == {4} and set(np.unique(zones[70:90, 30:60])) == {6}


def _planted_collection(cxr_dir, tmp_path, count=12):
    """A copy of the first `count` rows of cxr/images.csv plus `planted.jpg`: the first row's film
    scaled by 0.9, cut 4 % tighter on every side, brightened and re-encoded as JPEG quality 80, under
    patient id 999999."""
    with open(cxr_dir / "images.csv") as handle:
        rows = list(csv.DictReader(handle))[:count]
    (tmp_path / "images").mkdir()
    for row in rows:
        (tmp_path / "images" / row["filename"]).symlink_to(cxr_dir / "images" / row["filename"])
    gray = cv2.imread(str(cxr_dir / "images" / rows[0]["filename"]), cv2.IMREAD_GRAYSCALE)
    height, width = gray.shape
    cut = gray[height // 25: height - height // 25, width // 25: width - width // 25]
    copy = cv2.resize(cut, None, fx=0.9, fy=0.9, interpolation=cv2.INTER_AREA)
    copy = cv2.convertScaleAbs(copy, alpha=0.9, beta=20)
    cv2.imwrite(str(tmp_path / "images" / "planted.jpg"), copy, [cv2.IMWRITE_JPEG_QUALITY, 80])
    rows.append({**{key: "" for key in rows[0]}, "filename": "planted.jpg", "patientid": "999999"})
    with open(tmp_path / "images.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return load_records(tmp_path), P.image_id("cxr", rows[0]["filename"]), P.image_id("cxr", "planted.jpg")


def test_a_planted_duplicate_joins_its_original_patient_fold_and_side_of_the_locked_test(cxr_dir, tmp_path):
    records, original, planted = _planted_collection(cxr_dir, tmp_path)
    twins = P.find_twins({P.image_id("cxr", r.filename): r.image_path for r in records})
    assert any({a, b} == {original, planted} for a, b, _ in twins), twins
    assert P.merged_patients(records, [], [])[original] != P.merged_patients(records, [], [])[planted]
    patients = P.merged_patients(records, [], twins)
    assert patients[original] == patients[planted]
    drawn = []
    for seed in range(12):
        locked = P.choose_locked_test(records, [], patients, {}, seed=seed, fraction=0.3)
        folds = P.patient_folds(patients, 3, seed, locked)
        held = P.held_out(patients, locked)
        assert (original in locked) == (planted in locked) == (original in held)
        assert (patients[original] in folds) != (original in locked)  # in a fold exactly when not locked
        assert all(patients[image] not in folds for image in held)
        drawn.append(original in locked)
    assert any(drawn) and not all(drawn)  # both sides were exercised


def test_known_twins_are_merged_and_found_by_content(cxr_dir, quex_dir):
    records, quex = load_records(cxr_dir), load_quex_records(quex_dir)
    patients = P.merged_patients(records, quex)
    by_id = {}
    for r in records:
        by_id.setdefault(r.patient, []).append(P.image_id("cxr", r.filename))
    auntminnie = "image:auntminnie-2020_01_31_20_24_2322_2020_01_31_x-ray_coronavirus_US.jpg"
    for together in (["97", "178"], ["78", "201"], ["137", "202"],
                     ["196", "image:4-x-day1.jpg", "image:4-x-day8.jpg"], ["13", auntminnie]):
        images = [image for patient in together for image in by_id[patient]]
        assert len({patients[image] for image in images}) == 1, together
    for quex_image, cohen_image in (("covid_3848.jpg", "7c0d0e1d.jpg"), ("covid_4516.jpg", "extubation-8.jpg"),
                                    ("covid_4198.jpg", "A7E260CE-8A00-4C5F-A7F5-27336527A981.jpeg")):
        assert patients[P.image_id("qu-ex", quex_image)] == patients[P.image_id("cxr", cohen_image)], quex_image
    # The detector itself scores these films as one, and two patients' films apart.
    paths = {r.filename: r.image_path for r in records} | {q.filename: q.image_path for q in quex}
    thumbs = {}

    def score(a, b):
        for name in (a, b):
            thumbs.setdefault(name, P.thumbnail(paths[name]))
        return P.aligned_ncc(thumbs[a], thumbs[b])
    ards = "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-admission.jpg"
    for a, b in (("16660_2_1.jpg", ards),
                 ("353889E0-A1E8-4F9E-A0B8-F24F36BCFBFB.jpeg", "case_72_RX-TORACE1.jpg"),
                 ("A7E260CE-8A00-4C5F-A7F5-27336527A981.jpeg", "case_76_1-3.png"),
                 ("4-x-day1.jpg", "extubation-1.jpg"), ("7c0d0e1d.jpg", "covid_3848.jpg")):
        assert score(a, b) >= P.THRESHOLD, (a, b)
    assert score("16660_2_1.jpg", "353889E0-A1E8-4F9E-A0B8-F24F36BCFBFB.jpeg") < 0.7
    assert score("7c0d0e1d.jpg", "case_72_RX-TORACE1.jpg") < 0.7


def test_no_merged_patient_crosses_the_locked_test_and_cross_validation(cxr_dir, quex_dir):
    records, quex = load_records(cxr_dir), load_quex_records(quex_dir)
    patients = P.merged_patients(records, quex)
    locked = P.read_locked()
    assert set(locked) <= set(patients)  # every locked image exists
    for members in P.groups(patients).values():
        assert len({image in locked for image in members}) == 1, members  # whole merged patients only
    assert P.held_out(patients) == set(locked)
    cohen = {P.image_id("cxr", r.filename): r for r in records}
    folds = P.patient_folds({image: patients[image] for image in cohen}, 5, 20201)
    assert set(folds.values()) == set(range(5))
    for image in cohen:
        assert (patients[image] in folds) != (image in locked), image
    # The locked Cohen images were never trained or selected on by the 2.x lung model, and the set
    # holds every kind of label.
    lung_split = read_split()
    locked_cohen = [cohen[image] for image in locked if image in cohen]
    assert {lung_split[r.filename] for r in locked_cohen} == {"test"}
    assert all(any(test(r) for r in locked_cohen) for test in (
        lambda r: r.extent is not None, lambda r: r.brixia_zones, lambda r: r.labelme_path))
    classes = {P.image_id("qu-ex", q.filename): bool(q.infection_mask_path) for q in quex}
    assert {classes[image] for image in locked if image in classes} == {True, False}
