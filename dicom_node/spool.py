"""Durable files: write to a temporary name, fsync, rename, fsync the folder.

After `write` or `commit` returns, the file survives a crash or power loss with its full content;
a crash before that leaves only a temporary file, which `clean_temporary` removes at start-up.
Incoming C-STORE data sets stream into `incoming/` (same file system) and are renamed into
`inputs/` once accepted, so received bytes are written once and never copied.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

SAFE_NAME = re.compile(r"^[0-9A-Za-z._-]{1,128}$")


class Spool:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.inputs = self.root / "inputs"
        self.results = self.root / "results-spool"
        for folder in (self.incoming, self.inputs, self.results):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    @staticmethod
    def file_name(uid: str, kind: str | None = None) -> str:
        """`<uid>.dcm`, or `<kind>_<uid>.dcm` for a result (SEG, SR, SC) so a person listing the
        folder sees what each file is."""
        if not SAFE_NAME.match(uid):
            raise ValueError(f"not a usable UID for a file name: {uid!r}")
        return f"{kind}_{uid}.dcm" if kind else f"{uid}.dcm"

    def input_path(self, sop_uid: str) -> Path:
        return self.inputs / self.file_name(sop_uid)

    def result_path(self, sop_uid: str, kind: str) -> Path:
        return self.results / self.file_name(sop_uid, kind)

    @staticmethod
    def write(path: Path, data: bytes) -> Path:
        temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
        finally:
            os.close(descriptor)
        return Spool.commit(temporary, path)

    @staticmethod
    def commit(written: Path, path: Path) -> Path:
        """Make a fully written file durable under its final name."""
        _fsync(written)
        os.replace(written, path)
        _fsync(path.parent)
        return path

    def clean_temporary(self, older_than_seconds: float) -> int:
        """Remove what a crash left half written. Only files untouched for `older_than_seconds`: other
        receiver processes may be writing into the same folders (a file being received grows at least
        once per network timeout, or its association is aborted)."""
        cutoff = time.time() - older_than_seconds
        leftovers = [path for path in (*self.incoming.iterdir(), *self.inputs.glob(".tmp-*"), *self.results.glob(".tmp-*"))
                     if path.stat().st_mtime < cutoff]
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        return len(leftovers)

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 2**20


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
