"""STOW-RS destinations against a real Orthanc with its DICOMweb plugin and HTTP basic authentication:
results stored, wrong credentials refused for good with the reason, a server down at first delivered to
once it is up, and `cxr-node echo` checking the DICOMweb service."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import Node, Orthanc, chest_copies, dcmsend, wait_for

pytestmark = pytest.mark.skipif(not Path(Orthanc.DICOMWEB_PLUGIN).exists(), reason="needs Debian orthanc-dicomweb")
NCCID = "nhsx-nccid/1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"
USERS = {"cxr": "s3cret-pass"}


def stow_destination(pacs: Orthanc, folder: Path, password: str) -> tuple:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "password").write_text(password + "\n")
    return ("web", pacs, {"url": f"http://127.0.0.1:{pacs.http_port}/dicom-web", "username": "cxr",
                          "password_file": str(folder / "password")})


@pytest.fixture
def film(dicom_dir, tmp_path) -> Path:
    return chest_copies([dicom_dir / NCCID], 1, tmp_path / "film")[0]


def test_seg_and_sr_are_stored_through_stow_rs_with_basic_authentication(dicom_dir, film, tmp_path):
    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS).start()
    node = Node(tmp_path / "node", destinations=[stow_destination(pacs, tmp_path / "secrets", USERS["cxr"])],
                processing={"stable_seconds": 0}).start()
    try:
        echo = node.cli("echo")
        assert echo.returncode == 0 and "web (http://127.0.0.1:" in echo.stdout and "ok - QIDO-RS 200" in echo.stdout
        assert dcmsend(node.port, [film]).returncode == 0
        wait_for(lambda: node.status()["results"]["sent"] == 2, 120, what="SEG and SR stored through STOW-RS")
        assert len(pacs.instances("SEG")) == 1 and len(pacs.instances("SR")) == 1
        audit = (node.folder / "state" / "audit.log").read_text()
        assert f"http://127.0.0.1:{pacs.http_port}/dicom-web" in audit  # the destination, named by its URL
        assert USERS["cxr"] not in (node.folder / "node.log").read_text() + audit  # the password is never written
    finally:
        node.stop()
        pacs.stop()


def test_wrong_credentials_end_failed_with_the_reason_and_echo_says_so(film, tmp_path, record):
    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS).start()
    node = Node(tmp_path / "node", destinations=[stow_destination(pacs, tmp_path / "secrets", "wrong")],
                processing={"stable_seconds": 0}).start()
    try:
        echo = node.cli("echo")
        assert echo.returncode == 1 and "FAILED - QIDO-RS HTTP 401" in echo.stdout
        assert dcmsend(node.port, [film]).returncode == 0
        wait_for(lambda: node.status()["results"]["failed"] == 2, 120, what="results refused")
        reasons = [error["error"] for error in node.status()["last_errors"]]
        assert reasons and all("STOW-RS HTTP 401" in reason for reason in reasons), reasons
        assert pacs.instances() == []
        record("bad_input", case="STOW-RS destination with a wrong password",
               expected="results failed (permanent) with the HTTP 401 reason; echo fails", observed=reasons[0], ok=True)
    finally:
        node.stop()
        pacs.stop()


def test_a_dicomweb_server_down_at_first_gets_the_results_once_it_is_up(film, tmp_path, record):
    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS)  # ports chosen, not started yet
    node = Node(tmp_path / "node", destinations=[stow_destination(pacs, tmp_path / "secrets", USERS["cxr"])],
                processing={"stable_seconds": 0}).start()
    try:
        assert dcmsend(node.port, [film]).returncode == 0
        wait_for(lambda: node.status()["last_errors"], 60, what="a failed STOW-RS attempt")
        assert node.status()["results"]["pending"] == 2  # down: transient, kept
        assert "STOW-RS ConnectionError" in node.status()["last_errors"][0]["error"]
        pacs.start()
        wait_for(lambda: node.status()["results"]["sent"] == 2, 60, what="delivery once the server is up")
        assert len(pacs.instances("SEG")) == 1 and len(pacs.instances("SR")) == 1
    finally:
        node.stop()
        pacs.stop()
    record("faults", case="STOW-RS destination (Orthanc DICOMweb, basic auth) down at first, started later",
           expected="results pending while down (transient), all delivered after",
           observed="2 pending with a ConnectionError while down; both stored once it was up",
           sent=1, accepted=1, delivered=1, lost=0, duplicated=0)


@pytest.mark.parametrize("entry, refusal", [
    ('url = "http://cxr:secret@127.0.0.1:8042/dicom-web"', "no user or password in the URL"),
    ('url = "http://127.0.0.1:8042/dicom-web"\nusername = "cxr"\ntoken_file = "token"', "exclude each other"),
    ('url = "http://127.0.0.1:8042/dicom-web"\nae_title = "PACS"', "not both"),
])
def test_a_dicomweb_destination_is_refused_at_start_when_its_settings_contradict(tmp_path, entry, refusal):
    from dicom_node.config import ConfigError, load_config

    (tmp_path / "token").write_text("t0ken\n")
    site = tmp_path / "node.toml"
    site.write_text(f'[[destinations]]\nname = "web"\n{entry}\n')
    with pytest.raises(ConfigError, match=refusal):
        load_config(site, tmp_path)
