"""docs/CONFORMANCE.md against the node: the receiver is started and offered every documented SOP class
with every transfer syntax pydicom knows; the sender's association is captured at a loopback SCP.
What they accept and propose must be exactly what the statement's tables say."""
from __future__ import annotations

import re
import tempfile

import pydicom.uid
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, PYNETDICOM_IMPLEMENTATION_UID, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification

from dicom_node.config import load_config
from dicom_node.receiver import Receiver
from dicom_node.sender import RESULT_SOP_CLASSES, echo
from dicom_node.service import open_state
from tests.harness import REPO, free_port

STATEMENT = (REPO / "docs" / "CONFORMANCE.md").read_text()
UID = re.compile(r"^\d+(\.\d+)+$")
# Every transfer syntax pydicom names: proposed to the receiver to see which it takes.
ALL_TRANSFER_SYNTAXES = sorted({str(uid) for uid in pydicom.uid.AllTransferSyntaxes})


def documented_uids(heading: str) -> set[str]:
    """The UID column of the table under `#### heading`."""
    lines = STATEMENT.split(f"#### {heading}\n", 1)[1].splitlines()
    rows = [line for line in lines[:next(i for i, line in enumerate(lines) if line.startswith("#"))] if line.startswith("|")]
    return {cell.strip() for row in rows[2:] for cell in row.strip("|").split("|") if UID.match(cell.strip())}


def node_config(tmp_path, port: int, destination_port: int = 0):
    destination = (f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {destination_port}\n'
                   if destination_port else "")
    (tmp_path / "node.toml").write_text(f'[node]\nport = {port}\n[storage]\nstate_dir = "{tmp_path / "state"}"\n'
                                        f'[health]\nport = 0\n{destination}')
    return load_config(tmp_path / "node.toml")


@pytest.fixture
def receiver(tmp_path):
    config = node_config(tmp_path, free_port())
    receiver = Receiver(config, *open_state(config))
    temporary_folder, chunked = tempfile.gettempdir(), pynetdicom_config.STORE_RECV_CHUNKED_DATASET
    receiver.start()
    assert tempfile.gettempdir() == temporary_folder  # the spool is not the process's temporary folder
    yield config
    receiver.stop()
    assert pynetdicom_config.STORE_RECV_CHUNKED_DATASET == chunked  # pynetdicom as it was


def test_the_receiver_accepts_exactly_the_documented_classes_and_transfer_syntaxes(receiver):
    classes = documented_uids("Storage SCP: SOP classes analysed")
    syntaxes = documented_uids("Storage SCP: transfer syntaxes accepted")
    accepted = {}
    for sop_class in sorted(classes):
        ae = AE(ae_title="CONFORMANCE")
        for syntax in ALL_TRANSFER_SYNTAXES:  # one context per syntax, so each is accepted or not on its own
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title=receiver.ae_title)
        assert assoc.is_established, sop_class
        assert assoc.acceptor.implementation_class_uid == PYNETDICOM_IMPLEMENTATION_UID
        assert PYNETDICOM_IMPLEMENTATION_UID in STATEMENT
        accepted[sop_class] = {str(c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        assoc.release()
    assert accepted.pop(Verification)  # the transfer syntax table is for the storage classes
    for sop_class, taken in accepted.items():
        assert taken == syntaxes, sop_class
    assert f"({len(AllStoragePresentationContexts)} storage classes in all)" in STATEMENT


def test_the_sender_proposes_exactly_the_documented_classes_and_transfer_syntaxes(tmp_path):
    requested = []
    scp = AE(ae_title="PACS")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_REQUESTED, lambda event: requested.extend(event.assoc.requestor.requested_contexts))])
    try:
        config = node_config(tmp_path, free_port(), destination_port=port)
        ok, message = echo(config, config.destinations[0])
        assert ok, message
    finally:
        server.shutdown()
    proposed_classes = {str(c.abstract_syntax) for c in requested}
    assert proposed_classes == documented_uids("Storage SCU: SOP classes proposed")
    assert {str(c) for c in RESULT_SOP_CLASSES} < proposed_classes
    for context in requested:
        if context.abstract_syntax != Verification:
            assert {str(s) for s in context.transfer_syntax} == documented_uids("Storage SCU: transfer syntaxes proposed")
