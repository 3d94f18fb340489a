"""Subcommands of this stage (being built)."""


def register(sub, add_recipe_args) -> None:
    pass
