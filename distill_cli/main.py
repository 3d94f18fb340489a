"""`distill`: one console script, a subcommand per stage.

Each stage package owns its subcommands in its own ``cli.py`` (``register(subparsers)``)
and imports heavy libraries only inside the handlers, so ``distill --help`` is fast.
Handlers receive the parsed ``args``; ``args.load_recipe()`` gives the typed Recipe.

Options go anywhere on a subcommand's line (before, between or after its positionals and
KEY=VALUE overrides), the global ones (-v, --all-ranks) included: each subcommand's
arguments are parsed with argparse's intermixed parsing (``_Subcommands``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from distill_common.errors import DistillUserError
from distill_common.lifeline import install_lifeline
from distill_common.logs import setup_logging

log = logging.getLogger("distill")


def _global_options(parser: argparse.ArgumentParser, in_subcommand: bool) -> None:
    # In a subcommand they default to SUPPRESS: given before the subcommand, they stay.
    kw = {"default": argparse.SUPPRESS} if in_subcommand else {}
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging", **kw)
    parser.add_argument("--all-ranks", action="store_true",
                        help="log from every rank, not only rank 0", **kw)


class _Subcommands(argparse._SubParsersAction):
    """Subcommands parsed with ``parse_known_intermixed_args``: argparse's stock action
    parses a subcommand's arguments in order, so `finetune M T k=v --out X k2=v` was an
    error. A subcommand with its own actions (`config show`) is parsed in order up to
    the action, whose own arguments are then intermixed."""

    def add_parser(self, name, **kwargs):
        parser = super().add_parser(name, **kwargs)
        parser.register("action", "parsers", _Subcommands)
        _global_options(parser, in_subcommand=True)
        return parser

    def __call__(self, parser, namespace, values, option_string=None):
        name, rest = values[0], values[1:]
        if name not in self.choices:  # the stock message, with the choices
            return super().__call__(parser, namespace, values, option_string)
        if self.dest is not argparse.SUPPRESS:
            setattr(namespace, self.dest, name)
        chosen = self.choices[name]
        try:
            parsed, extras = chosen.parse_known_intermixed_args(rest, None)
        except TypeError:  # it has subcommands of its own (intermixed parsing refuses those)
            parsed, extras = chosen.parse_known_args(rest, None)
        if extras:
            chosen.error(f"unrecognized arguments: {' '.join(extras)}")
        for key, value in vars(parsed).items():
            setattr(namespace, key, value)


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (a path, or a name in configs/ such as "
                                       "`debug`)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.max_steps=10 student.num_layers=2")


def _recipe_loader(args):
    def load():
        from launcher.recipe import load_recipe
        return load_recipe(args.recipe, args.overrides)
    return load


def build_parser() -> argparse.ArgumentParser:
    from data_prep import cli as prep_cli
    from distill_cli import assets_cli, config_cli
    from distill_pretrain import cli as pretrain_cli
    from finetune import cli as finetune_cli
    from launcher import cli as launcher_cli

    from distill_common import __version__

    parser = argparse.ArgumentParser(
        prog="distill",
        description="Task-agnostic distillation of pretrained encoders: prep -> pretrain "
                    "-> export -> finetune -> report, locally or on a cluster.")
    parser.register("action", "parsers", _Subcommands)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(parser, in_subcommand=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    assets_cli.register(sub)
    config_cli.register(sub, add_recipe_args)
    prep_cli.register(sub, add_recipe_args)
    pretrain_cli.register(sub, add_recipe_args)
    finetune_cli.register(sub, add_recipe_args)
    launcher_cli.register(sub, add_recipe_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    install_lifeline()  # a rank started by a launcher dies with it (no-op otherwise)
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose, all_ranks=args.all_ranks or None)
    if hasattr(args, "recipe"):
        args.load_recipe = _recipe_loader(args)
    try:
        rc = args.func(args)
    except DistillUserError as err:  # one line; any other exception is a bug: traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `distill config show ... | head`
        sys.stderr.close()
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
