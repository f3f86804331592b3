"""The `cxr-node` command: serve | status | echo | predict | evaluate | train."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
