"""Security with real tools: DICOM TLS against DCMTK's TLS-enabled storescu, file permissions of
the spool and queue, and the systemd sandbox score."""
from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO, Node, Orthanc, storescu, wait_for
from tests.test_faults import SOURCES

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="openssl is needed to make test certificates")


@pytest.fixture(scope="module")
def tls_node(pki, tmp_path_factory):
    node = Node(tmp_path_factory.mktemp("tls-node"), tls={
        "enabled": True, "certificate": str(pki / "server.pem"), "private_key": str(pki / "server.key"),
        "ca_certificates": str(pki / "ca.pem"), "require_client_certificate": True}).start()
    yield node
    node.stop()


def tls_storescu(node: Node, pki: Path, key: str | None, image: Path) -> subprocess.CompletedProcess:
    """DCMTK storescu over TLS, verifying the node's certificate against the test CA."""
    tls = ["+tls", str(pki / f"{key}.key"), str(pki / f"{key}.pem")] if key else ["+tla"]
    return storescu(node.port, [image], "STORESCU", "CXR_NODE", *tls, "+cf", str(pki / "ca.pem"))


def test_tls_with_a_client_certificate_from_the_trusted_ca_is_accepted(tls_node, pki, dicom_dir, record):
    result = tls_storescu(tls_node, pki, "client", dicom_dir / SOURCES[1])
    assert result.returncode == 0 and "Received Store Response (Success)" in result.stderr, result.stderr[-2000:]
    wait_for(lambda: tls_node.queue_counts().get("results.written", 0) == 2, 120, what="the image analysed")
    record("security", case="DICOM TLS, client certificate from the trusted CA (DCMTK storescu +tls)",
           expected="accepted, analysed", observed="0x0000, SEG + SR written", ok=True)


@pytest.mark.parametrize("client, why", [
    ("plain", "no TLS on a TLS port"),
    ("rogue", "self-signed client certificate"),
    ("anonymous", "no client certificate"),
])
def test_tls_refuses_clients_it_cannot_trust(tls_node, pki, dicom_dir, client, why, record):
    image = dicom_dir / SOURCES[1]
    result = (storescu(tls_node.port, [image]) if client == "plain"
              else tls_storescu(tls_node, pki, None if client == "anonymous" else client, image))
    output = result.stdout + result.stderr
    refused = result.returncode != 0 and "Store Response" not in output
    record("security", case=f"DICOM TLS: {why}", expected="no association, nothing stored",
           observed=next((line for line in output.splitlines() if line.startswith(("E:", "F:"))), output[-120:]), ok=refused)
    assert refused, output[-2000:]


def test_tls_is_1_2_or_later(tls_node, pki, record):
    def handshake(maximum: ssl.TLSVersion) -> str:
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.load_cert_chain(pki / "client.pem", pki / "client.key")
        context.minimum_version, context.maximum_version = ssl.TLSVersion.MINIMUM_SUPPORTED, maximum
        try:
            with socket.create_connection(("127.0.0.1", tls_node.port), timeout=10) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.version()
        except (ssl.SSLError, OSError) as error:
            return f"refused ({type(error).__name__})"
    best, old = handshake(ssl.TLSVersion.MAXIMUM_SUPPORTED), handshake(ssl.TLSVersion.TLSv1_1)
    record("security", case="TLS version", expected="TLS 1.2+ negotiated, TLS 1.1 refused",
           observed=f"default client: {best}; TLS 1.1 client: {old}", ok=best in ("TLSv1.2", "TLSv1.3") and "refused" in old)
    assert best in ("TLSv1.2", "TLSv1.3") and old.startswith("refused")


def test_results_reach_a_pacs_that_takes_dicom_tls_only(pki, dicom_dir, tmp_path, record):
    """Orthanc with DICOM TLS (client certificates required) as the PACS: the destination with the
    right CA and a client certificate stores SEG + SR; one that trusts another CA never connects."""
    pacs = Orthanc(tmp_path / "orthanc", tls={"certificate": str(pki / "server.pem"),
                                              "private_key": str(pki / "server.key"), "trusted": str(pki / "ca.pem")}).start()
    client = {"tls_certificate": str(pki / "client.pem"), "tls_private_key": str(pki / "client.key")}
    node = Node(tmp_path / "node", destinations=[
        ("pacs", pacs, {"tls_ca_certificates": str(pki / "ca.pem"), **client}),
        ("wrong-ca", pacs, {"tls_ca_certificates": str(pki / "rogue.pem"), **client})]).start()
    try:
        assert storescu(node.port, [dicom_dir / SOURCES[1]]).returncode == 0
        wait_for(lambda: len(pacs.get("/instances")) == 2, 180, what="SEG and SR stored by Orthanc over TLS")
        wait_for(lambda: node.queue_counts().get("results.sent") == 2 and "certificate verify failed" in node.log(),
                 60, what="the untrusted destination's failed handshake")
        modalities = sorted(pacs.get(f"/instances/{i}/simplified-tags")["Modality"] for i in pacs.get("/instances"))
        assert modalities == ["SEG", "SR"] and node.queue_counts().get("results.pending") == 2
    finally:
        node.stop()
        pacs.stop()
    record("security", case="outbound DICOM TLS to Orthanc (TLS only, client certificate required)",
           expected="stored with the right CA; no connection when the PACS certificate does not verify",
           observed="SEG + SR stored; wrong CA: certificate verify failed, results pending", ok=True)


def test_spool_queue_and_results_are_readable_by_the_service_user_only(tls_node, record):
    state = tls_node.folder / "state"
    paths = [state, *state.rglob("*")]
    assert any(p.suffix == ".dcm" for p in paths) and any(p.name.startswith("queue.sqlite3") for p in paths)
    open_to_others = [f"{p.relative_to(state)} {stat.filemode(p.stat().st_mode)}" for p in paths
                      if p.stat().st_mode & 0o077]
    record("security", case=f"permissions of {len(paths)} state files and folders (spool, queue, results)",
           expected="0600 files, 0700 folders", observed=", ".join(open_to_others) or "all owner-only", ok=not open_to_others)
    assert not open_to_others


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_sandbox_exposure_is_low(tmp_path, record):
    unit = (REPO / "systemd" / "cxr-node@.service").read_text()
    copy = tmp_path / "cxr-node@worker.service"
    copy.write_text(unit.replace("/opt/cxr-node/.venv/bin/cxr-node", str(Path(sys.executable).with_name("cxr-node"))))
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(copy)],
                            capture_output=True, text=True, env={**os.environ, "SYSTEMD_COLORS": "0"})
    score = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout + result.stderr)
    assert score, result.stdout[-1000:] + result.stderr[-1000:]
    record("security", case="systemd-analyze security (offline) of systemd/cxr-node@.service (instance worker)",
           expected="exposure <= 2.0 (OK)", observed=f"{score.group(1)} {score.group(2)}", ok=float(score.group(1)) <= 2.0)
    assert float(score.group(1)) <= 2.0
