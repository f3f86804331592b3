"""Dynamic batching, as inference servers do it: segment() calls made at the same time from several
threads (the node's worker threads, or its job engine's slots) are gathered into one segment_many()
call, so that each model runs once per batch. A GPU gains most from it; see docs/SCALE-OUT.md for
what it gains on a CPU."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from model.infer import Pipeline, Segmentation


@dataclass
class _Request:
    gray: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    result: Segmentation | None = None
    error: BaseException | None = None


class BatchingPipeline:
    """segment() like Pipeline's; up to `max_batch` calls that arrive within `wait_seconds` of the first
    share one run of each model. An image whose batch fails is run again on its own, so one bad image
    fails only its own call."""

    def __init__(self, pipeline: Pipeline, max_batch: int, wait_seconds: float = 0.02):
        self.pipeline, self.max_batch, self.wait_seconds = pipeline, max_batch, wait_seconds
        self.version = pipeline.version
        self.batch_sizes: list[int] = []  # of every batch run (the gain's evidence)
        self._pending: list[_Request] = []
        self._arrived = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="batching", daemon=True)
        self._thread.start()

    def segment(self, gray: np.ndarray) -> Segmentation:
        request = _Request(gray)
        with self._arrived:
            if self._closed:
                raise RuntimeError("the batching pipeline is closed")
            self._pending.append(request)
            self._arrived.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def close(self) -> None:
        """Stop the batching thread once the calls already made are answered."""
        with self._arrived:
            self._closed = True
            self._arrived.notify_all()
        self._thread.join()

    def _next_batch(self) -> list[_Request]:
        """The next batch; [] once closed and nothing is pending."""
        with self._arrived:
            self._arrived.wait_for(lambda: self._pending or self._closed)
            self._arrived.wait_for(lambda: len(self._pending) >= self.max_batch, self.wait_seconds)
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            return batch

    def _run(self) -> None:
        while batch := self._next_batch():
            self.batch_sizes.append(len(batch))
            try:
                for request, result in zip(batch, self.pipeline.segment_many([r.gray for r in batch])):
                    request.result = result
            except Exception:  # noqa: BLE001 - each image again on its own: its error goes to its caller only
                for request in batch:
                    try:
                        request.result = self.pipeline.segment(request.gray)
                    except Exception as error:  # noqa: BLE001
                        request.error = error
            for request in batch:
                request.done.set()
