"""Typed settings from config/default.toml overlaid with a site file, validated at start-up (pydantic)."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

# config/default.toml, reached through a link inside the package so that a built wheel carries it too.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "default.toml"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A setting is missing, mistyped or out of range; the message names the key."""


@dataclass(frozen=True)
class OutboundTLS:
    """DICOM TLS to one destination: its server certificate is checked against `ca_certificates`
    (and its host name); this node's certificate is offered when the destination asks for one."""
    ca_certificates: Path
    certificate: Path | None
    private_key: Path | None


@dataclass(frozen=True)
class DicomWebTarget:
    """A DICOMweb (STOW-RS) destination: its base URL and credentials, read from their files at start-up
    (never printed: repr=False)."""
    url: str
    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    ca_certificates: Path | None = None


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    sr_only_with_seg: bool = False  # send an SR only once its SEG is stored there
    tls: OutboundTLS | None = None
    dicomweb: DicomWebTarget | None = None  # set: a STOW-RS destination (ae_title, host, port unused)


@dataclass(frozen=True)
class DicomWebEndpoint:
    """The STOW-RS endpoint ([dicomweb]); port 0: off. Users {name: password} and bearer tokens, from their
    files; TLS from PEM files."""
    bind: str
    port: int
    users: dict = field(default_factory=dict, repr=False)
    tokens: frozenset = field(default_factory=frozenset, repr=False)
    certificate: Path | None = None
    private_key: Path | None = None
    max_request_bytes: int = 256 * 2**20


@dataclass(frozen=True)
class TLSSettings:
    certificate: Path
    private_key: Path
    ca_certificates: Path | None
    require_client_certificate: bool


@dataclass(frozen=True)
class Config:
    ae_title: str
    bind: str
    port: int
    allowed_calling_aes: tuple[str, ...]
    require_called_ae: bool
    max_associations: int
    receiver_processes: int
    network_timeout: float
    tls: TLSSettings | None
    state_dir: Path
    results_dir: Path
    min_free_mb: int
    stable_seconds: float
    workers: int
    batch_size: int
    onnx_threads: int
    providers: tuple[str, ...]
    secondary_capture: bool
    presentation_state: bool
    destinations: tuple[Destination, ...]
    retry_initial_seconds: float
    retry_max_seconds: float
    retention_days: float
    history_days: float
    history_key_file: Path
    health_bind: str
    health_port: int
    log_level: str
    audit_log: Path
    audit_syslog: str
    queue_backend: str = "sqlite"
    queue_dsn: str = ""
    liveness_seconds: float = 60
    max_attempts: int = 3
    dicomweb: DicomWebEndpoint | None = None
    priors_pacs: str = ""  # the destination asked for this node's earlier SRs of a patient ("": none)
    priors_lookback_days: float = 400
    priors_max_studies: int = 3
    source: list = field(default_factory=list)

    @property
    def stalled_seconds(self) -> float:
        """With PostgreSQL: a worker whose procrastinate heartbeat is older than this is dead, its job runs
        again elsewhere. Half the liveness period: that worker is already `late` in `status`."""
        return self.liveness_seconds / 2


# Settings that were removed, and what replaced them: named in the error instead of "unknown setting".
REMOVED = {"queue.stalled_seconds": "removed: a worker silent for processing.liveness_seconds / 2 is dead "
                                    "(set processing.liveness_seconds to twice the old value instead)"}


# The site file's shape, checked by pydantic in strict mode: a string where a boolean or a number belongs
# ("no", "30") is refused rather than converted, and so is a key no section has.
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _ae_title(value: str) -> str:
    if not 0 < len(value.strip()) <= 16 or "\\" in value or not value.isascii():
        raise ValueError(f"an AE title is 1-16 ASCII characters without backslash, got {value!r}")
    return value.strip()


def _syslog(value: str) -> str:
    """"" (off), or udp://host[:port] / tcp://host[:port] of a syslog collector."""
    parsed = urlparse(value)
    if value and (parsed.scheme not in ("udp", "tcp") or not parsed.hostname):
        raise ValueError(f"udp://host:port or tcp://host:port of a syslog collector, got {value!r}")
    return value


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise ValueError(f"one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.upper()


AETitle = Annotated[str, AfterValidator(_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Node(_Section):
    ae_title: AETitle
    bind: str
    port: Port
    allowed_calling_aes: list[AETitle]
    require_called_ae: bool
    max_associations: int = Field(ge=1)
    network_timeout: float = Field(ge=1)
    receiver_processes: int = Field(ge=1)


class _TLS(_Section):
    enabled: bool
    certificate: str
    private_key: str
    ca_certificates: str
    require_client_certificate: bool


class _Storage(_Section):
    state_dir: str
    results_dir: str
    min_free_mb: int = Field(ge=0)


class _Queue(_Section):
    backend: Literal["sqlite", "postgresql"]
    dsn: str


class _Processing(_Section):
    stable_seconds: float = Field(ge=0)
    workers: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    onnx_threads: int = Field(ge=1)
    providers: list[str] = Field(min_length=1)
    liveness_seconds: float = Field(ge=10)  # procrastinate's heartbeat: every liveness_seconds / 6
    max_attempts: int = Field(ge=1)


class _Outputs(_Section):
    secondary_capture: bool
    presentation_state: bool


class _Priors(_Section):
    pacs: str
    lookback_days: float = Field(gt=0)
    max_studies: int = Field(ge=1, le=20)


class _Retry(_Section):
    initial_seconds: float = Field(ge=0.1)
    max_seconds: float = Field(ge=0.1)


class _Retention(_Section):
    days: float = Field(ge=0)
    history_days: float = Field(ge=0)
    history_key_file: str


class _Health(_Section):
    bind: str
    port: int = Field(ge=0, le=65535)


class _Audit(_Section):
    file: str
    syslog: Annotated[str, AfterValidator(_syslog)]


class _Logging(_Section):
    level: Annotated[str, AfterValidator(_log_level)]


class _Destination(_Section):
    name: str
    ae_title: AETitle | None = None  # DIMSE (C-STORE): ae_title, host and port
    host: str = ""
    port: Port | None = None
    url: str = ""                    # DICOMweb (STOW-RS): the base URL, e.g. https://pacs.example/dicom-web
    username: str = ""
    password_file: str = ""
    token_file: str = ""
    sr_only_with_seg: bool = False
    tls_ca_certificates: str = ""
    tls_certificate: str = ""
    tls_private_key: str = ""


class _DicomWeb(_Section):
    bind: str
    port: int = Field(ge=0, le=65535)
    users_file: str
    tokens_file: str
    tls_certificate: str
    tls_private_key: str
    max_request_mb: int = Field(ge=1, le=4096)


class _Settings(_Section):
    """config/default.toml overlaid with the site file, as read."""
    node: _Node
    tls: _TLS
    storage: _Storage
    queue: _Queue
    processing: _Processing
    outputs: _Outputs
    destinations: list[_Destination] = []
    priors: _Priors
    dicomweb: _DicomWeb
    retry: _Retry
    retention: _Retention
    health: _Health
    audit: _Audit
    logging: _Logging


def _where(location: tuple) -> str:
    """('destinations', 0, 'port') -> 'destinations[0].port'."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")


def _explain(error: ValidationError) -> str:
    """Every problem, each named by its key, on one line."""
    lines = []
    for problem in error.errors(include_url=False):
        key = _where(problem["loc"])
        if problem["type"] == "extra_forbidden":
            lines.append(f"{key}: {REMOVED[key]}" if key in REMOVED else f"unknown setting '{key}'")
        elif problem["type"] == "missing":
            lines.append(f"{key}: missing")
        else:
            message = problem["msg"].removeprefix("Value error, ")
            got = "" if "got " in message else f", got {problem['input']!r}"
            lines.append(f"{key}: {message}{got}")
    return "; ".join(lines)


def _merge(base: dict, override: dict) -> dict:
    """The site file's values over the defaults, section by section."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _pem_file(value: str, key: str, base_dir: Path) -> Path | None:
    """The PEM file `value` names (relative to base_dir), None when it names none."""
    if not value:
        return None
    file = (base_dir / value).resolve()
    if not file.is_file():
        raise ConfigError(f"{key}: no such file {file}")
    return file


def _tls(section: _TLS, base_dir: Path) -> TLSSettings | None:
    if not section.enabled:
        return None

    def pem(key: str, needed: bool) -> Path | None:
        if needed and not getattr(section, key):
            raise ConfigError(f"tls.{key}: a PEM file is needed when TLS is enabled"
                              + (" and client certificates are required" if key == "ca_certificates" else ""))
        return _pem_file(getattr(section, key), f"tls.{key}", base_dir)
    return TLSSettings(pem("certificate", True), pem("private_key", True),
                       pem("ca_certificates", section.require_client_certificate), section.require_client_certificate)


def _secret(value: str, key: str, base_dir: Path) -> str:
    """The first line of the file `value` names ("" when it names none)."""
    if not value:
        return ""
    try:
        return (base_dir / value).read_text().strip().splitlines()[0]
    except (OSError, IndexError) as error:
        raise ConfigError(f"{key}: cannot read {base_dir / value}: {getattr(error, 'strerror', None) or 'empty file'}") \
            from None


def _destination(entry: _Destination, key: str, base_dir: Path) -> Destination:
    ca, certificate, private_key = (_pem_file(getattr(entry, name), f"{key}.{name}", base_dir)
                                    for name in ("tls_ca_certificates", "tls_certificate", "tls_private_key"))
    if entry.url:
        if entry.ae_title or entry.host or entry.port:
            raise ConfigError(f"{key}: either url (DICOMweb) or ae_title, host and port (DIMSE), not both")
        if urlparse(entry.url).scheme not in ("http", "https") or not urlparse(entry.url).netloc:
            raise ConfigError(f"{key}.url: an http(s) URL is needed, got {entry.url!r}")
        if urlparse(entry.url).username or urlparse(entry.url).password:
            raise ConfigError(f"{key}.url: no user or password in the URL (they would be printed and audited); "
                              "use username and password_file")
        if entry.password_file and not entry.username:
            raise ConfigError(f"{key}.password_file: goes with username")
        if entry.username and entry.token_file:
            raise ConfigError(f"{key}: username and token_file exclude each other (basic or bearer)")
        target = DicomWebTarget(entry.url.rstrip("/"), entry.username,
                                _secret(entry.password_file, f"{key}.password_file", base_dir),
                                _secret(entry.token_file, f"{key}.token_file", base_dir), ca)
        return Destination(entry.name, "", "", 0, entry.sr_only_with_seg, dicomweb=target)
    if not (entry.ae_title and entry.host and entry.port):
        raise ConfigError(f"{key}: ae_title, host and port are needed (or url for a DICOMweb destination)")
    if (certificate is None) != (private_key is None):
        raise ConfigError(f"{key}: tls_certificate and tls_private_key go together")
    if certificate and not ca:
        raise ConfigError(f"{key}.tls_ca_certificates: needed for TLS (the CA that signs the destination's certificate)")
    return Destination(entry.name, entry.ae_title, entry.host, entry.port, entry.sr_only_with_seg,
                       OutboundTLS(ca, certificate, private_key) if ca else None)


def _dicomweb(section: _DicomWeb, base_dir: Path) -> DicomWebEndpoint | None:
    """The STOW-RS endpoint, or None (port 0). Users: `name:password` lines; tokens: one per line. Off the
    loopback interface it needs TLS and at least one user or token."""
    if not section.port:
        return None
    def lines(value: str, key: str) -> list[str]:
        try:
            return [line.strip() for line in (base_dir / value).read_text().splitlines() if line.strip()] if value else []
        except OSError as error:
            raise ConfigError(f"dicomweb.{key}: cannot read {base_dir / value}: {error.strerror}") from None
    users = dict(line.split(":", 1) for line in lines(section.users_file, "users_file") if ":" in line)
    tokens = frozenset(lines(section.tokens_file, "tokens_file"))
    certificate = _pem_file(section.tls_certificate, "dicomweb.tls_certificate", base_dir)
    private_key = _pem_file(section.tls_private_key, "dicomweb.tls_private_key", base_dir)
    if (certificate is None) != (private_key is None):
        raise ConfigError("dicomweb: tls_certificate and tls_private_key go together")
    if section.bind not in ("127.0.0.1", "::1", "localhost") and not (certificate and (users or tokens)):
        raise ConfigError(f"dicomweb.bind: {section.bind} is not loopback: TLS (tls_certificate, tls_private_key) "
                          "and authentication (users_file or tokens_file) are needed")
    return DicomWebEndpoint(section.bind, section.port, users, tokens, certificate, private_key,
                            section.max_request_mb * 2**20)


def load_config(path: Path | None = None, base_dir: Path | None = None) -> Config:
    """Defaults, then the site file at `path`. Relative folders resolve against `base_dir`
    (the current directory by default)."""
    raw = tomllib.loads(DEFAULT_CONFIG.read_text())
    sources = [str(DEFAULT_CONFIG)]
    if path is not None:
        try:
            raw = _merge(raw, tomllib.loads(Path(path).read_text()))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from error
        except OSError as error:
            raise ConfigError(f"cannot read configuration {path}: {error.strerror}") from error
        sources.append(str(path))
    try:
        settings = _Settings.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_explain(error)) from None
    node, storage, processing, queue = settings.node, settings.storage, settings.processing, settings.queue
    if queue.backend == "postgresql" and not queue.dsn:
        raise ConfigError('queue.dsn: needed with backend = "postgresql" (e.g. "postgresql://cxr@db.example/cxr")')
    base_dir = Path(base_dir or Path.cwd())
    destinations = [_destination(entry, f"destinations[{index}]", base_dir)
                    for index, entry in enumerate(settings.destinations)]
    if len({d.name for d in destinations}) != len(destinations):
        raise ConfigError("destinations: names must be unique")
    if settings.priors.pacs and settings.priors.pacs not in {d.name for d in destinations if not d.dicomweb}:
        raise ConfigError(f"priors.pacs: no DIMSE destination named {settings.priors.pacs!r}")
    state_dir = (base_dir / storage.state_dir).resolve()
    return Config(
        ae_title=node.ae_title, bind=node.bind, port=node.port, allowed_calling_aes=tuple(node.allowed_calling_aes),
        require_called_ae=node.require_called_ae, max_associations=node.max_associations,
        receiver_processes=node.receiver_processes, network_timeout=node.network_timeout,
        tls=_tls(settings.tls, base_dir), state_dir=state_dir,
        results_dir=(base_dir / storage.results_dir).resolve() if storage.results_dir else state_dir / "results",
        min_free_mb=storage.min_free_mb, stable_seconds=processing.stable_seconds, workers=processing.workers,
        batch_size=processing.batch_size, onnx_threads=processing.onnx_threads,
        liveness_seconds=processing.liveness_seconds, max_attempts=processing.max_attempts,
        providers=tuple(processing.providers), secondary_capture=settings.outputs.secondary_capture,
        presentation_state=settings.outputs.presentation_state,
        destinations=tuple(destinations), retry_initial_seconds=settings.retry.initial_seconds,
        retry_max_seconds=settings.retry.max_seconds, retention_days=settings.retention.days,
        history_days=settings.retention.history_days,
        history_key_file=(base_dir / settings.retention.history_key_file).resolve() if settings.retention.history_key_file
        else state_dir / "history.key",
        health_bind=settings.health.bind, health_port=settings.health.port, log_level=settings.logging.level,
        audit_log=state_dir / settings.audit.file, audit_syslog=settings.audit.syslog,
        queue_backend=queue.backend, queue_dsn=queue.dsn,
        dicomweb=_dicomweb(settings.dicomweb, base_dir), priors_pacs=settings.priors.pacs, priors_lookback_days=settings.priors.lookback_days,
        priors_max_studies=settings.priors.max_studies, source=sources,
    )
