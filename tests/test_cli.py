"""The one console script: subcommands listed, each --help works, errors are clean."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distill_cli.main import build_parser, main

SUBCOMMANDS = ["assets", "prep", "pretrain", "init", "export", "finetune", "report", "launch", "run",
               "config"]


def test_top_level_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in SUBCOMMANDS:
        assert f"    {cmd}" in out, f"`distill --help` does not list {cmd}"


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_each_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: distill " + cmd in capsys.readouterr().out


def test_console_script_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "distill_cli", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "prep" in proc.stdout


def test_config_show_prints_resolved_recipe(capsys, tmp_path):
    rc = main(["config", "show", "debug", "seed=7", f"output_dir={tmp_path}"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "seed: 7" in out and f"output_dir: {tmp_path}/shards" in out


def test_config_error_is_one_clean_line(capsys):
    rc = main(["config", "show", "debug", "train.no_such_knob=1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.no_such_knob" in err
    assert "Traceback" not in err


def test_parser_builds_without_heavy_imports():
    # `distill --help` must stay fast: building the parser imports no torch/ray/deepspeed.
    code = ("import sys; from distill_cli.main import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'ray', 'deepspeed', 'transformers') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert build_parser().prog == "distill"
