"""Real parts for integration tests: an Orthanc process, a cxr-node process, DCMTK senders."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie that its parent has not reaped yet counts as exited)."""
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then wait for the PID to exit (SIGKILL if it will not)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Orthanc:
    """Orthanc on loopback with its own database folder; the PACS the node sends to."""

    DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian orthanc-dicomweb

    def __init__(self, folder: Path, aet: str = "ORTHANC", dicom_port: int | None = None, dicomweb: bool = False,
                 tls: dict | None = None, query_retrieve: bool = False, users: dict | None = None,
                 dicomweb_servers: dict | None = None):
        """`tls`: {"certificate", "private_key", "trusted"} PEM paths: DICOM TLS only, client certificates
        from `trusted` required. `query_retrieve`: answer C-FIND and C-GET from any AE. `users`: {name:
        password} for HTTP basic authentication on its REST and DICOMweb API (the tests' own REST calls use
        the first). `dicomweb_servers`: {name: [url, user, password]} its STOW-RS client may send to."""
        self.folder, self.aet, self.dicomweb, self.tls = Path(folder), aet, dicomweb, tls
        self.query_retrieve, self.users, self.dicomweb_servers = query_retrieve, users or {}, dicomweb_servers or {}
        self.dicom_port, self.http_port = dicom_port or free_port(), free_port()
        self.process = None

    def start(self) -> "Orthanc":
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {"Name": "cxr-test", "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
                  "DicomAet": self.aet, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
                  "HttpBindAddress": "127.0.0.1", "DicomBindAddress": "127.0.0.1", "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True, "UnknownSopClassAccepted": True,
                  "Plugins": [self.DICOMWEB_PLUGIN] if self.dicomweb else [],
                  "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
                  "DicomAlwaysAllowFind": self.query_retrieve, "DicomAlwaysAllowGet": self.query_retrieve}
        if self.users:
            config.update({"AuthenticationEnabled": True, "RegisteredUsers": self.users})
        if self.dicomweb_servers:
            config["DicomWeb"]["Servers"] = self.dicomweb_servers
        if self.tls:
            config.update({"DicomTlsEnabled": True, "DicomTlsCertificate": self.tls["certificate"],
                           "DicomTlsPrivateKey": self.tls["private_key"],
                           "DicomTlsTrustedCertificates": self.tls["trusted"], "DicomTlsRemoteCertificateRequired": True})
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        self.process = subprocess.Popen(["Orthanc", str(self.folder / "orthanc.json")],
                                        stdout=open(self.folder / "orthanc.log", "ab"), stderr=subprocess.STDOUT)
        wait_for(self._answers, 30, what="Orthanc REST /system")
        return self

    def _answers(self) -> bool:
        try:
            return bool(self.get("/system"))
        except OSError:
            return False

    def stop(self) -> None:
        if self.process:
            stop_process(self.process)

    def request(self, path: str, data: bytes | None = None):
        """GET (or POST `data`) on its REST API, as its first user when it has users; JSON decoded."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data)
        if self.users:
            user, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def get(self, path: str):
        return self.request(path)

    def instances(self, modality: str | None = None) -> list[dict]:
        """Every instance with its tags, optionally only one modality."""
        found = []
        for series_id in self.get("/series"):
            series = self.get(f"/series/{series_id}")
            if modality and series["MainDicomTags"].get("Modality") != modality:
                continue
            for instance_id in series["Instances"]:
                found.append({"id": instance_id, "series": series,
                              "tags": self.get(f"/instances/{instance_id}/simplified-tags")})
        return found

    def file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file")


class Node:
    """cxr-node serve with a site configuration written for the test."""

    def __init__(self, folder: Path, destinations=(), role: str = "all", **settings):
        """`role`: serve --role; `settings`: {section: {key: value}} of the site file."""
        self.folder, self.role = Path(folder), role
        self.port, self.health_port = free_port(), free_port()
        self.settings = settings
        self.destinations = destinations
        self.process = None

    @property
    def config_path(self) -> Path:
        return self.folder / "node.toml"

    def write_config(self) -> None:
        node = {"port": self.port, "allowed_calling_aes": ["STORESCU", "DCMSEND"], **self.settings.get("node", {})}
        storage = {"state_dir": str(self.folder / "state"), "min_free_mb": 10, **self.settings.get("storage", {})}
        processing = {"stable_seconds": 0.5, **self.settings.get("processing", {})}
        lines = []
        for section, values in (("node", node), ("storage", storage), ("processing", processing),
                                ("retry", {"initial_seconds": 0.5, "max_seconds": 2}),
                                ("health", {"port": self.health_port}), ("tls", self.settings.get("tls", {})),
                                ("outputs", self.settings.get("outputs", {})), ("audit", self.settings.get("audit", {})),
                                ("queue", self.settings.get("queue", {})), ("priors", self.settings.get("priors", {}))):
            lines.append(f"[{section}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        for name, orthanc, *options in self.destinations:  # options: {key: value} of the destination
            options = options[0] if options else {}
            lines += ["[[destinations]]", f'name = "{name}"']
            if "url" not in options:  # a DIMSE destination (a DICOMweb one has a url instead)
                lines += [f'ae_title = "{orthanc.aet}"', 'host = "127.0.0.1"', f"port = {orthanc.dicom_port}"]
            lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> "Node":
        self.write_config()
        self.log_path = self.folder / "node.log"
        offset = len(self.log())  # a restart appends to the same log
        self.process = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--role", self.role,
                                         "--config", str(self.config_path)],
                                        cwd=REPO, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        wait_for(lambda: self._ready(offset) or self.process.poll() is not None, 120, what="node ready")
        assert self.process.poll() is None, self.log()[-3000:]
        return self

    def _ready(self, offset: int) -> bool:
        """The process started (not one of the extra receiver processes an `all` starts) said it is ready."""
        return any('"event": "ready"' in line and f'"role": "{self.role}"' in line
                   for line in self.log()[offset:].splitlines())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process:
            stop_process(self.process, 90)

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or closed."""
        self.process.kill()
        self.process.wait()

    def peak_rss_mb(self) -> float:
        """High-water mark of the node's resident memory (VmHWM), while it runs."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024

    def _read_queue(self, sql: str, args=()) -> list[sqlite3.Row]:
        """Rows read straight from the node's SQLite queue (fast; works while the node is down)."""
        db = sqlite3.connect(f"file:{self.folder / 'state' / 'queue.sqlite3'}?mode=ro", uri=True, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def instance(self, sop_uid: str) -> dict | None:
        rows = self._read_queue("SELECT * FROM instances WHERE sop_uid = ?", (sop_uid,))
        return dict(rows[0]) if rows else None

    def queue_counts(self) -> dict:
        """{'instances.<state>': n, 'results.<state>': n} for the states that occur."""
        return {f"{table}.{row['state']}": row["n"] for table in ("instances", "results")
                for row in self._read_queue(f"SELECT state, COUNT(*) n FROM {table} GROUP BY state")}

    def cli(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args, "--config", str(self.config_path)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    def status(self, uid: str | None = None) -> dict:
        result = self.cli("status", *(["--uid", uid] if uid else []))
        return json.loads(result.stdout)

    def idle(self) -> bool:
        """Nothing left to do: no instance waiting or running, no result pending."""
        counts = self.status()
        return (counts["instances"]["received"] + counts["instances"]["queued"] + counts["instances"]["processing"]
                + counts["results"]["pending"]) == 0

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/metrics", timeout=10) as response:
            return response.read().decode()


def dcmsend(port: int, files, calling_aet: str = "DCMSEND", called_aet: str = "CXR_NODE") -> subprocess.CompletedProcess:
    """Push files with DCMTK dcmsend (TCP_NODELAY avoids 40 ms delayed-ACK stalls per instance)."""
    return subprocess.run(["dcmsend", "-aet", calling_aet, "-aec", called_aet, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TCP_NODELAY": "1"})


def dcmsend_report(port: int, files, report: Path, calling_aet: str = "DCMSEND") -> dict[str, str]:
    """Push files with dcmsend and return {SOP Instance UID: DIMSE status} from its report file
    ("0x0000" for success); files that were never answered are missing."""
    subprocess.run(["dcmsend", "-aet", calling_aet, "-aec", "CXR_NODE", "--create-report-file", str(report),
                    "127.0.0.1", str(port), *map(str, files)], capture_output=True, text=True, timeout=600,
                   env={**os.environ, "TCP_NODELAY": "1"})
    statuses, uid = {}, None
    for line in report.read_text(errors="replace").splitlines() if report.exists() else []:
        if line.startswith("SOP Instance"):
            uid = line.split(":", 1)[1].strip()
        elif line.startswith("DIMSE Status") and uid:
            statuses[uid] = (line.split(":", 1)[1].split() or [""])[0]
    return statuses


def storescu(port: int, files, calling_aet: str = "STORESCU", called_aet: str = "CXR_NODE",
             *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-v", "-R", "-aet", calling_aet, "-aec", called_aet, *extra, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TCP_NODELAY": "1"})


def chest_copies(sources, count: int, folder: Path, per_study: int = 4, size: int | None = None) -> list[Path]:
    """`count` new instances made from real radiographs: new SOP, series and study UIDs (`per_study`
    images per study), optionally resized to `size` pixels square and stored uncompressed."""
    import cv2
    import pydicom
    folder.mkdir(parents=True, exist_ok=True)
    datasets = [pydicom.dcmread(path) for path in sources]
    if size:
        for ds in datasets:
            pixels = cv2.resize(ds.pixel_array, (size, size), interpolation=cv2.INTER_AREA)
            ds.PixelData, ds.Rows, ds.Columns = pixels.tobytes(), size, size
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    files = []
    for index in range(count):
        ds = datasets[index % len(datasets)]
        if index % per_study == 0:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        files.append(folder / f"{index:04d}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    return files


class PostgreSQL:
    """Debian's PostgreSQL as a plain process: initdb and pg_ctl as the `postgres` user (when run as
    root) in a temporary folder, listening on 127.0.0.1 at a free port, stopped by its PID."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.data = self.folder / "data"
        self.port = free_port()
        self.bin = Path(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))[-1]).parent
        self.as_postgres = os.geteuid() == 0  # PostgreSQL refuses to run as root

    def _run(self, *command: str, **options) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        return subprocess.run([*prefix, *command], capture_output=True, text=True, check=True, **options)

    def start(self) -> "PostgreSQL":
        if not self.data.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.as_postgres:
                shutil.chown(self.folder, "postgres", "postgres")
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "postgres.log"), "-w",
                  # authentication_timeout: a shutdown waits that long for a client that opened a connection
                  # and has not yet sent its startup packet (a pool reconnecting at that moment); 60 s by default
                  "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c authentication_timeout=10",
                  "start", timeout=60)
        return self

    @property
    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster: sessions are ended, nothing committed is lost)."""
        pid = self.pid
        os.kill(pid, signal.SIGINT)
        wait_for(lambda: process_gone(pid), 60, what="PostgreSQL to stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        self._run(str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-q",
                  "-c", f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def query(self, database: str, sql: str) -> list[list[str]]:
        """Rows of `sql` as text (psql -At), for tests that look into the database directly."""
        out = self._run(str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d",
                        database, "-At", "-F", "\t", "-c", sql).stdout
        return [line.split("\t") for line in out.splitlines()]
