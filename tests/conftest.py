import json
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


@pytest.fixture(scope="session")
def record():
    """Append one observation (a row of docs/RELIABILITY.md) to $CXR_RELIABILITY_LOG when it is set;
    `benchmarks/reliability.py` sets it and renders the tables from what the tests saw."""
    target = os.environ.get("CXR_RELIABILITY_LOG")

    def append(table: str, **row) -> None:
        if target:
            with open(target, "a") as handle:
                handle.write(json.dumps({"table": table, **row}, default=str) + "\n")
    return append
