"""STOW-RS to a DICOMweb destination (PS3.18 10.5) with dicomweb-client, each answer mapped onto the
outcome classes of the C-STORE path (sender.py), so a result is never dropped:
- 200: stored; 202 naming the instance in FailedSOPSequence: its Failure Reason read as a C-STORE status
  (0xA7xx out of resources: try again; 0xA9xx, 0xCxxx: permanent), a Warning Reason: stored with warning;
- 409 and the other 4xx (401 and 403, wrong or missing credentials, among them): permanent, with the reason;
- 5xx, 408, 429, timeouts and connection errors: transient, tried again with backoff."""
from __future__ import annotations

import io
import json
import re

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from dicom_node.config import DicomWebTarget
from dicom_node.outcomes import PERMANENT, STORED, TRANSIENT, WARNING, status_class

TRANSIENT_HTTP = {408, 429}


def client(target: DicomWebTarget, timeout: float) -> DICOMwebClient:
    """A client with the destination's credentials (basic or bearer) and CA; retries are the node's own."""
    session = requests.Session()
    if target.username:
        session.auth = (target.username, target.password)
    elif target.token:
        session.headers["Authorization"] = f"Bearer {target.token}"
    if target.ca_certificates:
        session.verify = str(target.ca_certificates)
        # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's CA; keep the environment's proxies
        session.proxies = requests.utils.get_environ_proxies(target.url)
        session.trust_env = False
    web = DICOMwebClient(target.url, session=session, timeout=timeout)
    web.set_http_retry_params(retry=False)
    return web


def _network_reason(error: Exception) -> str:
    """The cause a connection error buries in its text, e.g. 'STOW-RS ConnectionError: [Errno 111]
    Connection refused' or '... [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed
    certificate in certificate chain'."""
    text = " ".join(str(error).split())
    cause = re.search(r"\[SSL: \w+\][^'\"()]*|\[Errno -?\d+\][^'\"()]*|Read timed out|timed out", text)
    return f"{type(error).__name__}: {(cause.group(0) if cause else text[-160:]).strip(' .')}"


def _http_reason(response: requests.Response) -> str:
    """'HTTP 409 Conflict: <the server's message>' on one line, without the body's bulk."""
    try:
        body = response.json()
        detail = (body.get("Message") or body.get("Details") or json.dumps(body)) if isinstance(body, dict) else body
    except ValueError:
        detail = response.text
    detail = " ".join(str(detail).split())[:200]
    return f"STOW-RS HTTP {response.status_code} {response.reason}" + (f": {detail}" if detail else "")


def _failure_reason(response: requests.Response, sop_uid: str) -> int | None:
    """The Failure Reason a 409 answer's FailedSOPSequence gives the instance, if it gives one."""
    try:
        answer = pydicom.Dataset.from_json(response.json())
    except (ValueError, TypeError, AttributeError):
        return None
    return next((int(item.FailureReason) for item in answer.get("FailedSOPSequence", [])
                 if item.get("ReferencedSOPInstanceUID") == sop_uid and "FailureReason" in item), None)


def stow(web: DICOMwebClient, data: bytes, sop_uid: str) -> tuple[str, str, bool]:
    """Store one result: (outcome, the reason or warning, whether the server answered)."""
    try:
        answer = web.store_instances([pydicom.dcmread(io.BytesIO(data))])
    except requests.HTTPError as error:
        code = error.response.status_code
        if code == 409 and (failed := _failure_reason(error.response, sop_uid)) is not None:  # none stored
            return status_class(failed), f"STOW-RS HTTP 409, failure reason 0x{failed:04X}", True
        return (TRANSIENT if code >= 500 or code in TRANSIENT_HTTP else PERMANENT), _http_reason(error.response), True
    except (requests.ConnectionError, requests.Timeout) as error:
        return TRANSIENT, f"STOW-RS {_network_reason(error)}", False
    for item in answer.get("FailedSOPSequence", []):
        if item.get("ReferencedSOPInstanceUID") == sop_uid:
            code = int(item.get("FailureReason", 0xC000))
            return status_class(code), f"STOW-RS failure reason 0x{code:04X}", True
    for item in answer.get("ReferencedSOPSequence", []):
        if item.get("ReferencedSOPInstanceUID") == sop_uid and item.get("WarningReason") is not None:
            return WARNING, f"stored with STOW-RS warning reason 0x{int(item.WarningReason):04X}", True
    return STORED, "", True


def check(target: DicomWebTarget, timeout: float) -> tuple[bool, str]:
    """What `cxr-node echo` says of a DICOMweb destination: a QIDO-RS query for one study."""
    try:
        client(target, timeout).search_for_studies(limit=1)
    except requests.HTTPError as error:
        return False, _http_reason(error.response).replace("STOW-RS", "QIDO-RS")
    except (requests.ConnectionError, requests.Timeout) as error:
        return False, f"QIDO-RS {_network_reason(error)}"
    return True, "QIDO-RS 200"
