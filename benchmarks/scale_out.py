"""Scale-out figures on one machine with the PostgreSQL queue (docs/SCALE-OUT.md):

1. the queue's own ceiling: jobs claimed and finished per second by 16 concurrent claimers (4 worker
   processes x 4 procrastinate slots) whose "model" does nothing (each job: claim, start, record, finish);
2. images per minute analysed by 1, 2 and 3 `cxr-node serve --role worker` processes (real models,
   full-size radiographs, results written to results_dir), from a queue filled at once.

    .venv/bin/python benchmarks/scale_out.py [--jobs 2000] [--images 60]
Starts its own PostgreSQL (Debian's, as tests/harness.py does). Prints Markdown tables."""
from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dicom_node.config import load_config  # noqa: E402
from dicom_node.queue import State  # noqa: E402
from dicom_node.queue.postgresql import PostgresQueue  # noqa: E402
from tests.harness import Node, PostgreSQL, chest_copies, wait_for  # noqa: E402
from tests.test_faults import SOURCES  # noqa: E402

CLAIMER_PROCESSES, SLOTS = 4, 4


class NoModel:
    """Stands in for the Worker: the job is recorded as done without reading or analysing anything."""
    destinations: list[str] = []
    process_id = None

    def __init__(self, queue: PostgresQueue):
        self.queue = queue

    def process(self, job) -> State:
        self.queue.skip(job.sop_uid, "benchmark: no model", "benchmark")
        return State.SKIPPED


def site_config(folder: Path, dsn: str):
    (folder / "bench.toml").write_text(f'[storage]\nstate_dir = "{folder / "state"}"\n'
                                       f'[queue]\nbackend = "postgresql"\ndsn = "{dsn}"\n')
    return load_config(folder / "bench.toml")


def claimer(folder: Path, dsn: str) -> None:
    import asyncio

    from procrastinate.worker import Worker as Engine

    from dicom_node.engines.cluster import build_app
    config = site_config(folder, dsn)
    queue = PostgresQueue(dsn)
    app = build_app(config, queue, NoModel(queue), sender=None)

    async def run():
        async with app.open_async():
            await Engine(app=app, queues=["analyse"], concurrency=SLOTS, wait=False, install_signal_handlers=False,
                         delete_jobs="successful").run()
    asyncio.run(run())


def claims_per_second(server: PostgreSQL, folder: Path, jobs: int) -> tuple[float, float]:
    """(instances promoted per second, each with its job deferred, from one process; jobs claimed and
    finished per second by 16 claimers)."""
    from dicom_node.engines.cluster import build_app, install_schema
    dsn = server.create_database("claims")
    queue = PostgresQueue(dsn)
    install_schema(dsn)
    uids = [f"1.2.826.0.1.3680043.10.1.{index}" for index in range(jobs)]
    queue._transaction(lambda db: [db.execute(
        "INSERT INTO instances (sop_uid, study_uid, path, state, received_at, updated_at)"
        " VALUES (?, '1', '', 'received', 0, 0)", (uid,)) for uid in uids])
    app = build_app(site_config(folder, dsn), queue, NoModel(queue), sender=None)
    started = time.perf_counter()
    with app.open():
        while queue.counts()["instances"]["received"]:
            app.tasks["promote"](timestamp=0)  # the periodic promotion, run here: one analyse job per instance
    deferred_s = time.perf_counter() - started
    processes = [multiprocessing.Process(target=claimer, args=(folder, dsn)) for _ in range(CLAIMER_PROCESSES)]
    started = time.perf_counter()
    for process in processes:
        process.start()
    with tqdm(total=jobs, desc="claiming (16 claimers)") as bar:
        while (done := queue.counts()["instances"]["skipped"]) < jobs:
            bar.update(done - bar.n)
            time.sleep(0.2)
        bar.update(done - bar.n)
    claimed_s = time.perf_counter() - started
    for process in processes:
        process.join()
    queue.close()
    return jobs / deferred_s, jobs / claimed_s


def images_per_minute(server: PostgreSQL, folder: Path, images: list[Path], workers: int) -> float:
    dsn = server.create_database(f"workers_{workers}")
    settings = {"queue": {"backend": "postgresql", "dsn": dsn}, "processing": {"stable_seconds": 0, "onnx_threads": 1}}
    nodes = [Node(folder / f"w{workers}-{index}", role="worker", **settings).start() for index in range(workers)]
    queue = PostgresQueue(dsn)
    try:
        started = time.perf_counter()
        for index, image in enumerate(images):
            copy = folder / f"incoming-{index}"
            shutil.copy(image, copy)  # accept() takes the file, as from a receiver's incoming folder
            queue.accept(copy, f"1.2.826.0.1.3680043.10.2.{workers}.{index}", f"2.{index // 4}", "3",
                         "1.2.840.10008.5.1.4.1.1.1", "BENCH")
        with tqdm(total=len(images), desc=f"{workers} worker process(es)") as bar:
            def finished():
                done = queue.counts()["instances"]["done"]
                bar.update(done - bar.n)
                return done == len(images)
            wait_for(finished, 1800, 0.5, "every image analysed")
        return 60 * len(images) / (time.perf_counter() - started)
    finally:
        queue.close()
        for node in nodes:
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--images", type=int, default=60)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cxr-scale-"))
    server = PostgreSQL(Path(tempfile.mkdtemp(prefix="cxr-pg-"))).start()  # a folder the postgres user may enter
    try:
        deferred, claimed = claims_per_second(server, folder, args.jobs)
        images = chest_copies([REPO.parent / "shared" / "data" / "dicom" / s for s in SOURCES], args.images, folder / "images")
        rates = {workers: images_per_minute(server, folder, images, workers) for workers in (1, 2, 3)}
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(server.folder, ignore_errors=True)
    print(f"\n| queue (PostgreSQL, procrastinate), {args.jobs} jobs | per second |\n|---|---|")
    print(f"| instances promoted (job deferred, then marked queued), one process | {deferred:.0f} |")
    print(f"| jobs claimed and finished, {CLAIMER_PROCESSES * SLOTS} claimers, no model | {claimed:.0f} |")
    print(f"\n| worker processes (1 ONNX thread each) | images per minute ({args.images} full-size radiographs) |\n|---|---|")
    for workers, rate in rates.items():
        print(f"| {workers} | {rate:.0f} |")


if __name__ == "__main__":
    main()
