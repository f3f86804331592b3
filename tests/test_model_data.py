"""Data handling: polygon rasterisation, the patient split, lung geometry."""
import json

import numpy as np

from model.data import load_records, make_split, rasterize_labelme_doc, read_lung_labels, read_split
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
