"""`gptdist` command line: parses arguments and calls one library function
per subcommand. The `jobs/` entrypoints call the same functions."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: ray_config.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable",
    )


def _load(args):
    from gptdist.config import load_config

    return load_config(args.config, args.overrides)


def cmd_prepare(args) -> int:
    from data_pipeline.prepare import main_from_args

    return main_from_args(args)


def cmd_train(args) -> int:
    from gptdist.trainer import train_main

    cfg = _load(args)
    if args.local:
        cfg.ray.address = "local"
    if args.resume:
        cfg.train.run_name = args.resume
    train_main(cfg, force_local=args.local)
    return 0


def cmd_tune(args) -> int:
    from gptdist.tune import tune_main

    result = tune_main(_load(args), resume=args.resume)
    return 130 if result.get("interrupted") else 0  # 130: stopped by Ctrl-C


def cmd_sample(args) -> int:
    from gptdist.sampling import sample_main

    return sample_main(args)


def cmd_eval(args) -> int:
    from gptdist.evaluate import eval_main

    return eval_main(args)


def cmd_export(args) -> int:
    from gptdist.export import export_main

    return export_main(args)


def cmd_runs(args) -> int:
    from gptdist.runs import runs_main

    return runs_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptdist",
        description="Distributed GPT-2 pretraining on Ray, tracked in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="tokenize a corpus into 512-token Parquet blocks")
    add_prepare_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a GPT on Ray Train (DDP)")
    add_config_args(p)
    p.add_argument("--local", action="store_true", help="start Ray in-process on this machine")
    p.add_argument("--resume", metavar="RUN_NAME", help="continue the run of this name")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="Ray Tune search over head/layer shapes")
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="resume an interrupted sweep")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("sample", help="generate text from a checkpoint or MLflow run")
    add_source_args(p)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="<= 0 means greedy")
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--stop-at-eot", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="loss and perplexity over a prepared split")
    add_source_args(p)
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--data", default=None, help="dataset folder (default: the run's)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a model to Hugging Face format")
    add_source_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="hf", choices=["hf"])
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("runs", help="table of MLflow runs")
    add_config_args(p)
    p.add_argument("--experiment", default=None)
    p.add_argument("--sort", default="val/loss", help="metric to sort by (ascending)")
    p.set_defaults(func=cmd_runs)
    return parser


def add_source_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="checkpoint folder, runs:/<mlflow-run-id>, or a run name",
    )


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--source", action="append", default=None, help="corpus source; repeatable")
    p.add_argument("--out", default=None, help="output folder (default: data.path)")
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--text-column", default=None)
    p.add_argument("--overwrite", action="store_true")


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input, printed as one clear line, no traceback."""
    from data_pipeline.manifest import DatasetError
    from gptdist.checkpoint import CheckpointError
    from gptdist.config import ConfigError
    from gptdist.tokenizer import TokenizerFileError
    from gptdist.tracking import TrackingUnavailableError
    from gptdist.memory_estimate import MemoryEstimateError, WorkerOutOfMemoryError
    from gptdist.trainer import StorageError

    return (ConfigError, DatasetError, CheckpointError, TokenizerFileError, TrackingUnavailableError,
            StorageError, ConnectionError, FileNotFoundError, MemoryEstimateError, WorkerOutOfMemoryError)


def run(func: Callable, args) -> int:
    try:
        return func(args) or 0
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(("gptdist.", "data_pipeline.")):
            print(f"gptdist {args.command}: not implemented yet ({e.name})", file=sys.stderr)
            return 2
        raise
    except user_errors() as e:
        print(f"gptdist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptdist {args.command}: interrupted", file=sys.stderr)
        return 130  # the shell's code for a command ended by SIGINT


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
