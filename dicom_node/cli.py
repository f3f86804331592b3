"""The `cxr-node` command: serve | status | history | echo | retry | predict | evaluate | train."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _config(args):
    from dicom_node.config import load_config

    return load_config(Path(args.config) if args.config else None)


def cmd_serve(args) -> int:
    from dicom_node.service import serve

    return serve(_config(args), args.role)


# Keys whose epoch seconds `status` prints as local ISO 8601 times with their UTC offset.
TIME_KEYS = {"at", "next_attempt_at", "received_at", "updated_at", "last_error_at", "created_at", "sent_at"}


def readable_times(value):
    from datetime import datetime

    if isinstance(value, dict):
        return {key: datetime.fromtimestamp(item).astimezone().isoformat(timespec="seconds")
                if key in TIME_KEYS and isinstance(item, (int, float)) else readable_times(item)
                for key, item in value.items()}
    return [readable_times(item) for item in value] if isinstance(value, list) else value


def cmd_status(args) -> int:
    import json
    from collections import Counter
    from dataclasses import asdict

    from dicom_node.queue import open_queue

    config = _config(args)
    database = config.state_dir / "queue.sqlite3"
    if config.queue_backend == "sqlite" and not database.exists():
        print(f"cxr-node status: no queue at {database} (has the node run with this configuration?)", file=sys.stderr)
        return 1
    queue = open_queue(config)
    report = {"state_dir": str(config.state_dir), "queue": config.queue_backend,
              "processes": queue.processes(config.liveness_seconds), **queue.counts(),
              "last_errors": queue.last_errors()}
    if args.uid:
        job = queue.instance(args.uid)
        if job is None:
            print(f"cxr-node status: unknown SOP Instance UID {args.uid}", file=sys.stderr)
            return 1
        results = queue.results_of(args.uid)  # 'done' is the analysis; these say what became of its results
        report = {**asdict(job), "delivery": dict(Counter(str(r.state) for r in results)),
                  "results": [asdict(r) for r in results]}
    print(json.dumps(readable_times(report), indent=1, default=str))
    return 0


def cmd_history(args) -> int:
    """A patient's films on this node and what was measured on each, in the order they were taken."""
    from dicom_node.history import history_key, patient_key
    from dicom_node.queue import open_queue

    config = _config(args)
    secret = history_key(config.history_key_file, create=False)
    if secret is None or config.queue_backend == "sqlite" and not (config.state_dir / "queue.sqlite3").exists():
        print(f"cxr-node history: no history here (no {config.history_key_file} or queue)", file=sys.stderr)
        return 1
    films = open_queue(config).films(patient_key(secret, args.patient, args.issuer))
    if not films:
        print("cxr-node history: no films of this patient on this node", file=sys.stderr)
        return 1
    print("| taken | opacity % (right, left) | Brixia | model | study | source instance | SR |")
    print("|---|---|---|---|---|---|---|")
    for film in films:
        f = film.figures
        print(f"| {film.taken} | {f['opacity_pct']:.1f} ({f['right_pct']:.1f}, {f['left_pct']:.1f}) | "
              f"{f['brixia_global'] if f['brixia_global'] is not None else '-'} | {film.model_version} | "
              f"{film.study_uid} | {film.source_uid} | {film.sr_uid} |")
    return 0


def cmd_echo(args) -> int:
    """What a process of `--role` uses: this node's own port (C-ECHO, as a sender it allows would; all,
    receiver), the queue (every role) and every destination (all, worker; a DICOMweb one by a QIDO-RS query)."""
    from dicom_node.config import Destination
    from dicom_node.dicomweb_sender import check as check_dicomweb
    from dicom_node.queue import QueueUnavailable, open_queue
    from dicom_node.sender import echo

    config = _config(args)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(config.bind, config.bind)
    checks, failures = [], 0
    if args.role != "worker":
        if config.tls:
            print(f"this node ({config.ae_title}@{host}:{config.port}): not checked - its port requires DICOM TLS")
        else:
            calling = config.allowed_calling_aes[0] if config.allowed_calling_aes else "ECHOSCU"
            checks.append((Destination("this node", config.ae_title, host, config.port), calling))
    database = config.state_dir / "queue.sqlite3"
    if config.queue_backend == "sqlite" and not database.exists():
        print(f"queue (sqlite): not made yet - the node makes {database} at its first start")
    else:
        try:
            queue = open_queue(config)
            queue.counts()
            queue.close()
            print(f"queue ({config.queue_backend}): ok")
        except QueueUnavailable as error:
            failures += 1
            print(f"queue ({config.queue_backend}): FAILED - {error}")
    if args.role != "receiver":
        checks += [(destination, None) for destination in config.destinations]
    for destination, calling in checks:
        if destination.dicomweb:  # a STOW-RS destination: is its DICOMweb service there, and are we let in?
            ok, message = check_dicomweb(destination.dicomweb, config.network_timeout)
            where = destination.dicomweb.url
        else:
            ok, message = echo(config, destination, calling)
            where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        failures += not ok
        print(f"{destination.name} ({where}): {'ok' if ok else 'FAILED'} - {message}")
    if args.role != "receiver" and not config.destinations:
        print(f"no destinations configured: results are written to {config.results_dir}")
    return 1 if failures else 0


def cmd_retry(args) -> int:
    from dicom_node.queue import open_queue

    queue = open_queue(_config(args))
    instances, results = queue.retry_failed(args.uid), queue.retry_failed_results(args.uid)
    print(f"{instances} failed instance(s) queued again; {results} refused result(s) to be sent again")
    return 0 if instances or results or not args.uid else 1


def cmd_predict(args) -> int:
    from dicom_node.predict import predict_files
    from model.infer import load_pipeline

    rows, failures = predict_files([Path(f) for f in args.files], load_pipeline(threads=args.threads), Path(args.out))
    for path, error in failures:
        print(f"cxr-node predict: {path}: {error}", file=sys.stderr)
    analysed = sum(row["frontal_chest"] for row in rows)
    print(f"{analysed} frontal chest image(s) analysed, {len(rows) - analysed} skipped (see predictions.csv), "
          f"{len(failures)} unreadable; written to {args.out}")
    return 1 if failures else 0


def cmd_evaluate(args) -> int:
    if args.evidence:
        if not args.out:
            raise SystemExit("evaluate: --evidence needs --out")
        from model.evidence import evaluate_evidence

        evaluate_evidence(Path(args.evidence), Path(args.out))
        return 0
    if not args.data:
        raise SystemExit("evaluate: --data is required (or --evidence DIR)")
    if args.locked_test:
        return score_locked_test_once(args)
    if args.repeatability:
        from model.infer import WEIGHTS_DIR, load_pipeline
        from model.repeatability import measure, write_change_limits

        quex = Path(args.quex) if args.quex else Path(args.data).parent / "covid-qu-ex"
        doc = measure(Path(args.data), quex, load_pipeline(threads=args.threads), Path(args.repeatability))
        print("change limits written to the manifest:", write_change_limits(doc, WEIGHTS_DIR))
        return 0
    if args.cv:
        from model.training import cross_validated_report

        cross_validated_report(Path(args.data), Path(args.cv), Path(args.quex) if args.quex else None)
        return 0
    if not args.out:
        raise SystemExit("evaluate: --out is required (or --cv RUN_DIR)")
    from model.evaluate import evaluate
    from model.infer import load_pipeline

    evaluate(Path(args.data), Path(args.out), load_pipeline(threads=args.threads), split=args.split)
    return 0


def score_locked_test_once(args) -> int:
    """The locked test set is scored once, by the model to ship: an existing file is never overwritten."""
    out = Path(args.locked_test)
    if out.exists():
        raise SystemExit(f"evaluate: {out} exists: the locked test set is scored once (model/README.md)")
    from model.evaluate import score_locked_test
    from model.infer import load_pipeline

    quex = Path(args.quex) if args.quex else Path(args.data).parent / "covid-qu-ex"
    score_locked_test(Path(args.data), quex, load_pipeline(threads=args.threads), out,
                      sheet_path=out.with_name("contact-sheet-locked.png"))
    return 0


def cmd_train(args) -> int:
    from dataclasses import replace

    from model.training import Recipe, run

    recipe = replace(Recipe(), **{name: value for name, value in vars(args).items()
                                  if name in Recipe.__dataclass_fields__ and value is not None})
    run(Path(args.data), Path(args.out), recipe, quex_dir=args.quex)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-node", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", help="site TOML overriding config/default.toml (default: embedded defaults)")

    serve = commands.add_parser("serve", parents=[config], help="run the DICOM node")
    serve.add_argument("--role", choices=("all", "receiver", "worker"), default="all",
                       help="all (default): receive, analyse, send; receiver: only receive (what "
                            "`node.receiver_processes` starts; with PostgreSQL, on any host); worker: only analyse "
                            "and send (PostgreSQL only)")
    serve.set_defaults(handler=cmd_serve)
    status = commands.add_parser("status", parents=[config],
                                 help="the node's processes, queue counts and last errors (JSON)")
    status.add_argument("--uid", help="show one instance by SOP Instance UID")
    status.set_defaults(handler=cmd_status)
    history = commands.add_parser("history", parents=[config], help="a patient's films and figures on this node")
    history.add_argument("--patient", required=True, help="Patient ID (the history keeps only a hash of it)")
    history.add_argument("--issuer", default="", help="Issuer of Patient ID, if the films carry one")
    history.set_defaults(handler=cmd_history)
    echo = commands.add_parser("echo", parents=[config], help="check what a process of the role uses: C-ECHO this "
                               "node, the queue, C-ECHO every DIMSE destination, QIDO-RS every DICOMweb one (exit 1 "
                               "if one fails)")
    echo.add_argument("--role", choices=("all", "receiver", "worker"), default="all",
                      help="all (default): this node's port, the queue and the destinations; receiver: the port "
                           "and the queue; worker: the queue and the destinations")
    echo.set_defaults(handler=cmd_echo)
    retry = commands.add_parser("retry", parents=[config], help="queue failed instances and refused results again")
    retry.add_argument("--uid", help="only this SOP Instance UID: a source instance (and its refused results) or "
                                     "one result (default: everything failed)")
    retry.set_defaults(handler=cmd_retry)

    predict = commands.add_parser("predict", help="lung and opacity masks for PNG, JPEG or DICOM files")
    predict.add_argument("files", nargs="+", help="PNG, JPEG or DICOM files (DICOM pass the same frontal-chest "
                                                    "filter as `serve`; others the lung-plausibility check)")
    predict.add_argument("--out", required=True, help="folder for masks and predictions.csv")
    predict.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    predict.set_defaults(handler=cmd_predict)

    evaluate = commands.add_parser("evaluate", help="score the shipped models on an annotated folder")
    evaluate.add_argument("--data", help="folder laid out like shared/data/cxr (images.csv, ...)")
    evaluate.add_argument("--evidence", metavar="DIR",
                          help="instead: recompute the model card's figures, with patient-level 95 %% intervals, from "
                               "the committed per-image predictions in DIR (model/evidence) into --out/metrics.json")
    evaluate.add_argument("--out", help="folder for metrics.json, per_image.csv, ROC, scatter and overlay PNGs")
    evaluate.add_argument("--cv", metavar="RUN_DIR",
                          help="instead: re-score the cross-validation of a finished `cxr-node train` run from its "
                               "fold checkpoints, writing RUN_DIR/cv/ and RUN_DIR/ablation.json (needs the [train] extra)")
    evaluate.add_argument("--locked-test", metavar="FILE",
                          help="instead: score the locked test set (model/locked_test.csv) with the shipped model into "
                               "FILE (model/evidence/locked.json); once: an existing FILE is never overwritten")
    evaluate.add_argument("--repeatability", metavar="FILE",
                          help="instead: measure how much the figures move between copies of one film and between "
                               "same-day films of one patient, into FILE (model/evidence/repeatability.json)")
    evaluate.add_argument("--quex", help="with --cv, --locked-test or --repeatability: the COVID-QU-Ex folder (default: covid-qu-ex "
                                         "beside --data)")
    evaluate.add_argument("--split", default="all", choices=("all", "train", "val", "test"),
                          help="only images of this split of model/split.csv (default: all images)")
    evaluate.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    evaluate.set_defaults(handler=cmd_evaluate)

    train = commands.add_parser("train", help="train, cross-validate and export both models (resumes from "
                                              "checkpoints in --out; recipe defaults in model/training/recipe.py)")
    train.add_argument("--data", required=True, help="the Cohen-collection folder (shared/data/cxr layout)")
    train.add_argument("--quex", help="the COVID-QU-Ex folder (default: covid-qu-ex beside --data)")
    train.add_argument("--out", required=True, help="run folder: caches, checkpoints, CV report, weights/")
    train.add_argument("--retrain-lungs", action="store_true", default=None,
                       help="train the lung model too (default: reuse the shipped lungs)")
    for name in ("lung_epochs", "quex_epochs", "cohen_epochs", "folds"):
        train.add_argument("--" + name.replace("_", "-"), type=int, help=f"recipe field {name}")
    train.set_defaults(handler=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dicom_node.config import ConfigError
    from dicom_node.queue import QueueUnavailable, SchemaTooNew

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"cxr-node: configuration error: {error}", file=sys.stderr)
        return 2
    except SchemaTooNew as error:
        print(f"cxr-node: {error}", file=sys.stderr)
        return 2
    except QueueUnavailable as error:  # e.g. PostgreSQL down at start-up: systemd starts the node again
        print(f"cxr-node: queue unavailable: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
