"""The `cxr-node` command: serve | status | echo | retry | predict | evaluate | train."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _config(args):
    from dicom_node.config import load_config

    return load_config(Path(args.config) if args.config else None)


def cmd_serve(args) -> int:
    from dicom_node.service import serve

    return serve(_config(args))


def cmd_status(args) -> int:
    import json

    from dicom_node.queue import Queue

    config = _config(args)
    database = config.state_dir / "queue.sqlite3"
    if not database.exists():
        print(f"cxr-node status: no queue at {database} (has the node run with this configuration?)", file=sys.stderr)
        return 1
    queue = Queue(database)
    report = {"state_dir": str(config.state_dir), **queue.counts(), "last_errors": queue.last_errors()}
    if args.uid:
        report = queue.instance(args.uid) or {"error": f"unknown SOP Instance UID {args.uid}"}
    print(json.dumps(report, indent=1, default=str))
    return 0


def cmd_echo(args) -> int:
    from dicom_node.sender import echo

    config = _config(args)
    if not config.destinations:
        print("no destinations configured: results are written to", config.results_dir)
        return 0
    failures = 0
    for destination in config.destinations:
        ok, message = echo(config, destination)
        failures += not ok
        print(f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port}): "
              f"{'ok' if ok else 'FAILED'} - {message}")
    return 1 if failures else 0


def cmd_retry(args) -> int:
    from dicom_node.queue import Queue

    queue = Queue(_config(args).state_dir / "queue.sqlite3")
    count = queue.retry_failed(args.uid)
    print(f"{count} failed instance(s) queued again")
    return 0 if count or not args.uid else 1


def cmd_predict(args) -> int:
    from dicom_node.pixels import read_image
    from model.infer import load_pipeline
    from model.predict import predict_images

    pipeline = load_pipeline(threads=args.threads)
    failures = []

    def readable():
        for path in args.files:
            try:
                yield Path(path).name, read_image(Path(path))
            except (OSError, ValueError) as error:
                failures.append(path)
                print(f"cxr-node predict: {path}: {error}", file=sys.stderr)

    rows = predict_images(readable(), pipeline, Path(args.out))
    print(f"{len(rows)} image(s) written to {args.out}; {len(failures)} failed")
    return 1 if failures else 0


def cmd_evaluate(args) -> int:
    from model.evaluate import evaluate
    from model.infer import load_pipeline

    evaluate(Path(args.data), Path(args.out), load_pipeline(threads=args.threads), split=args.split)
    return 0


def cmd_train(args) -> int:
    from model.train import run

    run(Path(args.data), Path(args.out), lung_epochs=args.lung_epochs, opacity_epochs=args.opacity_epochs,
        fine_tune_epochs=args.fine_tune_epochs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-node", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", help="site TOML overriding config/default.toml (default: embedded defaults)")

    commands.add_parser("serve", parents=[config], help="run the DICOM node").set_defaults(handler=cmd_serve)
    status = commands.add_parser("status", parents=[config], help="queue counts and last errors (JSON)")
    status.add_argument("--uid", help="show one instance by SOP Instance UID")
    status.set_defaults(handler=cmd_status)
    commands.add_parser("echo", parents=[config], help="C-ECHO every destination").set_defaults(handler=cmd_echo)
    retry = commands.add_parser("retry", parents=[config], help="queue failed instances again")
    retry.add_argument("--uid", help="only this SOP Instance UID (default: every failed instance)")
    retry.set_defaults(handler=cmd_retry)

    predict = commands.add_parser("predict", help="lung and opacity masks for PNG, JPEG or DICOM files")
    predict.add_argument("files", nargs="+")
    predict.add_argument("--out", required=True, help="folder for masks and predictions.csv")
    predict.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    predict.set_defaults(handler=cmd_predict)

    evaluate = commands.add_parser("evaluate", help="score the shipped models on an annotated folder")
    evaluate.add_argument("--data", required=True, help="folder laid out like shared/data/cxr (images.csv, ...)")
    evaluate.add_argument("--out", required=True)
    evaluate.add_argument("--split", default="all", choices=("all", "train", "val", "test"),
                          help="only images of this split of model/split.csv (default: all images)")
    evaluate.add_argument("--threads", type=int, default=2)
    evaluate.set_defaults(handler=cmd_evaluate)

    train = commands.add_parser("train", help="train both models (resumes from checkpoints in --out)")
    train.add_argument("--data", required=True)
    train.add_argument("--out", required=True)
    train.add_argument("--lung-epochs", type=int, default=16)
    train.add_argument("--opacity-epochs", type=int, default=15)
    train.add_argument("--fine-tune-epochs", type=int, default=4)
    train.set_defaults(handler=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dicom_node.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"cxr-node: configuration error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
