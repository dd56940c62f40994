"""`gptdist` command line: parses arguments and calls one library function
per subcommand. The `jobs/` entrypoints call the same functions.

Only argparse is imported up front, and each command loads and validates its
config before it imports Ray, MLflow or the trainer: `--help` and a typo in
`--set` answer at once instead of after seconds of imports.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
from typing import Callable

from gptdist.console import VERBOSE_ENV, quiet_console


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default; the examples in the epilog
    keep their lines. Help that names its default itself (an option whose
    default None means "from the config") is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: ray_config.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable (default: none)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's and MLflow's own log lines (kept in Ray's log folder otherwise)",
    )


def add_command(sub, name: str, summary: str, func: Callable, examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand with the config options every command takes and its
    examples at the end of its --help."""
    p = sub.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter,
                       epilog="examples:\n" + "\n".join(f"  {e}" for e in examples))
    add_config_args(p)
    p.set_defaults(func=func)
    return p


def cmd_prepare(args) -> int:
    """The config gives the defaults, flags override."""
    from data_pipeline.prepare import prepare_dataset
    from data_pipeline.sources import SourceError
    from data_pipeline.manifest import DatasetError

    cfg = args.cfg

    def flag_or(value, default):
        return default if value is None else value

    try:
        prepare_dataset(flag_or(args.source, cfg.data.sources), flag_or(args.out, cfg.data.path),
                        block_size=flag_or(args.block_size, cfg.model.block_size),
                        val_fraction=flag_or(args.val_fraction, cfg.data.val_fraction),
                        text_column=flag_or(args.text_column, cfg.data.text_column),
                        overwrite=args.overwrite, num_cpus=cfg.ray.local_num_cpus)
    except (SourceError, DatasetError) as e:
        print(f"gptdist prepare: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_train(args) -> int:
    from gptdist.driver import train_main

    cfg = args.cfg
    if args.local:
        cfg.ray.address = "local"
    if args.resume:
        cfg.train.run_name = args.resume
    train_main(cfg, force_local=args.local)
    return 0


def cmd_tune(args) -> int:
    from gptdist.tune import tune_main

    result = tune_main(args.cfg, resume=args.resume)
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
    from gptdist.runs import print_runs

    return print_runs(args.cfg, args.experiment, args.sort)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptdist",
        description="Distributed GPT-2 pretraining on Ray, tracked in MLflow.",
        epilog="`gptdist COMMAND --help` shows a command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = add_command(sub, "prepare", "tokenize a corpus into 512-token Parquet blocks", cmd_prepare, [
        "gptdist prepare --source shakespeare --out data/shakespeare",
    ])
    add_prepare_args(p)

    p = add_command(sub, "train", "train a GPT on Ray Train (DDP)", cmd_train, [
        "gptdist train --local --set model.preset=nano --set train.max_steps=20 --set train.run_name=nano-20",
    ])
    p.add_argument("--local", action="store_true", help="start Ray in-process on this machine")
    p.add_argument("--resume", metavar="RUN_NAME",
                   help="continue the run of this name (default: start a new run)")

    p = add_command(sub, "tune", "Ray Tune search over head/layer shapes", cmd_tune, [
        "gptdist tune --set tune.max_steps=50",
        "gptdist tune --resume",
    ])
    p.add_argument("--resume", action="store_true", help="resume an interrupted sweep")

    p = add_command(sub, "sample", "generate text from a checkpoint or MLflow run", cmd_sample, [
        'gptdist sample --from nano-20 --prompt "ROMEO:" --max-new-tokens 100',
    ])
    add_source_args(p)
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="<= 0 means greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--num-samples", type=int, default=1, help="how many samples to print")
    p.add_argument("--stop-at-eot", action="store_true", help="end a sample at the <|endoftext|> token")

    p = add_command(sub, "eval", "loss and perplexity over a prepared split", cmd_eval, [
        "gptdist eval --from nano-20 --split val",
    ])
    add_source_args(p)
    p.add_argument("--split", default="val", choices=["train", "val"], help="which split to evaluate")
    p.add_argument("--data", default=None, help="dataset folder (default: the run's)")

    p = add_command(sub, "export", "export a model to Hugging Face format", cmd_export, [
        "gptdist export --from nano-20 --out exports/nano-20",
    ])
    add_source_args(p)
    p.add_argument("--out", required=True, help="folder to write (required)")
    p.add_argument("--format", default="hf", choices=["hf"], help="output format")

    p = add_command(sub, "runs", "table of MLflow runs", cmd_runs, [
        "gptdist runs --sort val/loss",
        "gptdist runs --set tracking.uri=http://127.0.0.1:5000",
    ])
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: tracking.experiment)")
    p.add_argument("--sort", metavar="METRIC", default=None,
                   help="sort ascending by this metric's latest value (default: the final val loss column)")
    return parser


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="checkpoint folder, runs:/<mlflow-run-id>, or a run name (required)",
    )


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", action="append", default=None,
                   help="corpus source; repeatable (default: data.sources)")
    p.add_argument("--out", default=None, help="output folder (default: data.path)")
    p.add_argument("--val-fraction", type=float, default=None, help="validation share (default: data.val_fraction)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per block (default: model.block_size)")
    p.add_argument("--text-column", default=None,
                   help="text column of .parquet sources (default: data.text_column)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")


# Errors that mean bad input, printed as one clear line, no traceback. Named
# by module rather than imported: the classes live beside Ray, MLflow and
# torch, and reporting a typo in the config must not import them.
USER_ERRORS = [
    ("builtins", "ConnectionError"),
    ("builtins", "FileNotFoundError"),
    ("gptdist.config", "ConfigError"),
    ("gptdist.runs", "RunsError"),
    ("data_pipeline.manifest", "DatasetError"),
    ("gptdist.checkpoint", "CheckpointError"),
    ("gptdist.tokenizer", "TokenizerFileError"),
    ("gptdist.tracking", "TrackingUnavailableError"),
    ("gptdist.preflight", "StorageError"),
    ("gptdist.memory_estimate", "MemoryEstimateError"),
    ("gptdist.memory_estimate", "WorkerOutOfMemoryError"),
]


def is_user_error(error: BaseException) -> bool:
    """Only modules already imported are looked in: an error's class is
    imported before anything can raise it."""
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(error, cls):
            return True
    return False


def run(func: Callable, args) -> int:
    with quiet_console():  # Ray's housekeeping off the console unless --verbose
        return run_quietly(func, args)


def run_quietly(func: Callable, args) -> int:
    from gptdist.config import load_config

    try:
        # Before the command imports Ray, MLflow or the trainer, so that a bad
        # value fails at once; every command takes it from args.cfg.
        args.cfg = load_config(args.config, args.overrides)
        return func(args) or 0
    except KeyboardInterrupt:
        print(f"gptdist {args.command}: interrupted", file=sys.stderr)
        return 130  # the shell's code for a command ended by SIGINT
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"gptdist {args.command}: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # read by gptdist.console, here and in Ray's workers
    # The interpreter's last garbage collections at exit walk every object
    # torch, Ray and MLflow created: about 1 s after the command is done.
    # Frozen objects are skipped; Python never promised their __del__ at exit.
    atexit.register(gc.freeze)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
