import itertools
import json
import os
import shutil
import subprocess
import tempfile
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


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """Certificates made with openssl: a test CA; from it a server certificate for 127.0.0.1 and localhost,
    one for another host (elsewhere.example) and a client certificate; a self-signed "rogue" certificate
    that nothing trusts."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make test certificates")
    folder = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=cxr-test-ca")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (folder / "elsewhere.ext").write_text("subjectAltName=DNS:elsewhere.example\n")
    for name, extra in (("server", ["-extfile", "server.ext"]), ("elsewhere", ["-extfile", "elsewhere.ext"]),
                        ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", *extra)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.pem", "-days", "2",
            "-subj", "/CN=rogue")
    return folder


@pytest.fixture(scope="session")
def quex_dir() -> Path:
    return SHARED_DATA / "covid-qu-ex"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(autouse=True)
def _delete_tmp_path_of_passed_tests(request):
    """A test's tmp_path (spools, Orthanc databases, copies of images) is deleted as soon as the test
    passes: a whole run would otherwise hold gigabytes. A failing test's stays for inspection."""
    folder = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    report = getattr(request.node, "report_call", None)
    if folder is not None and report is not None and report.passed:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgresql():
    """One PostgreSQL server (Debian's, as a plain process) for the session; tests make their own databases."""
    from tests.harness import PostgreSQL

    server = PostgreSQL(Path(tempfile.mkdtemp(prefix="cxr-pg-"))).start()  # not under pytest's root-only tmp
    yield server
    server.stop()
    shutil.rmtree(server.folder, ignore_errors=True)


DATABASES = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def make_queue(request, tmp_path):
    """Opens the queue of the backend under test: the same queue each call (as a restarted process
    would), empty at the start of the test; SQLite keeps its bytes in a spool under tmp_path.
    `make.site` is what a site file needs to name this queue (with state_dir = tmp_path/state), e.g. for the CLI."""
    from dicom_node.queue import SQLiteQueue
    from dicom_node.spool import Spool

    opened = []
    if request.param == "postgresql":
        from dicom_node.queue.postgresql import PostgresQueue

        dsn = request.getfixturevalue("postgresql").create_database(f"queue_{os.getpid()}_{next(DATABASES)}")

        def make():
            opened.append(PostgresQueue(dsn, tmp_path / "results"))
            return opened[-1]
        make.site = f'[queue]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
    else:
        def make():
            spool = Spool(tmp_path / "state")
            opened.append(SQLiteQueue(spool.root / "queue.sqlite3", spool, tmp_path / "results"))
            return opened[-1]
        make.site = ""
    yield make
    for queue in opened:
        queue.close()
