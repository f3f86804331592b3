"""The STOW-RS endpoint (dicom_node/stow.py) with real parts: Orthanc's own STOW-RS client sends a radiograph
and gets the node's results back; dicomweb-client stores over HTTPS; bad requests get their PS3.18 answer,
and what is accepted is kept while the rest is refused."""
from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient

from tests.harness import REPO, Node, Orthanc, chest_copies, free_port, wait_for

CHEST = "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"  # PA chest, JPEG baseline
USER, PASSWORD, TOKEN = "modality", "s3cret-pass", "token-7f3a9c"
BOUNDARY = "cxr-test-boundary"
DICOM_PARTS = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
# (0008,1198) Failed SOP Sequence, (0008,1199) Referenced SOP Sequence, (0008,1197) Failure Reason,
# (0008,1155) Referenced SOP Instance UID: the Store Instances Response Module (PS3.18 Annex I) in DICOM JSON
FAILED, REFERENCED, FAILURE_REASON, INSTANCE_UID = "00081198", "00081199", "00081197", "00081155"


class StowNode(Node):
    """A node with a [dicomweb] section in its site file (the harness writes only the sections it knows)."""

    def __init__(self, folder: Path, dicomweb: dict, **options):
        super().__init__(folder, **options)
        self.dicomweb = {"port": free_port(), **dicomweb}

    def write_config(self) -> None:
        super().write_config()
        with self.config_path.open("a") as config:
            config.write("[dicomweb]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in self.dicomweb.items()))

    @property
    def url(self) -> str:
        scheme = "https" if self.dicomweb.get("tls_certificate") else "http"
        return f"{scheme}://127.0.0.1:{self.dicomweb['port']}/dicom-web"


def multipart(*parts: bytes, part_type: str = "application/dicom") -> bytes:
    return b"".join(f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n" for part in parts) \
        + f"--{BOUNDARY}--\r\n".encode()


def post(url: str, body: bytes, content_type: str = DICOM_PARTS, authorization: str | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a POST; an HTTP error status is an answer here, not an exception."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type,
                                                              "Accept": "application/dicom+json"})
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def failures(answer: bytes) -> list[tuple[str, int]]:
    """(SOP Instance UID, Failure Reason) of each item of the answer's Failed SOP Sequence."""
    items = json.loads(answer).get(FAILED, {}).get("Value", [])
    return [(item.get(INSTANCE_UID, {}).get("Value", [""])[0], item[FAILURE_REASON]["Value"][0]) for item in items]


def stored(answer: bytes) -> list[str]:
    return [item[INSTANCE_UID]["Value"][0] for item in json.loads(answer).get(REFERENCED, {}).get("Value", [])]


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def held(node: Node) -> int:
    """Instances in the node's queue, whatever their state (`cxr-node status`)."""
    return sum(node.status()["instances"].values())


def test_orthanc_sends_a_radiograph_by_stow_rs_and_gets_the_results_back(dicom_dir, tmp_path, record):
    users_file = tmp_path / "users"
    users_file.write_text(f"{USER}:{PASSWORD}\n")
    stow_port = free_port()  # Orthanc's STOW-RS client sends to the node, the node its results to Orthanc by C-STORE
    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True,
                   dicomweb_servers={"cxr": [f"http://127.0.0.1:{stow_port}/dicom-web/", USER, PASSWORD]})
    node = StowNode(tmp_path / "node", {"port": stow_port, "users_file": str(users_file)}, destinations=[("pacs", pacs)])
    image = chest_copies([dicom_dir / CHEST], 1, tmp_path / "images")[0]
    uid = uid_of(image)
    pacs.start()
    try:
        node.start()
        orthanc_id = pacs.request("/instances", image.read_bytes())["ID"]
        pacs.request("/dicom-web/servers/cxr/stow", json.dumps({"Resources": [orthanc_id]}).encode())
        assert node.instance(uid)["calling_ae"] == f"STOW-RS:{USER}"  # committed before Orthanc got its answer
        wait_for(lambda: node.status()["results"]["sent"] == 2, 180, 1, "the SEG and the SR sent to Orthanc")
        study = str(pydicom.dcmread(image, stop_before_pixels=True).StudyInstanceUID)
        results = pacs.instances("SEG") + pacs.instances("SR")
        assert len(results) == 2 and all(result["tags"]["StudyInstanceUID"] == study for result in results)
        assert 'cxr_instances_received_total{outcome="accepted"} 1.0' in node.metrics()
        audit = (node.folder / "state" / "audit.log").read_text()
        assert f'UserID="STOW-RS:{USER}"' in audit and uid in audit
    finally:
        node.stop()
        pacs.stop()
    assert '"event": "stopped"' in node.log() and "Traceback" not in node.log()
    record("faults", case="Orthanc's STOW-RS client sends a radiograph to the node's STOW-RS endpoint (basic auth)",
           expected="committed before the answer; SEG and SR back in Orthanc",
           observed="queued as STOW-RS:modality before Orthanc had its answer; SEG and SR stored in Orthanc",
           sent=1, accepted=1, delivered=1, lost=0, duplicated=0)


@pytest.fixture(scope="module")
def https_node(pki, tmp_path_factory):
    """HTTPS with basic users and a bearer token."""
    folder = tmp_path_factory.mktemp("stow")
    (folder / "users").write_text(f"{USER}:{PASSWORD}\nother:other-pass\n")
    (folder / "tokens").write_text(f"{TOKEN}\n")
    node = StowNode(folder / "node", {"users_file": str(folder / "users"), "tokens_file": str(folder / "tokens"),
                                      "tls_certificate": str(pki / "server.pem"),
                                      "tls_private_key": str(pki / "server.key")}).start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def trusting(pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / "ca.pem"))


@pytest.fixture
def images(dicom_dir, tmp_path) -> list[Path]:
    """Three new chest radiographs, each in its own study."""
    return chest_copies([dicom_dir / CHEST], 3, tmp_path / "images", per_study=1)


def test_dicomweb_client_stores_over_https_with_basic_authentication(https_node, pki, images):
    session = requests.Session()
    session.auth, session.verify = (USER, PASSWORD), str(pki / "ca.pem")
    session.trust_env = False  # else REQUESTS_CA_BUNDLE, where set, replaces `verify` (and proxies apply to loopback)
    client = DICOMwebClient(https_node.url, session=session)
    answer = client.store_instances([pydicom.dcmread(images[0])])
    assert [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence] == [uid_of(images[0])]
    assert https_node.instance(uid_of(images[0]))["state"] in ("received", "queued", "processing", "done")


@pytest.mark.parametrize("what, authorization", [("no credentials", None), ("a wrong password", basic(USER, "wrong")),
                                                 ("an unknown user", basic("nobody", PASSWORD)),
                                                 ("a wrong bearer token", "Bearer wrong-token"),
                                                 ("malformed basic credentials", "Basic not-base64!")])
def test_missing_or_wrong_credentials_get_401_and_nothing_is_stored(https_node, trusting, images, what, authorization,
                                                                   record):
    before = held(https_node)
    status, headers, _ = post(https_node.url + "/studies", multipart(images[0].read_bytes()), authorization=authorization,
                              context=trusting)
    assert status == 401
    assert 'Basic realm="cxr-node"' in headers["www-authenticate"] and "Bearer" in headers["www-authenticate"]
    assert held(https_node) == before and https_node.instance(uid_of(images[0])) is None
    record("bad_input", case=f"STOW-RS with {what}",
           expected="HTTP 401 with WWW-Authenticate, nothing stored", observed=f"HTTP {status}, nothing stored", ok=True)


def test_a_bearer_token_is_accepted_and_the_study_of_the_url_is_stored(https_node, trusting, images):
    study = str(pydicom.dcmread(images[0], stop_before_pixels=True).StudyInstanceUID)
    status, headers, answer = post(f"{https_node.url}/studies/{study}", multipart(images[0].read_bytes()),
                                   authorization=f"Bearer {TOKEN}", context=trusting)
    assert (status, headers["content-type"]) == (200, "application/dicom+json")
    assert stored(answer) == [uid_of(images[0])] and not failures(answer)


@pytest.mark.parametrize("what, content_type, body, expected", [
    ("a bare application/dicom body", "application/dicom", b"DICM", 415),  # STOW-RS takes multipart/related only
    ("metadata parts (application/dicom+json)", f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
     multipart(b"[]"), 415),
    ("a multipart body without its boundary", DICOM_PARTS, b"no boundary in here", 400),
    ("a multipart body without its closing boundary", DICOM_PARTS,
     f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\ntruncated".encode(), 400),
    ("multipart/related without a boundary parameter", "multipart/related", multipart(b"x"), 400),
])
def test_a_body_that_is_not_multipart_related_of_dicom_is_refused_whole(https_node, trusting, what, content_type, body,
                                                                         expected, record):
    before = held(https_node)
    status, _, _ = post(https_node.url + "/studies", body, content_type, basic(USER, PASSWORD), trusting)
    assert status == expected
    assert held(https_node) == before
    record("bad_input", case=f"STOW-RS: {what}", expected=f"HTTP {expected}",
           observed=f"HTTP {status}, nothing stored", ok=True)


def verification_object(path: Path, folder: Path) -> bytes:
    """The radiograph's file claiming a SOP class that is not a storage class (Verification)."""
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.1"
    ds.save_as(folder / "verification.dcm")
    return (folder / "verification.dcm").read_bytes()


def test_parts_refused_for_their_reason_get_409_with_a_failed_sop_sequence(https_node, trusting, images, tmp_path,
                                                                           record):
    """PS3.18 Table I.2-2 failure reasons: 0xC000 cannot understand, 0xA900 (Study Instance UID mismatch),
    0x0122 SOP class not supported; all parts refused: 409."""
    before = held(https_node)
    cases = [("/studies", multipart(b"not a DICOM file at all"), [("", 0xC000)]),
             ("/studies", multipart(images[0].read_bytes(), part_type="text/plain"), [("", 0xC000)]),
             ("/studies/1.2.826.0.1.3680043.2.1125.1", multipart(images[0].read_bytes()), [(uid_of(images[0]), 0xA900)]),
             ("/studies", multipart(verification_object(images[1], tmp_path)), [(uid_of(images[1]), 0x0122)])]
    for path, body, expected in cases:
        status, headers, answer = post(https_node.url + path, body, authorization=basic(USER, PASSWORD), context=trusting)
        assert (status, headers["content-type"], failures(answer)) == (409, "application/dicom+json", expected), path
        assert not stored(answer)
        record("bad_input", case=f"STOW-RS part refused: {['not DICOM', 'text/plain part', 'study UID of another URL', 'Verification SOP class'][cases.index((path, body, expected))]}",
               expected=f"HTTP 409, Failure Reason 0x{expected[0][1]:04X}",
               observed=f"HTTP {status}, Failure Reason 0x{failures(answer)[0][1]:04X}", ok=True)
    assert held(https_node) == before
    assert not list((https_node.folder / "state" / "incoming").iterdir())  # no part left behind


def test_a_good_and_a_bad_part_store_the_good_one_with_202(https_node, trusting, images):
    before = held(https_node)
    body = multipart(images[2].read_bytes(), b"\x00" * 300)
    status, _, answer = post(https_node.url + "/studies", body, authorization=basic(USER, PASSWORD), context=trusting)
    assert status == 202
    assert stored(answer) == [uid_of(images[2])] and failures(answer) == [("", 0xC000)]
    assert held(https_node) == before + 1 and https_node.instance(uid_of(images[2]))
    metrics = https_node.metrics()
    assert 'cxr_instances_received_total{outcome="invalid"}' in metrics
    assert 'cxr_loop_progress_age_seconds{loop="stow-rs"}' in metrics  # the server thread is a watched loop


def test_below_the_disk_watermark_every_part_gets_out_of_resources(dicom_dir, tmp_path):
    free_mb = shutil.disk_usage(tmp_path).free / 2**20
    node = StowNode(tmp_path / "node", {}, storage={"min_free_mb": int(free_mb) + 10_000}).start()
    image = chest_copies([dicom_dir / CHEST], 1, tmp_path / "images")[0]
    try:
        status, _, answer = post(node.url + "/studies", multipart(image.read_bytes()))  # loopback, no users: open
        assert (status, failures(answer)) == (409, [(uid_of(image), 0xA700)])
        assert node.instance(uid_of(image)) is None
    finally:
        node.stop()


def test_a_request_over_max_request_mb_gets_413_and_nothing_is_kept(dicom_dir, tmp_path):
    """The body is held in memory, so its size is bounded: refused on its Content-Length before it is read,
    and a chunked one (no length) once it passes the limit; a request under it is stored."""
    node = StowNode(tmp_path / "node", {"max_request_mb": 1}).start()
    image = chest_copies([dicom_dir / CHEST], 1, tmp_path / "images")[0]
    oversized = multipart(image.read_bytes(), b"\0" * 2**20)
    try:
        status, _, answer = post(node.url + "/studies", oversized)
        assert status == 413 and b"dicomweb.max_request_mb" in answer, (status, answer)
        chunked = requests.post(node.url + "/studies", data=iter([oversized[i:i + 65536] for i in
                                                                  range(0, len(oversized), 65536)]),
                                headers={"Content-Type": DICOM_PARTS}, timeout=60)
        assert chunked.status_code == 413 and "Content-Length" not in chunked.request.headers
        assert node.instance(uid_of(image)) is None
        status, _, answer = post(node.url + "/studies", multipart(image.read_bytes()))
        assert len(image.read_bytes()) < 2**20 and (status, stored(answer)) == (200, [uid_of(image)])
    finally:
        node.stop()


def test_a_non_loopback_bind_without_tls_and_users_exits_2_naming_the_key(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\nstate_dir = "{tmp_path / "state"}"\n[dicomweb]\nport = {free_port()}\nbind = "0.0.0.0"\n')
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "dicomweb.bind" in result.stderr, result.stderr


def test_a_cut_off_part_is_refused_and_the_whole_copy_sent_after_it_is_stored(https_node, trusting, images):
    whole = images[0].read_bytes()
    status, _, answer = post(https_node.url + "/studies", multipart(whole[:len(whole) // 2]),
                             authorization=basic(USER, PASSWORD), context=trusting)
    assert (status, failures(answer)) == (409, [(uid_of(images[0]), 0xC000)])
    assert https_node.instance(uid_of(images[0])) is None
    status, _, answer = post(https_node.url + "/studies", multipart(whole), authorization=basic(USER, PASSWORD),
                             context=trusting)
    assert status == 200 and stored(answer) == [uid_of(images[0])]
    assert https_node.instance(uid_of(images[0])) is not None


def test_a_held_instance_sent_again_under_another_study_is_refused(https_node, trusting, images):
    status, _, _ = post(https_node.url + "/studies", multipart(images[1].read_bytes()),
                        authorization=basic(USER, PASSWORD), context=trusting)
    assert status == 200
    status, _, answer = post(https_node.url + "/studies/1.2.826.0.1.3680043.2.1125.7", multipart(images[1].read_bytes()),
                             authorization=basic(USER, PASSWORD), context=trusting)
    assert (status, failures(answer)) == (409, [(uid_of(images[1]), 0xA900)])


def test_a_destinations_own_ca_holds_whatever_the_environment_names(https_node, pki, monkeypatch):
    """requests would let REQUESTS_CA_BUNDLE replace the CA a DICOMweb destination names."""
    from dicom_node.config import DicomWebTarget
    from dicom_node.dicomweb_sender import check

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())  # the public CAs: not the test CA
    ok, message = check(DicomWebTarget(https_node.url, USER, PASSWORD, ca_certificates=pki / "ca.pem"), 10)
    assert message.startswith("QIDO-RS HTTP") and "SSL" not in message  # TLS held; the endpoint serves no QIDO
    ok, message = check(DicomWebTarget(https_node.url, USER, PASSWORD), 10)
    assert not ok and "CERTIFICATE_VERIFY_FAILED" in message
