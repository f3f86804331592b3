"""The shipped models through `model.infer` (ONNX Runtime, no TensorFlow): polarity and opacity."""
import csv

import numpy as np
import pydicom
import pytest

from dicom_node.pixels import dataset_gray
from model.image import read_gray
from model.infer import load_pipeline


@pytest.fixture(scope="module")
def pipeline():
    return load_pipeline()


def test_pixels_labelled_with_the_wrong_polarity_are_read_inverted(pipeline, dicom_dir):
    folder = dicom_dir / "torchxrayvision"
    honest = pipeline.segment(dataset_gray(pydicom.dcmread(next(folder.glob("1.2.276*.dcm")))))
    mislabelled = pipeline.segment(dataset_gray(pydicom.dcmread(folder / "Fake_MONOHR1.dcm")))
    assert not honest.inverted and mislabelled.inverted
    assert mislabelled.lung_confidence == pytest.approx(honest.lung_confidence, abs=1e-6)
    assert np.array_equal(mislabelled.lungs, honest.lungs)
    assert np.array_equal(mislabelled.opacity, honest.opacity)


def test_correctly_labelled_radiographs_are_not_inverted(pipeline, dicom_dir):
    for path in (dicom_dir / "pydicom-data" / "RG1_J2KR.dcm", next((dicom_dir / "nhsx-nccid").glob("*.dcm"))):
        seg = pipeline.segment(dataset_gray(pydicom.dcmread(path)))
        assert not seg.inverted, path.name


def quex_rows(quex_dir):
    with open(quex_dir / "images.csv") as handle:
        return list(csv.DictReader(handle))


def test_normal_radiographs_get_almost_no_opacity(pipeline, quex_dir):
    """The first five Normal rows of QU-Ex (true negatives; the shipped model trained on them: this
    guards against regressions, the cross-validated figures are in the model card)."""
    normals = [row for row in quex_rows(quex_dir) if row["class"] == "Normal"][:5]
    for row in normals:
        seg = pipeline.segment(read_gray(quex_dir / "images" / row["filename"]))
        assert seg.opacity_pct < 5, (row["filename"], seg.opacity_pct)


def test_extensive_infection_gets_a_large_opacity(pipeline, quex_dir):
    """The first five COVID rows whose infection mask covers over 80 % of the lungs (trained on)."""
    extensive = [row for row in quex_rows(quex_dir) if float(row["infection_fraction_of_lung"]) > 0.8][:5]
    for row in extensive:
        seg = pipeline.segment(read_gray(quex_dir / "images" / row["filename"]))
        assert seg.opacity_pct > 30, (row["filename"], seg.opacity_pct)


def test_a_dark_low_contrast_film_the_right_way_round_is_not_inverted(pipeline, cxr_dir):
    """Its lung confidence is just under the check (0.90) and 0.011 higher inverted: not enough."""
    seg = pipeline.segment(read_gray(cxr_dir / "images" / "covid-19-pneumonia-8.jpg"))
    assert not seg.inverted


def batch_images(dicom_dir, cxr_dir) -> list[np.ndarray]:
    """Different sizes and bit depths, one labelled with the wrong polarity, one doubtful film."""
    folder = dicom_dir / "torchxrayvision"
    return [dataset_gray(pydicom.dcmread(path)) for path in
            (next(folder.glob("1.2.276*.dcm")), folder / "Fake_MONOHR1.dcm", dicom_dir / "pydicom-data" / "RG1_J2KR.dcm",
             next((dicom_dir / "nhsx-nccid").glob("*.dcm")))] + [read_gray(cxr_dir / "images" / "covid-19-pneumonia-8.jpg")]


def same_reading(a, b) -> bool:
    """Equal but for float rounding between batch sizes: a few pixels on the masks' edges at most."""
    return (a.inverted == b.inverted and abs(a.opacity_pct - b.opacity_pct) < 0.05
            and np.mean(a.lungs != b.lungs) < 1e-3 and np.mean(a.opacity != b.opacity) < 1e-3)


def test_a_batch_reads_each_image_as_it_is_read_alone(pipeline, dicom_dir, cxr_dir):
    images = batch_images(dicom_dir, cxr_dir)
    batched = pipeline.segment_many(images)
    alone = [pipeline.segment(image) for image in images]
    assert [seg.inverted for seg in batched] == [False, True, False, False, False]
    assert all(same_reading(a, b) for a, b in zip(batched, alone))


def test_concurrent_calls_share_batches_and_each_gets_its_own_result(pipeline, dicom_dir, cxr_dir):
    from concurrent.futures import ThreadPoolExecutor

    from model.batching import BatchingPipeline

    images = batch_images(dicom_dir, cxr_dir) * 2
    batching = BatchingPipeline(pipeline, max_batch=4, wait_seconds=0.5)
    with ThreadPoolExecutor(len(images)) as pool:
        results = list(pool.map(batching.segment, images))
    assert sum(batching.batch_sizes) == len(images) and max(batching.batch_sizes) == 4
    assert len(batching.batch_sizes) < len(images)  # the models ran fewer times than there were images
    assert all(same_reading(result, pipeline.segment(image)) for result, image in zip(results, images))
    batching.close()  # the node closes it when it stops: its thread ends, and later calls are refused
    assert not batching._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        batching.segment(images[0])


def test_an_image_that_fails_in_a_batch_fails_alone(pipeline, dicom_dir, cxr_dir):
    from concurrent.futures import ThreadPoolExecutor

    from model.batching import BatchingPipeline

    good = batch_images(dicom_dir, cxr_dir)[:3]
    broken = np.zeros((0, 0), np.uint16)  # no pixels: cannot be resized
    batching = BatchingPipeline(pipeline, max_batch=4, wait_seconds=0.5)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(batching.segment, image) for image in [*good, broken]]
    assert [future.exception() is not None for future in futures] == [False, False, False, True]
    assert batching.batch_sizes[0] == 4
