"""Durable files: write to a temporary name, fsync, rename, fsync the folder.

After `write` returns, the file survives a crash or power loss with its full content; a crash
before that leaves only a temporary file, which `clean_temporary` removes at start-up.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

SAFE_NAME = re.compile(r"^[0-9A-Za-z._-]{1,128}$")


class Spool:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.inputs = self.root / "inputs"
        self.results = self.root / "results-spool"
        for folder in (self.inputs, self.results):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    @staticmethod
    def file_name(uid: str) -> str:
        if not SAFE_NAME.match(uid):
            raise ValueError(f"not a usable UID for a file name: {uid!r}")
        return f"{uid}.dcm"

    def input_path(self, sop_uid: str) -> Path:
        return self.inputs / self.file_name(sop_uid)

    def result_path(self, sop_uid: str) -> Path:
        return self.results / self.file_name(sop_uid)

    @staticmethod
    def write(path: Path, data: bytes) -> Path:
        temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return path

    def clean_temporary(self) -> int:
        removed = 0
        for folder in (self.inputs, self.results):
            for leftover in folder.glob(".tmp-*"):
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 2**20
