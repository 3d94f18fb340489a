"""The `distill` command line: one console script, one subcommand per stage."""
