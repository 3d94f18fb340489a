"""`distill config show|validate RECIPE [overrides]`."""

from __future__ import annotations

import argparse


def register(sub, add_recipe_args) -> None:
    p = sub.add_parser("config", help="print or validate a resolved recipe")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the recipe with defaults and overrides "
                                        "applied")
    add_recipe_args(show)
    show.set_defaults(func=_show)
    val = csub.add_parser("validate", help="also check the recipe against the teacher "
                                           "model (shapes, heads, layer maps)")
    add_recipe_args(val)
    val.set_defaults(func=_validate)


def _show(args: argparse.Namespace) -> int:
    from distill_common.config import to_yaml

    print(to_yaml(args.load_recipe()).rstrip("\n"))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from launcher.recipe import validate_recipe

    validate_recipe(args.load_recipe())
    print(f"{args.recipe}: ok")
    return 0
