import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def cxr_dir() -> Path:
    return SHARED_DATA / "cxr"


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    return SHARED_DATA / "dicom"
