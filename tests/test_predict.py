"""`cxr-node predict` with the shipped weights, in a process that must not import TensorFlow."""
import csv
import subprocess
import sys

import cv2
import numpy as np

from dicom_node.predict import COLUMNS

NO_TENSORFLOW = ("import sys; from dicom_node.cli import main; code = main(sys.argv[1:]); "
                 "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'; sys.exit(code)")


def run_predict(*args):
    return subprocess.run([sys.executable, "-c", NO_TENSORFLOW, "predict", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_predict_png_and_dicom_without_tensorflow(cxr_dir, dicom_dir, tmp_path):
    png = cxr_dir / "images" / "lancet-case2b.jpg"
    dcm = dicom_dir / "pydicom-data" / "RG1_J2KR.dcm"  # JPEG 2000, MONOCHROME1, 15-bit
    result = run_predict(png, dcm, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["filename"]: row for row in csv.DictReader(open(tmp_path / "predictions.csv"))}
    assert list(next(iter(rows.values())).keys()) == COLUMNS
    for name, (height, width) in ((png.name, cv2.imread(str(png)).shape[:2]), (dcm.name, (1955, 1841))):
        stem = name.rsplit(".", 1)[0]
        lung = cv2.imread(str(tmp_path / f"{stem}_lung.png"), cv2.IMREAD_GRAYSCALE)
        opacity = cv2.imread(str(tmp_path / f"{stem}_opacity.png"), cv2.IMREAD_GRAYSCALE)
        assert lung.shape == opacity.shape == (height, width)
        assert set(np.unique(lung)) <= {0, 255} and set(np.unique(opacity)) <= {0, 255}
        assert not (opacity[lung == 0]).any()  # opacity only inside the lungs
        # lungs cover a plausible part of a chest radiograph
        assert 0.15 < (lung > 0).mean() < 0.7, (name, (lung > 0).mean())
        row = rows[name]
        assert int(row["lung_area_px"]) == int((lung > 0).sum())
        assert abs(float(row["opacity_pct"]) - 100 * (opacity > 0).sum() / (lung > 0).sum()) < 0.01
        assert row["frontal_chest"] == "1" and row["inverted"] == "0"
    assert rows[png.name]["decided_by"] == "image" and rows[dcm.name]["decided_by"] == "tags"


def test_predict_applies_the_frontal_chest_decision_of_serve(dicom_dir, tmp_path):
    lateral = dicom_dir / "highdicom" / "dx_image.dcm"  # a lateral veterinary thorax
    mislabelled = dicom_dir / "torchxrayvision" / "Fake_MONOHR1.dcm"
    result = run_predict(lateral, mislabelled, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 frontal chest image(s) analysed, 1 skipped" in result.stdout
    rows = {row["filename"]: row for row in csv.DictReader(open(tmp_path / "predictions.csv"))}
    skipped = rows[lateral.name]
    assert skipped["frontal_chest"] == "0" and skipped["decided_by"] == "description" and "lateral" in skipped["reason"]
    assert skipped["opacity_pct"] == "" and not (tmp_path / "dx_image_lung.png").exists()
    assert rows[mislabelled.name]["frontal_chest"] == "1" and rows[mislabelled.name]["inverted"] == "1"


def test_predict_reports_unreadable_files_and_exits_nonzero(cxr_dir, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    result = run_predict(broken, cxr_dir / "images" / "lancet-case2b.jpg", "--out", tmp_path / "out")
    assert result.returncode == 1
    assert "broken.png" in result.stderr
    assert (tmp_path / "out" / "lancet-case2b_lung.png").exists()
