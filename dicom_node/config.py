"""Typed settings from config/default.toml overlaid with a site file, validated at start-up."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

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
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    sr_only_with_seg: bool = False  # send an SR only once its SEG is stored there
    tls: OutboundTLS | None = None


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
    destinations: tuple[Destination, ...]
    retry_initial_seconds: float
    retry_max_seconds: float
    retention_days: float
    health_bind: str
    health_port: int
    log_level: str
    audit_log: Path
    audit_syslog: str
    queue_backend: str = "sqlite"
    queue_dsn: str = ""
    stalled_seconds: float = 30
    source: list = field(default_factory=list)


def _merge(base: dict, override: dict, prefix="") -> dict:
    merged = dict(base)
    for key, value in override.items():
        if key not in base and key != "destinations":
            raise ConfigError(f"unknown setting '{prefix}{key}'")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = _merge(base[key], value, f"{prefix}{key}.")
        else:
            merged[key] = value
    return merged


def _ae_title(value, key) -> str:
    if not isinstance(value, str) or not 0 < len(value.strip()) <= 16 or "\\" in value or not value.isascii():
        raise ConfigError(f"{key}: an AE title is 1-16 ASCII characters without backslash, got {value!r}")
    return value.strip()


def _number(section: dict, key: str, path: str, kind=int, minimum=0):
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"{path}.{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{path}.{key}: must be >= {minimum}, got {value}")
    return kind(value)


def _flag(section: dict, key: str, path: str) -> bool:
    if not isinstance(section[key], bool):
        raise ConfigError(f"{path}.{key}: expected true or false, got {section[key]!r}")
    return section[key]


def _pem_file(section: dict, key: str, path: str, base_dir: Path) -> Path | None:
    """The PEM file `section[key]` names (relative to base_dir), None when it names none."""
    if not section.get(key):
        return None
    file = (base_dir / section[key]).resolve()
    if not file.is_file():
        raise ConfigError(f"{path}.{key}: no such file {file}")
    return file


def _tls(section: dict, base_dir: Path) -> TLSSettings | None:
    if not section["enabled"]:
        return None
    require_client = bool(section["require_client_certificate"])

    def pem(key: str, needed: bool) -> Path | None:
        if needed and not section[key]:
            raise ConfigError(f"tls.{key}: a PEM file is needed when TLS is enabled"
                              + (" and client certificates are required" if key == "ca_certificates" else ""))
        return _pem_file(section, key, "tls", base_dir)
    return TLSSettings(pem("certificate", True), pem("private_key", True), pem("ca_certificates", require_client),
                       require_client)


def _syslog(value) -> str:
    """"" (off), or udp://host[:port] / tcp://host[:port] of a syslog collector."""
    if value == "":
        return ""
    parsed = urlparse(str(value))
    if parsed.scheme not in ("udp", "tcp") or not parsed.hostname:
        raise ConfigError(f"audit.syslog: udp://host:port or tcp://host:port of a syslog collector, got {value!r}")
    return str(value)


DESTINATION_KEYS = {"name", "ae_title", "host", "port", "sr_only_with_seg", "tls_ca_certificates",
                    "tls_certificate", "tls_private_key"}


def _queue(section: dict) -> tuple[str, str, float]:
    """(backend, dsn, stalled_seconds) of [queue]."""
    backend = section["backend"]
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(f'queue.backend: "sqlite" or "postgresql", got {backend!r}')
    dsn = str(section["dsn"])
    if backend == "postgresql" and not dsn:
        raise ConfigError('queue.dsn: needed with backend = "postgresql" (e.g. "postgresql://cxr@db.example/cxr")')
    return backend, dsn, _number(section, "stalled_seconds", "queue", float, 5)


def _destination(entry: dict, key: str, base_dir: Path) -> Destination:
    missing = {"name", "ae_title", "host", "port"} - set(entry)
    if missing:
        raise ConfigError(f"{key}: missing {', '.join(sorted(missing))}")
    unknown = set(entry) - DESTINATION_KEYS
    if unknown:
        raise ConfigError(f"unknown setting '{key}.{sorted(unknown)[0]}'")
    ca, certificate, private_key = (_pem_file(entry, name, key, base_dir)
                                    for name in ("tls_ca_certificates", "tls_certificate", "tls_private_key"))
    if (certificate is None) != (private_key is None):
        raise ConfigError(f"{key}: tls_certificate and tls_private_key go together")
    if certificate and not ca:
        raise ConfigError(f"{key}.tls_ca_certificates: needed for TLS (the CA that signs the destination's certificate)")
    return Destination(str(entry["name"]), _ae_title(entry["ae_title"], f"{key}.ae_title"), str(entry["host"]),
                       _number(entry, "port", key, minimum=1),
                       _flag({"sr_only_with_seg": False, **entry}, "sr_only_with_seg", key),
                       OutboundTLS(ca, certificate, private_key) if ca else None)


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
    node, storage, processing = raw["node"], raw["storage"], raw["processing"]
    port = _number(node, "port", "node", minimum=1)
    if port > 65535:
        raise ConfigError(f"node.port: must be <= 65535, got {port}")
    base_dir = Path(base_dir or Path.cwd())
    destinations = [_destination(entry, f"destinations[{index}]", base_dir)
                    for index, entry in enumerate(raw.get("destinations", []))]
    if len({d.name for d in destinations}) != len(destinations):
        raise ConfigError("destinations: names must be unique")
    tls = _tls(raw["tls"], base_dir)
    level = str(raw["logging"]["level"]).upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"logging.level: one of {', '.join(LOG_LEVELS)}, got {raw['logging']['level']!r}")
    state_dir = (base_dir / storage["state_dir"]).resolve()
    results_dir = (base_dir / storage["results_dir"]).resolve() if storage["results_dir"] else state_dir / "results"
    queue_backend, queue_dsn, stalled_seconds = _queue(raw["queue"])
    providers = processing["providers"]
    if not providers or not all(isinstance(p, str) for p in providers):
        raise ConfigError("processing.providers: a non-empty list of ONNX Runtime provider names")
    return Config(
        ae_title=_ae_title(node["ae_title"], "node.ae_title"), bind=str(node["bind"]), port=port,
        allowed_calling_aes=tuple(_ae_title(a, "node.allowed_calling_aes") for a in node["allowed_calling_aes"]),
        require_called_ae=bool(node["require_called_ae"]),
        max_associations=_number(node, "max_associations", "node", minimum=1),
        receiver_processes=_number(node, "receiver_processes", "node", minimum=1),
        network_timeout=_number(node, "network_timeout", "node", float, 1), tls=tls,
        state_dir=state_dir, results_dir=results_dir,
        min_free_mb=_number(storage, "min_free_mb", "storage"),
        stable_seconds=_number(processing, "stable_seconds", "processing", float),
        workers=_number(processing, "workers", "processing", minimum=1),
        batch_size=_number(processing, "batch_size", "processing", minimum=1),
        onnx_threads=_number(processing, "onnx_threads", "processing", minimum=1),
        providers=tuple(providers), secondary_capture=_flag(raw["outputs"], "secondary_capture", "outputs"),
        destinations=tuple(destinations),
        retry_initial_seconds=_number(raw["retry"], "initial_seconds", "retry", float, 0.1),
        retry_max_seconds=_number(raw["retry"], "max_seconds", "retry", float, 0.1),
        retention_days=_number(raw["retention"], "days", "retention", float),
        health_bind=str(raw["health"]["bind"]), health_port=_number(raw["health"], "port", "health"),
        log_level=level, audit_log=state_dir / raw["audit"]["file"], audit_syslog=_syslog(raw["audit"]["syslog"]),
        queue_backend=queue_backend, queue_dsn=queue_dsn, stalled_seconds=stalled_seconds, source=sources,
    )
