"""IHE ATNA audit trail: a DICOM audit message (PS3.15 A.5) for each association, each instance
received and each result sent, and the node's start and stop. Appended to a local log (one XML
message per line, readable by the service user only) and, when configured, sent to a syslog
collector as RFC 5424 messages over UDP (RFC 5426) or TCP (RFC 6587 octet counting).

The messages name the patient by ID only (ATNA needs the patient to be findable); never by name.
Writing or sending them never fails the node's work: a failure is logged (an instance already stored
must still get its 0x0000)."""
from __future__ import annotations

import os
import socket
import threading
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

from dicom_node.logs import log

# (code, meaning) in the DCM scheme unless noted
APPLICATION_ACTIVITY, APPLICATION_START, APPLICATION_STOP = ("110100", "Application Activity"), \
    ("110120", "Application Start"), ("110121", "Application Stop")
USER_AUTHENTICATION, LOGIN = ("110114", "User Authentication"), ("110122", "Login")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
SOURCE_ROLE, DESTINATION_ROLE, APPLICATION_ROLE = ("110153", "Source Role ID"), ("110152", "Destination Role ID"), \
    ("110150", "Application")
STUDY_INSTANCE_UID = ("110180", "Study Instance UID")
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"
SYSLOG_PRIORITY = 10 * 8 + 5  # facility 10 (security/authorization), severity 5 (notice)


def _code(parent: ET.Element, tag: str, code: tuple[str, str], scheme: str = "DCM") -> None:
    ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": scheme, "originalText": code[1]})


class AuditTrail:
    def __init__(self, path: Path, ae_title: str, syslog: str = ""):
        self.path, self.ae_title, self.host = Path(path), ae_title, socket.gethostname()
        self.collector = urlparse(syslog) if syslog else None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ events
    def application(self, started: bool) -> None:
        message = self._message(APPLICATION_ACTIVITY, "E", SUCCESS, APPLICATION_START if started else APPLICATION_STOP)
        self._participant(message, "cxr-node", str(os.getpid()), APPLICATION_ROLE, requestor=False)
        self._write(message)

    def association(self, calling_ae: str, address: str, accepted: bool, detail: str = "") -> None:
        message = self._message(USER_AUTHENTICATION, "E", SUCCESS if accepted else MINOR_FAILURE, LOGIN, detail)
        self._participant(message, calling_ae, address, SOURCE_ROLE, requestor=True)
        self._participant(message, self.ae_title, self.host, DESTINATION_ROLE, requestor=False)
        self._write(message)

    def instance_received(self, calling_ae: str, address: str, header, sop_class_uid: str, sop_uid: str,
                          stored: bool, detail: str = "") -> None:
        """`header`: the data set (patient and study taken from it), or None when it could not be read."""
        message = self._message(INSTANCES_TRANSFERRED, "C", SUCCESS if stored else MINOR_FAILURE, detail=detail)
        self._participant(message, calling_ae, address, SOURCE_ROLE, requestor=True)
        self._participant(message, self.ae_title, self.host, DESTINATION_ROLE, requestor=False)
        self._write(message, self._objects(header, sop_class_uid, sop_uid))

    def result_sent(self, destination, header, sop_class_uid: str, sop_uid: str, stored: bool, detail: str = "") -> None:
        message = self._message(INSTANCES_TRANSFERRED, "R", SUCCESS if stored else SERIOUS_FAILURE, detail=detail)
        self._participant(message, self.ae_title, self.host, SOURCE_ROLE, requestor=True)
        if destination.dicomweb:  # a STOW-RS destination is known by its URL
            user, address = destination.dicomweb.url, urlparse(destination.dicomweb.url).hostname or ""
        else:
            user, address = destination.ae_title, destination.host
        self._participant(message, user, address, DESTINATION_ROLE, requestor=False)
        self._write(message, self._objects(header, sop_class_uid, sop_uid))

    # ------------------------------------------------------------ message parts
    def _message(self, event: tuple, action: str, outcome: str, event_type: tuple | None = None,
                 detail: str = "") -> ET.Element:
        message = ET.Element("AuditMessage")
        identification = ET.SubElement(message, "EventIdentification", {
            "EventActionCode": action, "EventDateTime": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": outcome})
        _code(identification, "EventID", event)
        if event_type:
            _code(identification, "EventTypeCode", event_type)
        if detail:
            ET.SubElement(identification, "EventOutcomeDescription").text = detail[:500]
        return message

    @staticmethod
    def _participant(message: ET.Element, user: str, address: str, role: tuple, requestor: bool) -> None:
        is_ip = address.replace(".", "").isdigit() or ":" in address
        participant = ET.SubElement(message, "ActiveParticipant", {
            "UserID": user, "UserIsRequestor": str(requestor).lower(), "NetworkAccessPointID": address,
            "NetworkAccessPointTypeCode": "2" if is_ip else "1"})  # 2: IP address, 1: machine name
        _code(participant, "RoleIDCode", role)

    @staticmethod
    def _objects(header, sop_class_uid: str, sop_uid: str) -> list[ET.Element]:
        """The study (with the instance) and, when the header names one, the patient by ID."""
        study = ET.Element("ParticipantObjectIdentification", {
            "ParticipantObjectID": str(header.get("StudyInstanceUID", "")) if header is not None else "",
            "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"})
        _code(study, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
        sop_class = ET.SubElement(study, "SOPClass", {"UID": sop_class_uid, "NumberOfInstances": "1"})
        ET.SubElement(sop_class, "Instance", {"UID": sop_uid})
        if header is None or not header.get("PatientID"):
            return [study]
        patient = ET.Element("ParticipantObjectIdentification", {
            "ParticipantObjectID": str(header.PatientID), "ParticipantObjectTypeCode": "1",
            "ParticipantObjectTypeCodeRole": "1"})
        _code(patient, "ParticipantObjectIDTypeCode", ("2", "Patient Number"), scheme="RFC-3881")
        return [study, patient]

    def _write(self, message: ET.Element, objects: list[ET.Element] = ()) -> None:
        source = ET.SubElement(message, "AuditSourceIdentification", {"AuditSourceID": f"{self.ae_title}@{self.host}"})
        _code(source, "AuditSourceTypeCode", ("4", "Application Server Process Tier"))
        message.extend(objects)
        text = ET.tostring(message, encoding="unicode")
        try:
            with self._lock:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(descriptor, (text + "\n").encode())
                finally:
                    os.close(descriptor)
        except OSError as error:  # e.g. a full disk: the DICOM answer must not depend on the audit file
            log("audit message not written to the local audit log", 40, error=str(error))
        if self.collector:
            self._send(text)

    def _send(self, text: str) -> None:
        timestamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        record = f"<{SYSLOG_PRIORITY}>1 {timestamp} {self.host} cxr-node {os.getpid()} IHE+RFC-3881 - ".encode() \
            + b"\xef\xbb\xbf" + text.encode()
        address = (self.collector.hostname, self.collector.port or 514)
        try:
            if self.collector.scheme == "udp":
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.sendto(record, address)
            else:
                with socket.create_connection(address, timeout=5) as sock:
                    sock.sendall(f"{len(record)} ".encode() + record)
        except OSError as error:
            log("audit message not sent to the syslog collector (kept in the local audit log)", 30, error=str(error))
