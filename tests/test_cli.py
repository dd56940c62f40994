import subprocess
import sys

import pytest

from gptdist.cli import build_parser, main

SUBCOMMANDS = ["prepare", "train", "tune", "sample", "eval", "export", "runs"]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_every_subcommand_has_a_handler():
    parser = build_parser()
    for name in SUBCOMMANDS:
        args = parser.parse_args([name] + (["--from", "x"] if name in ("sample", "eval", "export") else [])
                                 + (["--out", "y"] if name == "export" else []))
        assert callable(args.func)


def test_config_error_exits_2_with_the_key(capsys):
    assert main(["train", "--set", "train.max_steps=ten"]) == 2
    assert "train.max_steps='ten' must be an integer" in capsys.readouterr().err


def test_jobs_module_is_the_same_command():
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--set", "model.n_head=5"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "n_embd=384 is not divisible by model.n_head=5" in out.stderr
