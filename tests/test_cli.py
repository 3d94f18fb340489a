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


def test_finetune_and_report_errors_name_the_key_as_typed(capsys):
    """A bad `distill finetune` / `distill report` override is named as the user wrote it
    (finetune.learning_rates on the command line), before any model or data is read."""
    rc = main(["finetune", "/no/such/model", "bbc_news", "finetune.learning_rates=[1e-4,1e-4]"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: command line: finetune.learning_rates: ")
    assert "listed twice" in err and "/no/such/model" not in err
    rc = main(["report", "--model", "a=/no/such/model", "--out", "/tmp/unused",
               "report.latency_repeats=-1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: command line: report.latency_repeats: "), err


def test_parser_builds_without_heavy_imports():
    # `distill --help` must stay fast: building the parser imports no torch/ray/deepspeed.
    code = ("import sys; from distill_cli.main import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'ray', 'deepspeed', 'transformers') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert build_parser().prog == "distill"


def test_version(capsys):
    from distill_common import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"distill {__version__}"


def test_options_anywhere_on_the_line(capsys, tmp_path):
    """Options before, between and after the positionals and overrides, global ones too."""
    rc = main(["config", "show", "-v", "debug", "seed=7", "--all-ranks",
               f"output_dir={tmp_path}"])
    assert rc == 0 and "seed: 7" in capsys.readouterr().out
    parser = build_parser()
    args = parser.parse_args(["finetune", "MODEL", "--out", "o", "TASK", "finetune.epochs=2",
                              "-v", "task.split.seed=1"])
    assert (args.model_dir, args.task, args.out, args.verbose) == ("MODEL", "TASK", "o", True)
    assert args.overrides == ["finetune.epochs=2", "task.split.seed=1"]
    args = parser.parse_args(["--all-ranks", "launch", "debug", "--cluster", "local",
                              "train.max_steps=2", "--dry-run"])
    assert args.all_ranks and args.dry_run and args.overrides == ["train.max_steps=2"]
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "MODEL", "TASK", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_finetune_overrides_are_dotted_like_every_command(capsys, tmp_path):
    """`finetune.<key>=` and `task.<key>=`; the old bare form is refused with the new one."""
    rc = main(["finetune", "MODEL", "bbc_news", "epochs=2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: override 'epochs=2': keys are dotted")
    assert "finetune.epochs=2 for a fine-tuning setting" in err
    assert "task.epochs=2 for the task recipe" in err
    rc = main(["report", "--model", "a=MODEL", "--out", str(tmp_path), "latency_repeats=2"])
    assert rc == 2 and "report.latency_repeats=2 for a report setting" in \
        capsys.readouterr().err
