"""Liveness of the node's loops: each loop beats when it makes progress; the process is alive while every
loop beat within `processing.liveness_seconds`. /healthz and the systemd watchdog ping follow it, so a
loop that died or cannot work (queue locked, database down) shows, and systemd restarts a stuck node.

A loop that fails (a queue or claim error) retries with backoff instead of ending: `Loop` logs the
first failure with its cause, a changed cause again, and the recovery once."""
from __future__ import annotations

import threading
import time
from typing import Callable

from dicom_node.logs import log

BACKOFF_MAX_SECONDS = 10  # a failing loop tries again at least this often, so it resumes soon after the cause ends


def cause(error: BaseException) -> str:
    """What went wrong, never empty: the exception's type and message, then what caused it."""
    parts = []
    while error is not None and len(parts) < 3:
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        parts.append(f"{type(error).__name__}: {text}" if text else type(error).__name__)
        error = error.__cause__ or error.__context__
    return " <- ".join(parts)[:500]


class Liveness:
    """The last beat of every loop of this process."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._beats: dict[str, float] = {}
        self._lock = threading.Lock()

    def beat(self, loop: str) -> None:
        with self._lock:
            self._beats[loop] = time.monotonic()

    def ages(self) -> dict[str, float]:
        """{loop: seconds since its last beat} of every watched loop."""
        now = time.monotonic()
        with self._lock:
            return {loop: round(now - beat, 1) for loop, beat in self._beats.items()}

    def stalled(self) -> dict[str, float]:
        """ages() of the loops silent for longer than `seconds`."""
        return {loop: age for loop, age in self.ages().items() if age > self.seconds}

    def alive(self) -> bool:
        return not self.stalled()


class Loop:
    """One loop's progress and failures: `ok()` after each successful round, `failed(error)` after a
    failed one (returns how long to wait before the next: 1 s doubling up to BACKOFF_MAX_SECONDS)."""

    def __init__(self, name: str, liveness: Liveness | None):
        """`liveness` None: the loop runs too seldom (hourly) to be watched; its failures are still handled."""
        self.name, self.liveness = name, liveness
        self.failures, self.failing_since, self.last_cause = 0, None, ""
        self.next_try = 0.0  # monotonic time before which a timer-driven loop skips its round
        self.ok(quiet=True)

    def ok(self, quiet: bool = False) -> None:
        if self.liveness:
            self.liveness.beat(self.name)
        if self.failures and not quiet:
            log("loop working again", loop=self.name, failures=self.failures,
                failed_for_s=round(time.monotonic() - self.failing_since, 1), last_error=self.last_cause)
        self.failures, self.failing_since, self.last_cause = 0, None, ""

    def failed(self, error: BaseException) -> float:
        text = cause(error)
        if not self.failures:
            self.failing_since = time.monotonic()
        if text != self.last_cause:  # the first failure, or a new cause: once each, not every round
            log("loop failed; retrying with backoff", 40, loop=self.name, error=text, failures=self.failures + 1)
        self.failures, self.last_cause = self.failures + 1, text
        delay = min(BACKOFF_MAX_SECONDS, 2.0 ** (self.failures - 1))
        self.next_try = time.monotonic() + delay
        return delay


def guarded(loop: Loop, function: Callable, *args) -> Callable[[], None]:
    """A timer's job: `function(*args)` unless the loop is backing off; any error is the loop's failure,
    never the timer's end."""
    def run() -> None:
        if time.monotonic() < loop.next_try:
            return
        try:
            function(*args)
        except Exception as error:
            loop.failed(error)
            return
        loop.ok()
    return run
