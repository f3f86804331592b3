"""STOW-RS origin server (PS3.18 10.5 Store Transaction): POST /dicom-web/studies and /dicom-web/studies/{study}
with a multipart/related; type="application/dicom" body, one PS3.10 file per part.

Every part goes through the C-STORE path's checks and durable accept (`Receiver.store`), so an instance
counts as stored only once its bytes and queue row are committed; the HTTP answer is sent after the last
part. Served by uvicorn (Starlette) in a thread of each receiving process on `[dicomweb] port`; HTTPS
with the TLS files, HTTP basic or bearer authentication when users or tokens are configured."""
from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import errno
import hmac
import json
import socket
import ssl
import tempfile
import threading
import warnings
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pydicom
import uvicorn
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_file_meta_info
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from dicom_node.audit import AuditTrail
from dicom_node.config import Config, ConfigError
from dicom_node.logs import log
from dicom_node.metrics import RECEIVED
from dicom_node.receiver import (CANNOT_UNDERSTAND, OUT_OF_RESOURCES, STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES,
                                 Receiver)

BASE = "/dicom-web"
DICOM_JSON = "application/dicom+json"
UNDEFINED_LENGTH = 0xFFFFFFFF
SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.18 Table I.2-2 failure reasons, besides the C-STORE statuses
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122


@dataclass(frozen=True)
class PartResult:
    sop_class: str
    uid: str
    status: int  # 0x0000 stored (or already held), else the Failure Reason (0008,1197)


class UnsupportedMediaType(Exception):
    """415: the request's media type is not multipart/related of application/dicom."""


class BadRequest(Exception):
    """400: the body cannot be parsed as the multipart/related it says it is."""


def dicom_parts(content_type: str, body: bytes) -> list[EmailMessage]:
    """The parts of a multipart/related body, parsed by Python's `email` package (RFC 2046, RFC 2387)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if message.get_content_type() != "multipart/related":
        raise UnsupportedMediaType(f"{message.get_content_type()} is not multipart/related")
    if (message.get_param("type") or "application/dicom").lower() != "application/dicom":
        raise UnsupportedMediaType(f"parts of type {message.get_param('type')}: only application/dicom is stored")
    if not message.is_multipart() or message.defects:  # no boundary, none found, or the closing one missing
        raise BadRequest(f"the body is not multipart/related: {', '.join(type(d).__name__ for d in message.defects)}")
    parts = list(message.iter_parts())
    if not parts:
        raise BadRequest("the body holds no parts")
    return parts


def file_meta(path: Path) -> pydicom.dataset.FileMetaDataset | None:
    """The PS3.10 file meta information (preamble, "DICM", group 0002), None when the file has none."""
    try:
        return read_file_meta_info(path)
    except Exception:  # pydicom raises various types for what is not a PS3.10 file
        return None


def cut_off(path: Path) -> str | None:
    """What shows a PS3.10 file to be cut short (an element shorter than its length, an encapsulated
    Pixel Data without its end), None when it is whole. C-STORE gets whole data sets from its PDUs; an
    HTTP part can end anywhere, and a cut copy accepted would shadow the whole one sent after it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
        except Exception as error:  # pydicom raises various types for broken streams
            return f"cannot be read: {str(error)[:120]}"
    if any("End of file reached" in str(warning.message) for warning in caught):
        return "the file ends before its last element does"
    for tag in list(ds.keys()):
        raw = ds._dict[tag]  # still as read: value and stated length side by side
        if isinstance(raw, RawDataElement) and raw.length != UNDEFINED_LENGTH and raw.value is not None \
                and len(raw.value) < raw.length:
            return f"element {tag} holds {len(raw.value)} of its {raw.length} bytes"
    return None


def store_answer(results: list[PartResult]) -> tuple[int, dict]:
    """The HTTP status and the Store Instances Response Module (PS3.18 Annex I) as DICOM JSON."""
    answer = pydicom.Dataset()
    stored = [result for result in results if result.status == 0x0000]
    failed = [result for result in results if result.status != 0x0000]

    def reference(result: PartResult) -> pydicom.Dataset:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = result.sop_class, result.uid
        if result.status:
            item.FailureReason = result.status
        return item
    if stored:
        answer.ReferencedSOPSequence = [reference(result) for result in stored]
    if failed:
        answer.FailedSOPSequence = [reference(result) for result in failed]
    return (200 if not failed else 202 if stored else 409), answer.to_json_dict()


class StowServer:
    def __init__(self, config: Config, receiver: Receiver, audit: AuditTrail | None = None):
        self.config, self.endpoint, self.receiver, self.audit = config, config.dicomweb, receiver, audit
        self.server = self.thread = None
        routes = [Route(f"{BASE}/studies", self.store_instances, methods=["POST"]),
                  Route(f"{BASE}/studies/{{study}}", self.store_instances, methods=["POST"])]
        self.app = Starlette(routes=routes)

    # ------------------------------------------------------------ requests
    async def store_instances(self, request: Request) -> Response:
        address = request.client.host if request.client else ""
        user = self._authenticate(request.headers.get("authorization", ""))
        if self.audit and (self.endpoint.users or self.endpoint.tokens):  # audit writes block: not on the event loop
            await run_in_threadpool(self.audit.association, user or "unknown", address, user is not None,
                                    "" if user is not None else "STOW-RS request without valid credentials")
        if user is None:
            log("STOW-RS request refused: no valid credentials", 30, address=address)
            async for _ in request.stream():  # read and drop the body: a client still sending it would see a reset
                pass
            return PlainTextResponse("authentication required\n", 401, headers=self._challenge())
        limit, declared = self.endpoint.max_request_bytes, request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refused before a byte of it is read
            return self._too_large(address, int(declared))
        chunks, size = [], 0
        try:
            async for chunk in request.stream():  # chunked, or longer than it said: counted as it arrives
                size += len(chunk)
                if size > limit:
                    return self._too_large(address, size)
                chunks.append(chunk)
        except ClientDisconnect:  # the sender gave up mid-upload: nothing of it is kept, nobody to answer
            log("STOW-RS request ended by the client before its body was complete", 30, address=address)
            return Response(status_code=400)
        body = b"".join(chunks)
        source = f"STOW-RS:{user}" if user else "STOW-RS"
        study = request.path_params.get("study", "")
        try:
            results = await run_in_threadpool(self._store_body, request.headers.get("content-type", ""), body,
                                              study, source, address)
        except UnsupportedMediaType as error:
            return PlainTextResponse(f"{error}\n", 415)
        except BadRequest as error:
            return PlainTextResponse(f"{error}\n", 400)
        status, answer = store_answer(results)
        return Response(json.dumps(answer), status, media_type=DICOM_JSON)

    def _too_large(self, address: str, size: int) -> Response:
        mb = self.endpoint.max_request_bytes // 2**20
        log("STOW-RS request refused: larger than dicomweb.max_request_mb", 30, address=address,
            bytes_at_least=size, max_request_mb=mb)
        return PlainTextResponse(f"request larger than {mb} MB (dicomweb.max_request_mb): send fewer instances "
                                 "per request\n", 413)

    def _authenticate(self, authorization: str) -> str | None:
        """The user's name ("" where no users or tokens are configured: loopback only), None when refused."""
        users, tokens = self.endpoint.users, self.endpoint.tokens
        if not users and not tokens:
            return ""
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "basic" and users:
            try:
                name, _, password = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            # compare_digest: the time taken does not tell how much of a password was right
            return name if name in users and hmac.compare_digest(users[name].encode(), password.encode()) else None
        if scheme.lower() == "bearer" and tokens:
            given = credentials.strip().encode()
            return "bearer token" if any(hmac.compare_digest(token.encode(), given) for token in tokens) else None
        return None

    def _challenge(self) -> dict:
        schemes = (["Basic"] if self.endpoint.users else []) + (["Bearer"] if self.endpoint.tokens else [])
        return {"WWW-Authenticate": ", ".join(f'{scheme} realm="cxr-node"' for scheme in schemes)}

    def _store_body(self, content_type: str, body: bytes, study: str, source: str, address: str) -> list[PartResult]:
        return [self._store_part(part, study, source, address) for part in dicom_parts(content_type, body)]

    def _store_part(self, part: EmailMessage, study: str, source: str, address: str) -> PartResult:
        sop_class, uid, (status, header, outcome) = self._receive(part, study, source)
        if self.audit:
            self.audit.instance_received(source, address, header, sop_class, uid, status == 0x0000, outcome)
        return PartResult(sop_class, uid, status)

    def _receive(self, part: EmailMessage, study: str, source: str) -> tuple[str, str, tuple[int, object, str]]:
        """(SOP Class UID, SOP Instance UID, what `Receiver.store` answers) for one part. The part's PS3.10
        file meta information plays the C-STORE request's role; what C-STORE settles at association
        (a storage SOP class, a transfer syntax the node reads) is checked here."""
        if part.get_content_type() != "application/dicom":
            return "", "", self._refused("invalid", CANNOT_UNDERSTAND, f"a part of type {part.get_content_type()}", source)
        try:
            received = self._write_incoming(part.get_payload(decode=True) or b"")
        except OSError as error:  # the disk filled up
            return "", "", self._refused("out_of_resources", OUT_OF_RESOURCES, "spool write failed", source,
                                         error=error.strerror)
        try:
            meta = file_meta(received)
            if meta is None:
                return "", "", self._refused("invalid", CANNOT_UNDERSTAND, "not a DICOM PS3.10 file", source)
            sop_class, uid = str(meta.get("MediaStorageSOPClassUID", "")), str(meta.get("MediaStorageSOPInstanceUID", ""))
            transfer_syntax = str(meta.get("TransferSyntaxUID", ""))
            if sop_class not in STORAGE_SOP_CLASSES:
                return sop_class, uid, self._refused("invalid", SOP_CLASS_NOT_SUPPORTED,
                                                     "SOP class not supported (not a storage SOP class)", source, uid)
            if transfer_syntax not in TRANSFER_SYNTAXES:
                return sop_class, uid, self._refused("invalid", TRANSFER_SYNTAX_NOT_SUPPORTED,
                                                     f"transfer syntax {transfer_syntax[:64]} not supported", source, uid)
            if short := cut_off(received):
                return sop_class, uid, self._refused("invalid", CANNOT_UNDERSTAND, f"the file is cut off: {short}",
                                                     source, uid)
            return sop_class, uid, self.receiver.store(received, sop_class, uid, source, study)
        finally:
            received.unlink(missing_ok=True)  # an accepted file was moved into the spool or the database already

    @staticmethod
    def _refused(outcome: str, status: int, reason: str, source: str, uid: str = "", **fields) -> tuple[int, None, str]:
        """Counted and logged as `Receiver.store` does its refusals."""
        RECEIVED.labels(outcome).inc()
        log("refused: " + reason, 40 if outcome == "out_of_resources" else 30, uid=uid[:80], calling_ae=source,
            status=f"0x{status:04X}", **fields)
        return status, None, "refused: " + reason

    def _write_incoming(self, data: bytes) -> Path:
        """The part's bytes in the spool's incoming folder, as pynetdicom leaves a C-STORE data set there."""
        file = tempfile.NamedTemporaryFile(dir=self.receiver.spool.incoming, suffix=".dcm", delete=False)
        try:
            with file:
                file.write(data)
        except OSError:
            Path(file.name).unlink(missing_ok=True)  # a part written in part is no part
            raise
        return Path(file.name)

    # ------------------------------------------------------------ server thread
    def start(self) -> None:
        """Bind now, so that a port in use ends the start-up (exit 2); serve in a thread."""
        endpoint = self.endpoint
        # log_config None: uvicorn's warnings go through the node's JSON logging; no access log
        settings = uvicorn.Config(self.app, loop="asyncio", lifespan="off", log_config=None, log_level="warning",
                                  access_log=False, server_header=False, ssl_certfile=endpoint.certificate,
                                  ssl_keyfile=endpoint.private_key,
                                  timeout_graceful_shutdown=int(self.config.network_timeout))
        try:
            settings.load()
        except (ssl.SSLError, OSError) as error:
            raise ConfigError(f"dicomweb.tls_certificate / tls_private_key: cannot be used: {error}") from None
        sock = socket.socket(socket.AF_INET6 if ":" in endpoint.bind else socket.AF_INET)
        if self.config.receiver_processes > 1:  # the receiver processes share this port as they share node.port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((endpoint.bind, endpoint.port))
        except OSError as error:
            sock.close()
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(f"dicomweb.port: {endpoint.bind}:{endpoint.port} is already in use by another "
                                  "process") from None
            raise
        self.server = uvicorn.Server(settings)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="stow-rs", daemon=True)
        self.thread.start()
        log("STOW-RS endpoint listening", bind=endpoint.bind, port=endpoint.port, tls=bool(endpoint.certificate),
            authentication=bool(endpoint.users or endpoint.tokens))

    def check(self) -> None:
        """Raises when the serving thread has ended: nothing is received over DICOMweb any more."""
        if not self.thread.is_alive():
            raise RuntimeError("the STOW-RS server's thread has ended")

    def stop(self) -> None:
        """Stop accepting; requests in progress finish (their instances committed and answered) first."""
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(self.config.network_timeout + 5)
